"""Transferability scores against slow, independently written versions of their formulas, on random and real
features, and the rank agreement statistics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar

from heads import HeadsError
from heads.transferability import hscore, knn_loo, linear_cv, logme, rank_agreement, score_representation


def _evidence(F: np.ndarray, t: np.ndarray, alpha: float, beta: float) -> float:
    """The paper's log evidence written out: a D x D matrix, a solve and a log-determinant."""
    n, d = F.shape
    A = alpha * np.eye(d) + beta * F.T @ F
    m = beta * np.linalg.solve(A, F.T @ t)
    _, log_det = np.linalg.slogdet(A)
    return (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * np.sum((F @ m - t) ** 2) - alpha / 2 * m @ m - log_det / 2)


def _marginal(F: np.ndarray, t: np.ndarray, alpha: float, noise: float) -> float:
    """The same evidence as the marginal likelihood of t ~ N(0, F F^T / alpha + noise I): n x n matrices, and
    defined at noise = 0 (beta -> inf)."""
    C = F @ F.T / alpha + noise * np.eye(len(F))
    _, log_det = np.linalg.slogdet(C)
    return -0.5 * (len(F) * np.log(2 * np.pi) + log_det + t @ np.linalg.solve(C, t))


def slow_logme(X: np.ndarray, y: np.ndarray) -> float:
    """Maximise the evidence over (log alpha, log beta) directly with scipy, class by class, from several starts;
    with fewer rows than features on the marginal form, including its noise-free limit."""
    F = X.astype(np.float64)
    n, d = F.shape
    out = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        best = -np.inf
        for start in ([0.0, 0.0], [np.log(10.0), np.log(5.0)], [-3.0, 3.0], [2.0, 8.0]):
            if n >= d:
                objective = lambda p: -_evidence(F, t, np.exp(p[0]), np.exp(p[1]))  # noqa: E731
            else:
                objective = lambda p: -_marginal(F, t, np.exp(p[0]), np.exp(-p[1]))  # noqa: E731
            res = minimize(objective, start, method="Nelder-Mead",
                           options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 6000})
            best = max(best, -res.fun)
        if n < d and np.linalg.matrix_rank(F) == n:
            res = minimize_scalar(lambda a: -_marginal(F, t, np.exp(a), 0.0), bounds=(-30, 30), method="bounded",
                                  options={"xatol": 1e-10})
            best = max(best, -res.fun)
        out.append(best / n)
    return float(np.mean(out))


def slow_hscore(X: np.ndarray, y: np.ndarray) -> float:
    """The regularised H-score as written: shrunk covariance, per-row class means, pinv, trace."""
    from sklearn.covariance import LedoitWolf

    F = X.astype(np.float64)
    lw = LedoitWolf().fit(F)
    g = np.zeros_like(F)
    for c in np.unique(y):
        g[y == c] = F[y == c].mean(axis=0)
    cov_g = np.cov(g, rowvar=False, bias=True)
    return float(np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * cov_g)))


def _random(n: int, d: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, d))
    return np.maximum(centers[y] + rng.normal(scale=2.0, size=(n, d)), 0).astype(np.float32), y


def _one_strong_direction(n: int, d: int, separation: float, seed: int):
    """Fewer rows than features, one feature carrying the label: the evidence has several stationary points
    (the paper's iteration alone stops at the lower one) and an exact fit is possible."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d))
    X[:, 0] += separation * y
    return X, y


def _digits(n: int = 400):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X[:n].astype(np.float32), y[:n]


def _faces():
    """scikit-image's lfw_subset: 100 faces and 100 non-faces, 25 x 25 grey levels, as real features."""
    from skimage.data import lfw_subset

    images = lfw_subset()
    return images.reshape(len(images), -1)[:, ::5].astype(np.float32), np.repeat([1, 0], 100)


CASES = {
    "random n > D": lambda: _random(300, 24, 4, 0),
    "random n < D": lambda: _random(40, 90, 3, 1),
    "n < D, one strong direction": lambda: _one_strong_direction(30, 60, 10.0, 0),
    "n < D, two stationary points": lambda: _one_strong_direction(20, 100, 20.0, 3),
    "digits pixels": _digits,
    "lfw faces vs not": _faces,
}


@pytest.mark.parametrize("case", list(CASES))
def test_logme_equals_direct_maximisation_of_the_evidence(case):
    X, y = CASES[case]()
    assert logme(X, y) == pytest.approx(slow_logme(X, y), rel=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_hscore_equals_its_formula_written_out(case):
    X, y = CASES[case]()
    assert hscore(X, y) == pytest.approx(slow_hscore(X, y), rel=1e-3)


def test_knn_loo_equals_a_plain_loop():
    X, y = _digits(200)
    F = X / np.linalg.norm(X, axis=1, keepdims=True)
    hits = 0
    for i in range(len(F)):
        sims = F @ F[i]
        sims[i] = -np.inf
        nearest = np.argsort(-sims, kind="stable")[:5]
        counts = np.bincount(y[nearest], minlength=10)
        hits += counts.argmax() == y[i] if (counts == counts.max()).sum() == 1 else 0
    assert knn_loo(X, y, k=5, block=64) >= hits / len(F)  # ties may only add hits
    assert knn_loo(X, y, k=5, block=64) == knn_loo(X, y, k=5)  # blocking does not change the result
    assert knn_loo(X, y, k=5) > 0.9


def test_scores_order_informative_above_noise():
    """Real digits pixels carry the labels; the same pixels with shuffled rows do not: every score agrees."""
    X, y = _digits(600)
    noise = np.random.default_rng(0).permutation(X)
    good, _ = score_representation(X, y)
    bad, seconds = score_representation(noise, y)
    for name in good:
        assert good[name] > bad[name], name
        assert seconds[name] >= 0
    assert linear_cv(X, y) > 0.85 and linear_cv(noise, y) < 0.3


def test_score_errors():
    X, y = _digits(50)
    with pytest.raises(HeadsError, match="unknown score 'leep'; available: logme, hscore, knn_loo, linear_cv"):
        score_representation(X, y, ["leep"])
    with pytest.raises(HeadsError, match="at least two classes"):
        logme(X, np.zeros(len(X), int))


def test_rank_agreement_perfect_reversed_and_bootstrap_ci():
    acc = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    same = rank_agreement(acc * 10, acc)
    assert same["kendall_tau"] == pytest.approx(1.0) and same["weighted_tau"] == pytest.approx(1.0)
    assert same["kendall_tau_ci"] == [pytest.approx(1.0), pytest.approx(1.0)]
    reverse = rank_agreement(-acc, acc)
    assert reverse["kendall_tau"] == pytest.approx(-1.0)
    noisy = rank_agreement(np.array([1, 3, 2, 5, 4, 6.0]), np.arange(6.0))
    low, high = noisy["kendall_tau_ci"]
    assert low < noisy["kendall_tau"] < high <= 1.0
    with pytest.raises(HeadsError, match="at least 3 candidates"):
        rank_agreement(acc[:2], acc[:2])
