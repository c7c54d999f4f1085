"""The OpenVINO runtime: the same features as torch fp32 (features and layers), part of the config (a resume
with another runtime is refused), cached conversions, clean fallbacks and errors, and bench.

OpenVINO runs in subprocesses only (the CLI, or a short script): the test process itself stays on torch (see
tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

import featurize.runtime as runtime_module
from featurize.backbones import create_backbone
from featurize.engine import resolve_device
from featurize.errors import FeaturizeError
from featurize.runtime import openvino_version, resolve_runtime
from featurize.store import read_store
from pipelines.extract import extract_features

from conftest import ROOT, assert_one_line_error, invoke, photo, write_image

pytestmark = pytest.mark.skipif(openvino_version() is None, reason="OpenVINO is not installed")


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


def _cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env, **kwargs)


def _extract(source, out, runtime, *more, env=None, **kwargs):
    return _cli("extract", source, "--model", "test_efficientnet", "--weights", "random", "--precision", "fp32",
                "--out", out, "--runtime", runtime, "-q", *more, env=env, **kwargs)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openvino_store_equals_the_torch_fp32_store(photos, tmp_path):
    ov = _extract(photos, tmp_path / "ov.h5", "openvino", "--layers", "stages")
    pt = _extract(photos, tmp_path / "pt.h5", "torch", "--layers", "stages")
    assert ov.returncode == 0 and pt.returncode == 0, ov.stderr + pt.stderr
    assert "runtime: openvino" in ov.stdout and "runtime: torch" in pt.stdout
    a, b = read_store(tmp_path / "ov.h5"), read_store(tmp_path / "pt.h5")
    assert _cosines(a.features, b.features).min() >= 0.999
    with h5py.File(tmp_path / "ov.h5") as fa, h5py.File(tmp_path / "pt.h5") as fb:
        for name in a.layer_names:
            assert _cosines(fa[f"layers/{name}"][()], fb[f"layers/{name}"][()]).min() >= 0.999, name
    assert a.attrs["runtime"]["name"] == "openvino" and a.config["runtime"] == "openvino"
    assert a.attrs["runtime"]["precision"] == "fp32" and a.attrs["runtime"]["startup_seconds"]["compile"] >= 0
    assert "runtime" not in b.config  # a torch store keeps the config (and hash) it always had


CACHE_SCRIPT = """
import json, sys
import numpy as np
from featurize.backbones import create_backbone
from featurize.engine import resolve_device
from featurize.runtime import resolve_runtime
backbone = create_backbone("test_resnet", "random")
runs = [resolve_runtime("openvino", backbone, resolve_device("cpu"), "fp32", 4) for _ in range(2)]
x = np.random.default_rng(0).integers(0, 256, size=(3, *backbone.data_config["input_size"]), dtype=np.uint8)
outputs = [r.infer(x)[0] for r in runs]
# streams entering their first inference together (each on its own request) once deadlocked in OpenVINO's
# one-time numpy set-up; resolve_runtime now runs one inference first, on its own thread
import threading
fresh = resolve_runtime("openvino", backbone, resolve_device("cpu"), "fp32", 4)
barrier = threading.Barrier(4)
threads = [threading.Thread(target=lambda: (barrier.wait(), fresh.infer(x)), daemon=True) for _ in range(4)]
[t.start() for t in threads]
[t.join(timeout=60) for t in threads]
print(json.dumps({"cached": [r.cached for r in runs], "convert": [r.seconds["convert"] for r in runs],
                  "shape": list(outputs[0].shape), "diff": float(np.abs(outputs[0] - outputs[1]).max()),
                  "warmed": "first_inference" in fresh.seconds, "hung": sum(t.is_alive() for t in threads)}))
"""


def test_the_converted_model_is_cached_and_the_second_start_is_fast(tmp_path):
    env = {**os.environ, "HEADBENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cached"] == [False, True] and result["convert"][1] < result["convert"][0]
    assert result["shape"][0] == 3 and result["diff"] < 1e-4  # 3 rows out of a batch compiled for 4
    assert result["warmed"] and result["hung"] == 0
    assert len(list((tmp_path / "cache" / "openvino").iterdir())) == 1


def test_a_resume_with_another_runtime_is_refused_naming_it(photos, tmp_path):
    out = tmp_path / "s.h5"
    more = ("--shard-size", "16", "--batch-size", "8")
    killed = _extract(photos, out, "torch", *more, env={**os.environ, "HEADBENCH_FAULT": "after-shard:1"},
                      start_new_session=True)
    assert killed.returncode == -signal.SIGKILL
    other = _extract(photos, out, "openvino", *more)
    assert other.returncode == 1 and "changed: runtime" in other.stderr and "Traceback" not in other.stderr
    same = extract_features(photos, out, model="test_efficientnet", weights="random", precision="fp32", runtime="torch",
                            shard_size=16, batch_size=8, progress=False)  # the CLI's settings, in this process
    assert same.resumed_rows == 32  # shards 0 and 1


def test_auto_falls_back_to_torch_with_one_warning_and_explicit_openvino_fails_cleanly(monkeypatch, runner,
                                                                                       photos, tmp_path):
    monkeypatch.delenv("HEADBENCH_RUNTIME")
    backbone = create_backbone("test_resnet", "random")
    device = resolve_device("cpu")

    def broken(*args, **kwargs):  # stands in for a model OpenVINO cannot convert (OpenVINO itself never runs)
        raise RuntimeError("unsupported operation aten::frobnicate\nmore detail")

    monkeypatch.setattr(runtime_module, "_openvino", broken)
    warnings = []
    chosen = resolve_runtime("auto", backbone, device, "fp32", 8, warn=warnings.append)
    assert chosen.name == "torch" and len(warnings) == 1 and "aten::frobnicate" in warnings[0]
    with pytest.raises(FeaturizeError, match="did not convert .*aten::frobnicate.*use --runtime torch"):
        resolve_runtime("openvino", backbone, device, "fp32", 8)
    result = invoke(runner, ["extract", str(photos), "--model", "test_resnet", "--weights", "random", "--out",
                             str(tmp_path / "x.h5"), "--runtime", "openvino", "-q"])
    assert_one_line_error(result, "did not convert")
    monkeypatch.setenv("HEADBENCH_RUNTIME", "torch")
    assert resolve_runtime("auto", backbone, device, "fp32", 8, warn=warnings.append).name == "torch"
    assert len(warnings) == 1  # the environment chose: nothing to warn about
    monkeypatch.delenv("HEADBENCH_RUNTIME")

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


def test_bench_measures_both_runtimes_in_one_run(tmp_path):
    out = tmp_path / "bench.json"
    done = _cli("bench", "--model", "test_resnet", "--weights", "random", "--image-size", "64", "--num-images", "16",
                "--no-quality",
                "--runtime", "torch,openvino", "--json", out)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    for key in ("openvino_forward_ips", "openvino_end_to_end_ips", "ratio_openvino_vs_torch_forward",
                "ratio_openvino_vs_torch_end_to_end", "openvino_compute_bound_ips",
                "ratio_openvino_end_to_end_vs_compute_bound", "openvino_first_start_s", "openvino_second_start_s"):
        assert data[key] > 0 and key in done.stdout, key
    assert data["ratio_openvino_vs_torch_forward"] == pytest.approx(data["openvino_forward_ips"] / data["forward_ips"])
    assert data["openvino_second_start_s"] < data["openvino_first_start_s"]  # from the cache
