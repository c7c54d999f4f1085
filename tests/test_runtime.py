"""The OpenVINO runtime: the same features as torch fp32 (features and layers), part of the config (a resume
with another runtime is refused), cached conversions, clean fallbacks and errors, predict and bench."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import featurize.runtime as runtime_module
from featurize.backbones import create_backbone
from featurize.engine import resolve_device
from featurize.errors import FeaturizeError
from featurize.runtime import resolve_runtime
from featurize.store import read_store
from pipelines.extract import extract_features

from conftest import ROOT, assert_one_line_error, invoke, photo, write_image

pytest.importorskip("openvino")

TINY = dict(model="test_efficientnet", weights="random", precision="fp32", workers=0, progress=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 crops of real photographs, three classes."""
    root = tmp_path_factory.mktemp("ov-photos")
    rng = np.random.default_rng(0)
    for i in range(48):
        cls, name = [("cat", "chelsea"), ("coffee", "coffee"), ("space", "astronaut")][i % 3]
        img = photo(name)
        y, x = rng.integers(0, img.shape[0] - 96), rng.integers(0, img.shape[1] - 96)
        write_image(root / cls / f"{i:03d}.png", img[y : y + 96, x : x + 96])
    return root


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openvino_store_equals_the_torch_fp32_store(photos, tmp_path):
    ov = extract_features(photos, tmp_path / "ov.h5", runtime="openvino", layers="stages", **TINY)
    pt = extract_features(photos, tmp_path / "pt.h5", runtime="torch", layers="stages", **TINY)
    a, b = read_store(ov.path), read_store(pt.path)
    assert _cosines(a.features.astype(np.float64), b.features.astype(np.float64)).min() >= 0.999
    with __import__("h5py").File(ov.path) as fa, __import__("h5py").File(pt.path) as fb:
        for name in a.layer_names:
            assert _cosines(fa[f"layers/{name}"][()].astype(np.float64),
                            fb[f"layers/{name}"][()].astype(np.float64)).min() >= 0.999, name
    assert a.attrs["runtime"]["name"] == "openvino" and a.config["runtime"] == "openvino"
    assert "runtime" not in b.config  # a torch store keeps the config (and hash) it always had
    assert ov.runtime["precision"] == "fp32" and ov.runtime["startup_seconds"]["compile"] >= 0


def test_the_converted_model_is_cached_and_the_second_start_is_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADBENCH_CACHE", str(tmp_path / "cache"))
    backbone = create_backbone("test_resnet", "random")
    device = resolve_device("cpu")
    first = resolve_runtime("openvino", backbone, device, "fp32", 4)
    second = resolve_runtime("openvino", backbone, device, "fp32", 4)
    assert not first.cached and second.cached and second.seconds["convert"] < first.seconds["convert"]
    x = np.random.default_rng(0).integers(0, 256, size=(3, *backbone.data_config["input_size"]), dtype=np.uint8)
    assert np.array_equal(first.infer(x)[0], second.infer(x)[0])  # padded to the compiled batch of 4
    assert len(list((tmp_path / "cache" / "openvino").iterdir())) == 1


def test_a_resume_with_another_runtime_is_refused_naming_it(photos, tmp_path):
    out = tmp_path / "s.h5"
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", str(photos), "--model", "test_resnet", "--weights",
           "random", "--precision", "fp32", "--out", str(out), "--shard-size", "16", "--batch-size", "8", "-q"]
    killed = subprocess.run(cmd + ["--runtime", "torch"], env={**os.environ, "HEADBENCH_FAULT": "after-shard:1"},
                            capture_output=True, text=True, cwd=ROOT, start_new_session=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    other = subprocess.run(cmd + ["--runtime", "openvino"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert other.returncode == 1 and "changed: runtime" in other.stderr and "Traceback" not in other.stderr
    same = subprocess.run(cmd + ["--runtime", "torch"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert same.returncode == 0 and "resumed" in same.stdout


def test_auto_falls_back_to_torch_with_one_warning_and_explicit_openvino_fails_cleanly(monkeypatch, runner,
                                                                                       photos, tmp_path):
    backbone = create_backbone("test_resnet", "random")
    device = resolve_device("cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation aten::frobnicate\nmore detail")

    monkeypatch.setattr(runtime_module, "_convert", broken)
    warnings = []
    chosen = resolve_runtime("auto", backbone, device, "fp32", 8, warn=warnings.append)
    assert chosen.name == "torch" and len(warnings) == 1 and "aten::frobnicate" in warnings[0]
    with pytest.raises(FeaturizeError, match="did not convert .*aten::frobnicate.*use --runtime torch"):
        resolve_runtime("openvino", backbone, device, "fp32", 8)
    result = invoke(runner, ["extract", str(photos), "--model", "test_resnet", "--weights", "random", "--out",
                             str(tmp_path / "x.h5"), "--runtime", "openvino", "-q"])
    assert_one_line_error(result, "did not convert")

    monkeypatch.setattr(runtime_module, "openvino_version", lambda: None)
    warnings.clear()
    assert resolve_runtime("auto", backbone, device, "fp32", 8, warn=warnings.append).name == "torch"
    assert "pip install openvino" in warnings[0]
    with pytest.raises(FeaturizeError, match="OpenVINO is not installed; pip install openvino"):
        resolve_runtime("openvino", backbone, device, "fp32", 8)
    pixels = create_backbone("pixels", "auto")
    assert resolve_runtime("auto", pixels, device, "auto", 8).name == "torch"


def test_openvino_on_pixels_is_one_clear_error(runner, photos, tmp_path):
    result = invoke(runner, ["extract", str(photos), "--model", "pixels", "--out", str(tmp_path / "p.h5"),
                             "--runtime", "openvino", "-q"])
    assert_one_line_error(result, "the pixels pseudo-backbone has no model to compile")
