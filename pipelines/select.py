"""select-labels: which rows of a store to label next, for a budget (:mod:`heads.selection` does the choosing).

The candidates are the store's unlabelled rows (label -1) outside the test split -- or, when every row has a
label (a store used to simulate labelling), every row outside the test split. Rows already labelled join the
pool as the labelled set the picks extend: the store's own labelled rows beside unlabelled ones, and the ids of
``labeled`` (a CSV with an ``id`` column and optionally a ``label`` column). Test rows never enter the pool, and
no candidate's label is read: only the picked rows' labels, after the choice, to say which classes they cover.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurize.store import StoreError
from heads import HeadsError
from heads.selection import DEFAULT_DIMS, SelectionSpace, get_strategy, select
from pipelines.candidates import parse_candidates
from pipelines.scoring import write_csv

__all__ = ["select_labels", "LabelSelection"]

TEST = "test"


@dataclass
class LabelSelection:
    """The rows chosen, in order, and what was used to choose them.

    Attributes:
        ids: the picked rows' ids, in pick order (rank 1 first).
        rows: their row numbers in the store.
        strategy: the strategy's name.
        columns: per-pick columns the strategy reports (cluster, typicality, covered, distance, margin ...).
        summary: what the strategy used as a whole (clusters, radius, coverage).
        candidates: rows it could pick from; labeled: rows already labelled (the picks extend them).
        labels: the picked rows' class names where the store knows them (a simulation), else None.
        uncovered: classes no picked or labelled row has, where the store knows the labels.
        seconds: time of the choice.
        out: the CSV written, if any.
    """

    ids: list[str]
    rows: np.ndarray
    strategy: str
    columns: dict[str, np.ndarray]
    summary: dict[str, Any]
    candidates: int
    labeled: int
    labels: list[str] | None
    uncovered: list[str] | None
    seconds: float
    out: Path | None = None
    mode: str = "unlabelled"

    def __repr__(self) -> str:
        return (f"LabelSelection({self.strategy}: {len(self.ids)} of {self.candidates} {self.mode} rows, "
                f"{self.seconds:.1f} s)")


def _read_labeled(path: Path, ids: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows and (if the file has a ``label`` column) class indices of a labelled-ids CSV."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "id" not in reader.fieldnames:
                raise HeadsError(f"{path} needs an 'id' column (and optionally 'label'); it has "
                                 f"{', '.join(reader.fieldnames or []) or 'no header'}")
            entries = [(r["id"], r.get("label")) for r in reader]
    except OSError as e:
        raise HeadsError(f"cannot read --labeled {path}: {e.strerror or e}") from None
    position = {str(i): n for n, i in enumerate(ids)}
    unknown = [i for i, _ in entries if i not in position]
    if unknown:
        raise HeadsError(f"{len(unknown)} id(s) of {path} are not rows of the store, e.g. {unknown[0]!r}; give ids "
                         "as `python cli.py inspect` and the store list them")
    rows = np.asarray([position[i] for i, _ in entries], dtype=np.int64)
    if len(np.unique(rows)) != len(rows):
        raise HeadsError(f"{path} lists an id twice")
    if not entries or all(label in (None, "") for _, label in entries):
        return rows, None
    index = {c: n for n, c in enumerate(classes)}
    bad = next((label for _, label in entries if label not in index), None)
    if bad is not None:
        raise HeadsError(f"{path}: label {bad!r} is not a class of the store ({', '.join(classes[:10])}"
                         f"{', ...' if len(classes) > 10 else ''})")
    return rows, np.asarray([index[label] for _, label in entries], dtype=np.int64)


def select_labels(
    store: str | Path,
    budget: int,
    strategy: str = "typiclust",
    *,
    seed: int = 0,
    labeled: str | Path | None = None,
    out: str | Path | None = None,
    n_classes: int | None = None,
    radius: float | None = None,
    dims: int = DEFAULT_DIMS,
    task: str | None = None,
) -> LabelSelection:
    """Choose `budget` rows of `store` to label next.

    Args:
        store: ``STORE.h5`` or ``STORE.h5:LAYER`` (the representation the strategy measures distances in).
        budget: rows to choose.
        strategy: ``random``, ``typiclust``, ``probcover``, ``kcenter`` or ``margin`` (:mod:`heads.selection`).
        seed: the strategy's randomness.
        labeled: a CSV of rows already labelled (``id`` column, optionally ``label`` with class names); the
            picks extend them. ``margin`` needs labels for them (the file's, else the store's).
        out: where to write ``id,rank`` and the strategy's columns (atomically); None: nothing written.
        n_classes: probcover's cluster count for its radius (default: the store's classes).
        radius: probcover's radius instead.
        dims: the selection space's PCA width.
        task: which label set of the store (for the classes and the store's own labels).

    Raises:
        HeadsError, StoreError: a bad budget, no candidate rows, unknown or test ids in `labeled`, a strategy
            that needs labels without them.
    """
    spec = get_strategy(strategy)
    if int(budget) != budget or budget < 1:
        raise HeadsError(f"--budget must be at least 1 row, got {budget}")
    candidate = parse_candidates([store], task=task)[0]
    meta = candidate.store
    ok = meta.ok
    test = meta.split == TEST
    labels = meta.labels
    unlabelled = ok & ~test & (labels < 0)
    mode = "unlabelled" if unlabelled.any() else "non-test"
    candidates = unlabelled if unlabelled.any() else ok & ~test
    known = ok & ~test & (labels >= 0) if mode == "unlabelled" else np.zeros(len(labels), dtype=bool)
    y_known = labels.copy()
    if labeled is not None:
        rows, given = _read_labeled(Path(labeled), meta.ids, meta.classes)
        on_test = rows[test[rows]]
        if len(on_test):
            raise HeadsError(f"{len(on_test)} id(s) of --labeled are test rows, e.g. {meta.ids[on_test[0]]!r}: the "
                             "test split is for scoring and is never labelled for training; drop them")
        failed = rows[~ok[rows]]
        if len(failed):
            raise HeadsError(f"--labeled names {len(failed)} row(s) whose image failed to decode, e.g. "
                             f"{meta.ids[failed[0]]!r}; drop them")
        known[rows] = True
        candidates[rows] = False
        if given is not None:
            y_known[rows] = given
    n_candidates = int(candidates.sum())
    if n_candidates == 0:
        raise HeadsError(f"{meta.path.name} has no row to pick: every row is a test row, failed or already "
                         "labelled")
    if budget > n_candidates:
        raise HeadsError(f"--budget {budget} is larger than the {n_candidates} rows that can be picked; "
                         f"give at most {n_candidates}")
    labeled_rows = np.flatnonzero(known)
    y_labeled = y_known[labeled_rows]
    if spec.needs_labels and (len(labeled_rows) == 0 or (y_labeled < 0).any()):
        raise HeadsError(f"{strategy} ranks rows with a head fitted on labelled rows: give --labeled ids.csv with "
                         "a label column (or rows the store has labels for); to start from nothing, use "
                         "typiclust, probcover or random")
    started = time.perf_counter()
    in_pool = candidates | known
    pool = np.flatnonzero(in_pool)
    position = np.full(len(labels), -1)
    position[pool] = np.arange(len(pool))
    classes = n_classes if n_classes is not None else (len(meta.classes) if len(meta.classes) > 1 else None)
    if strategy == "probcover" and radius is None and not classes:
        raise HeadsError("probcover sets its radius from the number of classes and the store has none: give "
                         "--classes K (how many classes the labels will have) or --radius R")
    features = candidate.load(in_pool)
    space = SelectionSpace(features, dims=dims)
    picks = select(space, int(budget), strategy, labeled=position[labeled_rows],
                   y_labeled=y_labeled if spec.needs_labels else None, seed=seed, n_classes=classes, radius=radius)
    rows = pool[picks.rows]
    seconds = time.perf_counter() - started
    picked_labels = uncovered = None
    if (labels[rows] >= 0).all() and meta.classes:
        picked_labels = [meta.classes[i] for i in labels[rows]]
        have = set(labels[rows]) | set(y_known[labeled_rows][y_known[labeled_rows] >= 0])
        uncovered = [c for i, c in enumerate(meta.classes) if i not in have]
    columns = dict(picks.info)
    if "predicted" in columns:
        columns["predicted"] = np.asarray([meta.classes[i] for i in columns["predicted"]])
    result = LabelSelection([str(i) for i in meta.ids[rows]], rows, strategy, columns, picks.summary, n_candidates,
                            len(labeled_rows), picked_labels, uncovered, seconds, None, mode)
    if out is not None:
        header = ["id", "rank", "strategy", *columns] + (["label"] if picked_labels else [])
        table = [[result.ids[n], n + 1, strategy, *(_cell(columns[c][n]) for c in columns)]
                 + ([picked_labels[n]] if picked_labels else []) for n in range(len(rows))]
        try:
            result.out = write_csv(Path(out), header, table)
        except OSError as e:
            raise StoreError(f"cannot write {out}: {e.strerror or e}") from None
    return result


def _cell(value) -> str | int:
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return f"{float(value):.6g}"
    return str(value)


