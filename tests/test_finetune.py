"""finetune: what trains, the run folder, kill -9 and resume, the fine-tuned backbone back through extract, and
compare-heads --include -- on a tiny timm model (random weights, 32 px) and builtin:digits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
from PIL import Image

from featurize.errors import FeaturizeError
from featurize.finetune import block_groups, trainable_parameters
from featurize.store import read_store
from heads.persist import load_head
from pipelines.extract import extract_features

from conftest import ROOT, assert_one_line_error, invoke

MODEL = ["--model", "test_efficientnet", "--weights", "random", "--image-size", "32"]
TRAIN = ["--train-blocks", "1", "--epochs", "2", "--lr", "1e-3", "--batch-size", "64", "--hflip", "0",
         "--precision", "fp32", "-q"]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finetune(out, *extra, fault: str | None = None):
    """The CLI in a process of its own (a kill must not take pytest with it)."""
    env = {k: v for k, v in os.environ.items() if k != "HEADBENCH_FAULT"}
    if fault:
        env["HEADBENCH_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "finetune", "builtin:digits", *MODEL, *TRAIN,
                           "--out", str(out), *extra], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    return extract_features("builtin:digits", tmp_path_factory.mktemp("s") / "digits-te.h5", model="test_efficientnet",
                            weights="random", image_size=32, precision="fp32", workers=0, progress=False).path


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, digits_store):
    out = tmp_path_factory.mktemp("ft") / "ft1"
    done = _finetune(out, "--store", str(digits_store))
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.mark.parametrize("model, last", [("test_efficientnet", "conv_head.weight"), ("test_vit", "norm.weight"),
                                         ("test_resnet", "layer4.0.bn2.weight")])
def test_train_blocks_follow_timm_block_structure(model, last):
    net = timm.create_model(model, pretrained=False, num_classes=0)
    names = [n for n, _ in net.named_parameters()]
    groups = block_groups(net)
    assert sorted(n for g in groups for n in g) == sorted(names)  # every parameter in exactly one group
    assert trainable_parameters(net, 0) == []
    one = trainable_parameters(net, 1)
    assert one == [n for n in names if n in set(groups[-1])] and last in one  # what follows the last block
    two = trainable_parameters(net, 2)
    assert set(one) < set(two) and not set(two) & set(groups[0])  # stem stays frozen
    assert trainable_parameters(net, "all") == names
    with pytest.raises(FeaturizeError, match=f"has {len(groups) - 1} blocks"):
        trainable_parameters(net, len(groups))


def test_finetune_writes_a_run_folder_in_compare_heads_schema(clean_run, digits_store):
    out, done = clean_run
    assert "linear probe (head init)" in done.stdout and "features store digits-te.h5" in done.stdout
    results = json.loads((out / "results.json").read_text())
    row, meta = results["rows"][0], results["meta"]
    assert row["head"] == "finetune-1" and row["mode"] == "finetune" and row["device"] == "cpu"
    lo, hi = row["accuracy_ci"]
    assert lo <= row["accuracy"] <= hi and row["n_scored"] == 450  # digits' test split
    assert row["fit_seconds"] > 0 and row["nll"] is not None
    assert meta["rows"] == {"train": 1212, "val": 135, "test": 450, "test_failed": 0, "train_failed": 0}
    assert len(meta["history"]) == 2 and meta["probe"]["features"].startswith("store")
    # the trained parameters: the last block group (conv_head and bn2 included) and the head
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    block = dict(net.named_parameters())
    expected = sum(block[n].numel() for n in trainable_parameters(net, 1)) + (net.num_features + 1) * 10
    assert row["trained_params"] == expected
    # the head and the predictions agree with the row
    model, provenance = load_head(out / "head.skops")
    assert provenance["weights_sha256"] == _sha256(out / "backbone.safetensors") == meta["weights"]["sha256"]
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("id,label,prediction,p:0") and len(lines) == 451
    correct = sum(line.split(",")[1] == line.split(",")[2] for line in lines[1:])
    assert correct / 450 == pytest.approx(row["accuracy"])


def test_a_killed_finetune_resumes_to_the_weights_of_an_uninterrupted_run(clean_run, digits_store, tmp_path):
    reference, _ = clean_run
    steps = json.loads((reference / "results.json").read_text())["meta"]["steps_per_epoch"]
    out = tmp_path / "killed"
    killed = _finetune(out, "--store", str(digits_store), fault=f"finetune-step:{steps + 2}")  # inside epoch 2
    assert killed.returncode == -9
    assert (out / "checkpoint.pt").exists() and not (out / "results.json").exists()
    resumed = _finetune(out, "--store", str(digits_store))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch 1" in resumed.stdout
    assert _sha256(out / "backbone.safetensors") == _sha256(reference / "backbone.safetensors")
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert ours["rows"][0]["accuracy"] == theirs["rows"][0]["accuracy"]
    assert [h["loss"] for h in ours["meta"]["history"]] == [h["loss"] for h in theirs["meta"]["history"]]
    assert (out / "predictions.csv").read_text() == (reference / "predictions.csv").read_text()
    # the same command once more: nothing to do
    again = _finetune(out, "--store", str(digits_store))
    assert again.returncode == 0 and "already holds this run" in again.stdout


def test_fine_tuned_backbone_goes_through_extract_and_compare_heads(runner, clean_run, digits_store, tmp_path):
    run, _ = clean_run
    weights = run / "backbone.safetensors"
    store = extract_features("builtin:digits", tmp_path / "digits-ft.h5", model="test_efficientnet",
                             weights=str(weights), image_size=32, precision="fp32", workers=0, progress=False).path
    attrs = read_store(store, features=False).attrs
    assert attrs["weights_sha256"] == _sha256(weights) and attrs["weights_source"] == "file:backbone.safetensors"

    out = tmp_path / "results"
    result = invoke(runner, ["compare-heads", digits_store, store, "--heads", "torch-logreg,centroid",
                             "--include", run, "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    assert "finetune-1" in result.output and "trained params" in result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 5
    fine = next(r for r in rows if r["head"] == "finetune-1")
    frozen = [r for r in rows if r["head"] != "finetune-1"]
    assert fine["n_scored"] == frozen[0]["n_scored"] == 450
    assert fine["accuracy"] == json.loads((run / "results.json").read_text())["rows"][0]["accuracy"]
    assert 0 <= fine["p_value_vs_best"] <= 1 and fine["trained_params"] > 0
    assert all(r.get("trained_params") is None for r in frozen)
    versus = fine["vs_best_frozen"]  # what fine-tuning gains or loses, paired on the same rows
    assert (versus["representation"], versus["head"]) == (frozen[0]["representation"], frozen[0]["head"])
    assert versus["difference"] == pytest.approx(fine["accuracy"] - frozen[0]["accuracy"])
    assert versus["difference_ci"][0] <= versus["difference"] <= versus["difference_ci"][1]
    assert "Fine-tuning vs frozen features" in (out / "report.md").read_text()

    # the run's own head classifies images with its own backbone, as it did in the run
    result = invoke(runner, ["predict", "--head", run / "head.skops", "builtin:digits", "--weights", weights,
                             "--out", tmp_path / "predictions.csv", "-q"])
    assert result.exit_code == 0, result.output
    assert f"accuracy on split test: {fine['accuracy'] * 100:.2f} % (450 rows)" in result.output
    assert "finetune-1" in (out / "report.md").read_text()


def test_include_checks_the_test_rows(runner, clean_run, digits_store, tmp_path):
    run, _ = clean_run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text((run / "results.json").read_text())
    lines = (run / "predictions.csv").read_text().splitlines()
    (broken / "predictions.csv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one test row missing
    result = invoke(runner, ["compare-heads", digits_store, "--heads", "centroid", "--include", broken])
    assert_one_line_error(result, "1 of the 450 scored test rows have no prediction")

    (broken / "predictions.csv").unlink()
    result = invoke(runner, ["compare-heads", digits_store, "--heads", "centroid", "--include", broken])
    assert_one_line_error(result, "damaged run folder")
    result = invoke(runner, ["compare-heads", digits_store, "--heads", "centroid", "--include", tmp_path])
    assert_one_line_error(result, "not a finished finetune run")


def test_finetune_refuses_other_settings_and_bad_input(runner, clean_run, tmp_path, photo_folder):
    run, _ = clean_run
    result = invoke(runner, ["finetune", "builtin:digits", *MODEL, *TRAIN, "--lr", "1e-2", "--out", run])
    assert_one_line_error(result, "holds a finished run of other settings")
    result = invoke(runner, ["finetune", "builtin:digits", *MODEL, "--train-blocks", "x", "--out", tmp_path / "a"])
    assert_one_line_error(result, "--train-blocks must be a number of blocks")
    result = invoke(runner, ["finetune", "builtin:digits", *MODEL, "--train-blocks", "99", "--out", tmp_path / "a"])
    assert_one_line_error(result, "this model has 5 blocks")
    result = invoke(runner, ["finetune", str(photo_folder), *MODEL, "--out", tmp_path / "b"])
    assert_one_line_error(result, "this source has none")


def test_a_checkpoint_of_other_settings_is_refused_by_name(clean_run, digits_store, tmp_path):
    out = tmp_path / "other"
    steps = json.loads((clean_run[0] / "results.json").read_text())["meta"]["steps_per_epoch"]
    killed = _finetune(out, fault=f"finetune-step:{steps + 1}")
    assert killed.returncode == -9 and (out / "checkpoint.pt").exists()
    changed = _finetune(out, "--seed", "1")
    assert changed.returncode == 1
    assert "other settings (changed: seed)" in changed.stderr and "Traceback" not in changed.stderr


def test_head_alone_leaves_the_backbone_as_it_was(tmp_path):
    import torch
    from safetensors.torch import load_file

    from featurize.backbones import create_backbone
    from pipelines.finetuning import finetune

    result = finetune("builtin:digits", tmp_path / "ft0", model="test_efficientnet", weights="random", image_size=32,
                      train_blocks=0, epochs=1, lr=1e-3, batch_size=64, hflip=0.0, head_init="random",
                      precision="fp32", progress=False)
    assert result.row["head"] == "finetune-0" and result.probe is None
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    assert result.row["trained_params"] == (net.num_features + 1) * 10  # the head alone
    assert np.isfinite(result.history[0]["loss"])
    tuned = load_file(str(tmp_path / "ft0" / "backbone.safetensors"))
    original = create_backbone("test_efficientnet", "random", image_size=32).model.state_dict()
    assert tuned.keys() == original.keys()
    assert all(torch.equal(tuned[k], original[k].contiguous()) for k in original)  # BN statistics included


def test_the_head_alone_without_augmentation_trains_on_features_computed_once(tmp_path, digits_store):
    from pipelines.finetuning import finetune

    kwargs = dict(model="test_efficientnet", weights="random", image_size=32, train_blocks=0, epochs=3, lr=1e-2,
                  batch_size=64, augment="none", precision="fp32", progress=False)
    result = finetune("builtin:digits", tmp_path / "cached", store=digits_store, **kwargs)
    meta = json.loads((tmp_path / "cached" / "results.json").read_text())["meta"]
    assert meta["head_on_cached_features"] and meta["probe"]["features"].startswith("store")
    assert len(result.history) == 3 and result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.row["accuracy"] > 0.5  # the probe's head, trained further on the training rows' features


def test_a_val_split_is_used_and_a_broken_image_costs_only_its_row(tmp_path):
    from conftest import photo, write_image
    from pipelines.finetuning import finetune

    root = tmp_path / "photos"
    for cls, name in (("cat", "chelsea"), ("coffee", "coffee")):
        for split, sizes in (("train", (64, 80, 96)), ("val", (72,)), ("test", (88, 104))):
            for size in sizes:
                image = np.asarray(Image.fromarray(photo(name)).resize((size, size)))
                write_image(root / split / cls / f"{name}-{size}.png", image)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = finetune(str(root), tmp_path / "run", model="test_efficientnet", weights="random", image_size=32,
                      train_blocks=1, epochs=2, batch_size=2, hflip=0.0, precision="fp32", progress=False)
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]
    assert meta["rows"] == {"train": 7, "val": 2, "test": 4, "test_failed": 0, "train_failed": 1}
    assert meta["probe"]["failed_rows"] == 1  # left out of the probe too
    assert result.row["n_scored"] == 4 and all(np.isfinite(h["loss"]) for h in result.history)
