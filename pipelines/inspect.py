"""inspect: what a feature store holds (shape, classes, splits, failures) and where it came from."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

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


def summarize_store(path: str | Path, max_examples: int = 5) -> dict[str, Any]:
    """A JSON-able summary of a store, without reading its feature matrix.

    Args:
        path: the store.
        max_examples: how many failed rows to list by id.
    """
    store = read_store(path, features=False)
    n, d = store.shape
    names = store.classes + ["(unlabeled)"]
    counts: dict[str, dict[str, int]] = {}
    for split, label in zip(store.split, store.labels):
        per_split = counts.setdefault(str(split) or "(none)", collections.defaultdict(int))
        per_split[names[label]] += 1
    failed = store.status == STATUS_FAILED
    reasons = collections.Counter(str(e).split(":", 1)[0] for e in store.errors[failed])
    return {
        "path": str(store.path),
        "rows": n,
        "features": d,
        "layers": store.layers,
        "classes": store.classes,
        "counts": {split: dict(sorted(c.items(), key=lambda kv: names.index(kv[0]))) for split, c in sorted(counts.items())},
        "failed": int(failed.sum()),
        "failure_reasons": dict(reasons.most_common()),
        "failed_examples": [
            {"id": str(i), "error": str(e)} for i, e in zip(store.ids[failed][:max_examples], store.errors[failed])
        ],
        "provenance": {k: store.attrs[k] for k in PROVENANCE_KEYS if k in store.attrs},
    }
