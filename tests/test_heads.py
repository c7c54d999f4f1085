"""Heads: registry, protocol (no leakage), metrics, persistence -- on arrays, no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from heads import (
    HEADS,
    HeadsError,
    bootstrap_ci,
    fit_head,
    get_head,
    mcnemar_p_value,
    plan_protocol,
    point_metrics,
    resolve_heads,
    run_head,
)
from heads.persist import load_head, save_head

from conftest import ROOT


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(n_samples=240, n_features=24, n_informative=10, n_classes=6, n_clusters_per_class=1,
                               class_sep=1.5, random_state=0)
    split = np.array(["test" if i % 4 == 0 else "train" for i in range(len(y))])
    return X.astype(np.float32), y, split


def test_registry_has_the_promised_heads():
    assert {"logreg", "linear-svm", "rbf-svm", "knn", "ridge", "centroid", "lda"} <= set(HEADS)
    for spec in HEADS.values():
        pipe = spec.pipeline()
        assert [name for name, _ in pipe.steps] == ["prep", "clf"]
        grid = spec.param_grid()
        assert len(grid["prep"]) == len(spec.prep)
        pipe.set_params(**{k: v[0] for k, v in grid.items()})  # every grid key is a real parameter


def test_unknown_head_suggests_close_names():
    with pytest.raises(HeadsError, match=r"unknown head 'logreg2'; did you mean logreg"):
        get_head("logreg2")
    with pytest.raises(HeadsError, match="no head matches 'zz\\*'"):
        resolve_heads(["zz*"])
    assert [s.name for s in resolve_heads(["*svm", "logreg", "rbf-svm"])] == ["linear-svm", "rbf-svm", "logreg"]


def test_heads_import_neither_torch_nor_featurize():
    code = "import sys, heads, heads.persist; print(sorted(m for m in ('torch', 'featurize') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_evaluate_never_imports_the_budget_planner():
    """The planner predicts what the evaluation runs: budget -> evaluate is the only direction (their shared
    pieces live in heads/schedule.py)."""
    import ast
    import inspect

    import heads.evaluate

    tree = ast.parse(inspect.getsource(heads.evaluate))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m and m.split(".")[-1] == "budget"}, imported


def test_holdout_plan_keeps_test_rows_out_of_tuning(data):
    _, y, split = data
    plan = plan_protocol(y, split, folds=5, seed=0)
    assert plan.kind == "holdout" and len(plan.tasks) == 1
    task = plan.tasks[0]
    test = set(np.flatnonzero(split == "test"))
    assert set(task.score) == test and not test & set(task.fit)
    for train, val in task.cv:
        assert not test & set(task.fit[train]) and not test & set(task.fit[val])
    assert "holdout" in plan.description and "5-fold" in plan.description


def test_val_split_is_used_for_tuning(data):
    _, y, split = data
    split = split.copy()
    split[1::4] = "val"
    task = plan_protocol(y, split).tasks[0]
    assert len(task.cv) == 1
    train, val = task.cv[0]
    assert set(split[task.fit[val]]) == {"val"} and set(split[task.fit[train]]) == {"train"}


def test_nested_cv_without_test_split(data):
    _, y, _ = data
    plan = plan_protocol(y, np.array([""] * len(y)), folds=3, seed=1)
    assert plan.kind == "nested-cv" and len(plan.tasks) == 3
    assert sorted(plan.scored.tolist()) == list(range(len(y)))  # every row scored exactly once
    for task in plan.tasks:
        assert not set(task.fit) & set(task.score)
        assert all(len(cv) == 2 for cv in task.cv) and len(task.cv) == 3
    assert len(plan.final.fit) == len(y)


@pytest.mark.parametrize(
    "y, split, folds, message",
    [
        ([], [], 5, "no usable rows"),
        ([1, 1, 1, 1, 1, 1], [""] * 6, 2, r"only one class \('b'\)"),
        ([0, 0, 1, 1, 1, 1, 0, 1], [""] * 8, 5, r"class 'a' has 3 samples in the store, fewer than --folds 5"),
        ([0] * 6 + [1] * 6 + [2], ["train"] * 12 + ["test"], 3, "class 'c' appears in the test split but not in train"),
        ([0, 1], ["test", "test"], 2, "every labeled row is in the test split"),
        ([0, 1], ["", ""], 1, "--folds must be at least 2"),
    ],
)
def test_protocol_errors(y, split, folds, message):
    with pytest.raises(HeadsError, match=message):
        plan_protocol(np.array(y, dtype=int), np.array(split, dtype=str), folds=folds, classes=["a", "b", "c"])


def test_permuting_test_labels_changes_no_choice(data):
    """The test split never influences tuning: scrambling its labels leaves every chosen setting unchanged."""
    X, y, split = data
    scrambled = y.copy()
    test = np.flatnonzero(split == "test")
    scrambled[test] = np.random.default_rng(0).permutation(scrambled[test])[::-1]
    assert (scrambled[test] != y[test]).mean() > 0.5
    plan = plan_protocol(y, split)
    plan_scrambled = plan_protocol(scrambled, split)
    for spec in HEADS.values():
        a = run_head(spec, X, y, plan, 6, jobs=1)
        b = run_head(spec, X, scrambled, plan_scrambled, 6, jobs=1)
        assert a.params == b.params, spec.name
        np.testing.assert_array_equal(a.y_pred, b.y_pred)


def test_run_head_outputs(data):
    X, y, split = data
    plan = plan_protocol(y, split)
    run = run_head(get_head("logreg"), X, y, plan, 6)
    assert run.y_pred.shape == (len(plan.scored),)
    assert run.proba.shape == (len(plan.scored), 6) and np.allclose(run.proba.sum(1), 1)
    assert run.fit_seconds > 0 and run.tune_seconds >= run.fit_seconds and run.predict_us_per_sample > 0
    assert set(run.params[0]) == {"prep", "C"} and run.params[0]["prep"] == "standardize"
    assert accuracy_score(y[plan.scored], run.y_pred) > 0.7
    ridge = run_head(get_head("ridge"), X, y, plan, 6)
    assert ridge.calibration["method"] == "temperature" and ridge.proba.shape == ridge.scores.shape == (len(plan.scored), 6)


def test_point_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 7, 300))
    scores = rng.random((300, 7))
    scores[np.arange(300), pred] += 1
    m = point_metrics(y, pred, 7, scores=scores)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["accuracy"] <= m["top5_accuracy"] <= 1 and m["log_loss"] is None
    assert point_metrics(y % 3, pred % 3, 3, scores=scores[:, :3])["top5_accuracy"] is None  # <= 5 classes


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)

    def ci_width(n):
        y = rng.integers(0, 4, n)
        pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 4)
        ci = bootstrap_ci(y, pred, 4, n_boot=500, seed=0)
        point = point_metrics(y, pred, 4)
        for name, (low, high) in ci.items():
            assert low <= point[name] <= high, name
        return ci["accuracy"][1] - ci["accuracy"][0]

    assert ci_width(2000) < ci_width(100)
    y = np.array([0, 1, 2, 0, 1, 2])
    assert bootstrap_ci(y, y, 3) == bootstrap_ci(y, y, 3)  # seeded


def test_mcnemar_exact():
    a = np.array([True] * 10 + [False] * 5)
    assert mcnemar_p_value(a, a) == 1.0
    b = np.array([False] * 10 + [False] * 5)  # a right on 10 rows where b is wrong, never the reverse
    assert mcnemar_p_value(a, b) == pytest.approx(2 * 0.5**10)
    assert mcnemar_p_value(a, b) == mcnemar_p_value(b, a)


def test_saved_head_round_trip(tmp_path, data):
    X, y, split = data
    plan = plan_protocol(y, split)
    model = fit_head(get_head("logreg"), X, y, plan.final).best_estimator_
    path = save_head(tmp_path / "h.skops", model, {"backbone": "m", "classes": list("abcdef")})
    loaded, prov = load_head(path)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    assert prov == {"backbone": "m", "classes": list("abcdef")}


class NotSklearn:
    """A type a head file must never bring along."""


def test_untrusted_types_are_refused(tmp_path):
    import skops.io as sio

    path = tmp_path / "evil.skops"
    sio.dump({"format": "headbench-head", "format_version": 1, "model": NotSklearn(), "provenance": "{}"}, path)
    with pytest.raises(HeadsError, match="contains types that are not scikit-learn's .*NotSklearn"):
        load_head(path)
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(HeadsError, match="not a readable skops file"):
        load_head(tmp_path / "junk.skops")
    sio.dump({"something": 1}, tmp_path / "other.skops")
    with pytest.raises(HeadsError, match="holds no headbench head"):
        load_head(tmp_path / "other.skops")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creating the file is the proof that code ran


def test_pickle_heads_need_trust_and_never_run_without_it(tmp_path, data):
    import joblib

    marker = tmp_path / "pwned"
    joblib.dump({"format": "headbench-head", "model": _Evil(marker)}, tmp_path / "evil.joblib")
    with pytest.raises(HeadsError, match="pickle/joblib file, and loading one can run any code .* --trust"):
        load_head(tmp_path / "evil.joblib")
    assert not marker.exists()

    X, y, split = data
    model = fit_head(get_head("ridge"), X, y, plan_protocol(y, split).final).best_estimator_
    joblib.dump({"format": "headbench-head", "format_version": 1, "model": model, "provenance": "{}"},
                tmp_path / "mine.joblib")
    loaded, prov = load_head(tmp_path / "mine.joblib", trust=True)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_sample_bounded_grid_values_shrink_on_small_data():
    knn = get_head("knn")
    assert knn.param_grid()["clf__n_neighbors"] == [1, 5, 10, 20]
    assert knn.param_grid(n_train=7)["clf__n_neighbors"] == [1, 5, 7]
    assert get_head("logreg").param_grid(n_train=2)["clf__C"] == [0.01, 0.1, 1.0]
