"""headbench's jobs, from Python: the same operations the CLI runs, with the same options.

    from pipelines import extract_features, compare_heads, save_best_head, predict_images

    store = extract_features("builtin:digits", "digits.h5", model="tf_efficientnet_lite0", weights="packaged")
    comparison = compare_heads([store.path], heads=["logreg", "knn"], budget=None)
    print(comparison.leaderboard()[0])
    save_best_head(comparison, "best.skops")
    predict_images("best.skops", "my-digits/", "predictions.csv")

Every name below is importable from ``pipelines`` (loaded on first use, so ``import pipelines`` stays cheap);
docs/python-api.md documents each with its parameters and an example. Errors are ``FeaturizeError``,
``HeadsError`` or ``ClusterError``: one line saying what was wrong and what to do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> module it lives in (the single source of truth for __all__ and the lazy import below)
_EXPORTS = {
    "extract_features": "extract", "ExtractResult": "extract",
    "summarize_store": "inspect",
    "compare_heads": "compare", "Comparison": "compare", "save_best_head": "compare",
    "write_results": "report",
    "rank_candidates": "rank", "Ranking": "rank",
    "predict_images": "predict", "PredictResult": "predict",
    "finetune": "finetuning", "FinetuneResult": "finetuning", "load_run": "finetuning", "FinetuneRun": "finetuning",
    "select_labels": "select", "LabelSelection": "select",
    "audit": "auditing", "AuditResult": "auditing",
    "run_benchmark": "bench", "run_heads_benchmark": "bench_heads",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pipelines.auditing import AuditResult, audit
    from pipelines.bench import run_benchmark
    from pipelines.bench_heads import run_heads_benchmark
    from pipelines.compare import Comparison, compare_heads, save_best_head
    from pipelines.extract import ExtractResult, extract_features
    from pipelines.finetuning import FinetuneResult, FinetuneRun, finetune, load_run
    from pipelines.inspect import summarize_store
    from pipelines.predict import PredictResult, predict_images
    from pipelines.rank import Ranking, rank_candidates
    from pipelines.select import LabelSelection, select_labels
    from pipelines.report import write_results


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipelines.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
