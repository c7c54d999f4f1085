"""Standardise concatenated feature blocks (layers) so that each block weighs the same in a head."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["BlockStandardScaler"]


class BlockStandardScaler(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Standardise every feature, then scale each block of columns by ``1 / sqrt(block width)``.

    For features that are several layers side by side (``STORE.h5:concat``): after it every block has total
    variance 1, so a 16-wide early stage and a 1 280-wide last layer count alike in distances and penalties --
    a cheap, Head2Toe-like multi-layer representation. Fitted on the training rows only, like any step of a
    head.

    Args:
        widths: the width of each block, in column order; None: all columns are one block.
    """

    def __init__(self, widths: tuple[int, ...] | None = None):
        self.widths = widths

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        widths = (X.shape[1],) if self.widths is None else tuple(int(w) for w in self.widths)
        if sum(widths) != X.shape[1] or min(widths) < 1:
            raise ValueError(f"The 'widths' parameter of BlockStandardScaler must be positive block widths that add "
                             f"up to the {X.shape[1]} features of X. Got {self.widths} instead.")
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        block_scale = np.repeat([1.0 / np.sqrt(w) for w in widths], widths)
        # Constant columns stay at zero instead of dividing by zero (StandardScaler's convention).
        self.scale_ = np.where(std > 0, std, 1.0) / block_scale
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return ((X - self.mean_) / self.scale_).astype(X.dtype, copy=False)
