"""Racing heads under a time budget: measure every head cheaply, then spend the budget on those that can win.

Issue 7's planner gave every head an equal part of the budget. On real features that starves the head that
wins (an exact RBF SVM) while six linear models within two points of each other each take a full share. The
race instead works like successive halving *across* heads (and representations), with rows as the resource:

1. **Rung 0** -- every head's probes (:func:`probe_head`) fit every grid setting on stratified subsets of the
   training rows (for the cost model) and score the largest on a held-out set of training rows, the same rows
   for every head and representation, so accuracies are paired.
2. **Cut** -- a head stays in the race while the upper end of its paired confidence interval against the
   leader (``acc + Z * se`` of the difference) reaches the leader's accuracy; the others are dropped with their
   probe accuracy as the reason. Accuracy, not timing, decides, so the same command gives the same race.
3. **Duplicates** -- of the heads of one ``family`` (the same model in two implementations) still racing, one
   runs unless all were named: the first registered, unless another is predicted :data:`DUPLICATE_MARGIN`
   times faster (a margin wide enough that timing noise does not flip the choice).
4. **Rung 1** -- the survivors fit their best setting on :data:`RUNG_FACTOR` times more rows (scored on the same
   held-out rows, cut again) and time it: the cost extrapolation to all rows then starts much closer, and a head
   with an approximation gets its *fidelity*: the approximation (probed at the exact head's best setting) minus
   the exact head, same rows. The leader keeps the lead unless another head is significantly better.

The survivors then run (:mod:`pipelines.compare`): the others first with what they need at least, the race
leader last with everything that is left (:class:`heads.budget.Allocator` with ``leader_last``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone

from .budget import PROBE_ROWS, PROBE_SECONDS, CostModel, full_plan
from .schedule import stratified_subset
from .evaluate import base_pipeline, quiet_fits, readable_params
from .protocol import Plan
from .registry import HeadSpec

__all__ = ["HOLDOUT_ROWS", "RUNG_FACTOR", "RACE_FRACTION", "Z", "DUPLICATE_MARGIN", "Probe", "Contender",
           "probe_head", "race_split", "drop_duplicates", "cut", "confirm", "paired_upper_bound"]

HOLDOUT_ROWS = 2000  # held-out training rows every probe is scored on (paired across heads)
RUNG_FACTOR = 4  # rung 1 fits the best setting on this many times the probe's rows
Z = 1.96  # a head stays while acc + Z * se(difference to the leader) >= the leader's accuracy
DUPLICATE_MARGIN = 2.0  # another implementation replaces the first registered only when this much faster
RACE_FRACTION = 0.1  # rung 1 runs for a head only when predicted within this share of the budget


@dataclass
class Probe:
    """What probing one head measured.

    Attributes:
        cost: mean seconds of one fit on n rows plus scoring n/4 rows, over the grid's settings.
        rows: training rows of the probe that was scored.
        accuracy: the best setting's accuracy on the held-out rows.
        correct: per held-out row, whether the best setting got it right.
        params: the best setting (pipeline parameters, ready for ``set_params``).
        best_seconds: the best setting's fit + scoring seconds per probe size.
        seconds: wall time of the probe.
    """

    cost: CostModel
    rows: int
    accuracy: float
    correct: np.ndarray
    params: dict[str, Any]
    best_seconds: dict[int, float]
    seconds: float


@dataclass
class Contender:
    """One (representation, head) in the race."""

    key: tuple[str, str]
    spec: HeadSpec
    probe: Probe
    approximation: Probe | None = None
    status: str = "racing"  # racing | dropped | duplicate | skipped
    reason: str = ""
    rung_rows: list[int] = field(default_factory=list)
    rung_accuracy: list[float] = field(default_factory=list)
    fidelity: float | None = None  # approximation's accuracy minus the exact head's, same rows (rung 1)
    fidelity_rows: int | None = None
    confirm_seconds: float = 0.0
    rung_correct: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        self.add_rung(self.probe.rows, self.probe.correct)

    def add_rung(self, rows: int, correct: np.ndarray) -> None:
        self.rung_rows.append(rows)
        self.rung_accuracy.append(float(correct.mean()))
        self.rung_correct.append(correct)

    @property
    def accuracy(self) -> float:
        """Accuracy at the last rung it reached."""
        return self.rung_accuracy[-1]

    @property
    def seconds(self) -> float:
        """Time the race spent on it (probes of the head and its approximation, rung 1)."""
        return self.probe.seconds + (self.approximation.seconds if self.approximation else 0.0) + self.confirm_seconds

    def summary(self) -> dict[str, Any]:
        """The race as results.json reports it."""
        return {"representation": self.key[0], "head": self.key[1], "status": self.status, "reason": self.reason,
                "rung_rows": self.rung_rows, "rung_accuracy": self.rung_accuracy,
                "probe_params": readable_params(self.probe.params), "fidelity": self.fidelity,
                "fidelity_rows": self.fidelity_rows, "race_seconds": self.seconds,
                "cost_model": _cost_fields(self.probe.cost),
                "approximation_cost_model": _cost_fields(self.approximation.cost) if self.approximation else None}


def _cost_fields(cost: CostModel) -> dict[str, float]:
    """A cost model as results.json gives it: seconds of one fit (+ scoring a quarter as many rows) on n rows
    = fixed (shrunk below fixed_rows) + seconds_at * (n / rows_at) ** exponent (the refit's growing part x
    refit_factor)."""
    return dataclasses.asdict(cost)


def race_split(y: np.ndarray, fit: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, holdout): positions of `fit` rows for probe training and the held-out rows every probe is scored
    on (stratified, :data:`HOLDOUT_ROWS` or a fifth of the fit rows; in random order, so any prefix is a random
    sample too)."""
    size = min(HOLDOUT_ROWS, len(fit) // 5)
    held = fit[stratified_subset(y[fit], size, seed)]
    holdout = np.random.default_rng(seed).permutation(held)
    return np.setdiff1d(fit, holdout), holdout


def _fit_predict(pipeline, X, y, rows, scored) -> tuple[float, float, np.ndarray, float]:
    """(fit seconds, predict seconds, predictions, fixed seconds) of `pipeline` trained on `rows`, predicting
    `scored`; the fixed seconds are the part of the fit its estimator reports as not growing with the rows
    (``fixed_seconds_``: a kernel map's decomposition), 0 for the others."""
    started = time.perf_counter()
    with quiet_fits():
        pipeline.fit(X[rows], y[rows])
        fitted = time.perf_counter()
        predicted = pipeline.predict(X[scored])
    return fitted - started, time.perf_counter() - fitted, predicted, getattr(pipeline[-1], "fixed_seconds_", 0.0)


def probe_head(spec: HeadSpec, X: np.ndarray, y: np.ndarray, pool: np.ndarray, holdout: np.ndarray, *,
               class_weight: str | None = None, seed: int = 0, sizes: tuple[int, int] | None = None,
               settings: list[dict[str, Any]] | None = None) -> Probe:
    """Time every grid setting of `spec` on stratified subsets of `pool` of two sizes, fit its cost model, and
    score the larger probe's settings on the `holdout` rows.

    A setting's cost is its fit on n rows plus predicting n/4 rows (the predict time measured on the held-out
    rows, scaled). While the largest probe is quick (under ``PROBE_SECONDS`` a setting) and the pool is 8 times
    larger, a probe at twice the size is added (timed only) and the upper pair used for the cost model.
    `settings` restricts the probe to these grid points (an approximation probed at its exact head's best).
    """
    started = time.perf_counter()
    pipeline = base_pipeline(spec, class_weight, seed)
    small, large = sizes or spec.probe_rows or PROBE_ROWS
    large = max(2, min(large, len(pool)))
    sizes = (max(1, min(small, large // 2)), large)
    mean: dict[int, float] = {}
    predicting: dict[int, float] = {}
    per_setting: dict[int, list[float]] = {}
    fixed: dict[int, float] = {}
    scored: dict[str, Any] = {}

    def probe(n: int, score: bool) -> None:
        rows = pool[stratified_subset(y[pool], n, seed)]
        timed = holdout if score else holdout[: max(1, n // 4)]
        seconds, accuracy, scoring, fixed_parts = [], [], [], []
        for params in settings or _settings(spec, len(rows)):
            fit_s, predict_s, predicted, fixed_s = _fit_predict(clone(pipeline).set_params(**params), X, y, rows,
                                                                timed)
            fixed_parts.append(fixed_s)
            scoring.append(predict_s * (n / 4) / len(timed))
            seconds.append(fit_s + scoring[-1])
            if score:
                correct = predicted == y[timed]
                accuracy.append(float(correct.mean()))
                if len(accuracy) == 1 or accuracy[-1] > max(accuracy[:-1]):  # first best, in grid order
                    scored.update(params=params, correct=correct, index=len(accuracy) - 1)
        mean[n] = float(np.mean(seconds))
        fixed[n] = float(np.mean(fixed_parts))
        predicting[n] = float(np.sum(scoring) / max(np.sum(seconds), 1e-9))
        per_setting[n] = seconds

    probe(sizes[0], False)
    probe(sizes[1], True)
    pair = sizes
    while mean[pair[1]] < PROBE_SECONDS and len(pool) >= 8 * pair[1]:
        pair = (pair[1], 2 * pair[1])
        probe(pair[1], False)
    cost = CostModel.through(pair, (mean[pair[0]], mean[pair[1]]), spec.cost_exponent, predicting[pair[1]],
                             fixed_rows=spec.rank(),  # a sized approximation: its rank's fixed cost, measured
                             fixed_seconds=fixed[pair[1]] if fixed[pair[1]] > 0 else None)
    best_seconds = {n: times[scored["index"]] for n, times in per_setting.items()}  # the same grid order
    return Probe(cost, sizes[1], float(scored["correct"].mean()), scored["correct"], scored["params"],
                 best_seconds, time.perf_counter() - started)


def _settings(spec: HeadSpec, n_train: int) -> list[dict]:
    from sklearn.model_selection import ParameterGrid

    return list(ParameterGrid(spec.param_grid(n_train)))


def paired_upper_bound(correct: np.ndarray, leader: np.ndarray) -> float:
    """Upper end of the paired confidence interval of (this head's accuracy - the leader's), on the same rows:
    the difference of two paired proportions, its standard error from the rows where they disagree."""
    n = len(correct)
    difference = float(correct.mean() - leader.mean())
    discordant = float(np.sum(correct != leader))
    se = math.sqrt(max(discordant - n * difference**2, 0.0)) / n
    return difference + Z * se


def drop_duplicates(contenders: list[Contender], plan: Plan, jobs: int, named: set[str] = frozenset()) -> None:
    """Of every family's members on one representation, keep the first registered unless another is predicted
    :data:`DUPLICATE_MARGIN` times faster (hysteresis: timing noise never flips the choice). Families whose
    members were all `named` keep every member."""
    groups: dict[tuple[str, str], list[Contender]] = {}
    for c in contenders:
        if c.spec.family is not None and c.status == "racing":
            groups.setdefault((c.key[0], c.spec.family), []).append(c)
    for members in groups.values():
        if len(members) < 2 or all(c.spec.name in named for c in members):
            continue
        seconds = {c.key: full_plan(c.spec, c.probe.cost, plan, jobs) for c in members}
        keep = members[0]
        for other in members[1:]:
            if seconds[other.key] * DUPLICATE_MARGIN < seconds[keep.key]:
                keep = other
        why = (f"predicted {DUPLICATE_MARGIN:g}x faster here" if keep is not members[0] else
               f"registered first, and no other is predicted {DUPLICATE_MARGIN:g}x faster")
        for c in members:
            if c is not keep:
                c.status = "duplicate"
                c.reason = (f"same model as {keep.spec.name} ({why}: full protocol predicted "
                            f"{seconds[keep.key]:.0f} s vs {seconds[c.key]:.0f} s); name both to run both")


def cut(contenders: list[Contender], incumbent: Contender | None = None) -> Contender:
    """Drop the racing heads that cannot catch the leader (paired upper bound below zero) at the last rung every
    racing head reached; returns the leader: the best there (ties go to the first) -- but an `incumbent` (the
    previous rung's leader, still racing) keeps the lead unless that head is significantly better (paired lower
    bound above zero): near-ties never move the budget from one head to another."""
    racing = [c for c in contenders if c.status == "racing"]
    rung = min(len(c.rung_rows) for c in racing) - 1
    leader = max(racing, key=lambda c: c.rung_accuracy[rung])  # max keeps the first of equals
    if incumbent is not None and incumbent in racing and leader is not incumbent:
        ahead = -paired_upper_bound(incumbent.rung_correct[rung], leader.rung_correct[rung])
        if ahead <= 0:
            leader = incumbent
    best = leader.rung_correct[rung]
    for c in racing:
        if c is leader:
            continue
        bound = paired_upper_bound(c.rung_correct[rung], best)
        if bound < 0:
            c.status = "dropped"
            c.reason = (f"{c.rung_accuracy[rung] * 100:.2f} % on {len(best)} held-out rows, trained on "
                        f"{c.rung_rows[rung]}, vs {leader.key[1]}'s {leader.rung_accuracy[rung] * 100:.2f} % "
                        + (f"on {leader.key[0]} " if leader.key[0] != c.key[0] else "")
                        + f"(paired 95 % upper bound of the difference: {bound * 100:+.2f} points)")
    return leader


def confirm(contender: Contender, X: np.ndarray, y: np.ndarray, pool: np.ndarray, holdout: np.ndarray, *,
            class_weight: str | None, seed: int, rows: int,
            ) -> None:
    """Rung 1: fit the best setting on `rows` stratified pool rows, score the held-out rows, and re-fit the cost
    model's growth from the best setting's own times (rung 0, timed twice -- the faster counts, as in
    ``timeit`` -- to rung 1), which extrapolates from much nearer the full size. A probed approximation scored
    at `rows` gets its fidelity: its accuracy minus this one's."""
    started = time.perf_counter()
    spec, probe = contender.spec, contender.probe
    model = clone(base_pipeline(spec, class_weight, seed)).set_params(**probe.params)
    regrow = probe.cost.rows_at < rows  # the probes stopped below this rung: extrapolate from here instead
    if regrow:  # the growth rests on the rung-0 time: a second timing of it, and the faster one counts
        base = pool[stratified_subset(y[pool], probe.rows, seed)]
        fit_s, predict_s, _, _ = _fit_predict(clone(model), X, y, base, holdout[: max(1, probe.rows // 4)])
        probe.best_seconds[probe.rows] = min(probe.best_seconds[probe.rows], fit_s + predict_s)
    subset = pool[stratified_subset(y[pool], rows, seed)]
    fit_s, predict_s, predicted, _ = _fit_predict(model, X, y, subset, holdout)
    contender.add_rung(rows, predicted == y[holdout])
    contender.confirm_seconds += time.perf_counter() - started
    scoring = predict_s * (rows / 4) / len(holdout)
    if regrow:
        _regrow(contender, rows, fit_s + scoring, scoring / max(fit_s + scoring, 1e-9))
    if contender.approximation is not None and contender.approximation.rows == rows:
        contender.fidelity = contender.approximation.accuracy - contender.accuracy
        contender.fidelity_rows = contender.approximation.rows


def _regrow(contender: Contender, rows: int, seconds: float, predict_fraction: float) -> None:
    """Re-fit the cost model from the best setting's own times at rung 0 and at `rows`.

    Between the rungs the measured exponent holds (kept near the head's known complexity); beyond them it is
    taken halfway back to that complexity, since what made small fits grow faster or slower fades with n
    (liblinear at C = 1 on Fashion-MNIST: 1.23-1.28 from 2 000 to 8 000 rows, 1.13 from 8 000 to 60 000).
    The refit is charged at the best setting's cost (``refit_factor``), the tuning at the grid's mean."""
    spec, probe = contender.spec, contender.probe
    base = probe.best_seconds[probe.rows]
    measured = math.log(max(seconds, 1e-9) / max(base, 1e-9)) / math.log(rows / probe.rows)
    low = max(1.0, spec.cost_exponent - 0.5)  # between rungs fixed overheads matter less: superlinear solvers
    between = min(max(measured, low), spec.cost_exponent + 1.0)  # may show their real, lower growth
    # The mean over settings, grown from rung 0 with the best setting's measured exponent.
    at_rows = probe.cost.seconds(probe.rows) * (rows / probe.rows) ** between
    refit_factor = min(max(seconds / max(at_rows, 1e-9), 0.25), 4.0)
    contender.probe.cost = CostModel((between + spec.cost_exponent) / 2, rows, at_rows, predict_fraction,
                                     refit_factor=refit_factor)
