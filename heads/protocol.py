"""The evaluation protocol: which rows tune, which rows fit, which rows are scored, decided once for all heads.

Pure functions of labels and splits; the test rows never reach tuning:

* with test rows: tune on the non-test rows (stratified K-fold CV, or the ``val`` split when there is one),
  refit the best setting on all non-test rows, score the test rows once (``holdout``);
* without test rows: nested CV, outer stratified K folds for the estimate, inner stratified K folds inside
  each outer training part for tuning (``nested-cv``).

Every head gets the same :class:`Plan`, so the same folds and the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from .errors import HeadsError

__all__ = ["Task", "Plan", "plan_protocol"]


@dataclass(frozen=True)
class Task:
    """One tune-fit-score round.

    Attributes:
        fit: row indices the setting is tuned on and the chosen setting is refit on.
        score: row indices scored with the refit model (never used for tuning).
        cv: (train, validation) index pairs *relative to* ``fit`` for the tuning search.
    """

    fit: np.ndarray
    score: np.ndarray
    cv: list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Plan:
    """The protocol for one comparison.

    Attributes:
        kind: ``holdout`` or ``nested-cv``.
        tasks: one task (holdout) or one per outer fold (nested CV).
        final: the task whose refit model is the one to save (holdout: the same as ``tasks[0]``; nested CV:
            tuned by CV on every row).
        folds: K.
        seed: seed of every fold split.
        description: one sentence for reports.
    """

    kind: str
    tasks: list[Task]
    final: Task
    folds: int
    seed: int
    description: str

    @property
    def scored(self) -> np.ndarray:
        """Row indices with a prediction, in the order predictions are concatenated."""
        return np.concatenate([t.score for t in self.tasks])


def _name(classes: list[str] | None, label: int) -> str:
    return repr(classes[label]) if classes and 0 <= label < len(classes) else repr(str(label))


def _check_folds(y: np.ndarray, folds: int, what: str, classes: list[str] | None) -> None:
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) < 2:
        only = _name(classes, int(labels[0])) if len(labels) else "none"
        raise HeadsError(f"{what} has only one class ({only}); a classifier needs at least two classes")
    small = counts.argmin()
    if counts[small] < folds:
        raise HeadsError(
            f"class {_name(classes, int(labels[small]))} has {counts[small]} samples in {what}, fewer than "
            f"--folds {folds}; lower --folds or add samples"
        )


def _cv(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def plan_protocol(
    y: np.ndarray, split: np.ndarray, folds: int = 5, seed: int = 0, classes: list[str] | None = None
) -> Plan:
    """Decide the protocol from labels and splits (rows are the usable ones: labeled, status ok).

    Args:
        y: class indices, one per row.
        split: ``train``/``val``/``test``/``""`` per row.
        folds: K for every stratified K-fold split.
        seed: seed for every shuffle.
        classes: class names, for messages.

    Raises:
        HeadsError: no rows, one class only, fewer samples of a class than folds, test classes unseen in
            training.
    """
    y = np.asarray(y)
    split = np.asarray(split).astype(str)
    if folds < 2:
        raise HeadsError(f"--folds must be at least 2, got {folds}")
    if len(y) == 0:
        raise HeadsError("no usable rows: the store has no labeled rows with status ok")
    is_test = split == "test"

    if is_test.any():
        fit, score = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        if len(fit) == 0:
            raise HeadsError("every labeled row is in the test split; tuning and fitting need train rows")
        unseen = sorted(set(y[score].tolist()) - set(y[fit].tolist()))
        if unseen:
            raise HeadsError(
                f"class {_name(classes, unseen[0])} appears in the test split but not in train; a head cannot "
                "predict a class it never saw"
            )
        is_val = split[fit] == "val"
        if is_val.any() and (~is_val).any():
            _check_folds(y[fit][~is_val], 1, "the train split", classes)
            cv = [(np.flatnonzero(~is_val), np.flatnonzero(is_val))]
            how = "tuned on the val split (fit on train)"
        else:
            _check_folds(y[fit], folds, "the train split", classes)
            cv = _cv(y[fit], folds, seed)
            how = f"tuned by stratified {folds}-fold CV on the train rows"
        task = Task(fit, score, cv)
        description = (
            f"holdout: {how}, best setting refit on all {len(fit)} non-test rows, "
            f"scored once on {len(score)} test rows"
        )
        return Plan("holdout", [task], task, folds, seed, description)

    everything = np.arange(len(y))
    _check_folds(y, folds, "the store", classes)
    tasks = []
    for outer_train, outer_test in _cv(y, folds, seed):
        _check_folds(y[outer_train], folds, "an outer training fold of nested CV", classes)
        tasks.append(Task(outer_train, outer_test, _cv(y[outer_train], folds, seed)))
    final = Task(everything, np.array([], dtype=int), _cv(y, folds, seed))
    description = (
        f"nested CV (no test split): outer stratified {folds}-fold CV for the estimate, inner stratified "
        f"{folds}-fold CV on each outer training part for tuning; every one of the {len(y)} rows scored once"
    )
    return Plan("nested-cv", tasks, final, folds, seed, description)
