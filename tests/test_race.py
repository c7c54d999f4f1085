"""The race across heads under --budget: paired cuts, duplicates, rung 1, approximations sized by the share, the
leader last with all that remains, and the report of it all."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

import heads.budget as budget
from heads import HEADS, get_head, plan_protocol
from heads.budget import CostModel, plan_head
from heads.evaluate import labels_follow_scores, readable_params, score_rows
from heads.kernel_approx import NystroemSVC
from heads.race import Contender, Probe, confirm, cut, drop_duplicates, paired_upper_bound, probe_head, race_split
from heads.synthetic import synthetic_features
from pipelines.bench_heads import write_synthetic_store

from conftest import invoke


def _plan(n=10_000, classes=10, folds=5):
    y = np.arange(n) % classes
    split = np.where(np.arange(n) < n * 5 // 6, "train", "test")
    return plan_protocol(y, split, folds=folds)


def _probe(correct, cost=CostModel(1.0, 1000, 0.01), rows=2000, params=None) -> Probe:
    correct = np.asarray(correct, bool)
    return Probe(cost, rows, float(correct.mean()), correct, params or {}, {rows: cost.seconds(rows)}, 0.1)


def _wrong_first(k: int, n: int = 1000) -> np.ndarray:
    correct = np.ones(n, bool)
    correct[:k] = False
    return correct


def test_paired_upper_bound_is_the_paired_difference_plus_its_margin():
    rng = np.random.default_rng(0)
    leader = rng.random(2000) < 0.9
    other = np.where(rng.random(2000) < 0.1, ~leader, leader)  # disagrees on ~10 % of rows
    n, d = len(leader), other.mean() - leader.mean()
    b, c = np.sum(other & ~leader), np.sum(~other & leader)
    se = np.sqrt(((b + c) / n - d**2) / n)
    assert paired_upper_bound(other, leader) == pytest.approx(d + 1.96 * se)
    assert paired_upper_bound(leader, leader) == 0.0  # the same predictions can still "win": kept


def test_cut_drops_only_heads_that_cannot_win():
    leader = np.ones(1000, bool)
    leader[500:580] = False  # 92 %
    worse = leader.copy()
    worse[:40] = False  # 88 %: the leader's errors and 40 more
    other = np.ones(1000, bool)
    other[:85] = False  # 91.5 %, on other rows: within the noise of the paired difference
    heads = [Contender(("s", "a"), get_head("ridge"), _probe(worse)),
             Contender(("s", "b"), get_head("lda"), _probe(other)),
             Contender(("s", "c"), get_head("knn"), _probe(leader))]
    assert cut(heads).key == ("s", "c")
    assert [h.status for h in heads] == ["dropped", "racing", "racing"]
    assert "88.00 %" in heads[0].reason and "92.00 %" in heads[0].reason and "upper bound" in heads[0].reason
    # a head that reached rung 1 is compared with the others at the rung they all reached
    heads[1].add_rung(8000, np.ones(1000, bool))
    assert cut(heads) is heads[2] and heads[1].status == "racing"
    # near-ties do not move the lead (hysteresis); a significant lead does
    heads[2].add_rung(8000, other)  # 91.5 %
    heads[1].rung_correct[1] = leader  # 92 %, but 165 rows disagree: not significant
    heads[1].rung_accuracy[1] = 0.92
    assert cut(heads, incumbent=heads[2]) is heads[2] and cut(heads) is heads[1]
    heads[1].rung_correct[1] = np.ones(1000, bool)
    heads[1].rung_accuracy[1] = 1.0
    assert cut(heads, incumbent=heads[2]) is heads[1] and heads[2].status == "dropped"


def test_duplicates_keep_the_first_registered_unless_another_is_much_faster():
    plan = _plan()
    pair = lambda slow, fast: [  # noqa: E731
        Contender(("s", "logreg"), get_head("logreg"), _probe(_wrong_first(10), CostModel(1.0, 1000, slow))),
        Contender(("s", "torch-logreg"), get_head("torch-logreg"), _probe(_wrong_first(10), CostModel(1.0, 1000, fast)))]
    close = pair(1.0, 0.8)  # 1.25x faster: timing noise, not a reason to switch
    drop_duplicates(close, plan, 2)
    assert [c.status for c in close] == ["racing", "duplicate"] and "same model as logreg" in close[1].reason
    much = pair(1.0, 0.2)
    drop_duplicates(much, plan, 2)
    assert [c.status for c in much] == ["duplicate", "racing"]
    named = pair(1.0, 0.2)
    drop_duplicates(named, plan, 2, named={"logreg", "torch-logreg"})
    assert [c.status for c in named] == ["racing", "racing"]


def test_probes_are_scored_on_the_same_held_out_rows_and_repeat_exactly():
    X, y = synthetic_features(6000, 32, 4, seed=3)
    X = X.astype(np.float32)
    fit = np.arange(5000)
    pool, holdout = race_split(y, fit, seed=0)
    assert len(holdout) == 1000 and not np.intersect1d(pool, holdout).size and set(pool) | set(holdout) == set(fit)
    spec = get_head("ridge")
    probe = probe_head(spec, X, y, pool, holdout, sizes=(500, 1000))
    assert probe.rows == 1000 and len(probe.correct) == len(holdout)
    rows = pool[budget.stratified_subset(y[pool], 1000, 0)]
    by_hand = [float((spec.pipeline().set_params(**params).fit(X[rows], y[rows]).predict(X[holdout]) == y[holdout]).mean())
               for params in ParameterGrid(spec.param_grid(1000))]
    assert probe.accuracy == max(by_hand)  # the best setting, refitted by hand on the same stratified rows
    again = probe_head(spec, X, y, pool, holdout, sizes=(500, 1000))
    assert again.accuracy == probe.accuracy  # decisions do not depend on timing
    assert readable_params(again.params) == readable_params(probe.params)
    assert 0.0 <= probe.cost.predict_fraction < 1.0

    contender = Contender(("s", "ridge"), spec, probe)
    confirm(contender, X, y, pool, holdout, class_weight=None, seed=0, rows=4000)
    assert contender.rung_rows == [1000, 4000] and contender.probe.cost.rows_at >= 4000
    assert 1.0 <= contender.probe.cost.exponent <= 2.0


def test_the_approximation_grows_with_its_share_and_the_exact_head_wins_when_it_fits():
    plan = _plan()
    spec = get_head("rbf-svm")
    huge = CostModel(2.0, 1000, 10.0)  # exact: ~1000 s for one fit on 8 333 rows
    approx = CostModel(1.0, 1000, 0.5, fixed=2.0)
    small = plan_head(spec, huge, plan, 12.0, jobs=2, n_classes=10, approximation_cost=approx)
    large = plan_head(spec, huge, plan, 600.0, jobs=2, n_classes=10, approximation_cost=approx)
    assert small.approximated and large.approximated
    assert small.spec.rank() < large.spec.rank() == spec.approximation.rank() == 4000
    assert "1 000 Nystroem" in small.spec.description and "1 000 Nystroem" in small.reason
    assert small.spec.pipeline().named_steps["clf"].n_components == 1000
    cheap = plan_head(spec, CostModel(2.0, 1000, 0.01), plan, 600.0, jobs=2, n_classes=10, approximation_cost=approx)
    assert not cheap.approximated


def test_the_last_head_gets_everything_left():
    allocator = budget.Allocator(600.0, _plan(), jobs=2, n_classes=10)
    allocator.add("a", get_head("ridge"), CostModel(1.0, 1000, 0.01))
    allocator.add("b", get_head("rbf-svm"), CostModel(2.0, 1000, 10.0), CostModel(1.0, 1000, 0.05))
    assert allocator.share("a", 500.0, ["a", "b"]) < 500.0
    assert allocator.share("b", 450.0, ["b"]) == 450.0
    decision = allocator.decide("b", 450.0, ["b"])
    assert decision.share_seconds == 450.0 and decision.predicted_seconds <= 450.0 * budget.LAST_FRACTION


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("s") / "synthetic.h5", 6000, 48, 4, seed=0)


def test_budgeted_compare_races_and_reports_it(runner, synthetic_store, tmp_path, monkeypatch):
    # Deterministic race: probes return fixed costs and held-out results; rung 1 and the runs are real fits.
    wrong = {"centroid": 300, "ridge": 21, "logreg": 21, "torch-logreg": 21, "rbf-svm": 20, "knn": 20}
    costs = {"rbf-svm": CostModel(2.0, 1000, 1000.0), "knn": CostModel(2.0, 1000, 1000.0),
             "logreg": CostModel(1.0, 1000, 1.0), "torch-logreg": CostModel(1.0, 1000, 1.0)}
    rbf = get_head("rbf-svm")  # a smaller kernel map keeps the test fast; the planning is the same
    small_map = dataclasses.replace(rbf.approximation, estimator=lambda: NystroemSVC(n_components=100),
                                    description="RBF kernel approximated by 100 Nystroem components")
    monkeypatch.setitem(HEADS, "rbf-svm", dataclasses.replace(rbf, approximation=small_map))

    def fake_probe(spec, X, y, pool, holdout, **kwargs):
        exact = spec is get_head(spec.name)
        params = {k: v[0] for k, v in spec.param_grid(1000).items()}
        cost = costs.get(spec.name, CostModel(1.0, 1000, 1e-3)) if exact else CostModel(1.0, 1000, 0.01)
        return _probe(_wrong_first(wrong[spec.name], len(holdout)), cost, rows=1000, params=params)

    monkeypatch.setattr("pipelines.compare.probe_head", fake_probe)
    out = tmp_path / "r"
    result = invoke(runner, ["compare-heads", synthetic_store, "--heads", "logreg,rbf-svm,knn,ridge,centroid,*-logreg",
                             "--budget", "0.5", "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    rows = {r["head"]: r for r in data["rows"]}
    others = {r["head"]: r for r in data["meta"]["skipped"]}
    assert others["centroid"]["mode"] == "dropped" and "upper bound" in others["centroid"]["reason"]
    assert others["torch-logreg"]["mode"] == "duplicate"  # named by a pattern only: one of the pair runs
    assert others["knn"]["mode"] == "skipped"  # cannot run in 30 s, and no approximation
    assert set(rows) == {"logreg", "ridge", "rbf-svm"}
    assert rows["ridge"]["mode"] in ("full", "halving")  # the others get their minimum, the leader the rest
    assert rows["rbf-svm"]["approximated"] and "Nystroem" in rows["rbf-svm"]["method"]
    assert rows["rbf-svm"]["race"]["status"] == "racing"  # the leader ran last, with all that was left
    assert rows["rbf-svm"]["share_seconds"] >= max(r["share_seconds"] for r in data["rows"])
    assert rows["ridge"]["race"]["rung_rows"] == [1000, 4000]  # rung 1: a real fit on four times the rows
    for r in rows.values():
        assert r["predicted_seconds"] is not None and r["actual_seconds"] > 0 and r["budget_note"]
    report = (out / "report.md").read_text()
    assert "## Cost and budget: the race" in report and "| synthetic | centroid |" in report
    assert "| dropped |" in report and "| duplicate |" in report and "actual / predicted" in report
    assert "dropped centroid:" in result.output and "duplicate torch-logreg:" in result.output


def test_small_stores_run_one_of_a_pair_unless_both_are_named(runner, tmp_path, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("small stores are not probed")

    monkeypatch.setattr("pipelines.compare.probe_head", no_probe)
    small = write_synthetic_store(tmp_path / "small.h5", 1200, 16, 3)
    result = invoke(runner, ["compare-heads", small, "--heads", "*knn", "--out", tmp_path / "a", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["head"] for r in data["rows"]] == ["knn"] and data["meta"]["skipped"][0]["mode"] == "duplicate"
    result = invoke(runner, ["compare-heads", small, "--heads", "knn,torch-knn", "--out", tmp_path / "b", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert {r["head"] for r in data["rows"]} == {"knn", "torch-knn"} and not data["meta"]["skipped"]


@pytest.mark.parametrize("make", [
    lambda: SVC(C=10.0, break_ties=True),
    lambda: KNeighborsClassifier(5, weights="distance", metric="cosine"),
    lambda: KNeighborsClassifier(4),
])
def test_one_threaded_pass_gives_exactly_what_predict_gives(make):
    X, y = synthetic_features(3000, 16, 5, seed=2)
    X = np.vstack([X, X[:200]]).astype(np.float32)  # exact duplicates: zero distances, vote ties
    y = np.concatenate([y, y[:200]])
    model = make().fit(X[:1500], y[:1500])
    assert labels_follow_scores(model)
    labels, proba, decision = score_rows(model, X[1500:], jobs=2)
    np.testing.assert_array_equal(labels, model.predict(X[1500:]))
    scores = proba if proba is not None else decision
    np.testing.assert_allclose(scores, model.predict_proba(X[1500:]) if proba is not None else
                               model.decision_function(X[1500:]))


def test_a_head_given_exactly_its_minimum_still_runs():
    plan = _plan(60_000)  # the float rounding that once skipped linear-svm on Fashion-MNIST
    spec = get_head("linear-svm")
    for level in (0.011, 0.0123, 0.0137, 0.02, 0.05):
        cost = CostModel(1.2932, 8000, level * 8)
        floor = budget.minimum_share(spec, cost, plan, jobs=2, n_classes=10)
        assert plan_head(spec, cost, plan, floor, jobs=2, n_classes=10).mode != "skipped"
