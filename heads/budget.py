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
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from .protocol import Plan, Task
from .registry import PREPROCESSING, HeadSpec

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
    "stratified_subset",
    "full_plan",
]

DEFAULT_BUDGET_MINUTES = 15.0  # compare-heads --budget: leaves room for probes, bootstrap and reports in 20 min
FACTOR = 3  # successive halving: keep the best third of the candidates, triple their rows
PLANNED_FRACTION = 0.85  # plan predicted costs into 85 % of a share: the rest absorbs prediction error
PROBE_ROWS = (1000, 2000)  # timed probe sizes; stores with fewer than 2x the largest keep the full protocol


@dataclass(frozen=True)
class CostModel:
    """Seconds of one fit on n rows plus scoring n/4 rows: ``offset + scale * n ** exponent``."""

    exponent: float
    scale: float
    offset: float

    def seconds(self, n: float) -> float:
        return self.offset + self.scale * max(n, 0.0) ** self.exponent

    @classmethod
    def through(cls, sizes: tuple[int, int], seconds: tuple[float, float], exponent: float) -> "CostModel":
        """The model through two timed sizes (a noisy, non-increasing pair falls back to a pure power law)."""
        (n1, n2), (t1, t2) = sizes, seconds
        scale = (t2 - t1) / (n2**exponent - n1**exponent)
        if scale <= 0:
            return cls(exponent, max(t1, t2) / n2**exponent, 0.0)
        return cls(exponent, scale, max(0.0, t1 - scale * n1**exponent))


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message=".*within_class_std_dev_.*", category=UserWarning)
        pipeline.fit(X[rows], y[rows])
        pipeline.predict(X[scored])
    return time.perf_counter() - started


def _middle(values: list) -> object:
    return values[len(values) // 2]


def probe_cost(spec: HeadSpec, X: np.ndarray, y: np.ndarray, *, class_weight: str | None = None,
               seed: int = 0, sizes: tuple[int, int] = PROBE_ROWS) -> CostModel:
    """Time `spec` at two sizes (per preprocessing choice, middle of the grid) and fit its cost model."""
    times = []
    for n in sizes:
        rows = stratified_subset(y, n, seed)
        rest = np.setdiff1d(np.arange(len(y)), rows)
        scored = rest[: max(1, n // 4)] if len(rest) else rows[: max(1, n // 4)]
        total = 0.0
        for prep in spec.prep:
            pipeline = spec.pipeline().set_params(prep=PREPROCESSING[prep]())
            params = {f"clf__{k}": _middle(v) for k, v in spec.grid.items()}
            for key in spec.sample_bounded:
                if f"clf__{key}" in params:
                    params[f"clf__{key}"] = min(params[f"clf__{key}"], len(rows))
            pipeline.set_params(**params)
            clf_params = pipeline.named_steps["clf"].get_params()
            if "random_state" in clf_params:
                pipeline.set_params(clf__random_state=seed)
            if spec.class_weight:
                pipeline.set_params(clf__class_weight=class_weight)
            total += _fit_and_score_seconds(pipeline, X, y, rows, scored)
        times.append(total / len(spec.prep))
    return CostModel.through(sizes, (times[0], times[1]), spec.cost_exponent)


def halving_schedule(n_candidates: int, max_rows: int, n_splits: int, n_classes: int,
                     factor: int = FACTOR) -> list[tuple[int, int]]:
    """(candidates, rows) per iteration, as ``HalvingGridSearchCV(min_resources="exhaust")`` runs them."""
    required = 1
    while factor**required <= n_candidates:
        required += 1
    smallest = 2 * n_splits * n_classes
    min_rows = max(smallest, max_rows // factor ** (required - 1))
    possible = 1
    while min_rows * factor**possible <= max_rows:
        possible += 1
    return [(math.ceil(n_candidates / factor**i), min_rows * factor**i) for i in range(min(possible, required))]


def _parallel(fits: int, jobs: int) -> int:
    return max(1, min(jobs, fits))


def _task_shape(task: Task) -> tuple[int, int, float]:
    """(fit rows, CV splits, mean fraction of fit rows each split trains on)."""
    n_fit = len(task.fit)
    fraction = float(np.mean([len(train) for train, _ in task.cv])) / max(n_fit, 1)
    return n_fit, len(task.cv), fraction


def full_plan(spec: HeadSpec, cost: CostModel, plan: Plan, jobs: int) -> float:
    """Predicted wall seconds of the plain protocol (grid search on every fit row, refit, score)."""
    total = 0.0
    for task in plan.tasks:
        n_fit, splits, fraction = _task_shape(task)
        fits = spec.grid_size() * splits
        total += fits * cost.seconds(n_fit * fraction) / _parallel(fits, jobs) + cost.seconds(n_fit)
    return total


def _halving_seconds(spec: HeadSpec, cost: CostModel, plan: Plan, rows: int, jobs: int, n_classes: int) -> float:
    total = 0.0
    for task in plan.tasks:
        n_fit, splits, fraction = _task_shape(task)
        if spec.grid_size() > 1:
            for candidates, resources in halving_schedule(spec.grid_size(), rows, splits, n_classes):
                fits = candidates * splits
                total += fits * cost.seconds(resources * fraction) / _parallel(fits, jobs)
        total += cost.seconds(n_fit)
    return total


def _smallest_tuning_rows(spec: HeadSpec, plan: Plan, n_classes: int) -> int:
    splits = len(plan.tasks[0].cv)
    return max(1000, 2 * splits * n_classes * FACTOR ** max(0, len(halving_schedule(spec.grid_size(), 10**9, splits, n_classes)) - 1))


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


def plan_head(spec: HeadSpec, cost: CostModel, plan: Plan, share: float, *, jobs: int, n_classes: int,
              approximation_cost: "callable | None" = None) -> HeadBudget:
    """Decide how `spec` runs within `share` seconds; `approximation_cost()` probes the approximation on demand.

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
        approx_cost, probe_seconds = approximation_cost()
        approx = _fit_in_share(spec.approximation, approx_cost, plan, max(0.0, share - probe_seconds), jobs,
                               n_classes)
        if approx is not None:
            approx.approximated = True
            approx.probe_seconds = probe_seconds
            approx.reason = f"{why} (share {share:.0f}s): approximated; {approx.reason}"
            return approx
    return HeadBudget("skipped", spec, predicted_seconds=full_plan(spec, cost, plan, jobs),
                      reason=f"{why}, over its share of {share:.0f}s, and it has no approximation that fits")

