"""inspect: what a feature store holds (shape, classes per task and split, failures) and where it came from."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from featurize.store import STATUS_FAILED, read_store

__all__ = ["summarize_store", "PROVENANCE_KEYS"]

PROVENANCE_KEYS = (
    "backbone",
    "weights_source",
    "weights_sha256",
    "data_config",
    "pooling",
    "decode",
    "precision",
    "runtime",
    "dtype",
    "device",
    "config_hash",
    "dataset_fingerprint",
    "source",
    "created",
    "library_versions",
    "format",
    "format_version",
)


def _counts(split: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, dict[str, int]]:
    """Rows per split and class (``(unlabeled)`` for -1), classes in their order."""
    names = classes + ["(unlabeled)"]
    counts: dict[str, dict[str, int]] = {}
    for part, label in zip(split, labels):
        per_split = counts.setdefault(str(part) or "(none)", collections.defaultdict(int))
        per_split[names[label]] += 1
    return {part: dict(sorted(c.items(), key=lambda kv: names.index(kv[0]))) for part, c in sorted(counts.items())}


def summarize_store(path: str | Path, max_examples: int = 5) -> dict[str, Any]:
    """A JSON-able summary of a store, without reading its feature matrix.

    Args:
        path: the store.
        max_examples: how many failed rows to list by id.
    """
    store = read_store(path, features=False)
    n, d = store.shape
    tasks = {name: {"classes": classes, "counts": _counts(store.split, labels, classes)}
             for name, (classes, labels) in store.tasks.items()}
    failed = store.status == STATUS_FAILED
    reasons = collections.Counter(str(e).split(":", 1)[0] for e in store.errors[failed])
    return {
        "path": str(store.path),
        "rows": n,
        "features": d,
        "layers": store.layers,
        "classes": store.classes,
        "counts": tasks[store.default_task]["counts"],
        "default_task": store.default_task,
        "tasks": tasks,
        "failed": int(failed.sum()),
        "failure_reasons": dict(reasons.most_common()),
        "failed_examples": [
            {"id": str(i), "error": str(e)} for i, e in zip(store.ids[failed][:max_examples], store.errors[failed])
        ],
        "provenance": {k: store.attrs[k] for k in PROVENANCE_KEYS if k in store.attrs},
    }
