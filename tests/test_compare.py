"""compare-heads and predict end to end through the CLI, on real stores."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from featurize.store import read_store
from heads.persist import load_head
from pipelines.extract import extract_features

from conftest import ROOT, TINY, assert_one_line_error, invoke, photo, write_image


_run = invoke
_one_line_error = assert_one_line_error


@pytest.fixture(scope="module")
def digits_lite0(tmp_path_factory):
    """The demo store: builtin:digits with the packaged ImageNet lite0 weights, extracted as `make demo` does
    (the CLI with --runtime auto: OpenVINO where it is installed, in a process of its own)."""
    out = tmp_path_factory.mktemp("d") / "digits-lite0.h5"
    env = {k: v for k, v in os.environ.items() if k != "HEADBENCH_RUNTIME"}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", "builtin:digits", "--model",
                           "tf_efficientnet_lite0", "--weights", "packaged", "--out", str(out), "-q"], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def test_demo_store_leaderboard_and_outputs(runner, digits_lite0, tmp_path):
    out = tmp_path / "results"
    result = _run(runner, ["compare-heads", digits_lite0, "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    assert "protocol: holdout" in result.output

    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert len(rows) >= 7 and {r["head"] for r in rows} >= {"logreg", "linear-svm", "rbf-svm", "knn", "ridge",
                                                          "centroid", "lda"}
    for r in rows:
        for key in ("backbone", "head", "accuracy", "accuracy_ci", "balanced_accuracy", "macro_f1", "fit_seconds",
                    "predict_us_per_sample", "params", "p_value_vs_best"):
            assert key in r, key
        low, high = r["accuracy_ci"]
        assert low <= r["accuracy"] <= high and high - low < 0.1
        assert 0 <= r["p_value_vs_best"] <= 1
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    assert rows[0]["accuracy"] > 0.9  # ImageNet features separate handwritten digits well
    assert rows[0]["p_value_vs_best"] == 1.0 and rows[0]["tied_with_best"]
    assert data["meta"]["protocol"] == "holdout" and data["meta"]["n_scored"] == 450

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["head"] for r in table] == [r["head"] for r in rows]
    assert float(table[0]["accuracy"]) == pytest.approx(rows[0]["accuracy"])
    report = (out / "report.md").read_text()
    assert "| rank | representation | head |" in report and report.count("| tf_efficientnet_lite0 |") == \
        3 * len(rows) + len(data["meta"]["skipped"])  # leaderboard, calibration, cost table (+ duplicates)
    assert all(r["nll"] is not None and r["ece_ci"][0] <= r["ece"] <= r["ece_ci"][1] for r in rows)
    assert "## Cost and budget" in report and "small store (1347 fit rows): the full protocol" in report
    for png in ("accuracy_vs_fit_time.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000


def test_saved_head_predicts_the_reported_test_accuracy(runner, digits_tiny, tmp_path):
    out, head, preds = tmp_path / "r", tmp_path / "best.skops", tmp_path / "preds.csv"
    result = _run(runner, ["compare-heads", digits_tiny, "--heads", "logreg,ridge,lda", "--out", out,
                           "--save-best", head, "-q"])
    assert result.exit_code == 0, result.output
    best = json.loads((out / "results.json").read_text())["rows"][0]
    model, prov = load_head(head)
    assert prov["head"] == best["head"] and prov["backbone"] == "test_resnet"
    assert prov["store_config_hash"] == read_store(digits_tiny, features=False).attrs["config_hash"]
    assert prov["weights_sha256"] and prov["data_config"]["input_size"] == [3, 160, 160]

    result = _run(runner, ["predict", "--head", head, "builtin:digits", "--out", preds, "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert f"accuracy on split test: {best['accuracy'] * 100:.2f} % (450 rows)" in result.output
    with open(preds) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1797 and rows[0]["id"] == "builtin:digits:0"
    store = read_store(digits_tiny)
    test = store.split == "test"
    predicted = np.array([store.classes.index(r["prediction"]) for r in rows])
    assert (predicted[test] == store.labels[test]).mean() == pytest.approx(best["accuracy"])


def test_predict_writes_probabilities_and_failures(runner, digits_tiny, tmp_path):
    head = tmp_path / "h.skops"
    assert _run(runner, ["compare-heads", digits_tiny, "--heads", "logreg", "--save-best", head, "-q"]).exit_code == 0
    folder = tmp_path / "imgs"
    write_image(folder / "a.png", photo("coffee")[:64, :64])
    (folder / "b.png").write_bytes(b"")
    result = _run(runner, ["predict", "--head", head, folder, "--out", tmp_path / "p.csv", "--workers", "0", "-q",
                           "--proba"])
    assert result.exit_code == 0 and "2 rows, 1 failed" in result.output
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "prediction"] + [f"p:{d}" for d in range(10)] + ["error"]
    assert rows[0]["prediction"] in {str(d) for d in range(10)} and rows[0]["error"] == ""
    assert sum(float(rows[0][f"p:{d}"]) for d in range(10)) == pytest.approx(1, abs=1e-9)
    assert rows[1]["prediction"] == "" and rows[1]["error"].startswith("UnidentifiedImageError")
    plain = _run(runner, ["predict", "--head", head, folder, "--out", tmp_path / "q.csv", "--workers", "0", "-q"])
    assert plain.exit_code == 0
    with open(tmp_path / "q.csv") as f:
        assert list(next(csv.DictReader(f))) == ["id", "prediction", "error"]


def test_nested_cv_when_there_is_no_test_split(runner, photo_folder, tmp_path):
    root = tmp_path / "flat"
    for cls, name in (("cat", "chelsea"), ("coffee", "coffee"), ("space", "astronaut")):
        for i in range(6):
            write_image(root / cls / f"{i}.png", np.roll(photo(name)[::4, ::4], 7 * i, axis=1))
    store = extract_features(root, tmp_path / "flat.h5", **TINY).path
    out = tmp_path / "r"
    result = _run(runner, ["compare-heads", store, "--heads", "logreg,knn", "--folds", "2", "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    assert "protocol: nested CV" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["protocol"] == "nested-cv" and data["meta"]["n_scored"] == 18
    assert all(len(r["params_per_fold"]) == 2 for r in data["rows"])


def test_several_stores_rank_backbone_by_head_and_leave_out_failed_rows(runner, photo_folder, tmp_path):
    root = tmp_path / "src"
    for cls, name in (("cat", "chelsea"), ("coffee", "coffee")):
        for i in range(6):
            write_image(root / "train" / cls / f"{i}.png", np.roll(photo(name)[::4, ::4], 5 * i, axis=0))
        for i in range(2):
            write_image(root / "test" / cls / f"t{i}.png", np.roll(photo(name)[::4, ::4], 3 + 5 * i, axis=1))
    (root / "train" / "cat" / "broken.png").write_bytes(b"")
    a = extract_features(root, tmp_path / "a.h5", max_failures=1, **TINY).path
    b = extract_features(root, tmp_path / "b.h5", max_failures=1, **{**TINY, "model": "test_efficientnet"}).path
    out = tmp_path / "r"
    result = _run(runner, ["compare-heads", a, b, "--heads", "logreg,centroid", "--folds", "2", "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    assert "left out: 1 rows that failed in at least one store" in result.output
    data = json.loads((out / "results.json").read_text())
    assert {(r["backbone"], r["head"]) for r in data["rows"]} == {
        (m, h) for m in ("test_resnet", "test_efficientnet") for h in ("logreg", "centroid")
    }
    assert data["meta"]["excluded_failed"] == 1 and data["meta"]["rows_used"] == 16


def test_compare_heads_bad_input(runner, digits_tiny, photo_folder, tmp_path):
    _one_line_error(_run(runner, ["compare-heads", digits_tiny, "--heads", "logreg,svm2"]), "unknown head 'svm2'")
    other = extract_features(photo_folder, tmp_path / "photos.h5", **TINY).path
    _one_line_error(_run(runner, ["compare-heads", digits_tiny, other]), "describe different samples: 1797 rows vs 7")
    # fewer samples per class than folds: the photo folder has 2 images of a class
    _one_line_error(_run(runner, ["compare-heads", other, "-q"]), "fewer than --folds 5; lower --folds")

    one = tmp_path / "one"
    for i in range(6):
        write_image(one / "cat" / f"{i}.png", photo("chelsea")[i * 8:, :])
    store = extract_features(one, tmp_path / "one.h5", **TINY).path
    _one_line_error(_run(runner, ["compare-heads", store, "-q"]), "only one class ('cat')")

    unlabeled = tmp_path / "unlabeled"
    write_image(unlabeled / "a.png", photo("chelsea"))
    store = extract_features(unlabeled, tmp_path / "unlabeled.h5", **TINY).path
    _one_line_error(_run(runner, ["compare-heads", store, "-q"]), "has no labeled rows")

    shutil.copy(digits_tiny, tmp_path / "copy.h5")
    _one_line_error(_run(runner, ["compare-heads", tmp_path / "missing.h5"]), "does not exist")


def test_predict_bad_input(runner, digits_tiny, tmp_path):
    (tmp_path / "fake.skops").write_bytes(b"junk")
    _one_line_error(_run(runner, ["predict", "--head", tmp_path / "fake.skops", "builtin:digits", "--out",
                                  tmp_path / "p.csv"]), "not a readable skops file")
    head = tmp_path / "h.skops"
    assert _run(runner, ["compare-heads", digits_tiny, "--heads", "ridge", "--save-best", head, "-q"]).exit_code == 0
    from safetensors.torch import save_file
    from featurize.backbones import create_backbone

    state = create_backbone("test_resnet", "random", keep_classifier=True).model.state_dict()
    save_file({k: v * 2 for k, v in state.items()}, str(tmp_path / "other.safetensors"))
    _one_line_error(_run(runner, ["predict", "--head", head, "builtin:digits", "--out", tmp_path / "p.csv",
                                  "--weights", tmp_path / "other.safetensors"]), "not the ones the head was trained on")
    assert not (tmp_path / "p.csv").exists()


def test_heads_command_lists_grids(runner):
    result = _run(runner, ["heads"])
    assert result.exit_code == 0
    assert "logreg" in result.output and "C=[0.01, 0.1, 1.0]" in result.output
    assert "(1 setting)" in result.output
    _one_line_error(_run(runner, ["heads", "nothing*"]), "no head matches 'nothing*'")


def test_a_second_run_into_the_same_out_folder_is_refused(runner, digits_tiny, tmp_path):
    from filelock import FileLock

    out = tmp_path / "results"
    out.mkdir()
    with FileLock(str(out / ".lock")):  # what a running compare-heads holds
        result = _run(runner, ["compare-heads", digits_tiny, "--heads", "centroid", "--out", out, "-q"])
    _one_line_error(result, "another compare-heads is writing into")
    assert not (out / "results.json").exists()
    result = _run(runner, ["compare-heads", digits_tiny, "--heads", "centroid", "--out", out, "-q"])
    assert result.exit_code == 0 and (out / "results.json").exists()  # the lock was released, the run writes


def _without_timings(document: dict) -> dict:
    """results.json without what a rerun may change: timings, and which units came from the cache."""
    timing = {"fit_seconds", "tune_seconds", "predict_us_per_sample", "actual_seconds", "predicted_seconds",
              "probe_seconds", "share_seconds", "cached"}
    rows = [{k: v for k, v in r.items() if k not in timing} for r in document["rows"]]
    meta = {k: v for k, v in document["meta"].items() if k not in ("seconds", "units", "parallel")}
    for key in ("learning_curve", "twin_check"):
        if meta.get(key):
            meta[key] = {k: v for k, v in meta[key].items() if k != "seconds"}
    return {"rows": rows, "meta": meta, "learning_curve": document.get("learning_curve")}


def test_a_killed_comparison_resumes_from_its_committed_units(digits_tiny, tmp_path):
    """SIGKILL once ten units are committed -- the seven learning-curve draws and three of the four heads -- (the
    crash hook, so the point is exact; --jobs 1: no worker processes to outlive it); the same command then reuses
    them, computes the rest, and writes the results of an uninterrupted run. --fresh recomputes everything."""
    # with --shots 2 --seeds 2: 7 learning-curve draws (LDA cannot be fitted on 2 rows per class: its first draw
    # says so, its second is not tried), then the 4 heads
    heads = "centroid,ridge,lda,knn"
    clean_dir, out = tmp_path / "clean", tmp_path / "resumed"

    def cli(out_dir, *more, fault=None):
        env = {k: v for k, v in os.environ.items() if k != "HEADBENCH_FAULT"}
        if fault:
            env["HEADBENCH_FAULT"] = fault
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), "compare-heads", str(digits_tiny), "--heads", heads,
                               "--out", str(out_dir), "--jobs", "1", "--folds", "3", "--bootstrap", "200",
                               "--shots", "2", "--seeds", "2", "-q", *more],
                              capture_output=True, text=True,
                              cwd=ROOT, timeout=600, env=env, start_new_session=True)

    clean = cli(clean_dir)
    assert clean.returncode == 0, clean.stderr
    killed = cli(out, fault="after-unit:10")  # every draw and three of the four heads committed
    assert killed.returncode == -9, killed.stderr
    units = [p for p in (out / ".runs").iterdir() if not p.name.startswith(".")]
    assert len(units) == 10 and not (out / "results.json").exists()

    resumed = cli(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "reused 10 units committed by an earlier run" in resumed.stdout and "computed 1;" in resumed.stdout
    again = json.loads((out / "results.json").read_text())
    assert again["meta"]["units"]["reused"] == 10 and again["meta"]["units"]["committed"] == 1
    assert sum(r["cached"] for r in again["rows"]) == 3 and again["learning_curve"]
    assert _without_timings(again) == _without_timings(json.loads((clean_dir / "results.json").read_text()))

    fresh = cli(out, "--fresh")
    assert fresh.returncode == 0 and "reused" not in fresh.stdout
    assert json.loads((out / "results.json").read_text())["meta"]["units"] == {
        "reused": 0, "reused_seconds": 0.0, "committed": 11}


def test_identical_runs_give_identical_calibration(digits_lite0):
    """Two identical runs give the same results.json (timing aside): liblinear's and libsvm's fits share one
    process-wide random generator, so the out-of-fold fits of a temperature are not run in threads at once (they
    were, and linear-svm's temperature differed in the 7th digit between two identical compare-heads runs)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer
    from sklearn.svm import LinearSVC

    from heads.evaluate import _oof_logits, shares_global_rng

    store = read_store(digits_lite0)
    train = np.flatnonzero(store.split == "train")
    X, y = store.features[train].astype(np.float32), store.labels[train]
    folds = [(np.setdiff1d(np.arange(len(y)), np.arange(k, len(y), 5)), np.arange(k, len(y), 5)) for k in range(5)]
    pipeline = make_pipeline(Normalizer(), LinearSVC(C=10.0, max_iter=5000, random_state=0))
    assert shares_global_rng(pipeline)
    runs = [_oof_logits(pipeline, X, y, np.unique(y), folds, jobs=2)[0] for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
