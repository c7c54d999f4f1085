"""Linear classifiers fitted full-batch with L-BFGS in torch (float32 state, CPU or CUDA).

``TorchLogisticRegression`` (multinomial log loss, scikit-learn's ``LogisticRegression`` objective) and
``TorchLinearSVC`` (one-vs-rest squared hinge, ``LinearSVC``'s default loss) share the solver. They are
scikit-learn classifiers: they drop into the heads' Pipelines, grids and skops persistence. The fitted
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

__all__ = ["TorchLogisticRegression", "TorchLinearSVC"]


class _TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """An L2-penalised linear classifier solved with torch's L-BFGS on all rows at once.

    Minimises ``C * sum_i w_i * loss_i + ||W||^2 / 2`` (the intercept is not penalised), scaled by
    ``1 / (C * sum_i w_i)`` for float32 stability. Loss and gradient are written out (two matrix products per
    evaluation, no autograd graph); subclasses give the per-row loss and its derivative in :meth:`_loss`.

    Parameters:
        C: inverse regularisation strength, > 0.
        max_iter: L-BFGS iterations at most.
        tol: stop when the gradient's largest entry falls below this (scikit-learn's ``tol`` on the same
            scaled objective).
        class_weight: None, ``"balanced"``, or a dict class -> weight.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``; fitting only.
        precision: precision of the two matrix products with X: ``"bf16"`` (X held in bfloat16, products
            accumulated in float32; ~4x faster on CPUs with AVX512-BF16/AMX, half the memory), ``"fp32"``, or
            ``"auto"`` (bf16 on CUDA with bf16 and on CPUs with native bf16, fp32 elsewhere). Logits, softmax,
            the penalty and the L-BFGS state are always float32.
        warm_start: start from the previous fit's coefficients (same classes and width), e.g. along a path of
            increasing C; otherwise from zeros.
    """

    def __init__(self, C=1.0, max_iter=200, tol=1e-4, class_weight=None, device="auto", precision="auto",
                 warm_start=False):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.device = device
        self.precision = precision
        self.warm_start = warm_start

    def _check_params(self):
        if not isinstance(self.C, numbers.Real) or not self.C > 0:
            raise ValueError(f"The 'C' parameter of {type(self).__name__} must be a float in the range (0.0, inf). Got {self.C!r} instead.")
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ValueError(f"The 'max_iter' parameter of {type(self).__name__} must be an int >= 1. Got {self.max_iter!r} instead.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"The 'device' parameter of {type(self).__name__} must be 'auto', 'cpu' or 'cuda'. Got {self.device!r} instead.")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"The 'precision' parameter of {type(self).__name__} must be 'auto', 'bf16' or 'fp32'. Got {self.precision!r} instead.")

    def _torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _matmul_dtype(self, device):
        import torch

        if self.precision == "fp32":
            return torch.float32
        if self.precision == "bf16":
            return torch.bfloat16
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        # torch's own probes of the CPU's native bf16 instructions (AVX512-BF16, AMX); absent ones count as no.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
        return torch.bfloat16 if native else torch.float32

    def fit(self, X, y):
        """Fit on features X [n, d] and labels y [n]; returns self."""
        import torch

        self._check_params()
        warm = self.warm_start and hasattr(self, "coef_")
        previous = (self.classes_, self.coef_, self.intercept_) if warm else None
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
        dtype = self._matmul_dtype(device)
        Xt = torch.tensor(np.asarray(X, dtype=np.float32), device=device).to(dtype)
        yt = torch.tensor(y_index, dtype=torch.int64, device=device)
        rows = torch.arange(len(yt), device=device)
        row_weight = torch.tensor(weights, dtype=torch.float32, device=device)[yt]
        total = row_weight.sum()
        W = torch.zeros(n_classes, X.shape[1], dtype=torch.float32, device=device)
        b = torch.zeros(n_classes, dtype=torch.float32, device=device)
        if previous is not None and np.array_equal(previous[0], self.classes_) and previous[1].shape == W.shape:
            W.copy_(torch.from_numpy(previous[1]))
            b.copy_(torch.from_numpy(previous[2]))
        W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
        optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=self.tol,
                                      tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
        inv_c = 1.0 / float(self.C)

        def closure():
            logits = (Xt @ W.to(dtype).T).float() + b
            row_loss, residual = self._loss(logits, yt, rows)
            loss = (row_weight * row_loss).sum() + 0.5 * inv_c * (W * W).sum()
            residual *= row_weight[:, None]
            W.grad.copy_(((residual.to(dtype).T @ Xt).float() + inv_c * W) / total)
            b.grad.copy_(residual.sum(0) / total)
            return loss / total

        optimizer.step(closure)
        self.n_iter_ = np.array([optimizer.state[optimizer._params[0]].get("n_iter", 0)])
        self.coef_ = W.cpu().numpy()
        self.intercept_ = b.cpu().numpy()
        return self

    def _loss(self, logits, yt, rows):
        """Per-row loss [n] and its derivative with respect to the logits [n, k] (a new tensor)."""
        raise NotImplementedError

    def _scores(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_

    def decision_function(self, X):
        """Class scores: [n, n_classes], or [n] (positive class minus negative) for two classes."""
        scores = self._scores(X)
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict(self, X):
        """The class with the highest score for each row."""
        scores = self._scores(X)
        return self.classes_[np.argmax(scores, axis=1)]


class TorchLogisticRegression(_TorchLinearClassifier):
    """Multinomial logistic regression: scikit-learn's ``LogisticRegression(penalty="l2")`` objective.

    Parameters are those of the shared solver: ``C``, ``max_iter``, ``tol``, ``class_weight``, ``device``,
    ``precision``, ``warm_start`` (see the module's linear classifier base).
    """

    def _loss(self, logits, yt, rows):
        import torch

        row_loss = torch.logsumexp(logits, dim=1) - logits[rows, yt]
        residual = torch.softmax(logits, dim=1)
        residual[rows, yt] -= 1.0
        return row_loss, residual

    def predict_proba(self, X):
        """Class probabilities [n, n_classes], columns in the order of ``classes_``."""
        return softmax(self._scores(X).astype(np.float64))

    def predict_log_proba(self, X):
        return np.log(np.clip(self.predict_proba(X), 1e-300, None))



class TorchLinearSVC(_TorchLinearClassifier):
    """One-vs-rest linear SVM with the squared hinge loss (``LinearSVC``'s default), solved by L-BFGS.

    The squared hinge is smooth, so the full-batch quasi-Newton solver applies; each class's margin is
    ``1 - t * f`` with ``t = +1`` for the class's rows and ``-1`` for the others. Parameters as the base.
    """

    def _loss(self, logits, yt, rows):
        import torch

        signs = torch.full_like(logits, -1.0)
        signs[rows, yt] = 1.0
        slack = torch.clamp(1.0 - signs * logits, min=0.0)
        return (slack * slack).sum(1), -2.0 * signs * slack
