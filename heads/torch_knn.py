"""k nearest neighbours by cosine similarity, as batched matrix products + top-k in torch (CPU or CUDA).

For large stores a brute-force cosine kNN is one matmul per query block: torch runs it on the GPU when
there is one, and in float32 with a bounded block size either way. Fitted state is numpy, so a saved head
needs no GPU.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["TorchKNeighborsClassifier"]

_EPS = 1e-12
_EXACT = 1e-5  # cosine distances below this count as exact matches


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), _EPS)


class TorchKNeighborsClassifier(ClassifierMixin, BaseEstimator):
    """Cosine-similarity k nearest neighbours with uniform or distance-weighted votes.

    Parameters:
        n_neighbors: neighbours that vote, at most the number of training rows.
        weights: ``"distance"`` (vote 1 / cosine distance; exact matches outvote everything) or ``"uniform"``.
        batch_size: query rows per matrix product (bounds memory at batch_size x n_train floats).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, n_neighbors=5, weights="distance", batch_size=2048, device="auto"):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.batch_size = batch_size
        self.device = device

    def fit(self, X, y):
        """Remember the L2-normalised training rows and their labels; returns self."""
        if not isinstance(self.n_neighbors, numbers.Integral) or self.n_neighbors < 1:
            raise ValueError(f"The 'n_neighbors' parameter of TorchKNeighborsClassifier must be an int >= 1. Got {self.n_neighbors!r} instead.")
        if self.weights not in ("distance", "uniform"):
            raise ValueError(f"The 'weights' parameter of TorchKNeighborsClassifier must be 'distance' or 'uniform'. Got {self.weights!r} instead.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"The 'device' parameter of TorchKNeighborsClassifier must be 'auto', 'cpu' or 'cuda'. Got {self.device!r} instead.")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, self._y_index = np.unique(y, return_inverse=True)
        self._X_unit = _unit_rows(X)
        return self

    def predict_proba(self, X):
        """Vote shares [n, n_classes] among the nearest neighbours, columns in the order of ``classes_``."""
        import torch

        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        n_fit = self._X_unit.shape[0]
        if self.n_neighbors > n_fit:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {self.n_neighbors}, n_samples_fit = {n_fit}")
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.device == "auto" else self.device)
        train = torch.tensor(self._X_unit, device=device)
        labels = torch.tensor(self._y_index, device=device)
        queries = _unit_rows(X)
        out = np.empty((len(queries), len(self.classes_)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(queries), self.batch_size):
                q = torch.tensor(queries[start : start + self.batch_size], device=device)
                sim, idx = (q @ train.T).topk(self.n_neighbors, dim=1)
                if self.weights == "distance":
                    dist = (1.0 - sim.double()).clamp_min(0)
                    # float32 cosine of identical rows lands within ~1e-7 of 1 depending on summation order
                    exact = dist <= _EXACT
                    votes = torch.where(exact.any(dim=1, keepdim=True), exact.double(), 1.0 / dist.clamp_min(_EXACT))
                else:
                    votes = torch.ones_like(sim, dtype=torch.float64)
                tally = torch.zeros(len(q), len(self.classes_), dtype=torch.float64, device=device)
                tally.scatter_add_(1, labels[idx], votes)
                out[start : start + len(q)] = (tally / tally.sum(dim=1, keepdim=True)).cpu().numpy()
        return out

    def predict(self, X):
        """The class with the largest vote for each row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
