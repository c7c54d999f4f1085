"""Several label sets in one store: CSV label:NAME columns, /tasks/<name> in the store, compare-heads --task,
inspect per task, and a head saved for one task predicting that task's classes."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from featurize.errors import FeaturizeError
from featurize.sources import DigitsSource, open_source
from featurize.store import StoreError, read_store, verify_store
from pipelines.extract import extract_features

from conftest import ROOT, assert_one_line_error, invoke

PARITY = {d: "even" if d % 2 == 0 else "odd" for d in range(10)}


def _write_manifest(path, rows, header=("path", "label:digit", "label:parity", "split")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory):
    """300 of scikit-learn's digits as PNG files, listed in a CSV with two label sets: the digit and its
    parity (one row without a parity), and the builtin's train/test split."""
    root = tmp_path_factory.mktemp("tasks")
    source = DigitsSource()
    rows = []
    for s in source.samples[:300]:
        name = f"img/d{s.index:04d}.png"
        (root / "img").mkdir(exist_ok=True)
        source.load(s.index).save(root / name)
        digit = source.classes[s.label]
        rows.append([name, digit, "" if s.index == 7 else PARITY[int(digit)], s.split])
    return _write_manifest(root / "digits.csv", rows)


@pytest.fixture(scope="module")
def tasks_store(digits_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks-store") / "digits.h5"
    return extract_features(digits_csv, out, model="pixels", workers=0, progress=False).path


def test_csv_label_columns_become_tasks_with_empty_cells_unlabeled_for_that_task_only(digits_csv):
    source = open_source(digits_csv)
    assert source.task_names == ["digit", "parity"] and source.default_task == "digit"
    assert source.classes == [str(d) for d in range(10)]  # the first label set is the default (no plain column)
    parity = source.task("parity")
    assert parity.classes == ["even", "odd"]
    assert parity.labels[7] == -1 and source.samples[7].label >= 0  # unlabeled for parity only
    digits = [int(source.classes[s.label]) for s in source.samples]
    assert all(parity.classes[p] == PARITY[d] for p, d in zip(parity.labels, digits) if p >= 0)


def test_the_store_holds_every_task_and_old_stores_still_read(tasks_store):
    store = read_store(tasks_store, features=False)
    assert store.task_names == ["digit", "parity"] and store.task_name == "digit"
    with h5py.File(tasks_store) as f:
        assert json.loads(f.attrs["tasks"]) == ["digit", "parity"] and f.attrs["default_task"] == "digit"
        assert f["tasks/parity/labels"].shape == (300,) and list(f["tasks/parity/classes"].asstr()) == ["even", "odd"]
        assert np.array_equal(f["tasks/digit/labels"][()], f["labels"][()])
    assert store.config["dataset"]["tasks"] == ["digit", "parity"]  # names in the config, contents in its fingerprint
    parity = store.with_task("parity")
    assert parity.classes == ["even", "odd"] and parity.labels[7] == -1 and parity.task_name == "parity"
    assert store.labels[7] >= 0 and store.with_task("digit") is store
    with pytest.raises(StoreError, match="has no task 'colour'; it has: digit, parity"):
        store.with_task("colour")
    assert verify_store(tasks_store)["rows"] == 300

    old = read_store(ROOT / "tests" / "data" / "store-v1.h5", features=False)  # written before tasks existed
    assert old.task_names == ["label"] and old.with_task("label") is old


def test_changing_one_task_label_changes_the_fingerprint(digits_csv, tmp_path):
    rows = list(csv.reader(open(digits_csv)))
    rows[1][2] = "odd" if rows[1][2] == "even" else "even"
    changed = _write_manifest(digits_csv.parent / "changed.csv", rows[1:], rows[0])
    assert open_source(changed).fingerprint() != open_source(digits_csv).fingerprint()


@pytest.mark.parametrize("header,expected", [
    (("path", "label:a/b"), "label set name 'a/b' must be"),
    (("path", "label", "label:label"), "label set name 'label' must be"),
    (("path", "label:x", "LABEL:x"), "column 'label:x' more than once"),
    (("path", "colour"), "allowed: path, label, split and label:NAME"),
])
def test_bad_label_set_columns_are_refused(tmp_path, header, expected):
    path = _write_manifest(tmp_path / "m.csv", [["a.png"] + ["x"] * (len(header) - 1)], header)
    with pytest.raises(FeaturizeError, match=expected):
        open_source(path)


def test_inspect_counts_per_task(runner, tasks_store):
    result = invoke(runner, ["inspect", str(tasks_store), "--json"])
    summary = json.loads(result.output)
    parity = summary["tasks"]["parity"]["counts"]
    assert sum(parity["train"].values()) + sum(parity["test"].values()) == 300
    assert parity["train"].get("(unlabeled)", 0) + parity["test"].get("(unlabeled)", 0) == 1
    assert summary["counts"] == summary["tasks"]["digit"]["counts"]
    text = invoke(runner, ["inspect", str(tasks_store)]).output
    assert "task parity: samples per class and split" in text and "tasks (compare-heads --task NAME|all)" in text


def test_compare_heads_task_all_gives_one_leaderboard_per_task_and_heads_that_predict_their_task(
        runner, tasks_store, digits_csv, tmp_path):
    out, best = tmp_path / "results", tmp_path / "best.skops"
    result = invoke(runner, ["compare-heads", str(tasks_store), "--heads", "logreg,centroid", "--task", "all",
                             "--out", str(out), "--save-best", str(best), "--bootstrap", "200", "-q"])
    assert "task digit" in result.output and "task parity" in result.output
    everything = json.loads((out / "results.json").read_text())
    assert everything["tasks"] == ["digit", "parity"]
    assert {r["task"] for r in everything["rows"]} == {"digit", "parity"} and len(everything["rows"]) == 4
    for task, classes in (("digit", [str(d) for d in range(10)]), ("parity", ["even", "odd"])):
        results = json.loads((out / task / "results.json").read_text())
        assert results["meta"]["task"] == task and results["meta"]["classes"] == classes
        assert all(r["task"] == task for r in results["rows"])
        assert (out / task / "report.md").read_text().startswith(f"# compare-heads report: task {task}")
    assert everything["meta"]["parity"]["excluded_unlabeled"] == 1 and everything["meta"]["digit"]["excluded_unlabeled"] == 0
    assert "[parity/report.md]" in (out / "report.md").read_text()

    preds = tmp_path / "parity.csv"
    result = invoke(runner, ["predict", "--head", str(tmp_path / "best.parity.skops"), str(digits_csv), "--out",
                             str(preds), "-q"])
    with open(preds) as f:
        predicted = [row["prediction"] for row in csv.DictReader(f)]
    assert set(predicted) == {"even", "odd"} and len(predicted) == 300  # that task's classes
    assert "accuracy" in result.output  # scored against the manifest's parity labels
    invoke(runner, ["predict", "--head", str(tmp_path / "best.digit.skops"), str(digits_csv), "--out",
                    str(tmp_path / "digit.csv"), "-q"])
    with open(tmp_path / "digit.csv") as f:
        assert {row["prediction"] for row in csv.DictReader(f)} <= set(map(str, range(10)))


def test_one_task_and_an_unknown_task(runner, tasks_store, tmp_path):
    result = invoke(runner, ["compare-heads", str(tasks_store), "--heads", "centroid", "--task", "parity",
                             "--out", str(tmp_path / "one"), "--bootstrap", "200", "-q"])
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["meta"]["task"] == "parity" and results["meta"]["classes"] == ["even", "odd"]
    assert results["rows"][0]["task"] == "parity" and "task parity" not in result.output  # no per-task rule
    bad = invoke(runner, ["compare-heads", str(tasks_store), "--task", "colour", "-q"])
    assert_one_line_error(bad, "has no task 'colour'; it has: digit, parity")
