"""Label selection: the strategies (heads.selection), select-labels (pipelines.select, the CLI) and the learning
curves per strategy (compare-heads --selection)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from featurize.sources import DigitsSource
from heads import HeadsError
from heads.selection import STRATEGIES, SelectionSpace, select
from pipelines.extract import extract_features

from conftest import assert_one_line_error, invoke


@pytest.fixture(scope="module")
def pool(digits):
    """The digits' 1 347 training rows (standardised pixels) and their labels."""
    X_train, _, y_train, _ = digits
    return X_train, y_train


@pytest.fixture(scope="module")
def space(pool):
    return SelectionSpace(pool[0])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_picks_budget_new_rows_reproducibly(space, pool, name):
    labeled = np.arange(0, 200, 10)  # 20 labelled rows of (at least) two classes
    y_labeled = pool[1][labeled]
    first = select(space, 30, name, labeled=labeled, y_labeled=y_labeled, seed=3, n_classes=10)
    again = select(space, 30, name, labeled=labeled, y_labeled=y_labeled, seed=3, n_classes=10)
    assert len(first.rows) == 30 and len(np.unique(first.rows)) == 30
    assert not np.isin(first.rows, labeled).any()
    np.testing.assert_array_equal(first.rows, again.rows)
    for column in first.info.values():
        assert len(column) == 30


def test_strategies_never_read_the_labels_of_rows_they_do_not_pick(space, pool):
    # the curves' rounds reveal the labels of what was picked, round after round (margin fits on them); every
    # other label is changed here, and the picks must not move
    from pipelines.curves import draw_selection

    y = pool[1]
    for name in STRATEGIES:
        picks, _, _ = draw_selection(space, y, [10, 20, 40], name, 0, 10)
        changed = (y + 1) % 10
        changed[picks[-1]] = y[picks[-1]]
        again, _, _ = draw_selection(space, changed, [10, 20, 40], name, 0, 10)
        for a, b in zip(picks, again):
            np.testing.assert_array_equal(a, b)
        if name == "margin":  # and the labels it was given do matter: it is not blind
            flipped = y.copy()
            flipped[picks[0]] = flipped[picks[0]] % 2  # two classes instead of ten
            assert not np.array_equal(draw_selection(space, flipped, [10, 20, 40], name, 0, 10)[0][1], picks[1])


def test_typiclust_covers_more_classes_than_random_at_one_label_per_class(space, pool):
    y = pool[1]
    covered = {name: np.mean([len(np.unique(y[select(space, 10, name, seed=s).rows])) for s in range(5)])
               for name in ("random", "typiclust")}
    assert covered["typiclust"] >= covered["random"] + 1.0, covered  # measured: 8.6 vs 6.6 classes of 10


def test_typiclust_picks_the_most_typical_row_of_distinct_large_clusters(space):
    picks = select(space, 12, "typiclust", seed=0)
    assert len(set(picks.info["cluster"])) == 12  # one per cluster: 12 clusters for 12 picks
    assert picks.summary["clusters"] == 12
    clusters = space.kmeans(12, 0)
    for row, cluster in zip(picks.rows, picks.info["cluster"]):
        assert clusters[row] == cluster


def test_probcover_greedy_coverage_matches_brute_force():
    rng = np.random.default_rng(0)
    X = np.hstack([rng.normal(size=(80, 2)), np.ones((80, 1))]).astype(np.float32)  # 3-D, normalised inside
    space = SelectionSpace(X)
    radius = 0.3
    picks = select(space, 6, "probcover", radius=radius, seed=0)
    Z = space.X
    near = np.linalg.norm(Z[:, None] - Z[None], axis=2) < radius
    covered = np.zeros(len(Z), dtype=bool)
    for row, gain in zip(picks.rows, picks.info["covered"]):
        best = (near & ~covered[None, :]).sum(axis=1).max()
        assert gain == best == (near[row] & ~covered).sum()
        covered |= near[row]
    assert picks.info["coverage"][-1] == pytest.approx(covered.mean())


def test_probcover_refuses_a_radius_whose_graph_would_not_fit(pool, monkeypatch):
    from heads import selection

    monkeypatch.setattr(selection, "MAX_EDGES", 50_000)
    with pytest.raises(HeadsError, match="give a smaller --radius"):
        select(SelectionSpace(pool[0]), 5, "probcover", radius=1.9)


def test_probcover_radius_keeps_95_percent_of_balls_pure(space):
    radius = space.radius(10)
    labels = space.kmeans(10, 0)
    Z = space.X
    distance = np.sqrt(np.maximum(2 - 2 * Z @ Z.T, 0))
    other = labels[:, None] != labels[None, :]
    pure = ~((distance < radius) & other).any(axis=1)
    assert 0.94 <= pure.mean() <= 0.96


def test_kcenter_picks_the_farthest_row_each_time(space):
    labeled = np.array([0, 1, 2])
    picks = select(space, 5, "kcenter", labeled=labeled)
    centres = list(labeled)
    for row in picks.rows:
        d = np.sqrt(np.maximum(2 - 2 * space.X @ space.X[centres].T, 0)).min(axis=1)
        d[centres] = -1
        assert d[row] == pytest.approx(d.max(), abs=1e-5)
        centres.append(row)


def test_margin_needs_labels_and_picks_the_least_sure_rows(space, pool):
    with pytest.raises(HeadsError, match="labelled rows of at least two classes"):
        select(space, 5, "margin")
    labeled = np.arange(100)
    picks = select(space, 10, "margin", labeled=labeled, y_labeled=pool[1][labeled])
    assert (np.diff(picks.info["margin"]) >= 0).all() and picks.info["margin"].max() < 0.5


def test_select_refuses_bad_budgets(space):
    for budget, message in [(0, "positive"), (len(space) + 1, "larger than")]:
        with pytest.raises(HeadsError, match=message):
            select(space, budget, "random")
    with pytest.raises(HeadsError, match="did you mean typiclust"):
        select(space, 5, "typiclust2")


# --- select-labels ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partly_labelled(tmp_path_factory):
    """300 digits as PNGs in a CSV: train rows 0-239 unlabelled but 20, the rest test rows with labels."""
    root = tmp_path_factory.mktemp("select")
    source = DigitsSource()
    (root / "img").mkdir()
    rows = []
    for n, s in enumerate(source.samples[:300]):
        name = f"img/d{n:04d}.png"
        source.load(s.index).save(root / name)
        split = "train" if n < 240 else "test"
        label = source.classes[s.label] if (split == "test" or n % 12 == 0) else ""
        rows.append([name, label, split])
    with open(root / "digits.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return extract_features(root / "digits.csv", root / "digits.h5", model="pixels", workers=0, progress=False).path


def test_select_labels_picks_only_unlabelled_training_rows(runner, partly_labelled, tmp_path):
    out = tmp_path / "to_label.csv"
    result = invoke(runner, ["select-labels", partly_labelled, "--budget", "15", "--out", out])
    assert result.exit_code == 0, result.output
    assert "15 rows chosen by typiclust among 220 unlabelled rows, extending 20 labelled" in result.output
    with open(out) as f:
        picked = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in picked] == list(range(1, 16))
    assert {"id", "rank", "strategy", "cluster", "cluster_size", "typicality"} <= set(picked[0])
    numbers = [int(r["id"].split("/d")[1][:4]) for r in picked]
    assert all(n < 240 and n % 12 for n in numbers)  # unlabelled training rows only


def test_select_labels_does_not_look_at_test_rows(runner, partly_labelled, tmp_path):
    from pipelines.select import select_labels

    first = select_labels(partly_labelled, 10, "kcenter")
    import h5py
    import shutil

    changed = tmp_path / "changed.h5"
    shutil.copy(partly_labelled, changed)
    with h5py.File(changed, "r+") as f:
        f["features"][240:] = np.random.default_rng(0).normal(size=f["features"][240:].shape)
    assert select_labels(changed, 10, "kcenter").ids == first.ids


def test_select_labels_margin_extends_labelled_ids(runner, partly_labelled, tmp_path):
    from featurize.store import read_store

    store = read_store(partly_labelled, features=False)
    labeled = tmp_path / "labeled.csv"
    rows = np.flatnonzero((store.labels < 0) & (store.split == "train"))[:30]
    labeled.write_text("id,label\n" + "".join(f"{store.ids[r]},{r % 10}\n" for r in rows))
    out = tmp_path / "next.csv"
    result = invoke(runner, ["select-labels", partly_labelled, "-n", "10", "-s", "margin", "--labeled", labeled,
                             "--out", out])
    assert result.exit_code == 0, result.output
    assert "among 190 unlabelled rows, extending 50 labelled" in result.output
    with open(out) as f:
        picked = [r["id"] for r in csv.DictReader(f)]
    assert not set(picked) & {str(store.ids[r]) for r in rows}


def test_select_labels_bad_inputs_are_one_line_errors(runner, partly_labelled, digits_tiny, tmp_path):
    from featurize.store import read_store

    store = read_store(partly_labelled, features=False)
    out = tmp_path / "x.csv"
    base = ["select-labels", partly_labelled, "--out", out]
    assert_one_line_error(invoke(runner, [*base, "--budget", "0"]), "--budget must be at least 1")
    assert_one_line_error(invoke(runner, [*base, "--budget", "221"]), "larger than the 220 rows that can be picked")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("id\nnot-a-row.png\n")
    assert_one_line_error(invoke(runner, [*base, "-n", "5", "--labeled", unknown]), "are not rows of the store")
    test_ids = tmp_path / "test.csv"
    test_ids.write_text(f"id\n{store.ids[250]}\n")
    assert_one_line_error(invoke(runner, [*base, "-n", "5", "--labeled", test_ids]), "are test rows")
    assert not out.exists()
    # every training row of the builtin digits is labelled: a simulation, with no labelled set to start from
    assert_one_line_error(invoke(runner, ["select-labels", digits_tiny, "-n", "5", "-s", "margin", "--out", out]),
                          "margin ranks rows with a head")


def test_select_labels_on_a_store_without_candidates(runner, tmp_path):
    root = tmp_path / "t"
    (root / "img").mkdir(parents=True)
    source = DigitsSource()
    for n in range(20):
        source.load(n).save(root / "img" / f"{n}.png")
    (root / "all-test.csv").write_text("path,label,split\n" + "".join(
        f"img/{n}.png,{n % 2},test\n" for n in range(20)))
    store = extract_features(root / "all-test.csv", root / "t.h5", model="pixels", workers=0, progress=False).path
    result = invoke(runner, ["select-labels", store, "--budget", "3", "--out", tmp_path / "x.csv"])
    assert_one_line_error(result, "has no row to pick")


# --- compare-heads --selection ---------------------------------------------------------------------------------


def test_compare_heads_selection_curve(runner, digits_tiny, tmp_path):
    out = tmp_path / "results"
    result = invoke(runner, ["compare-heads", digits_tiny, "--heads", "logreg", "--shots", "1,2", "--seeds", "2",
                             "--selection", "random,typiclust,margin", "--out", out, "--bootstrap", "200", "-q"])
    assert result.exit_code == 0, result.output
    assert "label selection, accuracy %" in result.output
    data = json.loads((out / "results.json").read_text())
    rows = [r for r in data["learning_curve"] if r.get("selection")]
    assert {(r["selection"], r["shots"]) for r in rows} == {(s, k) for s in ("random", "typiclust", "margin")
                                                           for k in (1, 2)}
    for r in rows:
        assert r["budget"] == r["shots"] * 10 and len(r["classes_covered"]) == 2
        assert ("gain_vs_random" in r) == (r["selection"] != "random")
    margin_first = next(r for r in rows if r["selection"] == "margin" and r["shots"] == 1)
    random_first = next(r for r in rows if r["selection"] == "random" and r["shots"] == 1)
    assert margin_first["cold_start"] and margin_first["accuracy_per_seed"] == random_first["accuracy_per_seed"]
    report = (out / "report.md").read_text()
    assert "## Label selection" in report and "learning_curve.png" in report
    assert (out / "learning_curve.png").stat().st_size > 10_000
    assert_one_line_error(invoke(runner, ["compare-heads", digits_tiny, "--selection", "random"]), "give --shots too")
    assert_one_line_error(invoke(runner, ["compare-heads", digits_tiny, "--shots", "1", "--selection", "typiclus"]),
                          "did you mean typiclust")
