"""Cost-aware compare-heads: cost models, successive-halving plans, approximations, and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.model_selection import HalvingGridSearchCV, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

import heads.budget as budget
from heads import get_head, plan_protocol
from heads.budget import CostModel, halving_schedule, plan_head, stratified_subset
from heads.evaluate import fit_head
from heads.kernel_approx import NystroemSVC, ScaledNystroem
from heads.persist import load_head, save_head
from heads.synthetic import synthetic_features
from heads.torch_logreg import TorchLinearSVC
from pipelines.bench_heads import write_synthetic_store

from conftest import assert_one_line_error, invoke


@parametrize_with_checks([TorchLinearSVC(), NystroemSVC(n_components=20), ScaledNystroem(n_components=10)])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def test_torch_linear_svc_matches_liblinear(digits):
    X_train, X_test, y_train, y_test = digits
    ours = TorchLinearSVC(C=0.1, precision="fp32").fit(X_train, y_train).score(X_test, y_test)
    ref = LinearSVC(C=0.1, max_iter=20000).fit(X_train, y_train).score(X_test, y_test)
    assert abs(ours - ref) <= 0.01


def test_nystroem_svc_approximates_the_exact_rbf_svm(digits, tmp_path):
    X_train, X_test, y_train, y_test = digits
    exact = SVC(C=10.0, gamma="scale").fit(X_train, y_train).score(X_test, y_test)
    approx = NystroemSVC(C=10.0, n_components=1000, random_state=0).fit(X_train, y_train)
    assert approx.kernel_map_.gamma_ == pytest.approx(1 / (X_train.shape[1] * X_train.var()), rel=1e-4)
    assert approx.score(X_test, y_test) >= exact - 0.015
    path = save_head(tmp_path / "h.skops", approx, {"head": "rbf-svm"})
    loaded, _ = load_head(path)
    np.testing.assert_array_equal(loaded.predict(X_test), approx.predict(X_test))


def test_synthetic_features_look_like_pooled_cnn_features():
    X, y = synthetic_features(3000, 128, 5, seed=1)
    assert X.shape == (3000, 128) and X.dtype == np.float16 and set(np.unique(y)) == set(range(5))
    assert X.min() >= 0 and 0.3 < (X == 0).mean() < 0.7  # rectified, about half zeros
    again, _ = synthetic_features(3000, 128, 5, seed=1)
    np.testing.assert_array_equal(X, again)
    from sklearn.linear_model import LogisticRegression

    Xf = StandardScaler().fit_transform(X.astype(np.float32))
    accuracy = LogisticRegression(C=0.1, max_iter=2000).fit(Xf[:2000], y[:2000]).score(Xf[2000:], y[2000:])
    assert 0.7 < accuracy < 0.995  # learnable, not trivial


def test_cost_model_through_two_points():
    model = CostModel.through((1000, 2000), (0.5, 2.0), 1.0)  # quadratic growth shows through a linear prior
    assert model.exponent == pytest.approx(2.0) and model.seconds(4000) == pytest.approx(8.0)
    capped = CostModel.through((1000, 2000), (0.1, 10.0), 1.0)  # noise: at most one power above the prior
    assert capped.exponent == 2.0
    overhead = CostModel.through((1000, 2000), (0.5, 0.55), 1.0)  # fixed overheads: never below the prior
    assert overhead.exponent == 1.0 and overhead.seconds(20_000) == pytest.approx(5.5)
    # A kernel approximation's rank costs the same whatever the rows: read slow growth as that fixed part.
    fixed = CostModel.through((4000, 8000), (16.8, 22.0), 1.0, fixed_rows=4000)  # lite0 Fashion-MNIST, m = 4000
    assert fixed.fixed == pytest.approx(11.6) and fixed.seconds(4000) == pytest.approx(16.8)
    assert fixed.seconds(60_000) == pytest.approx(11.6 + 5.2 * 15)  # measured: 107 s
    assert fixed.refit_seconds(60_000, 0) == pytest.approx(fixed.seconds(60_000))
    assert fixed.seconds(1000) == pytest.approx(11.6 / 64 + 5.2 / 4)  # rank = rows below 4000: (1/4) ** 3
    half = fixed.scaled(1.0, size=0.5)  # 2 000 components: fixed / 8, whole from 2 000 rows
    assert half.seconds(8000) == pytest.approx(11.6 / 8 + 10.4) and half.fixed_rows == 2000
    below = CostModel.through((2000, 4000), (2.5, 16.0), 1.0, fixed_rows=4000)  # probes below the rank
    assert below.fixed > 0 and below.seconds(2000) == pytest.approx(2.5) and below.seconds(4000) == pytest.approx(16.0)
    steep = CostModel.through((4000, 8000), (10.0, 30.0), 1.0, fixed_rows=4000)  # faster growth: the plain power law
    assert steep.fixed == 0.0 and steep.exponent == pytest.approx(math.log2(3))


@pytest.mark.parametrize("candidates,rows", [(3, 900), (4, 3000), (8, 5000), (2, 700), (1, 500)])
def test_halving_schedule_is_what_sklearn_runs(candidates, rows):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(rows, 3)), np.arange(rows) % 4
    cv = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    search = HalvingGridSearchCV(DummyClassifier(), {"constant": list(range(candidates)), "strategy": ["prior"]},
                                 factor=budget.FACTOR, min_resources="exhaust", cv=cv, refit=False).fit(X, y)
    expected = list(zip(search.n_candidates_, search.n_resources_))
    assert halving_schedule(candidates, rows, 3, 4) == expected


def _plan(n=10_000, classes=10, folds=5):
    y = np.arange(n) % classes
    split = np.where(np.arange(n) < n * 5 // 6, "train", "test")
    return plan_protocol(y, split, folds=folds)


def test_cheap_heads_get_the_full_protocol_and_expensive_ones_halving():
    plan = _plan()
    spec = get_head("logreg")
    cheap = plan_head(spec, CostModel(1.0, 1000, 1e-3), plan, 60.0, jobs=2, n_classes=10)
    assert cheap.mode == "full" and cheap.tune_rows == len(plan.tasks[0].fit) and not cheap.approximated

    costly = CostModel(1.0, 1000, 0.4)  # 3.3 s per fit on 8333 rows: 3 x 5 fits do not fit in 20 s
    decision = plan_head(spec, costly, plan, 20.0, jobs=2, n_classes=10)
    assert decision.mode == "halving" and 1000 <= decision.tune_rows < len(plan.tasks[0].fit)
    assert decision.predicted_seconds <= 20.0 * budget.PLANNED_FRACTION
    assert "successive halving" in decision.reason


def test_a_head_that_cannot_fit_is_approximated_or_skipped():
    plan = _plan()
    spec = get_head("rbf-svm")
    huge = CostModel(2.0, 1000, 10.0)  # ~1000 s for one fit on 10 000 rows
    cheap = CostModel(1.0, 1000, 0.1)
    decision = plan_head(spec, huge, plan, 60.0, jobs=2, n_classes=10, approximation_cost=cheap)
    assert decision.approximated and decision.spec.rank_param == "n_components"  # the Nystroem map, sized
    assert decision.mode in ("full", "halving") and decision.predicted_seconds <= 60.0
    assert "approximated" in decision.reason and "rbf-svm" in decision.reason
    assert budget.minimum_share(spec, huge, plan, jobs=2, n_classes=10, approximation_cost=cheap) < 60.0
    assert budget.minimum_share(spec, huge, plan, jobs=2, n_classes=10) > 600.0  # the exact refit alone

    skipped = plan_head(get_head("knn"), huge, plan, 60.0, jobs=2, n_classes=10)
    assert skipped.mode == "skipped" and "no approximation" in skipped.reason
    assert skipped.predicted_seconds > 60


def test_halving_tunes_on_a_subset_and_refits_on_every_fit_row():
    X, y = synthetic_features(3000, 32, 4, seed=0)
    X = X.astype(np.float32)
    plan = plan_protocol(y, np.where(np.arange(3000) < 2500, "train", "test"), folds=3)
    task = plan.tasks[0]
    tuned = fit_head(get_head("knn"), X, y, task, jobs=1, tune_rows=900)
    assert tuned.best_estimator_.named_steps["clf"].n_samples_fit_ == len(task.fit)
    assert set(tuned.best_params_) == {"prep", "clf__n_neighbors"}
    only = fit_head(get_head("lda"), X, y, task, tune_rows=0)  # nothing to tune: one fit on every row
    assert only.best_params_ and only.best_estimator_.score(X[task.score], y[task.score]) > 0.5


class _Recorder:
    """A stand-in for budget.LastRound that records what the halving asked and answers a fixed size."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def last_round_rows(self, task, done, seconds, rows):
        self.calls.append((done, rows))
        return self.rows


def test_halving_last_round_is_sized_by_resize():
    X, y = synthetic_features(3000, 32, 4, seed=0)
    X = X.astype(np.float32)
    plan = plan_protocol(y, np.where(np.arange(3000) < 2500, "train", "test"), folds=3)
    task = plan.tasks[0]
    spec = get_head("knn")  # 8 settings: rounds of 8, 3 and 1 candidates
    schedule = halving_schedule(spec.grid_size(), 900, len(task.cv), 4)
    for size in (1500, 700):  # grown past the planned subset (more fit rows drawn), and shrunk within it
        recorder = _Recorder(size)
        tuned = fit_head(spec, X, y, task, tune_rows=900, resize=recorder)
        assert tuned.tune_rows_ == size and len(recorder.calls) == 1
        done, planned = recorder.calls[0]
        assert done == schedule[:-1] and planned == schedule[-1][1] == 900
        assert tuned.best_estimator_.named_steps["clf"].n_samples_fit_ == len(task.fit)  # the refit: every row


def test_last_round_fills_the_target_from_the_measured_ratio():
    plan = _plan(n=60_000)
    spec = get_head("logreg")
    cost = CostModel(1.0, 1000, 3.0)  # 150 s for one fit on every row: tuning fits only on a subset
    task = plan.tasks[0]
    planned = plan_head(spec, cost, plan, 400.0, jobs=1, n_classes=10, fraction=1.0)
    assert planned.mode == "halving"
    planned.target_seconds, planned.last = 400.0, True
    schedule = halving_schedule(spec.grid_size(), planned.tune_rows, len(task.cv), 10)
    predicted = sum(budget._round_seconds(cost, task, c, r, 1) for c, r in schedule[:-1])

    def last_rows(ratio, last=True):
        planned.last = last
        sizing = budget.LastRound(planned, plan, jobs=1, n_classes=10)
        sizing.started -= ratio * predicted  # as if the earlier rounds had just taken that long
        rows = sizing.last_round_rows(task, schedule[:-1], ratio * predicted, schedule[-1][1])
        return rows, sizing

    same, _ = last_rows(1.0)  # as predicted: about the planned rows (the plan left a little room)
    assert abs(same - planned.tune_rows) <= 0.05 * planned.tune_rows
    faster, sizing = last_rows(0.6)  # the earlier rounds ran fast: the last one grows into the target
    assert faster > 1.3 * planned.tune_rows and "instead of" in sizing.note()
    slower, _ = last_rows(1.6)
    assert schedule[-2][1] <= slower < 0.8 * planned.tune_rows
    kept, sizing = last_rows(0.6, last=False)  # a head before the last never takes more than planned
    assert kept == schedule[-1][1] and sizing.note() == ""
    assert last_rows(0.01)[0] <= len(task.fit)
    planned.cost = CostModel(1.0, 1000, 0.001)  # earlier rounds of milliseconds: overheads, not the model
    assert last_rows(2.0)[0] == schedule[-1][1]


def test_stratified_subset_keeps_class_shares():
    y = np.repeat([0, 1, 2], [600, 300, 100])
    subset = stratified_subset(y, 100, seed=0)
    assert len(subset) == 100 and np.all(np.diff(subset) > 0)
    assert np.bincount(y[subset]).tolist() == [60, 30, 10]
    assert len(stratified_subset(y, 5000, seed=0)) == 1000


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("s") / "synthetic.h5", 6000, 48, 4, seed=0)


def test_small_stores_keep_the_full_protocol(runner, synthetic_store, tmp_path, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("small stores are not probed")

    monkeypatch.setattr("pipelines.compare.probe_head", no_probe)
    small = write_synthetic_store(tmp_path / "small.h5", 1200, 16, 3)
    result = invoke(runner, ["compare-heads", small, "--heads", "logreg,ridge", "--budget", "0.01", "--out",
                             tmp_path / "r", "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    assert all(r["mode"] == "full" and "small store" in r["budget_note"] for r in rows)
    result = invoke(runner, ["compare-heads", synthetic_store, "--heads", "ridge", "--exhaustive", "--out",
                             tmp_path / "e", "-q"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "e" / "results.json").read_text())["rows"][0]
    assert row["mode"] == "full" and row["budget_note"] == "no budget (--exhaustive)"


def test_bad_budget_is_one_line(runner, synthetic_store):
    result = invoke(runner, ["compare-heads", synthetic_store, "--budget", "0"])
    assert result.exit_code == 2 and "--budget" in result.output  # click's usage error for a bad option value


def test_allocator_reserves_minimum_shares_and_calibrates_on_actual_times():
    plan = _plan()
    allocator = budget.Allocator(120.0, plan, jobs=2, n_classes=10)
    allocator.add("cheap", get_head("ridge"), CostModel(1.0, 1000, 0.01))
    allocator.add("rbf", get_head("rbf-svm"), CostModel(2.0, 1000, 10.0), CostModel(1.0, 1000, 0.3))
    allocator.add("knn", get_head("knn"), CostModel(2.0, 1000, 10.0))  # cannot run even alone: reserves nothing
    keys = allocator.order(["rbf", "knn", "cheap"])
    assert keys[0] == "cheap"
    share = allocator.share("cheap", 120.0, keys)
    assert allocator.minimum("cheap") <= share < 120.0 - allocator.minimum("rbf")  # rbf's minimum stays reserved
    assert allocator.decide("knn", 120.0, ["knn"]).mode == "skipped"
    assert allocator.decide("rbf", 100.0, ["rbf"]).approximated

    before = allocator.full_seconds("cheap")
    allocator.record(10.0, 20.0)  # a head took twice its prediction
    assert allocator.calibration == 2.0 and allocator.full_seconds("cheap") == pytest.approx(2 * before)
    allocator.record(1.0, 50.0)  # too short to learn from
    assert allocator.calibration == 2.0
    assert "calibrated" in allocator.decide("cheap", 100.0, ["cheap"]).reason


def test_bench_heads_measures_every_part(runner, tmp_path):
    out = tmp_path / "bench-heads.json"
    result = invoke(runner, ["bench-heads", "--n", "1500", "--d", "16", "--classes", "3", "--cs", "0.1,1",
                             "--svm-rows", "300", "--keep-store", tmp_path / "synthetic.h5", "--json", out])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["train_rows"] == 1250 and data["test_rows"] == 250 and data["features"] == 16
    assert [r["C"] for r in data["logreg"]] == [0.1, 1.0]
    for r in data["logreg"]:
        assert r["speedup_cpu"] == pytest.approx(r["sklearn_fit_s"] / r["torch_cpu_fit_s"])
        assert r["clf_speedup_cpu"] == pytest.approx(r["sklearn_clf_fit_s"] / r["torch_cpu_clf_fit_s"])
        assert abs(r["accuracy_delta_cpu_points"]) < 3
    assert data["c_path"]["Cs"] == [0.1, 1.0] and len(data["c_path"]["warm_fit_s"]) == 2
    assert data["rbf_svm"]["train_rows"] == 300 and 0.5 < data["rbf_svm"]["nystroem_accuracy"] <= 1
    compare = data["compare_heads"]
    # a small store: every head, full protocol -- one of each duplicate pair (logreg/torch-logreg, knn/torch-knn)
    assert len(compare["heads"]) == 7 and [s["mode"] for s in compare["skipped"]] == ["duplicate", "duplicate"]
    assert all(h["mode"] == "full" for h in compare["heads"])
    assert (tmp_path / "synthetic.h5").exists() and "compare-heads (default heads" in result.output


def test_bench_heads_bad_input(runner, tmp_path):
    assert_one_line_error(invoke(runner, ["bench-heads", "--cs", "0.1,x"]), "--cs must be comma-separated numbers")
    assert_one_line_error(invoke(runner, ["bench-heads", "--cs", "0"]), "--cs needs at least one C > 0")
    assert_one_line_error(invoke(runner, ["bench-heads", "--store", tmp_path / "missing.h5", "--no-compare"]),
                          "missing.h5")


def test_a_timed_fixed_part_is_taken_as_measured():
    model = CostModel.through((4000, 8000), (16.8, 22.0), 1.0, fixed_rows=4000, fixed_seconds=7.8)
    assert model.fixed == pytest.approx(7.8) and model.seconds(8000) == pytest.approx(22.0)
    assert model.seconds(60_000) == pytest.approx(7.8 + 14.2 * 7.5)  # measured here: 107 s
    below = CostModel.through((1000, 2000), (2.0, 4.0), 1.0, fixed_rows=4000, fixed_seconds=1.0)
    assert below.fixed == pytest.approx(8.0) and below.seconds(2000) == pytest.approx(4.0)
