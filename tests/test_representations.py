"""Which representation: the pixel baseline, layers from one forward pass, --crop-pct, candidates
(STORE:LAYER, :all, :concat) in compare-heads, rank and predict, and version-1 stores still read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from featurize.backbones import create_backbone
from featurize.sources import DigitsSource
from featurize.store import partial_dir, read_features, read_store
from heads.blocks import BlockStandardScaler
from pipelines.extract import extract_features

from conftest import ROOT, assert_one_line_error, invoke, write_digit_folder

TINY = dict(model="test_resnet", weights="random", precision="fp32", runtime="torch", workers=0, progress=False)
FIXTURE_V1 = ROOT / "tests" / "data" / "store-v1.h5"


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """60 of scikit-learn's digits (classes 0-2) as PNG files in train/test split folders."""
    return write_digit_folder(tmp_path_factory.mktemp("digits"), classes=3, train=15, test=5)


@pytest.fixture(scope="module")
def stores(digit_folder, tmp_path_factory):
    """The same 60 digits as: test_resnet last layer only, test_resnet with every stage, pixels."""
    d = tmp_path_factory.mktemp("stores")
    plain = extract_features(digit_folder, d / "plain.h5", **TINY).path
    staged = extract_features(digit_folder, d / "staged.h5", layers="stages", **TINY).path
    pixels = extract_features(digit_folder, d / "pixels.h5", model="pixels", workers=0, progress=False).path
    return {"plain": plain, "staged": staged, "pixels": pixels}


def test_pixel_store_holds_the_resized_pixels_in_0_1(stores, digit_folder):
    px, plain = read_store(stores["pixels"]), read_store(stores["plain"])
    assert px.shape == (60, 3 * 32 * 32) and px.attrs["backbone"] == "pixels"
    np.testing.assert_array_equal(px.ids, plain.ids)
    np.testing.assert_array_equal(px.labels, plain.labels)
    assert px.features.min() >= 0 and px.features.max() <= 1 and px.features.max() > 0.9
    assert px.attrs["precision"] == "fp32" and px.attrs["weights_source"] == "none"
    assert px.attrs["data_config"]["crop_pct"] == 0.875 and px.attrs["data_config"]["mean"] == [0, 0, 0]
    # The same numbers as resizing the decoded image with the store's own transform.
    backbone = create_backbone("pixels")
    image = DigitsSource().load(int(px.ids[0].split("/d")[1][:4]))
    expected = backbone.image_transform(image).float().div(255).flatten().numpy()
    np.testing.assert_allclose(px.features[0].astype(np.float32), expected, atol=1e-3)


def test_pixels_grayscale_size_and_crop_pct_are_recorded_and_hashed(digit_folder, tmp_path):
    grey = read_store(extract_features(digit_folder, tmp_path / "g.h5", model="pixels", grayscale=True,
                                       image_size=8, crop_pct=1.0, workers=0, progress=False).path)
    assert grey.shape == (60, 64) and grey.attrs["pooling"] == {"kind": "pixels", "grayscale": True}
    assert grey.attrs["data_config"]["crop_pct"] == 1.0
    full = read_store(extract_features(digit_folder, tmp_path / "f.h5", crop_pct=1.0, **TINY).path)
    default = read_store(extract_features(digit_folder, tmp_path / "d.h5", **TINY).path)
    assert full.attrs["data_config"]["crop_pct"] == 1.0 and default.attrs["data_config"]["crop_pct"] == 0.95
    assert full.attrs["config_hash"] != default.attrs["config_hash"]
    assert not np.allclose(full.features, default.features)


def test_layers_come_from_the_same_forward_pass_and_leave_features_bit_identical(stores, digit_folder):
    plain, staged = read_store(stores["plain"]), read_store(stores["staged"])
    assert np.array_equal(plain.features.view(np.uint16), staged.features.view(np.uint16))
    assert staged.layer_names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert [t["width"] for t in staged.layers] == [32, 32, 48, 192, 96]
    assert staged.config["layers"] == staged.layers and "layers" not in plain.config
    # Each layer is the global average of that stage's output, as timm's forward_intermediates gives it.
    backbone = create_backbone("test_resnet", "random")
    image = backbone.image_transform(DigitsSource().load(int(staged.ids[7].split("/d")[1][:4])))
    x = backbone.normalize(image[None])
    with torch.inference_mode():
        stages = backbone.model.forward_intermediates(x, indices=5, intermediates_only=True)
    for info, output in zip(staged.layers, stages):
        np.testing.assert_allclose(read_features(staged, info["name"])[7].astype(np.float32),
                                   output.mean(dim=(2, 3))[0].numpy(), rtol=2e-3, atol=2e-3)


def test_token_models_pool_layers_as_their_head_does():
    """test_vit pools its class token: the last block's pooled output, layer-normed, is the pre-logits."""
    backbone = create_backbone("test_vit", "random", layers="stages")
    assert [(t["name"], t["pooling"], t["width"]) for t in backbone.layers] == [
        (f"blocks.{i}", "token", 64) for i in range(6)]
    x = torch.randn(3, *backbone.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = backbone.features(x)
        layers = backbone.take_layers()
        torch.testing.assert_close(backbone.model.norm(layers["blocks.5"]), features, rtol=1e-4, atol=1e-4)
    assert backbone.take_layers() == {}  # handed over once


def test_layer_choices_and_their_errors(runner, tmp_path):
    backbone = create_backbone("test_efficientnet", "random", layers="1,-1,blocks.2,last")
    assert [t["name"] for t in backbone.layers] == ["blocks.1", "blocks.4", "blocks.2"]
    args = ["extract", "builtin:digits", "--model", "test_resnet", "--weights", "random", "-q", "--out",
            tmp_path / "x.h5"]
    assert_one_line_error(invoke(runner, args + ["--layers", "layer9"]),
                          "--layers layer9: no such module in this model; did you mean layer")
    assert_one_line_error(invoke(runner, args + ["--layers", "7"]), "stage index out of range; this model has 5 stages")
    args = ["extract", "builtin:digits", "--model", "pixels", "-q", "--out", tmp_path / "x.h5"]
    assert_one_line_error(invoke(runner, args + ["--layers", "stages"]), "--model pixels has no layers")
    assert_one_line_error(invoke(runner, args + ["--weights", "hub"]), "--model pixels has no weights")
    assert_one_line_error(invoke(runner, ["extract", "builtin:digits", "--model", "test_resnet", "--grayscale",
                                          "-q", "--out", tmp_path / "x.h5"]), "--grayscale applies to --model pixels only")
    assert not (tmp_path / "x.h5").exists()


def test_inspect_and_verify_list_layers(runner, stores):
    text = invoke(runner, ["inspect", stores["staged"]]).output
    assert "layers (compare them as STORE.h5:NAME, STORE.h5:all or STORE.h5:concat): last (96, /features), " \
           "act1 (32, avg), layer1 (32, avg)" in text
    summary = json.loads(invoke(runner, ["inspect", stores["staged"], "--json"]).output)
    assert [t["name"] for t in summary["layers"]] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert invoke(runner, ["verify", stores["staged"]]).exit_code == 0


def test_verify_finds_a_damaged_layer(runner, stores, tmp_path):
    broken = tmp_path / "broken.h5"
    shutil.copy(stores["staged"], broken)
    with h5py.File(broken, "a") as f:
        f["layers/layer2"][4, 1] = np.nan
    assert_one_line_error(invoke(runner, ["verify", broken]), "is ok but has NaN/Inf values in /layers/layer2")
    with h5py.File(broken, "a") as f:
        del f["layers/layer2"]
    assert_one_line_error(invoke(runner, ["verify", broken]), "lists layer 'layer2' but /layers/layer2 is missing")


def test_an_interrupted_run_with_layers_resumes_to_the_same_store(runner, stores, digit_folder, tmp_path):
    out = tmp_path / "resumed.h5"
    args = ["extract", str(digit_folder), "--model", "test_resnet", "--weights", "random", "--precision", "fp32",
            "--workers", "0", "--layers", "stages", "--shard-size", "16", "-q", "--out", str(out)]
    killed = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HEADBENCH_FAULT": "after-shard:1"}, timeout=300)
    assert killed.returncode == -9 and not out.exists() and partial_dir(out).exists()
    other = invoke(runner, [a if a != "stages" else "layer2" for a in args])
    assert_one_line_error(other, "holds an unfinished run with other settings (changed: layers)")
    resumed = invoke(runner, args)
    assert resumed.exit_code == 0 and "32 resumed from an earlier run" in resumed.output, resumed.output
    reference = read_store(stores["staged"])
    store = read_store(out)
    for name in reference.layer_names:
        np.testing.assert_array_equal(read_features(store, name), read_features(reference, name))
    np.testing.assert_array_equal(store.features, reference.features)


def test_candidates_name_layers_all_and_concat(runner, stores, tmp_path):
    from pipelines.candidates import parse_candidates

    found = parse_candidates([stores["pixels"], f"{stores['staged']}:all", f"{stores['staged']}:concat"])
    assert [c.name for c in found] == ["pixels", "test_resnet", "test_resnet:act1", "test_resnet:layer1",
                                       "test_resnet:layer2", "test_resnet:layer3", "test_resnet:layer4",
                                       "test_resnet:concat"]
    concat = found[-1]
    assert concat.block_widths == (96, 32, 32, 48, 192, 96) and concat.load().shape == (60, 496)
    staged = stores["staged"]
    assert_one_line_error(invoke(runner, ["compare-heads", f"{staged}:layer9"]),
                          "has no layer 'layer9'; use one of: last, act1, layer1, layer2, layer3, layer4, all, concat")
    assert_one_line_error(invoke(runner, ["compare-heads", f"{stores['plain']}:concat"]),
                          "holds no layers to concatenate; extract it with --layers stages first")
    assert_one_line_error(invoke(runner, ["compare-heads", staged, f"{staged}:last"]), "is given twice")
    assert_one_line_error(invoke(runner, ["rank", stores["plain"], FIXTURE_V1]), "describe different samples")


def test_compare_pixels_against_every_layer_paired_with_trust_and_top(runner, stores, tmp_path):
    out = tmp_path / "r"
    result = invoke(runner, ["compare-heads", stores["pixels"], f"{stores['staged']}:all", "--heads",
                             "logreg,centroid", "--folds", "3", "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    assert "representation" in result.output and "test_resnet:layer3" in result.output
    assert "scores vs best-head accuracy, Kendall tau [95% CI] over 7 candidates: logme" in result.output
    data = json.loads((out / "results.json").read_text())
    assert {(r["representation"], r["layer"]) for r in data["rows"]} >= {("pixels", "last"), ("test_resnet", "last"),
                                                                         ("test_resnet:layer2", "layer2")}
    assert len(data["rows"]) == 14 and all(r["n_scored"] == 15 for r in data["rows"])
    ranking = data["meta"]["ranking"]
    assert len(ranking["scores"]) == 7 and ranking["rows_scored"] == 45
    assert set(ranking["agreement"]) == {"logme", "hscore", "knn_loo", "linear_cv"}
    tau = ranking["agreement"]["knn_loo"]
    assert -1 <= tau["kendall_tau_ci"][0] <= tau["kendall_tau"] <= tau["kendall_tau_ci"][1] <= 1
    report = (out / "report.md").read_text()
    assert "## Representations: transferability scores and how far to trust them" in report
    assert "| score | Kendall tau [95 % CI] | weighted tau [95 % CI] |" in report

    top = invoke(runner, ["compare-heads", stores["pixels"], f"{stores['staged']}:all", "--heads", "centroid",
                          "--folds", "3", "--top", "3", "--rank-by", "linear_cv", "--out", out, "-q"])
    assert top.exit_code == 0, top.output
    data = json.loads((out / "results.json").read_text())
    ranking = data["meta"]["ranking"]
    kept = sorted(ranking["scores"], key=lambda r: -r["linear_cv"])[:3]
    assert {r["representation"] for r in data["rows"]} == {r["candidate"] for r in kept}
    assert len(ranking["ranked_out"]) == 4 and top.output.count("ranked out by --top 3") == 4


def test_predict_rebuilds_a_layer_and_reproduces_the_test_accuracy(runner, stores, digit_folder, tmp_path):
    for candidate in (f"{stores['staged']}:layer3", f"{stores['staged']}:concat", stores["pixels"]):
        out, head = tmp_path / "r", tmp_path / "h.skops"
        result = invoke(runner, ["compare-heads", candidate, "--heads", "logreg", "--folds", "3", "--out", out,
                                 "--save-best", head, "-q"])
        assert result.exit_code == 0, result.output
        best = json.loads((out / "results.json").read_text())["rows"][0]
        preds = invoke(runner, ["predict", "--head", head, digit_folder, "--out", tmp_path / "p.csv", "-q"])
        assert preds.exit_code == 0, preds.output
        assert f"accuracy on split test: {best['accuracy'] * 100:.2f} % (15 rows)" in preds.output, candidate


def test_rank_command_prints_and_writes_every_score_with_seconds(runner, stores, tmp_path):
    out = tmp_path / "rank.json"
    result = invoke(runner, ["rank", stores["pixels"], f"{stores['staged']}:all", "--rank-by", "logme", "--json",
                             out, "-q"])
    assert result.exit_code == 0, result.output
    assert "ranked by logme; 7 candidates scored on 45 rows" in result.output and "knn_loo s" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["logme"] for r in rows] == sorted((r["logme"] for r in rows), reverse=True)
    for r in rows:
        assert set(r) == {"candidate", "store", "layer", "width", "logme", "hscore", "knn_loo", "linear_cv", "seconds"}
        assert set(r["seconds"]) == {"logme", "hscore", "knn_loo", "linear_cv"}
    assert invoke(runner, ["rank", stores["plain"], "--rank-by", "leep"]).exit_code == 2


def test_a_version_1_store_still_verifies_inspects_and_compares(runner, tmp_path):
    assert invoke(runner, ["verify", FIXTURE_V1]).output.startswith(f"ok: {FIXTURE_V1}: 73 rows x 96 features, 1 failed")
    summary = json.loads(invoke(runner, ["inspect", FIXTURE_V1, "--json"]).output)
    assert summary["layers"] == [] and summary["failed"] == 1
    result = invoke(runner, ["compare-heads", FIXTURE_V1, "--heads", "logreg,centroid", "--out", tmp_path, "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["rows_used"] == 72 and data["rows"][0]["layer"] == "last"
    assert data["meta"]["ranking"] is None


@parametrize_with_checks([BlockStandardScaler(), BlockStandardScaler(widths=None)])
def test_block_standard_scaler_follows_the_estimator_contract(estimator, check):
    check(estimator)


def test_block_standard_scaler_gives_every_block_the_same_weight():
    rng = np.random.default_rng(0)
    X = np.hstack([rng.normal(5, 100, size=(200, 4)), rng.normal(0, 0.01, size=(200, 60))])
    Z = BlockStandardScaler((4, 60)).fit_transform(X)
    assert Z[:, :4].var(axis=0).sum() == pytest.approx(1.0) and Z[:, 4:].var(axis=0).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must be positive block widths that add up to the 64 features"):
        BlockStandardScaler((4, 50)).fit(X)
