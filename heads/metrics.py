"""Metrics, bootstrap confidence intervals and paired tests (pure numpy/scipy functions)."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

__all__ = ["point_metrics", "bootstrap_ci", "mcnemar_p_value", "BOOTSTRAP_METRICS"]

BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def _top_k(y: np.ndarray, scores: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def point_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    scores: np.ndarray | None = None,
    proba: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Accuracy, balanced accuracy, macro-F1; top-5 accuracy (scores, more than 5 classes); log-loss (proba).

    Args:
        y_true, y_pred: class indices.
        n_classes: number of classes (columns of `scores` and `proba`).
        scores: [n, n_classes] decision scores or probabilities, higher = more likely; or None.
        proba: [n, n_classes] probabilities; or None.
    """
    out: dict[str, float | None] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "top5_accuracy": None,
        "log_loss": None,
    }
    if scores is not None and n_classes > 5:
        out["top5_accuracy"] = _top_k(y_true, scores, 5)
    if proba is not None:
        out["log_loss"] = float(log_loss(y_true, proba, labels=np.arange(n_classes)))
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of accuracy, balanced accuracy and macro-F1 over resampled rows.

    Vectorised: each resample is a row of multinomial counts, so per-class counts are matrix products.
    The same seed gives the same resamples for every head, so intervals are comparable.
    """
    n = len(y_true)
    if n == 0:
        return {m: (float("nan"), float("nan")) for m in BOOTSTRAP_METRICS}
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # [B, n]
    correct = (y_true == y_pred).astype(np.float64)
    true_1h = np.eye(n_classes)[y_true]  # [n, C]
    pred_1h = np.eye(n_classes)[y_pred]
    tp = w @ (true_1h * correct[:, None])  # [B, C]
    support = w @ true_1h
    predicted = w @ pred_1h
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (w @ correct) / n
        recall = np.where(support > 0, tp / support, np.nan)
        balanced = np.nanmean(recall, axis=1)
        denom = support + predicted  # 2tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
        macro_f1 = np.nanmean(f1, axis=1)
    alpha = (1 - level) / 2
    out = {}
    for name, values in zip(BOOTSTRAP_METRICS, (accuracy, balanced, macro_f1)):
        low, high = np.quantile(values, [alpha, 1 - alpha])
        out[name] = (float(low), float(high))
    return out


def mcnemar_p_value(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact (binomial) McNemar test on paired right/wrong outcomes of two classifiers on the same rows.

    Returns 1.0 when the two never disagree.
    """
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue)


def paired_difference_ci(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B on the same rows, with a percentile bootstrap CI that resamples the rows
    (pairs kept together): (difference, low, high)."""
    diff = correct_a.astype(np.float64) - correct_b.astype(np.float64)
    n = len(diff)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    alpha = (1 - level) / 2
    low, high = np.quantile((w @ diff) / n, [alpha, 1 - alpha])
    return float(diff.mean()), float(low), float(high)
