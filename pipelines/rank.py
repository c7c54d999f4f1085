"""rank: score candidate representations for a task without training heads (LogME, H-score, kNN, a linear probe).

Scores use the labeled, ok, non-test rows (every store's), optionally a stratified subsample of them; the test
rows never enter. A ``concat`` candidate is scored on its blocks standardised as its heads see them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from heads import HeadsError
from heads.blocks import BlockStandardScaler
from heads.transferability import SCORES, score_representation, stratified_subsample
from pipelines.candidates import Candidate, distinct_stores, parse_candidates, usable_rows

__all__ = ["Ranking", "rank_candidates", "score_candidates", "DEFAULT_RANK_BY", "DEFAULT_MAX_ROWS", "check_score"]

# Leave-one-out kNN agreed best with the best head's accuracy across our measured data sets
# (docs/choosing-a-representation.md), and is among the cheapest.
DEFAULT_RANK_BY = "knn_loo"
# Enough rows for stable scores, few enough that knn_loo (n^2) and LogME (one SVD) take seconds.
DEFAULT_MAX_ROWS = 10_000


def check_score(name: str) -> str:
    """`name` when it is a known score; else a one-line error listing them."""
    if name not in SCORES:
        raise HeadsError(f"--rank-by must be one of {', '.join(SCORES)}, got {name!r}")
    return name


@dataclass
class Ranking:
    """Scores of every candidate.

    Attributes:
        rows: one dict per candidate (``candidate``, ``store``, ``layer``, ``width``, one key per score,
            ``seconds`` per score), best first by `rank_by`.
        rank_by: the score the rows are ordered by.
        n_rows: rows each candidate was scored on.
        seconds: wall time of the whole ranking.
    """

    rows: list[dict[str, Any]]
    rank_by: str
    n_rows: int
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        order = ", ".join(r["candidate"] for r in self.rows[:5]) + (", ..." if len(self.rows) > 5 else "")
        return (f"Ranking(rank_by={self.rank_by!r}, candidates={len(self.rows)}, rows={self.n_rows}, "
                f"best first: {order}, seconds={self.seconds:.1f})")


def score_candidates(candidates: list[Candidate], rows: np.ndarray, y: np.ndarray, *, scores: list[str] | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Every score of every candidate on the store rows `rows` (a boolean mask) with labels `y`."""
    out = []
    for c in tqdm(candidates, desc="rank", unit="candidate", disable=not progress):
        X = c.load(rows)
        if c.block_widths is not None:
            X = BlockStandardScaler(c.block_widths).fit_transform(X)
        values, seconds = score_representation(X, y, scores)
        out.append({"candidate": c.name, "store": str(c.store.path), "layer": c.layer, "width": int(X.shape[1]),
                    **values, "seconds": seconds})
    return out


def rank_candidates(specs: list[str | Path], *, rank_by: str = DEFAULT_RANK_BY, scores: list[str] | None = None,
                    max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0, progress: bool = True) -> Ranking:
    """Score each candidate (``STORE.h5[:LAYER|:all|:concat]``) on its labeled, ok, non-test rows.

    Args:
        rank_by: the score that orders the table.
        scores: which scores to compute (all when None); must include `rank_by`.
        max_rows: score a stratified subsample of at most this many rows (None: all).

    Raises:
        HeadsError, FeaturizeError: unreadable stores, stores of different samples, unknown score names, too
            few rows or classes.
    """
    started = time.perf_counter()
    check_score(rank_by)
    names = list(SCORES) if scores is None else list(scores)
    if rank_by not in names:
        names.append(rank_by)
    if max_rows is not None and max_rows < 10:
        raise HeadsError(f"--max-rows must be at least 10, got {max_rows}")
    candidates = parse_candidates(specs)
    stores = distinct_stores(candidates)
    _, usable = usable_rows(stores)
    rows = usable & (stores[0].split != "test")
    if not rows.any():
        raise HeadsError(f"nothing to rank: {stores[0].path.name} has no labeled, ok rows outside the test split")
    keep = np.flatnonzero(rows)[stratified_subsample(stores[0].labels[rows], max_rows, seed)]
    mask = np.zeros(len(rows), bool)
    mask[keep] = True
    y = stores[0].labels[mask]
    table = score_candidates(candidates, mask, y, scores=names, progress=progress)
    table.sort(key=lambda r: -r[rank_by])
    for position, row in enumerate(table, start=1):
        row["rank"] = position
    return Ranking(table, rank_by, int(mask.sum()), time.perf_counter() - started,
                   {"scores": names, "classes": len(np.unique(y)), "max_rows": max_rows, "seed": seed})
