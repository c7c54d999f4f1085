"""The cosine space that the audit and label selection both measure rows in.

Rows are L2-normalised, projected by a PCA fitted once (on at most `fit_rows` rows drawn with a fixed seed) to at
most `dims` dimensions, and normalised again: a dot product is then the cosine similarity, and a squared distance
``2 - 2 * cosine``.
"""

from __future__ import annotations

import numpy as np

from .errors import HeadsError

__all__ = ["CosineSpace", "normalise"]


def normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows left as they are), float32."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


class CosineSpace:
    """Rows where a dot product is the cosine similarity: normalised, PCA-projected (fitted on at most
    `fit_rows` rows, fixed seed) to at most `dims` dimensions, normalised again.

    Args:
        user: who measures, for the one-line error about NaN or infinite rows (e.g. ``the audit``).

    Attributes:
        X: the projected rows (float32, one per input row).
        dims: their width.
    """

    def __init__(self, X: np.ndarray, *, dims: int, fit_rows: int = 20_000, block: int = 65_536,
                 user: str = "the audit"):
        if np.ndim(X) != 2 or len(X) == 0:
            raise HeadsError(f"{user} needs at least one feature row")
        self.user = user
        self._pca = None
        if X.shape[1] > dims and len(X) > dims:
            from sklearn.decomposition import PCA

            rows = np.arange(len(X)) if len(X) <= fit_rows else \
                np.sort(np.random.default_rng(0).choice(len(X), fit_rows, replace=False))
            self._pca = PCA(n_components=dims, svd_solver="randomized", random_state=0).fit(
                normalise(self._checked(X[rows])))
        self.dims = dims if self._pca is not None else X.shape[1]
        self.X = np.empty((len(X), self.dims), dtype=np.float32)
        for start in range(0, len(X), block):
            self.X[start:start + block] = self.transform(X[start:start + block])

    def _checked(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float32)
        if not np.isfinite(block).all():
            raise HeadsError(f"{self.user} got rows with NaN or infinite features; leave failed rows out or re-extract")
        return block

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """New rows (e.g. the features of calibration copies) in the same space."""
        rows = normalise(self._checked(rows))
        return rows if self._pca is None else normalise(self._pca.transform(rows))
