"""Cost-aware tuning: predict what each head costs on this store, then spend a time budget where it pays.

Large stores make the plain protocol (every grid point x every fold, on every row) take hours: an exact RBF
SVM is quadratic to cubic in the rows. For each head this module

1. **models** the cost from timed probes (:func:`heads.race.probe_head`: every grid setting fitted on
   ``PROBE_ROWS`` stratified rows plus scoring a quarter as many), extrapolated to n rows by a power law whose
   exponent the probes measure within the head's known complexity (:class:`CostModel`);
2. **plans** within a share of the budget: the full protocol when its predicted cost fits; else successive
   halving (``HalvingGridSearchCV``, factor 3) on the largest stratified tuning subset whose search, plus the
   refit of the winner on *all* training rows, fits; else the head's approximation (e.g. a Nystroem kernel map
   for the RBF SVM), planned the same way; else the head is skipped. Every decision carries its reason.

Shares are handed out cheapest head first, the race leader (:mod:`heads.race`) last: each gets its minimum plus
an equal part of what is left, the last one everything that remains, so what a head does not use flows to the
leader, and actual times (not predictions) are charged. An approximation is sized by its share (more Nystroem
components when there is time for them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .evaluate import CALIBRATION_ROWS, calibration_method, labels_follow_scores
from .schedule import FACTOR, halving_rounds, halving_schedule, stratified_subset
from .protocol import Plan, Task
from .registry import HeadSpec

__all__ = [
    "DEFAULT_BUDGET_MINUTES",
    "FACTOR",
    "PLANNED_FRACTION",
    "LAST_FRACTION",
    "FIDELITY_TOLERANCE",
    "PROBE_ROWS",
    "CostModel",
    "HeadBudget",
    "halving_schedule",
    "plan_head",
    "minimum_share",
    "stratified_subset",
    "head_jobs",
    "Allocator",
    "LastRound",
    "full_plan",
]

DEFAULT_BUDGET_MINUTES = 15.0  # compare-heads --budget: leaves room for probes, bootstrap and reports in 20 min
PLANNED_FRACTION = 0.85  # plan predicted costs into 85 % of a share: the rest absorbs prediction error
LAST_FRACTION = 0.95  # the last head (the race leader) plans into 95 % of what is left: no budget idles
FIDELITY_TOLERANCE = 0.0025  # an approximation within 0.25 points of its exact head counts as faithful
PROBE_SECONDS = 0.5  # probes double in size while one setting takes less than this
PROBE_ROWS = (1000, 2000)  # timed probe sizes; stores with fewer than 2x the largest keep the full protocol


# An approximation of rank m (m landmarks): its fixed part (their eigendecomposition) grows as m ** 3; the rest
# (the kernel map, O(n m d), and the linear model's passes over m features) as m.
RANK_FIXED_EXPONENT = 3.0


@dataclass(frozen=True)
class CostModel:
    """Mean seconds of one fit on n rows plus scoring n/4 rows: ``fixed + seconds_at * (n / rows_at) ** exponent``
    (a CV fit scores a quarter as many rows as it trains on with 5 folds); `predict_fraction` of the growing
    part is the scoring, which grows with n in the same way (kernel SVMs and kNN predict in time proportional to
    their training rows, linear models in constant time per row).

    `fixed`: seconds every fit spends on a rank-`fixed_rows` decomposition (a kernel approximation's landmarks),
    zero for most heads; below `fixed_rows` rows the rank is the row count and that part shrinks as
    ``(n / fixed_rows) ** RANK_FIXED_EXPONENT``.

    `refit_factor`: the growing part of the refit (the setting tuning is expected to pick: the race's best)
    relative to the mean over the grid's settings; settings can differ 2x (liblinear at C = 100 vs C = 1)."""

    exponent: float
    rows_at: int
    seconds_at: float
    predict_fraction: float = 0.0
    fixed: float = 0.0
    fixed_rows: int = 0
    refit_factor: float = 1.0

    def _fixed(self, n: float) -> float:
        if not self.fixed_rows or n >= self.fixed_rows:
            return self.fixed
        return self.fixed * (max(n, 1.0) / self.fixed_rows) ** RANK_FIXED_EXPONENT

    def seconds(self, n: float) -> float:
        return self._fixed(n) + self.seconds_at * (max(n, 1.0) / self.rows_at) ** self.exponent

    def refit_seconds(self, n: float, scored: int, jobs: int = 1, passes: int = 2) -> float:
        """One fit on n rows plus scoring `scored` rows (the refit, then the test split): labels and then
        scores or probabilities (`passes`: 2, or 1 when the labels follow from the scores), split over `jobs`
        threads (:func:`heads.evaluate.score_rows`)."""
        p = self.predict_fraction
        passes = passes / _parallel(jobs, jobs)
        growing = (self.seconds(n) - self._fixed(n)) * self.refit_factor
        return self._fixed(n) + growing * ((1.0 - p) + p * passes * scored / max(n / 4.0, 1.0))

    def scaled(self, factor: float, size: float | None = None) -> "CostModel":
        """Every cost multiplied by `factor` (a calibration from measured runs); with `size`, an approximation
        at `size` times its rank instead: the fixed part as size ** RANK_FIXED_EXPONENT, the rest by `factor`."""
        fixed, rows = self.fixed * factor, self.fixed_rows
        if size is not None:
            fixed, rows = self.fixed * size**RANK_FIXED_EXPONENT, int(round(self.fixed_rows * size))
        return CostModel(self.exponent, self.rows_at, self.seconds_at * factor, self.predict_fraction, fixed, rows,
                         self.refit_factor)

    @classmethod
    def through(cls, sizes: tuple[int, int], seconds: tuple[float, float], exponent: float,
                predict_fraction: float = 0.0, fixed_rows: int | None = None,
                fixed_seconds: float | None = None) -> "CostModel":
        """The power law through the larger probe, with the exponent the two probes show, kept within
        [`exponent`, `exponent` + 1]: never below the head's known complexity (fixed overheads make small
        probes look cheap), and superlinear solvers (liblinear's iterations grow with n) are caught.

        With `fixed_rows` (a head whose fits decompose a rank-`fixed_rows` matrix, such as a kernel
        approximation's landmarks), the cost is ``fixed + b * n ** exponent`` through both probes (the fixed part
        shrunk below `fixed_rows` rows) when both parts come out positive: growth slower than `exponent` is that
        fixed part, not a reason to lift the power law to `exponent`. With `fixed_seconds` (that part timed at
        the larger probe) the growing part is the rest of the larger probe, grown at `exponent`: no difference
        of two noisy timings decides the slope."""
        (n1, n2), (t1, t2) = sizes, seconds
        measured = math.log(max(t2, 1e-9) / max(t1, 1e-9)) / math.log(n2 / n1)
        if fixed_rows and fixed_seconds is not None:
            whole = fixed_seconds / min(n2 / fixed_rows, 1.0) ** RANK_FIXED_EXPONENT
            growing = t2 - fixed_seconds
            if growing > 0:
                return cls(exponent, n2, growing, predict_fraction, whole, fixed_rows)
        if fixed_rows:
            f1, f2 = (min(n / fixed_rows, 1.0) ** RANK_FIXED_EXPONENT for n in (n1, n2))
            g1 = (n1 / n2) ** exponent  # the growing part at n1, relative to n2
            determinant = f1 - f2 * g1
            if abs(determinant) > 1e-9:  # solve t1 = f1 F + g1 G, t2 = f2 F + G for the fixed F and the growing G
                fixed = (t1 - g1 * t2) / determinant
                growing = t2 - f2 * fixed
                if fixed >= 0 and growing > 0:
                    return cls(exponent, n2, growing, predict_fraction, fixed, fixed_rows)
        return cls(min(max(measured, exponent), exponent + 1.0), n2, max(t2, 1e-6), predict_fraction)


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
        share_seconds: the part of the budget it was given (None: no budget).
        probe_seconds: time spent probing (charged to the budget).
        reason: one sentence, for the report.
        cost: the cost model the plan was made with (the approximation's, sized, when ``approximated``).
        target_seconds: what the plan may take: the share times the fraction planned into (None: no budget).
        last: whether it is the last head to run, which may grow into what is left (:class:`LastRound`).
    """

    mode: str
    spec: HeadSpec
    approximated: bool = False
    tune_rows: int = 0
    predicted_seconds: float | None = None
    probe_seconds: float = 0.0
    reason: str = ""
    share_seconds: float | None = None
    cost: CostModel | None = None
    target_seconds: float | None = None
    last: bool = False


PARALLEL_EFFICIENCY = 0.7  # parallel fits share memory bandwidth and caches: 2 jobs give ~1.4x, not 2x


def head_jobs(spec: HeadSpec, jobs: int) -> int:
    """Parallel fits for `spec`: one at a time for heads that use every core in one fit (``threaded``)."""
    return 1 if spec.threaded else jobs


def _passes(spec: HeadSpec) -> int:
    """Passes over the scored rows: labels, then scores -- one when the labels follow from the scores."""
    return 1 if labels_follow_scores(spec.estimator()) else 2


def _parallel(fits: int, jobs: int) -> float:
    workers = max(1, min(jobs, fits))
    return 1.0 + (workers - 1) * PARALLEL_EFFICIENCY


def _task_shape(task: Task) -> tuple[int, int, float]:
    """(fit rows, CV splits, mean fraction of fit rows each split trains on)."""
    n_fit = len(task.fit)
    fraction = float(np.mean([len(train) for train, _ in task.cv])) / max(n_fit, 1)
    return n_fit, len(task.cv), fraction


def _calibration_seconds(spec: HeadSpec, cost: CostModel, task: Task, jobs: int) -> float:
    """The out-of-fold fits that calibrate a head without probabilities by default (a temperature on its
    decision scores, :func:`heads.evaluate.calibrate_head`): one per CV split on at most ``CALIBRATION_ROWS``."""
    if calibration_method(spec, None) == "none":
        return 0.0
    n_fit, splits, fraction = _task_shape(task)
    return splits * cost.seconds(min(n_fit, CALIBRATION_ROWS) * fraction) / _parallel(splits, jobs)


def full_plan(spec: HeadSpec, cost: CostModel, plan: Plan, jobs: int) -> float:
    """Predicted wall seconds of the plain protocol (grid search on every fit row, refit, calibration, score)."""
    jobs = head_jobs(spec, jobs)
    return sum(_round_seconds(cost, task, spec.grid_size(), len(task.fit), jobs)
               + _after_tuning_seconds(spec, cost, task, jobs) for task in plan.tasks)


def _round_seconds(cost: CostModel, task: Task, candidates: int, rows: int, jobs: int) -> float:
    """One halving round: `candidates` settings x the task's CV splits, on `rows` tuning rows."""
    _, splits, fraction = _task_shape(task)
    fits = candidates * splits
    return fits * cost.seconds(rows * fraction) / _parallel(fits, jobs)


def _after_tuning_seconds(spec: HeadSpec, cost: CostModel, task: Task, jobs: int) -> float:
    """The refit on every fit row, scoring the task's rows, and calibration."""
    return cost.refit_seconds(len(task.fit), len(task.score), jobs, _passes(spec)) + \
        _calibration_seconds(spec, cost, task, jobs)


def _halving_seconds(spec: HeadSpec, cost: CostModel, plan: Plan, rows: int, jobs: int, n_classes: int) -> float:
    total, jobs = 0.0, head_jobs(spec, jobs)
    for task in plan.tasks:
        if spec.grid_size() > 1:
            for candidates, resources in halving_schedule(spec.grid_size(), rows, len(task.cv), n_classes):
                total += _round_seconds(cost, task, candidates, resources, jobs)
        total += _after_tuning_seconds(spec, cost, task, jobs)
    return total


class LastRound:
    """Sizes the last round of a head's successive halving from what its earlier rounds actually took.

    Predictions can be off by a quarter either way on a busy 2-core machine (timing noise, caches, memory
    bandwidth). The earlier rounds measure it on this very run: their actual seconds over their predicted ones
    scale every remaining prediction (the last round, the refit, calibration, scoring), and the last round gets
    the most rows whose predicted time ends the head when its plan should end (`decision.target_seconds` from
    when this object was made). A head that is not the last to run only shrinks its last round (what it does not
    use flows to the heads after it); the last one also grows it, so no budget idles behind a prediction that
    was too high. The rows stay between the previous round's and every fit row."""

    RATIO_BOUNDS = (0.5, 2.0)  # a ratio outside this is a disturbance, not the model being off
    MIN_MEASURED = 10.0  # earlier rounds predicted under this many seconds say nothing (dispatch overheads)

    def __init__(self, decision: HeadBudget, plan: Plan, *, jobs: int, n_classes: int):
        self.decision, self.plan, self.n_classes = decision, plan, n_classes
        self.jobs = head_jobs(decision.spec, jobs)
        self.started = time.perf_counter()
        self.resized: list[tuple[int, int, float]] = []  # (planned rows, chosen rows, ratio) per task

    def note(self) -> str:
        """What the resizing did, for the report ('' when nothing was resized)."""
        changed = [(p, c, r) for p, c, r in self.resized if p != c]
        if not changed:
            return ""
        planned, chosen, ratio = changed[0]
        return (f"; the earlier rounds took {ratio:.2f}x their predicted time: last round on {chosen} rows instead "
                f"of {planned}" + (f" (and {len(changed) - 1} more tasks)" if len(changed) > 1 else ""))

    def last_round_rows(self, task: Task, done: list[tuple[int, int]], seconds: float, rows: int) -> int:
        """Rows for the last round of `task`'s halving, after rounds `done` ((candidates, rows) each) took
        `seconds`; `rows` is what was planned."""
        spec, cost = self.decision.spec, self.decision.cost
        if cost is None or self.decision.target_seconds is None:
            return rows
        predicted = sum(_round_seconds(cost, task, c, r, self.jobs) for c, r in done)
        if predicted < self.MIN_MEASURED:
            return rows
        # The earlier rounds ran on a third of the rows or fewer, where the cost's parts weigh differently (an
        # approximation's fixed part dominates below its rank): their ratio says half of what the rest will do,
        # in log space (Fashion-MNIST: 0.82x measured on round 0, 1.16x on the last round and calibration).
        ratio = math.sqrt(min(max(seconds / max(predicted, 1e-9), self.RATIO_BOUNDS[0]), self.RATIO_BOUNDS[1]))
        scaled = cost.scaled(ratio)
        index = next(i for i, t in enumerate(self.plan.tasks) if t is task)
        # This task ends by its part of the target (tasks are alike), the refit, calibration and scoring after.
        deadline = self.decision.target_seconds * (index + 1) / len(self.plan.tasks)
        left = deadline - (time.perf_counter() - self.started)
        n_fit = len(task.fit)
        after = _after_tuning_seconds(spec, scaled, task, self.jobs)
        candidates = math.ceil(spec.grid_size() / FACTOR ** len(done))
        low, high = done[-1][1], n_fit if self.decision.last else rows
        if _round_seconds(scaled, task, candidates, high, self.jobs) + after <= left:
            chosen = high
        elif _round_seconds(scaled, task, candidates, low, self.jobs) + after > left:
            chosen = low
        else:
            while high - low > max(1, n_fit // 200):  # bisect the most rows that end in time
                mid = (low + high) // 2
                if _round_seconds(scaled, task, candidates, mid, self.jobs) + after <= left:
                    low = mid
                else:
                    high = mid
            chosen = low
        chosen = max(done[-1][1], min(chosen, n_fit))
        self.resized.append((rows, chosen, ratio))
        return chosen


def _smallest_tuning_rows(spec: HeadSpec, plan: Plan, n_classes: int) -> int:
    """The fewest tuning rows worth halving on: every round has scikit-learn's minimum rows (2 per class
    per split) or more, and never under 1 000."""
    smallest = 2 * len(plan.tasks[0].cv) * n_classes
    return max(1000, smallest * FACTOR ** (halving_rounds(spec.grid_size()) - 1))


def _fit_in_share(spec: HeadSpec, cost: CostModel, plan: Plan, share: float, jobs: int,
                  n_classes: int) -> HeadBudget | None:
    """The full protocol if it fits `share`, else halving on the largest tuning subset that fits, else None."""
    predicted = full_plan(spec, cost, plan, jobs)
    n_fit = min(len(t.fit) for t in plan.tasks)
    if predicted <= share:
        return HeadBudget("full", spec, tune_rows=n_fit, predicted_seconds=predicted, cost=cost,
                          reason=f"full protocol predicted {predicted:.0f}s, within its share of {share:.0f}s")
    if spec.grid_size() == 1:
        refit = _halving_seconds(spec, cost, plan, 0, jobs, n_classes)
        if refit <= share:
            return HeadBudget("halving", spec, tune_rows=0, predicted_seconds=refit, cost=cost,
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
    return HeadBudget("halving", spec, tune_rows=low, predicted_seconds=seconds, cost=cost,
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
    # A hair above: given exactly this share, plan_head must find the cheapest plan despite float rounding.
    return seconds / PLANNED_FRACTION * (1 + 1e-6)


# An approximation's size, as fractions of the probed one (its registered size, the largest it runs at: the
# probes measure it there), largest first. On the 60 000 Fashion-MNIST rows a 4 000-component map matched the
# exact SVM (90.91 vs 90.93 %) in 131 s; 8 000 components took over 8 minutes.
RANK_STEPS = (1.0, 0.5, 0.25)


def _approximate(spec: HeadSpec, cost: CostModel, plan: Plan, share: float, jobs: int,
                 n_classes: int) -> HeadBudget | None:
    """The approximation at the largest size (``RANK_STEPS`` x the probed one) whose plan fits `share`."""
    for step in RANK_STEPS if spec.rank_param is not None else (1.0,):
        decision = _fit_in_share(*_sized(spec, cost, step), plan, share, jobs, n_classes)
        if decision is not None:
            return decision
    return None


def _sized(spec: HeadSpec, cost: CostModel, step: float) -> tuple[HeadSpec, CostModel]:
    """An approximation at `step` times its probed size, with its cost model (the spec as is without a size)."""
    if spec.rank_param is None or step == 1.0:
        return spec, cost
    return spec.with_rank(int(spec.rank() * step)), cost.scaled(step, size=step)


def plan_head(spec: HeadSpec, cost: CostModel, plan: Plan, share: float, *, jobs: int, n_classes: int,
              approximation_cost: CostModel | None = None, fraction: float = PLANNED_FRACTION,
              fidelity: float | None = None) -> HeadBudget:
    """Decide how `spec` runs within `share` seconds (`approximation_cost`: the probed approximation's), planning
    predicted costs into `fraction` of it.

    The exact head when it fits (full protocol, else successive halving on a subset and the refit on every row);
    else its approximation at the largest size that fits; else ``skipped``. When the approximation's measured
    `fidelity` (its accuracy minus the exact head's, same rows) is within ``FIDELITY_TOLERANCE``, the exact head
    is preferred only when it can run its full protocol: the exact head is not predicted to win by more than the
    approximation loses, so the budget goes to a larger approximation instead of a subset-tuned exact fit.
    """
    share *= fraction
    exact = _fit_in_share(spec, cost, plan, share, jobs, n_classes)
    faithful = fidelity is not None and fidelity >= -FIDELITY_TOLERANCE and approximation_cost is not None
    if exact is not None and (exact.mode == "full" or not faithful):
        return exact
    n_fit = min(len(t.fit) for t in plan.tasks)
    refit = sum(cost.refit_seconds(len(t.fit), len(t.score), head_jobs(spec, jobs), _passes(spec)) for t in plan.tasks)
    if exact is not None:
        why = (f"the approximation scored {fidelity * 100:+.2f} points against exact {spec.name} on the same rows "
               f"and exact {spec.name} could only be tuned on a subset")
    elif refit > share:
        why = f"exact {spec.name} needs {refit:.0f}s just to fit {n_fit} rows"
    else:
        why = f"exact {spec.name} cannot be tuned in {share:.0f}s"
    if spec.approximation is not None and approximation_cost is not None:
        approx = _approximate(spec.approximation, approximation_cost, plan, share, jobs, n_classes)
        if approx is not None:
            approx.approximated = True
            approx.reason = f"{why}: approximated ({approx.spec.description}); {approx.reason}"
            return approx
    if exact is not None:
        return exact
    return HeadBudget("skipped", spec, predicted_seconds=full_plan(spec, cost, plan, jobs),
                      reason=f"{why}, over its share of {share:.0f}s, and it has no approximation that fits")


class Allocator:
    """Hands a time budget to heads in turn, charging what they actually took.

    Each head gets its :func:`minimum_share` plus an equal part of what remains after the minimum shares of
    every head still to run -- so an expensive head late in the order is approximated rather than starved; the
    last head gets all that remains. With `leader_last` (the race), the last head is the leader and is first
    reserved what its best plan needs (:meth:`wanted`): the others get their minimum, plus an equal part of
    whatever the leader cannot use. A
    head that could not run even alone in the budget reserves nothing (and is skipped); when the budget is
    overdrawn, the heads still to run get at most their minimum, and the last ones are skipped. Predictions
    are calibrated by the runs so far: once a head predicted to take over ``CALIBRATE_ABOVE`` seconds has run,
    later predictions are multiplied by the median of actual / predicted (kept within [1, 4]), which absorbs
    what probes cannot see (memory bandwidth shared by parallel fits, a busy machine).
    """

    CALIBRATE_ABOVE = 2.0

    def __init__(self, budget_seconds: float, plan: Plan, *, jobs: int, n_classes: int, leader_last: bool = False):
        self.budget_seconds = budget_seconds
        self.leader_last = leader_last
        self.plan = plan
        self.jobs = jobs
        self.n_classes = n_classes
        self.calibration = 1.0
        self._heads: dict = {}
        self._fidelity: dict = {}
        self._ratios: list[float] = []

    def add(self, key, spec: HeadSpec, cost: CostModel, approximation_cost: CostModel | None = None,
            fidelity: float | None = None) -> None:
        self._heads[key] = (spec, cost, approximation_cost)
        self._fidelity[key] = fidelity

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
        """Seconds for `key` given `remaining` seconds and the `pending` heads (itself included); the last head
        gets all that remains."""
        if pending == [key]:
            return max(0.0, remaining)
        others = pending[:-1] if self.leader_last else pending
        floors = {k: self.minimum(k) for k in others}
        affordable = [k for k in others if floors[k] <= self.budget_seconds]
        surplus = remaining - sum(floors[k] for k in affordable)
        if self.leader_last:  # the leader (last) is reserved what its best plan needs; the others get the rest
            surplus -= max(self.minimum(pending[-1]), self.wanted(pending[-1]))
        if floors[key] > self.budget_seconds:
            return max(0.0, surplus) / max(1, len(affordable))
        if surplus >= 0:
            return floors[key] + surplus / len(affordable)
        return min(floors[key], max(0.0, remaining))

    def wanted(self, key) -> float:
        """What the head's best plan needs: its full protocol, or -- with a faithful approximation (see
        :func:`plan_head`) -- the cheaper of that and the approximation's full protocol at its largest size."""
        spec, cost, approx = self._costs(key)
        seconds = full_plan(spec, cost, self.plan, self.jobs)
        fidelity = self._fidelity.get(key)
        if approx is not None and fidelity is not None and fidelity >= -FIDELITY_TOLERANCE:
            seconds = min(seconds, full_plan(spec.approximation, approx, self.plan, self.jobs))
        return seconds / LAST_FRACTION

    def decide(self, key, remaining: float, pending: list) -> HeadBudget:
        spec, cost, approx = self._costs(key)
        fraction = LAST_FRACTION if pending == [key] else PLANNED_FRACTION
        share = self.share(key, remaining, pending)
        decision = plan_head(spec, cost, self.plan, share, jobs=self.jobs, n_classes=self.n_classes,
                             approximation_cost=approx, fraction=fraction, fidelity=self._fidelity.get(key))
        decision.share_seconds = share
        decision.target_seconds = share * fraction
        decision.last = pending == [key]
        if self.calibration > 1.0:
            decision.reason += f" (predictions x{self.calibration:.2f}, calibrated on the heads run so far)"
        return decision

    def record(self, predicted: float | None, actual: float) -> None:
        """Learn from a finished head (`predicted` as planned, calibration included)."""
        if predicted is not None and predicted >= self.CALIBRATE_ABOVE:
            self._ratios.append(actual / (predicted / self.calibration))
            self.calibration = min(4.0, max(1.0, float(np.median(self._ratios))))
