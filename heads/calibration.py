"""Calibrated probabilities: metrics (NLL, Brier, ECE) and calibrators fitted on out-of-fold predictions.

A deployed head is used through its probabilities (thresholds, abstention, ranking), so compare-heads reports
how well they are calibrated and can fix them:

* :func:`calibration_metrics` -- negative log-likelihood (scikit-learn's ``log_loss``), the multiclass Brier
  score (``brier_score_loss``: mean over rows of the squared distance to the one-hot label) and the expected
  calibration error: 15 equal-width bins of the top-label confidence, each bin's |accuracy - confidence|
  weighted by its share of the rows (L1), bins right-closed as torchmetrics' ``MulticlassCalibrationError``.
* :class:`Calibrator` -- ``temperature`` (Guo et al. 2017: one scalar T, ``softmax(logits / T)``, fitted by
  minimising the NLL; it never changes the argmax), ``sigmoid`` (Platt scaling per class, one-vs-rest) or
  ``isotonic`` (per class, one-vs-rest), fitted on out-of-fold scores of the fit rows, never on scored rows.
  Heads without ``predict_proba`` (ridge, linear and kernel SVMs) are scaled from their decision scores.
* :class:`CalibratedHead` -- a fitted pipeline and its calibrator, one estimator to save and predict with.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import brier_score_loss, log_loss

from .errors import HeadsError

__all__ = ["ECE_BINS", "METHODS", "ISOTONIC_MIN_ROWS", "reliability_bins", "expected_calibration_error", "calibration_metrics",
           "bootstrap_calibration_ci", "Calibrator", "CalibratedHead", "head_logits", "CALIBRATION_METRICS"]

ECE_BINS = 15
METHODS = ("none", "temperature", "sigmoid", "isotonic")
ISOTONIC_MIN_ROWS = 1000  # fewer calibration rows over-fit isotonic regression (scikit-learn's advice)
CALIBRATION_METRICS = ("nll", "brier", "ece")
_EPS = 1e-12


def reliability_bins(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, rows) of the non-empty bins among `n_bins` equal-width bins (lower, upper]
    of the top-label confidence: the points of a reliability diagram."""
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.searchsorted(np.linspace(0, 1, n_bins + 1), confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    filled = count > 0
    accuracy = np.bincount(bins, weights=correct, minlength=n_bins)[filled] / count[filled]
    mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins)[filled] / count[filled]
    return mean_confidence, accuracy, count[filled]


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """L1 ECE over `n_bins` equal-width bins (lower, upper] of the top-label confidence."""
    confidence, accuracy, count = reliability_bins(y, proba, n_bins)
    return float(np.sum(np.abs(accuracy - confidence) * count) / len(y))


def calibration_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """``nll``, ``brier`` and ``ece`` of class probabilities `proba` [n, n_classes] for labels `y`."""
    labels = np.arange(proba.shape[1])
    return {"nll": float(log_loss(y, proba, labels=labels)),
            "brier": float(brier_score_loss(y, proba, labels=labels)),
            "ece": expected_calibration_error(y, proba)}


def bootstrap_calibration_ci(y: np.ndarray, proba: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                             seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of NLL, Brier and ECE over resampled rows (the same resamples for every head)."""
    n = len(y)
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    nll_row = -np.log(np.clip(proba[rows, y], _EPS, 1.0))
    brier_row = np.sum((proba - np.eye(proba.shape[1])[y]) ** 2, axis=1)
    values = {m: np.empty(n_boot) for m in CALIBRATION_METRICS}
    for b in range(n_boot):
        sample = rng.integers(0, n, n)
        values["nll"][b] = nll_row[sample].mean()
        values["brier"][b] = brier_row[sample].mean()
        values["ece"][b] = expected_calibration_error(y[sample], proba[sample])
    alpha = (1 - level) / 2
    return {m: tuple(float(v) for v in np.quantile(values[m], [alpha, 1 - alpha])) for m in CALIBRATION_METRICS}


def head_logits(model, X: np.ndarray) -> np.ndarray:
    """Logits of a fitted classifier: log-probabilities where it has ``predict_proba``, else its decision scores
    ([n] scores of a binary head become [-s/2, s/2])."""
    if hasattr(model, "predict_proba"):
        return np.log(np.clip(model.predict_proba(X), _EPS, 1.0))
    scores = np.asarray(model.decision_function(X), dtype=np.float64)
    if scores.ndim == 1:
        scores = np.stack([-scores / 2, scores / 2], axis=1)
    return scores


class Calibrator(BaseEstimator):
    """Maps a head's logits [n, n_classes] to calibrated probabilities.

    Parameters:
        method: ``temperature``, ``sigmoid`` or ``isotonic``.
    """

    def __init__(self, method: str = "temperature"):
        self.method = method

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "Calibrator":
        logits = np.asarray(logits, dtype=np.float64)
        y = np.asarray(y)
        self.n_classes_ = logits.shape[1]
        if self.method == "temperature":
            onehot_rows = np.arange(len(y))

            def nll(log_t: float) -> float:
                return float(-log_softmax(logits / np.exp(log_t), axis=1)[onehot_rows, y].mean())

            found = minimize_scalar(nll, bounds=(-7.0, 7.0), method="bounded", options={"xatol": 1e-6})
            self.temperature_ = float(np.exp(found.x))
        elif self.method == "sigmoid":
            from sklearn.linear_model import LogisticRegression

            self.maps_ = [LogisticRegression(C=1e6).fit(logits[:, [c]], y == c) if 0 < (y == c).sum() < len(y)
                          else None for c in range(self.n_classes_)]
        elif self.method == "isotonic":
            if len(y) < ISOTONIC_MIN_ROWS:
                raise HeadsError(f"--calibrate isotonic needs at least {ISOTONIC_MIN_ROWS} calibration rows, got "
                                 f"{len(y)}; use temperature or sigmoid")
            from sklearn.isotonic import IsotonicRegression

            self.maps_ = [IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(logits[:, c], y == c)
                          for c in range(self.n_classes_)]
        else:
            raise HeadsError(f"--calibrate must be one of {', '.join(METHODS)}; got {self.method!r}")
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities; rows sum to 1."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.method == "temperature":
            return softmax(logits / self.temperature_, axis=1)
        columns = []
        for c, mapping in enumerate(self.maps_):
            if mapping is None:
                columns.append(np.zeros(len(logits)))
            elif self.method == "sigmoid":
                columns.append(mapping.predict_proba(logits[:, [c]])[:, 1])
            else:
                columns.append(mapping.predict(logits[:, c]))
        proba = np.stack(columns, axis=1)
        total = proba.sum(axis=1, keepdims=True)
        uniform = np.full_like(proba, 1.0 / proba.shape[1])
        return np.where(total > 0, proba / np.where(total > 0, total, 1.0), uniform)


class CalibratedHead(ClassifierMixin, BaseEstimator):
    """A fitted head and the calibrator fitted on its out-of-fold logits.

    ``predict_proba`` gives calibrated probabilities and ``predict`` their argmax: with temperature scaling
    exactly the head's own predictions.

    Parameters:
        head: the fitted pipeline.
        calibrator: a fitted :class:`Calibrator`.
    """

    def __init__(self, head=None, calibrator=None):
        self.head = head
        self.calibrator = calibrator

    def fit(self, X, y):  # the parts are fitted by compare-heads on different rows; refitting is not defined
        raise HeadsError("a CalibratedHead is assembled from a fitted head and calibrator; it is not refit")

    @property
    def classes_(self):
        return self.head.classes_

    def predict_proba(self, X) -> np.ndarray:
        return self.calibrator.transform(head_logits(self.head, X))

    def decision_function(self, X) -> np.ndarray:
        return head_logits(self.head, X)

    def predict(self, X) -> np.ndarray:
        if self.calibrator.method == "temperature":
            return self.head.predict(X)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
