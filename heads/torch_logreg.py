"""Multinomial logistic regression fitted full-batch with L-BFGS in torch (float32, CPU or CUDA).

A scikit-learn classifier: it drops into the heads' Pipelines, grids and skops persistence. The fitted
parameters are numpy arrays and prediction is numpy, so a saved head runs without torch's device or a GPU.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.extmath import softmax
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["TorchLogisticRegression"]


class TorchLogisticRegression(ClassifierMixin, BaseEstimator):
    """L2-penalised multinomial logistic regression, solved with torch's L-BFGS on all rows at once.

    Minimises ``C * sum_i w_i * CE_i + ||W||^2 / 2`` (scikit-learn's objective for ``LogisticRegression``
    with ``penalty="l2"``; the intercept is not penalised), scaled by ``1 / (C * sum_i w_i)`` for float32
    stability.

    Parameters:
        C: inverse regularisation strength, > 0.
        max_iter: L-BFGS iterations at most.
        tol: stop when the gradient's largest entry falls below this.
        class_weight: None, ``"balanced"``, or a dict class -> weight.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``; fitting only.
    """

    def __init__(self, C=1.0, max_iter=200, tol=1e-5, class_weight=None, device="auto"):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.device = device

    def _check_params(self):
        if not isinstance(self.C, numbers.Real) or not self.C > 0:
            raise ValueError(f"The 'C' parameter of TorchLogisticRegression must be a float in the range (0.0, inf). Got {self.C!r} instead.")
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ValueError(f"The 'max_iter' parameter of TorchLogisticRegression must be an int >= 1. Got {self.max_iter!r} instead.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"The 'device' parameter of TorchLogisticRegression must be 'auto', 'cpu' or 'cuda'. Got {self.device!r} instead.")

    def _torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def fit(self, X, y):
        """Fit on features X [n, d] and labels y [n]; returns self."""
        import torch

        self._check_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                f"This solver needs samples of at least 2 classes in the data, but the data contains only one class: {self.classes_[0]!r}"
            )
        weights = np.ones(n_classes)
        if self.class_weight is not None:
            weights = compute_class_weight(self.class_weight, classes=self.classes_, y=y)

        device = self._torch_device()
        Xt = torch.tensor(np.asarray(X, dtype=np.float32), device=device)
        yt = torch.tensor(y_index, dtype=torch.int64, device=device)
        row_weight = torch.tensor(weights, dtype=torch.float32, device=device)[yt]
        total = row_weight.sum()
        W = torch.zeros(n_classes, X.shape[1], dtype=torch.float32, device=device, requires_grad=True)
        b = torch.zeros(n_classes, dtype=torch.float32, device=device, requires_grad=True)
        optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=self.tol,
                                      tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
        penalty = 1.0 / (2.0 * float(self.C))

        def closure():
            optimizer.zero_grad()
            ce = torch.nn.functional.cross_entropy(Xt @ W.T + b, yt, reduction="none")
            loss = ((row_weight * ce).sum() + penalty * (W * W).sum()) / total
            loss.backward()
            return loss

        optimizer.step(closure)
        self.n_iter_ = np.array([optimizer.state[optimizer._params[0]].get("n_iter", 0)])
        self.coef_ = W.detach().cpu().numpy()
        self.intercept_ = b.detach().cpu().numpy()
        return self

    def decision_function(self, X):
        """Class scores: [n, n_classes], or [n] (positive class minus negative) for two classes."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        scores = np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X):
        """Class probabilities [n, n_classes], columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        scores = (np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_).astype(np.float64)
        return softmax(scores)

    def predict_log_proba(self, X):
        return np.log(np.clip(self.predict_proba(X), 1e-300, None))

    def predict(self, X):
        """The most likely class of each row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
