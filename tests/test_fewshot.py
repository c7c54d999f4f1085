"""Few-shot learning curves: shared nested draws, tuning on the drawn rows only, results and report."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pipelines.curves as curves
from heads import HeadsError, get_head, plan_protocol
from heads.fewshot import ShotResult, curve_point, draw_shots, paired_p_value, parse_shots, shot_task
from pipelines.compare import compare_heads
from pipelines.extract import extract_features

from conftest import TINY, assert_one_line_error, invoke


@pytest.fixture(scope="module")
def digits_tiny_vit(tmp_path_factory):
    return extract_features("builtin:digits", tmp_path_factory.mktemp("d") / "digits-vit.h5",
                            **{**TINY, "model": "test_vit"}).path


def test_parse_shots():
    assert parse_shots("16, 1,2,all,4,2") == [1, 2, 4, 16, "all"]
    assert parse_shots("all") == ["all"]
    for bad, message in [("1,two", "'two'"), ("0,1", "at least 1"), (" , ", "empty")]:
        with pytest.raises(HeadsError, match=message):
            parse_shots(bad)


def test_draws_are_nested_stratified_and_depend_only_on_labels_k_and_seed():
    y = np.repeat(np.arange(4), [3, 10, 10, 30])
    draws = draw_shots(y, [1, 2, 4, 8], [0, 1])
    again = draw_shots(y.copy(), [8, 1], [1])  # other k lists, other calls: the same rows
    assert np.array_equal(draws[(1, 1)], again[(1, 1)]) and np.array_equal(draws[(8, 1)], again[(8, 1)])
    for seed in (0, 1):
        for small, large in [(1, 2), (2, 4), (4, 8)]:
            assert set(draws[(small, seed)]) <= set(draws[(large, seed)])
        counts = np.bincount(y[draws[(4, seed)]], minlength=4)
        assert counts.tolist() == [3, 4, 4, 4]  # a class with fewer rows gives all it has
    assert not np.array_equal(draws[(8, 0)], draws[(8, 1)])


def test_shot_task_tunes_with_min_k_folds_and_not_at_one_shot():
    y = np.repeat(np.arange(3), 20)
    fit, score = np.arange(0, 60, 2), np.arange(1, 60, 2)
    drawn = draw_shots(y[fit], [1, 3, 10], [0])
    one = shot_task(fit, drawn[(1, 0)], score, y, folds=5, seed=0)
    assert one.cv == [] and len(one.fit) == 3
    three = shot_task(fit, drawn[(3, 0)], score, y, folds=5, seed=0)
    assert len(three.cv) == 3 and np.array_equal(three.score, score)
    assert len(shot_task(fit, drawn[(10, 0)], score, y, folds=5, seed=0).cv) == 5


def test_curve_point_ci_and_paired_test():
    rng = np.random.default_rng(0)
    good = [ShotResult(s, {}, rng.random(500) < 0.8) for s in range(5)]
    bad = [ShotResult(s, {}, rng.random(500) < 0.6) for s in range(5)]
    point = curve_point(good)
    assert point.accuracy_ci[0] < point.accuracy < point.accuracy_ci[1]
    assert point.accuracy == pytest.approx(np.mean([r.correct.mean() for r in good]))
    assert paired_p_value(good, bad) < 1e-6 and paired_p_value(good, good) == 1.0


def test_every_head_and_candidate_gets_the_same_draws(digits_tiny, digits_tiny_vit, monkeypatch):
    seen = {}
    fit_draw = curves._fit_draw

    def recording(spec, X, y, task, **kwargs):
        seen.setdefault((len(task.fit), tuple(task.fit[:5]), len(task.cv)), set()).add((id(X), spec.name))
        return fit_draw(spec, X, y, task, **kwargs)

    monkeypatch.setattr(curves, "_fit_draw", recording)
    comparison = compare_heads([digits_tiny, digits_tiny_vit], ["logreg", "centroid"], shots=[1, 2, 4],
                               seeds=2, budget=None, progress=False)
    assert len(seen) == 3 * 2  # one draw per (k, seed) ...
    for users in seen.values():
        assert len(users) == 2 * 2  # ... used by both heads on both candidates
    rows = comparison.curve["rows"]
    assert {(r["shots"], r["head"]) for r in rows} == {(k, h) for k in (1, 2, 4) for h in ("logreg", "centroid")}
    assert all(r["untuned"] == (r["shots"] == 1) for r in rows)
    assert sum(r["best"] for r in rows) == 3


def test_test_labels_never_influence_the_curve_settings(digits_tiny):
    from featurize.store import read_store
    from pipelines import candidates as cands

    store = read_store(digits_tiny)
    X = np.asarray(store.features, np.float32)
    y = store.labels.copy()
    plan = plan_protocol(y, store.split)
    units = [(cands.parse_candidates([digits_tiny])[0], get_head(name)) for name in ("logreg", "knn")]
    features = {units[0][0].name: X}
    kwargs = dict(folds=5, jobs=1, class_weight=None, n_boot=100, seed=0)
    first = curves.learning_curve(units, features, y, plan, [2, 8], [0], **kwargs)
    scrambled = y.copy()
    test = plan.final.score
    scrambled[test] = np.random.default_rng(1).permutation(scrambled[test])
    scrambled[test[:50]] = (scrambled[test[:50]] + 1) % 10
    second = curves.learning_curve(units, features, scrambled, plan, [2, 8], [0], **kwargs)
    assert [r["params_per_seed"] for r in first] == [r["params_per_seed"] for r in second]
    assert [r["accuracy"] for r in first] != [r["accuracy"] for r in second]  # the test labels were used: scoring


def test_compare_heads_shots_cli_writes_the_curve(runner, digits_tiny, tmp_path):
    out = tmp_path / "results"
    result = invoke(runner, ["compare-heads", digits_tiny, "--heads", "logreg,knn,centroid", "--shots", "1,2,4,all",
                             "--seeds", "2", "--out", out, "--bootstrap", "200", "-q"])
    assert result.exit_code == 0, result.output
    assert "learning curve, best head per labelled rows per class" in result.output
    data = json.loads((out / "results.json").read_text())
    curve = data["learning_curve"]
    assert {r["shots"] for r in curve} == {1, 2, 4, "all"}
    assert all(len(r["seeds"]) == 2 and len(r["accuracy_per_seed"]) == 2 for r in curve if r["shots"] != "all")
    assert data["meta"]["learning_curve"]["shots"] == [1, 2, 4, "all"]
    report = (out / "report.md").read_text()
    assert "## Learning curve" in report and "learning_curve.png" in report
    assert (out / "learning_curve.png").stat().st_size > 10_000
    bad = invoke(runner, ["compare-heads", digits_tiny, "--shots", "1,x"])
    assert_one_line_error(bad, "--shots")
