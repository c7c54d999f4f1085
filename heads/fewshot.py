"""Few-shot learning curves: how accuracy grows with the labelled examples per class.

For each number of shots k and each seed, :func:`draw_shots` picks k rows per class from the fit rows. The
draws depend only on the labels, k and the seed -- never on the head or the representation -- so every head and
candidate is trained on the SAME rows and their accuracies are paired; and they are nested: for one seed, each
class's rows are put in one seeded random order and the k-shot draw is its first k, so the 2-shot draw contains
the 1-shot draw.

Tuning uses the drawn rows only (:func:`shot_task`): stratified CV with ``min(k, folds)`` folds when k >= 2;
with k = 1 there is nothing to validate on, and each head runs its :meth:`~heads.registry.HeadSpec.untuned`
setting (marked "untuned"). The scored rows are the plan's test rows, or -- without a test split -- every usable
row outside the draw.

:func:`curve_point` summarises one (representation, head, k) over the seeds: the mean accuracy, a 95 % CI from a
bootstrap over seeds *and* scored rows, and the per-seed values; :func:`paired_p_value` compares two heads on
their pooled predictions (exact McNemar test over every seed's scored rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from .errors import HeadsError
from .metrics import mcnemar_p_value
from .protocol import Task

__all__ = ["ALL", "parse_shots", "draw_shots", "shot_task", "ShotResult", "curve_point", "paired_p_value"]

ALL = "all"  # the shots value that means every labelled row: the plain comparison


def parse_shots(text: str) -> list[int | str]:
    """``"1,2,4,8,16,all"`` -> ``[1, 2, 4, 8, 16, "all"]`` (sorted, unique; ``all`` last)."""
    values: set[int] = set()
    with_all = False
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part.lower() == ALL:
            with_all = True
            continue
        try:
            k = int(part)
        except ValueError:
            raise HeadsError(f"--shots takes labels per class as integers and 'all', e.g. 1,2,4,8,16,all; "
                             f"got {part!r}") from None
        if k < 1:
            raise HeadsError(f"--shots values must be at least 1 label per class, got {k}")
        values.add(k)
    if not values and not with_all:
        raise HeadsError("--shots is empty; give labels per class, e.g. 1,2,4,8,16,all")
    return sorted(values) + ([ALL] if with_all else [])


def draw_shots(y: np.ndarray, shots: list[int], seeds: list[int]) -> dict[tuple[int, int], np.ndarray]:
    """Positions (into `y`) of the k-per-class draw for every k in `shots` and every seed: sorted, nested across
    k for one seed, and a function of (y, k, seed) only. A class with fewer than k rows gives all it has."""
    classes = np.unique(y)
    draws = {}
    for seed in seeds:
        rng = np.random.default_rng([seed, 0x5EED])
        order = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
        for k in shots:
            draws[(k, seed)] = np.sort(np.concatenate([order[c][:k] for c in classes]))
    return draws


def shot_task(fit: np.ndarray, drawn: np.ndarray, score: np.ndarray, y: np.ndarray, *, folds: int,
              seed: int) -> Task:
    """The tune-fit-score task of one draw: fit on ``fit[drawn]``, tune by stratified CV with ``min(k, folds)``
    folds (k: the fewest rows of a class in the draw; no CV when k = 1), score `score` (row indices)."""
    rows = fit[drawn]
    counts = np.unique(y[rows], return_counts=True)[1]
    n_splits = min(int(counts.min()), folds)
    cv = [] if n_splits < 2 else list(
        StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(rows)), y[rows]))
    return Task(rows, score, cv)


@dataclass
class ShotResult:
    """One head on one draw: its predictions on the draw's scored rows and the setting it ran."""

    seed: int
    params: dict[str, Any]
    correct: np.ndarray
    untuned: bool = False


@dataclass
class CurvePoint:
    """One (representation, head, k) over the seeds."""

    accuracy: float
    accuracy_ci: tuple[float, float]
    per_seed: list[float]
    seeds: list[int]
    untuned: bool
    params: list[dict[str, Any]] = field(default_factory=list)


def curve_point(results: list[ShotResult], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> CurvePoint:
    """Mean accuracy over seeds with a percentile bootstrap CI that resamples the seeds and, within each, the
    scored rows (both sources of variance: which rows were drawn, and which rows were scored)."""
    per_seed = [float(r.correct.mean()) for r in results]
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    picks = rng.integers(0, len(results), size=(n_boot, len(results)))
    for b in range(n_boot):
        total = 0.0
        for s in picks[b]:
            correct = results[s].correct
            total += correct[rng.integers(0, len(correct), len(correct))].mean()
        means[b] = total / len(results)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return CurvePoint(float(np.mean(per_seed)), (float(low), float(high)), per_seed, [r.seed for r in results],
                      any(r.untuned for r in results), [r.params for r in results])


def paired_p_value(a: list[ShotResult], b: list[ShotResult]) -> float:
    """Exact McNemar p-value of two heads on the same draws, their predictions pooled over the seeds."""
    by_seed = {r.seed: r.correct for r in b}
    pooled_a = np.concatenate([r.correct for r in a])
    pooled_b = np.concatenate([by_seed[r.seed] for r in a])
    return mcnemar_p_value(pooled_a, pooled_b)
