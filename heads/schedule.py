"""Successive halving's schedule and stratified row subsets: what the planner (:mod:`heads.budget`) predicts
and the evaluation (:mod:`heads.evaluate`) runs, kept here so that both import it and budget -> evaluate stays
the only direction between them."""

from __future__ import annotations

import math

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = ["FACTOR", "stratified_subset", "halving_rounds", "halving_schedule"]

FACTOR = 3  # successive halving: keep the best third of the candidates, triple their rows


def stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a stratified random subset of `size` rows (all positions when size >= len(y))."""
    positions = np.arange(len(y))
    if size >= len(y):
        return positions
    _, counts = np.unique(y, return_counts=True)
    stratify = y if min(size, len(y) - size) >= len(counts) and counts.min() >= 2 else None
    subset, _ = train_test_split(positions, train_size=size, stratify=stratify, random_state=seed)
    return np.sort(subset)


def halving_rounds(n_candidates: int, factor: int = FACTOR) -> int:
    """Rounds successive halving needs to narrow `n_candidates` down to the last factor or fewer."""
    rounds = 1
    while factor**rounds <= n_candidates:
        rounds += 1
    return rounds


def halving_schedule(n_candidates: int, max_rows: int, n_splits: int, n_classes: int,
                     factor: int = FACTOR) -> list[tuple[int, int]]:
    """(candidates, rows) per iteration, as ``HalvingGridSearchCV(min_resources="exhaust")`` runs them."""
    required = halving_rounds(n_candidates, factor)
    smallest = 2 * n_splits * n_classes
    min_rows = max(smallest, max_rows // factor ** (required - 1))
    possible = 1
    while min_rows * factor**possible <= max_rows:
        possible += 1
    return [(math.ceil(n_candidates / factor**i), min_rows * factor**i) for i in range(min(possible, required))]
