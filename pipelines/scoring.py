"""A leaderboard row's scores from predictions on the scored rows: the same fields, computed the same way, for
every row of compare-heads -- frozen heads and fine-tuned runs joined with ``--include`` alike -- and the
prediction files (CSV) both write."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from featurize.store import write_atomic
from heads import bootstrap_ci, point_metrics
from heads.calibration import CALIBRATION_METRICS, bootstrap_calibration_ci, calibration_metrics

__all__ = ["score_fields", "format_ci", "write_csv", "write_prediction_csv", "read_prediction_csv"]


def score_fields(y: np.ndarray, y_pred: np.ndarray, n_classes: int, *, scores: np.ndarray | None = None,
                 proba: np.ndarray | None = None, proba_before: np.ndarray | None = None,
                 calibration: str = "none", temperatures: list[float] | None = None, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Accuracy, balanced accuracy and macro-F1 with bootstrap CIs, top-5 accuracy and log-loss, and NLL, Brier
    and ECE with CIs (None without probabilities), the calibration method and mean temperature, and the
    calibration metrics before calibration (`proba_before`)."""
    metrics = point_metrics(y, y_pred, n_classes, scores, proba)
    cis = bootstrap_ci(y, y_pred, n_classes, n_boot=n_boot, seed=seed)
    fields: dict[str, Any] = {
        **{k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")},
        **{f"{k}_ci": list(v) for k, v in cis.items()},
        "top5_accuracy": metrics["top5_accuracy"],
        "log_loss": metrics["log_loss"],
        "calibration": calibration,
        "temperature": float(np.mean(temperatures)) if temperatures else None,
    }
    if proba is None:
        return {**fields, **{m: None for m in CALIBRATION_METRICS}, **{f"{m}_ci": None for m in CALIBRATION_METRICS},
                "before_calibration": None}
    after = calibration_metrics(y, proba)
    calibration_cis = bootstrap_calibration_ci(y, proba, n_boot=n_boot, seed=seed)
    before = after if calibration == "none" or proba_before is None else calibration_metrics(y, proba_before)
    return {**fields, **after, **{f"{m}_ci": list(calibration_cis[m]) for m in CALIBRATION_METRICS},
            "before_calibration": before}


def write_csv(path: Path, header: list[str], rows) -> Path:
    """A CSV file written atomically (:func:`featurize.store.write_atomic`): the old file or the whole new one."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    return write_atomic(path, write)


def write_prediction_csv(path: Path, ids, classes: list[str], y, y_pred, proba: np.ndarray | None) -> Path:
    """``id,label,prediction`` and, with probabilities, one ``p:<class>`` column per class (exact decimals, so
    that :func:`read_prediction_csv` gives the same numbers back), written atomically."""
    header = ["id", "label", "prediction"] + ([f"p:{c}" for c in classes] if proba is not None else [])
    return write_csv(path, header, ([sample, classes[label], classes[predicted]]
                                    + ([repr(float(p)) for p in proba[i]] if proba is not None else [])
                                    for i, (sample, label, predicted) in enumerate(zip(ids, y, y_pred))))


def read_prediction_csv(path: Path, classes: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """What :func:`write_prediction_csv` wrote: ids, labels and predictions (indices into `classes`), and the
    probabilities (None without ``p:`` columns).

    Raises:
        ValueError: a header or a class name that does not fit `classes`.
    """
    index = {c: i for i, c in enumerate(classes)}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        with_proba = len(header) > 3
        if header[:3] != ["id", "label", "prediction"] or (with_proba and header[3:] != [f"p:{c}" for c in classes]):
            raise ValueError(f"unexpected columns {header[:3 + len(classes)]}")
        ids, labels, predicted, proba = [], [], [], []
        for row in reader:
            ids.append(row[0])
            labels.append(index[row[1]])
            predicted.append(index[row[2]])
            if with_proba:
                proba.append([float(v) for v in row[3:]])
    return (ids, np.array(labels, dtype=np.int64), np.array(predicted, dtype=np.int64),
            np.array(proba, dtype=np.float64).reshape(len(ids), len(classes)) if with_proba else None)


def format_ci(row: dict[str, Any], metric: str = "accuracy") -> str:
    """A row's metric in percent with its 95 % CI: ``97.33 [95.8, 98.7]``."""
    low, high = row[f"{metric}_ci"]
    return f"{row[metric] * 100:.2f} [{low * 100:.1f}, {high * 100:.1f}]"
