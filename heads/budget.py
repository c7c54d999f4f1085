"""Cost-aware tuning: predict what each head costs on this store, then spend a time budget where it pays.

Large stores make the plain protocol (every grid point x every fold, on every row) take hours: an exact RBF
SVM is quadratic to cubic in the rows. For each head this module

1. **probes** the cost: one fit on ``PROBE_ROWS`` stratified rows plus scoring a quarter as many, per
   preprocessing choice, at the middle of the grid, timed; the time is extrapolated to n rows by the head's
   known complexity (``t(n) = c + a * n ** cost_exponent``, fitted through the two probes);
2. **plans** within a share of the budget: the full protocol when its predicted cost fits; else successive
   halving (``HalvingGridSearchCV``, factor 3) on the largest stratified tuning subset whose search, plus the
   refit of the winner on *all* training rows, fits; else the head's approximation (e.g. a Nystroem kernel map
   for the RBF SVM), planned the same way; else the head is skipped. Every decision carries its reason.

Shares are handed out cheapest head first: each gets the remaining budget divided by the heads left, so what a
cheap head does not use flows to the expensive ones, and actual times (not predictions) are charged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import train_test_split

from .evaluate import base_pipeline, quiet_fits
from .protocol import Plan, Task
from .registry import HeadSpec

__all__ = [
    "DEFAULT_BUDGET_MINUTES",
    "FACTOR",
    "PLANNED_FRACTION",
    "PROBE_ROWS",
    "CostModel",
    "HeadBudget",
    "halving_schedule",
    "probe_cost",
    "plan_head",
    "minimum_share",
    "stratified_subset",
    "head_jobs",
    "Allocator",
    "full_plan",
]

DEFAULT_BUDGET_MINUTES = 15.0  # compare-heads --budget: leaves room for probes, bootstrap and reports in 20 min
FACTOR = 3  # successive halving: keep the best third of the candidates, triple their rows
PLANNED_FRACTION = 0.85  # plan predicted costs into 85 % of a share: the rest absorbs prediction error
PROBE_SECONDS = 0.5  # probes double in size while one setting takes less than this
PROBE_ROWS = (1000, 2000)  # timed probe sizes; stores with fewer than 2x the largest keep the full protocol


@dataclass(frozen=True)
class CostModel:
    """Mean seconds of one fit on n rows plus scoring n/4 rows: ``seconds_at * (n / rows_at) ** exponent``."""

    exponent: float
    rows_at: int
    seconds_at: float

    def seconds(self, n: float) -> float:
        return self.seconds_at * (max(n, 1.0) / self.rows_at) ** self.exponent

    def scaled(self, factor: float) -> "CostModel":
        """The same growth, every cost multiplied by `factor` (a calibration from measured runs)."""
        return CostModel(self.exponent, self.rows_at, self.seconds_at * factor)

    @classmethod
    def through(cls, sizes: tuple[int, int], seconds: tuple[float, float], exponent: float) -> "CostModel":
        """The power law through the larger probe, with the exponent the two probes show, kept within
        [`exponent`, `exponent` + 1]: never below the head's known complexity (fixed overheads make small
        probes look cheap), and superlinear solvers (liblinear's iterations grow with n) are caught."""
        (n1, n2), (t1, t2) = sizes, seconds
        measured = math.log(max(t2, 1e-9) / max(t1, 1e-9)) / math.log(n2 / n1)
        return cls(min(max(measured, exponent), exponent + 1.0), n2, max(t2, 1e-6))


@dataclass
class HeadBudget:
    """How one head is run under the budget.

    Attributes:
        mode: ``full`` (the plain protocol), ``halving`` (successive halving on a tuning subset, refit on all
            training rows) or ``skipped``.
        spec: the head actually run (the approximation when ``approximated``).
        approximated: whether the exact head was replaced by its approximation.
        tune_rows: rows the hyper-parameters are tuned on (per task); 0 when there is nothing to tune.
        predicted_seconds: predicted wall time of tuning + refit + scoring (None: not probed, small store).
        probe_seconds: time spent probing (charged to the budget).
        reason: one sentence, for the report.
    """

    mode: str
    spec: HeadSpec
    approximated: bool = False
    tune_rows: int = 0
    predicted_seconds: float | None = None
    probe_seconds: float = 0.0
    reason: str = ""


def stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a stratified random subset of `size` rows (all positions when size >= len(y))."""
    positions = np.arange(len(y))
    if size >= len(y):
        return positions
    _, counts = np.unique(y, return_counts=True)
    stratify = y if size >= len(counts) and counts.min() >= 2 else None
    subset, _ = train_test_split(positions, train_size=size, stratify=stratify, random_state=seed)
    return np.sort(subset)


def _fit_and_score_seconds(pipeline, X: np.ndarray, y: np.ndarray, rows: np.ndarray, scored: np.ndarray) -> float:
    started = time.perf_counter()
    with quiet_fits():
        pipeline.fit(X[rows], y[rows])
        pipeline.predict(X[scored])
    return time.perf_counter() - started


def _settings(spec: HeadSpec, n_train: int) -> list[dict]:
    from sklearn.model_selection import ParameterGrid

    return list(ParameterGrid(spec.param_grid(n_train)))


def probe_cost(spec: HeadSpec, X: np.ndarray, y: np.ndarray, *, class_weight: str | None = None,
               seed: int = 0, sizes: tuple[int, int] | None = None) -> CostModel:
    """Time every grid setting of `spec` on stratified subsets of two sizes and fit its cost model.

    While the largest probe is quick (under ``PROBE_SECONDS`` a setting) and a quarter of the store is larger,
    a probe at twice that size is added and the upper pair is used: the closer the probes come to the real
    size, the less fixed overheads and cache effects distort the extrapolation.
    """
    pipeline = base_pipeline(spec, class_weight, seed)
    timed: dict[int, float] = {}
    small, large = sizes or spec.probe_rows or PROBE_ROWS
    large = max(2, min(large, len(y) // 2))  # a store smaller than the probes: probe within it
    sizes = (max(1, min(small, large // 2)), large)

    def probe(n: int) -> float:
        rows = stratified_subset(y, n, seed)
        rest = np.setdiff1d(np.arange(len(y)), rows)
        scored = rest[: max(1, n // 4)] if len(rest) else rows[: max(1, n // 4)]
        settings = _settings(spec, len(rows))
        total = sum(_fit_and_score_seconds(clone(pipeline).set_params(**params), X, y, rows, scored)
                    for params in settings)
        return total / len(settings)

    for n in sizes:
        timed[n] = probe(n)
    pair = sizes
    while timed[pair[1]] < PROBE_SECONDS and len(y) >= 8 * pair[1]:
        pair = (pair[1], 2 * pair[1])
        timed[pair[1]] = probe(pair[1])
    return CostModel.through(pair, (timed[pair[0]], timed[pair[1]]), spec.cost_exponent)


def _halving_rounds(n_candidates: int, factor: int = FACTOR) -> int:
    """Rounds successive halving needs to narrow `n_candidates` down to the last factor or fewer."""
    rounds = 1
    while factor**rounds <= n_candidates:
        rounds += 1
    return rounds


def halving_schedule(n_candidates: int, max_rows: int, n_splits: int, n_classes: int,
                     factor: int = FACTOR) -> list[tuple[int, int]]:
    """(candidates, rows) per iteration, as ``HalvingGridSearchCV(min_resources="exhaust")`` runs them."""
    required = _halving_rounds(n_candidates, factor)
    smallest = 2 * n_splits * n_classes
    min_rows = max(smallest, max_rows // factor ** (required - 1))
    possible = 1
    while min_rows * factor**possible <= max_rows:
        possible += 1
    return [(math.ceil(n_candidates / factor**i), min_rows * factor**i) for i in range(min(possible, required))]


PARALLEL_EFFICIENCY = 0.7  # parallel fits share memory bandwidth and caches: 2 jobs give ~1.4x, not 2x


def head_jobs(spec: HeadSpec, jobs: int) -> int:
    """Parallel fits for `spec`: one at a time for heads that use every core in one fit (``threaded``)."""
    return 1 if spec.threaded else jobs


def _parallel(fits: int, jobs: int) -> float:
    workers = max(1, min(jobs, fits))
    return 1.0 + (workers - 1) * PARALLEL_EFFICIENCY


def _task_shape(task: Task) -> tuple[int, int, float]:
    """(fit rows, CV splits, mean fraction of fit rows each split trains on)."""
    n_fit = len(task.fit)
    fraction = float(np.mean([len(train) for train, _ in task.cv])) / max(n_fit, 1)
    return n_fit, len(task.cv), fraction


def full_plan(spec: HeadSpec, cost: CostModel, plan: Plan, jobs: int) -> float:
    """Predicted wall seconds of the plain protocol (grid search on every fit row, refit, score)."""
    total, jobs = 0.0, head_jobs(spec, jobs)
    for task in plan.tasks:
        n_fit, splits, fraction = _task_shape(task)
        fits = spec.grid_size() * splits
        total += fits * cost.seconds(n_fit * fraction) / _parallel(fits, jobs) + cost.seconds(n_fit)
    return total


def _halving_seconds(spec: HeadSpec, cost: CostModel, plan: Plan, rows: int, jobs: int, n_classes: int) -> float:
    total, jobs = 0.0, head_jobs(spec, jobs)
    for task in plan.tasks:
        n_fit, splits, fraction = _task_shape(task)
        if spec.grid_size() > 1:
            for candidates, resources in halving_schedule(spec.grid_size(), rows, splits, n_classes):
                fits = candidates * splits
                total += fits * cost.seconds(resources * fraction) / _parallel(fits, jobs)
        total += cost.seconds(n_fit)
    return total


def _smallest_tuning_rows(spec: HeadSpec, plan: Plan, n_classes: int) -> int:
    """The fewest tuning rows worth halving on: every round has scikit-learn's minimum rows (2 per class
    per split) or more, and never under 1 000."""
    smallest = 2 * len(plan.tasks[0].cv) * n_classes
    return max(1000, smallest * FACTOR ** (_halving_rounds(spec.grid_size()) - 1))


def _fit_in_share(spec: HeadSpec, cost: CostModel, plan: Plan, share: float, jobs: int,
                  n_classes: int) -> HeadBudget | None:
    """The full protocol if it fits `share`, else halving on the largest tuning subset that fits, else None."""
    predicted = full_plan(spec, cost, plan, jobs)
    n_fit = min(len(t.fit) for t in plan.tasks)
    if predicted <= share:
        return HeadBudget("full", spec, tune_rows=n_fit, predicted_seconds=predicted,
                          reason=f"full protocol predicted {predicted:.0f}s, within its share of {share:.0f}s")
    if spec.grid_size() == 1:
        refit = _halving_seconds(spec, cost, plan, 0, jobs, n_classes)
        if refit <= share:
            return HeadBudget("halving", spec, tune_rows=0, predicted_seconds=refit,
                              reason=f"nothing to tune; CV skipped (full protocol predicted {predicted:.0f}s)")
        return None
    low, high = _smallest_tuning_rows(spec, plan, n_classes), n_fit
    if low >= high or _halving_seconds(spec, cost, plan, low, jobs, n_classes) > share:
        return None
    while high - low > max(1, n_fit // 200):  # bisect the largest subset that fits
        mid = (low + high) // 2
        if _halving_seconds(spec, cost, plan, mid, jobs, n_classes) <= share:
            low = mid
        else:
            high = mid
    seconds = _halving_seconds(spec, cost, plan, low, jobs, n_classes)
    return HeadBudget("halving", spec, tune_rows=low, predicted_seconds=seconds,
                      reason=f"full protocol predicted {predicted:.0f}s > share {share:.0f}s: successive halving "
                             f"on {low} of {n_fit} rows, refit on all")


def _cheapest_seconds(spec: HeadSpec, cost: CostModel, plan: Plan, jobs: int, n_classes: int) -> float:
    rows = _smallest_tuning_rows(spec, plan, n_classes) if spec.grid_size() > 1 else 0
    return min(full_plan(spec, cost, plan, jobs), _halving_seconds(spec, cost, plan, rows, jobs, n_classes))


def minimum_share(spec: HeadSpec, cost: CostModel, plan: Plan, *, jobs: int, n_classes: int,
                  approximation_cost: CostModel | None = None) -> float:
    """The smallest share with which :func:`plan_head` runs the head at all (exactly or approximated)."""
    seconds = _cheapest_seconds(spec, cost, plan, jobs, n_classes)
    if spec.approximation is not None and approximation_cost is not None:
        seconds = min(seconds, _cheapest_seconds(spec.approximation, approximation_cost, plan, jobs, n_classes))
    return seconds / PLANNED_FRACTION


def plan_head(spec: HeadSpec, cost: CostModel, plan: Plan, share: float, *, jobs: int, n_classes: int,
              approximation_cost: CostModel | None = None) -> HeadBudget:
    """Decide how `spec` runs within `share` seconds (`approximation_cost`: the probed approximation's).

    Returns a :class:`HeadBudget` (``skipped`` when neither the head nor its approximation fits).
    """
    share *= PLANNED_FRACTION
    exact = _fit_in_share(spec, cost, plan, share, jobs, n_classes)
    if exact is not None:
        return exact
    n_fit = min(len(t.fit) for t in plan.tasks)
    refit = cost.seconds(n_fit) * len(plan.tasks)
    why = f"exact {spec.name} needs {refit:.0f}s just to fit {n_fit} rows" if refit > share else \
        f"exact {spec.name} cannot be tuned in {share:.0f}s"
    if spec.approximation is not None and approximation_cost is not None:
        approx = _fit_in_share(spec.approximation, approximation_cost, plan, share, jobs, n_classes)
        if approx is not None:
            approx.approximated = True
            approx.reason = f"{why}: approximated; {approx.reason}"
            return approx
    return HeadBudget("skipped", spec, predicted_seconds=full_plan(spec, cost, plan, jobs),
                      reason=f"{why}, over its share of {share:.0f}s, and it has no approximation that fits")


class Allocator:
    """Hands a time budget to heads in turn, charging what they actually took.

    Each head gets its :func:`minimum_share` plus an equal part of what remains after the minimum shares of
    every head still to run -- so an expensive head late in the order is approximated rather than starved. A
    head that could not run even alone in the budget reserves nothing (and is skipped); when the budget is
    overdrawn, the heads still to run get at most their minimum, and the last ones are skipped. Predictions
    are calibrated by the runs so far: once a head predicted to take over ``CALIBRATE_ABOVE`` seconds has run,
    later predictions are multiplied by the median of actual / predicted (kept within [1, 4]), which absorbs
    what probes cannot see (memory bandwidth shared by parallel fits, a busy machine).
    """

    CALIBRATE_ABOVE = 2.0

    def __init__(self, budget_seconds: float, plan: Plan, *, jobs: int, n_classes: int):
        self.budget_seconds = budget_seconds
        self.plan = plan
        self.jobs = jobs
        self.n_classes = n_classes
        self.calibration = 1.0
        self._heads: dict = {}
        self._ratios: list[float] = []

    def add(self, key, spec: HeadSpec, cost: CostModel, approximation_cost: CostModel | None = None) -> None:
        self._heads[key] = (spec, cost, approximation_cost)

    def _costs(self, key) -> tuple[HeadSpec, CostModel, CostModel | None]:
        spec, cost, approx = self._heads[key]
        return spec, cost.scaled(self.calibration), approx.scaled(self.calibration) if approx else None

    def full_seconds(self, key) -> float:
        spec, cost, _ = self._costs(key)
        return full_plan(spec, cost, self.plan, self.jobs)

    def minimum(self, key) -> float:
        spec, cost, approx = self._costs(key)
        return minimum_share(spec, cost, self.plan, jobs=self.jobs, n_classes=self.n_classes,
                             approximation_cost=approx)

    def order(self, keys: list) -> list:
        """Cheapest full protocol first: what a head leaves of its share flows to the ones after it."""
        return sorted(keys, key=self.full_seconds)

    def share(self, key, remaining: float, pending: list) -> float:
        """Seconds for `key` given `remaining` seconds and the `pending` heads (itself included)."""
        floors = {k: self.minimum(k) for k in pending}
        affordable = [f for f in floors.values() if f <= self.budget_seconds]
        surplus = remaining - sum(affordable)
        if floors[key] > self.budget_seconds:
            return max(0.0, surplus) / max(1, len(affordable))
        if surplus >= 0:
            return floors[key] + surplus / len(affordable)
        return min(floors[key], max(0.0, remaining))

    def decide(self, key, remaining: float, pending: list) -> HeadBudget:
        spec, cost, approx = self._costs(key)
        decision = plan_head(spec, cost, self.plan, self.share(key, remaining, pending), jobs=self.jobs,
                             n_classes=self.n_classes, approximation_cost=approx)
        if self.calibration > 1.0:
            decision.reason += f" (predictions x{self.calibration:.2f}, calibrated on the heads run so far)"
        return decision

    def record(self, predicted: float | None, actual: float) -> None:
        """Learn from a finished head (`predicted` as planned, calibration included)."""
        if predicted is not None and predicted >= self.CALIBRATE_ABOVE:
            self._ratios.append(actual / (predicted / self.calibration))
            self.calibration = min(4.0, max(1.0, float(np.median(self._ratios))))
