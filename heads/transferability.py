"""Transferability scores: how well a representation suits a labeled task, estimated without tuning heads.

Each score maps (X, y) to one number, larger is better:

* :func:`logme` -- LogME (You et al., ICML 2021): the log marginal likelihood (evidence) of a Bayesian linear
  regression from the features to each class's one-vs-rest target, maximised over the prior precision alpha and
  the noise precision beta by the paper's fixed-point iteration, divided by the number of rows and averaged
  over classes. Computed in float64 on the features as given.
* :func:`hscore` -- the shrinkage-regularised H-score (Ibrahim et al., 2022): ``tr(cov_f^-1 (1 - a) cov_g)``
  with ``cov_f`` the Ledoit-Wolf shrunk feature covariance (shrinkage ``a``) and ``cov_g`` the covariance of
  each row's class-mean feature.
* :func:`knn_loo` -- leave-one-out accuracy of a cosine k-nearest-neighbour vote.
* :func:`linear_cv` -- stratified K-fold CV accuracy of one fixed linear probe (standardize + ridge classifier).

:func:`score_representation` computes any of them with the seconds each took. Kendall's tau between scores and
accuracies, with a bootstrap CI over candidates, is :func:`rank_agreement`.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .errors import HeadsError

__all__ = [
    "SCORES",
    "logme",
    "hscore",
    "knn_loo",
    "linear_cv",
    "score_representation",
    "rank_agreement",
    "stratified_subsample",
]


def _class_codes(y: np.ndarray) -> np.ndarray:
    """Labels as 0..C-1; at least two classes."""
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise HeadsError(f"transferability scores need at least two classes, got {len(classes)}")
    return codes


def _spectrum(F: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values S of F (those above round-off) and U^T T, from an eigendecomposition of the smaller Gram
    matrix (F F^T or F^T F): several times faster than an SVD for the tall or wide matrices features are."""
    n, d = F.shape
    if n <= d:
        lam, U = np.linalg.eigh(F @ F.T)
        keep = lam > lam.max(initial=0.0) * 1e-12
        return np.sqrt(lam[keep]), U[:, keep].T @ T
    lam, V = np.linalg.eigh(F.T @ F)
    keep = lam > lam.max(initial=0.0) * 1e-12
    S = np.sqrt(lam[keep])
    return S, ((F @ V[:, keep]) / S).T @ T


def _posterior(S: np.ndarray, sigma: np.ndarray, ut: np.ndarray, outside: float, lam: float):
    """|m|^2, |F m - t|^2 and gamma for the posterior mean m at alpha/beta = lam, in the SVD basis of F."""
    fitted = sigma / (sigma + lam)  # share of t kept along each singular direction
    m2 = float(((S / (sigma + lam) * ut) ** 2).sum())
    residual = float((((1.0 - fitted) * ut) ** 2).sum()) + outside
    return m2, residual, float(fitted.sum())


def _fixed_point(S: np.ndarray, sigma: np.ndarray, ut: np.ndarray, outside: float, n: int, tol: float,
                 max_iter: int) -> float:
    """The paper's iteration from alpha = beta = 1; returns lam = alpha / beta (0: it ran into the noise-free
    limit, which only an exact fit, r = n, allows)."""
    lam = 1.0
    for _ in range(max_iter):
        m2, residual, gamma = _posterior(S, sigma, ut, outside, lam)
        alpha = gamma / max(m2, np.finfo(float).tiny)
        if n - gamma <= 1e-12 * n or residual <= 0.0:
            return 0.0
        new = alpha * residual / (n - gamma)  # alpha / beta with beta = (n - gamma) / residual
        if abs(new - lam) <= tol * lam:
            return new
        lam = new
    return lam


def _evidence(S: np.ndarray, sigma: np.ndarray, ut: np.ndarray, outside: float, n: int, lam: float) -> float:
    """The log evidence maximised over the scale at a fixed ratio lam = alpha / beta.

    The powers of alpha and beta in log|A| gathered, the evidence is

        r/2 log alpha + (n - r)/2 log beta - 1/2 sum log(lam + s_i) - n/2 log 2 pi - beta/2 |Fm - t|^2
        - alpha/2 |m|^2,

    where m depends on lam alone; with alpha = lam beta its maximum over beta is at
    ``beta = n / (|Fm - t|^2 + lam |m|^2)``. Exact for any beta, and at lam = 0 (beta -> inf, only when r = n:
    an exact fit, alpha = n / |m|^2).
    """
    r = len(sigma)
    m2, residual, _ = _posterior(S, sigma, ut, outside, lam)
    tiny = np.finfo(float).tiny
    common = -0.5 * float(np.log(lam + sigma).sum()) - n / 2 * np.log(2 * np.pi) - n / 2
    if lam == 0:
        return float(r / 2 * np.log(n / max(m2, tiny)) + common)
    beta = n / max(residual + lam * m2, tiny)
    return float(r / 2 * np.log(lam * beta) + (n - r) / 2 * np.log(beta) + common)


def _best_ratio(S: np.ndarray, sigma: np.ndarray, ut: np.ndarray, outside: float, n: int, tol: float,
                max_iter: int) -> tuple[float, float]:
    """(lam, evidence) at the evidence's maximum: the paper's fixed point, checked against a scan of lam over
    the whole spectrum (refined by Brent's method) and, for an exact fit, the noise-free limit -- the evidence
    can have more than one stationary point when there are fewer rows than features."""
    from scipy.optimize import minimize_scalar

    candidates = [_fixed_point(S, sigma, ut, outside, n, tol, max_iter)]
    grid = np.linspace(np.log(sigma.min()) - 12, np.log(sigma.max()) + 12, 121)
    values = [_evidence(S, sigma, ut, outside, n, float(np.exp(g))) for g in grid]
    i = int(np.argmax(values))
    low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    refined = minimize_scalar(lambda g: -_evidence(S, sigma, ut, outside, n, float(np.exp(g))), bounds=(low, high),
                              method="bounded", options={"xatol": 1e-9})
    candidates.append(float(np.exp(refined.x)))
    if len(sigma) == n:
        candidates.append(0.0)
    scored = [(_evidence(S, sigma, ut, outside, n, lam), lam) for lam in candidates]
    evidence, lam = max(scored)
    return lam, evidence


def logme(X: np.ndarray, y: np.ndarray, *, tol: float = 1e-8, max_iter: int = 200) -> float:
    """LogME: the maximised evidence per row of Bayesian linear regression onto one-vs-rest targets, averaged
    over classes.

    For features F (n x D) and a target t, the evidence of ``t = F m + noise`` with prior ``m ~ N(0, I/alpha)``
    and noise precision beta is

        n/2 log beta + D/2 log alpha - n/2 log 2 pi - beta/2 |F m - t|^2 - alpha/2 |m|^2 - 1/2 log|A|,

    with ``A = alpha I + beta F^T F`` and ``m = beta A^-1 F^T t``. alpha and beta come from the paper's
    fixed-point iteration (``gamma = sum beta s_i / (alpha + beta s_i)``, ``alpha = gamma / |m|^2``,
    ``beta = (n - gamma) / |F m - t|^2``, where s_i are the eigenvalues of F^T F), run until alpha/beta moves by
    less than `tol` relative (the authors stop at 1 %), and the result is kept only if neither a scan of
    alpha/beta over the whole spectrum nor the noise-free limit gives a larger evidence (:func:`_best_ratio`).
    One eigendecomposition of F's smaller Gram matrix serves every class.
    """
    F = np.asarray(X, dtype=np.float64)
    n, d = F.shape
    codes = _class_codes(y)
    targets = np.eye(codes.max() + 1)[codes]  # [n, classes] one-vs-rest
    S, UT = _spectrum(F, targets)
    sigma = S**2
    r = len(sigma)  # directions F reaches; the other d - r eigenvalues of F^T F are zero
    evidences = []
    for k in range(targets.shape[1]):
        t = targets[:, k]
        ut = UT[:, k]  # t in the left singular basis
        # The part of t that no m can reach; none when F spans every row (r = n): then t can be fitted exactly.
        outside = 0.0 if r == n else max(float(t @ t - ut @ ut), 0.0)
        _, evidence = _best_ratio(S, sigma, ut, outside, n, tol, max_iter)
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def hscore(X: np.ndarray, y: np.ndarray) -> float:
    """Shrinkage-regularised H-score: ``tr(cov_f^-1 (1 - a) cov_g)``.

    ``cov_f`` is the features' covariance shrunk towards ``tr(cov)/D * I`` by the Ledoit-Wolf shrinkage ``a``;
    ``cov_g`` is the covariance of each row replaced by its class's mean feature (both with 1/n
    normalisation). Since ``cov_g = sum_c p_c mu_c mu_c^T`` (centred class means), the trace is
    ``(1 - a) sum_c p_c mu_c^T cov_f^-1 mu_c``: one linear solve, no D x D inverse.
    """
    F = np.asarray(X, dtype=np.float64)
    codes = _class_codes(y)
    F = F - F.mean(axis=0)
    n, d = F.shape
    counts = np.bincount(codes)
    weights = counts / counts.sum()
    P = np.eye(len(counts))[codes].T / counts[:, None]  # [classes, n]: row c averages class c's rows
    if d > n:
        return _hscore_wide(F, P, weights)
    from sklearn.covariance import ledoit_wolf

    cov, shrinkage = ledoit_wolf(F, assume_centered=True)
    means = P @ F
    solved = np.linalg.lstsq(cov, means.T, rcond=None)[0] if shrinkage == 0 else np.linalg.solve(cov, means.T)
    return float((1.0 - shrinkage) * np.einsum("c,dc,cd->", weights, solved, means))


def _hscore_wide(F: np.ndarray, P: np.ndarray, weights: np.ndarray) -> float:
    """:func:`hscore` through the n x n Gram matrix G = F F^T when there are more features than rows.

    Ledoit-Wolf's shrinkage needs only |F^T F|_F = |G|_F, the row norms and the trace; and by Woodbury,
    ``(b I + c F^T F)^-1 = (I - c F^T (b I + c G)^-1 F) / b`` with ``b = a mu`` and ``c = (1 - a) / n``, so the
    class means' quadratic forms need G alone: no D x D matrix.
    """
    n, d = F.shape
    G = F @ F.T
    trace = float(np.trace(G))
    mu = trace / (n * d)
    delta_ = float((G**2).sum()) / n**2
    beta_ = float((np.diag(G) ** 2).sum())
    beta = 1.0 / (d * n) * (beta_ / n - delta_)
    delta = (delta_ - 2.0 * mu * trace / n + d * mu**2) / d
    shrinkage = 0.0 if min(beta, delta) == 0 else min(beta, delta) / delta
    if shrinkage == 0:  # no shrinkage: the covariance is singular here, so fall back to the pseudo-inverse
        cov = F.T @ F / n
        means = P @ F
        return float(np.einsum("c,dc,cd->", weights, np.linalg.pinv(cov, rcond=1e-15) @ means.T, means))
    b, c = shrinkage * mu, (1.0 - shrinkage) / n
    K = G @ P.T  # [n, classes]: F mu_c for every class
    norms = np.einsum("cn,nc->c", P, K)  # |mu_c|^2
    W = np.linalg.solve(b * np.eye(n) + c * G, K)
    quad = (norms - c * np.einsum("nc,nc->c", K, W)) / b
    return float((1.0 - shrinkage) * (weights * quad).sum())


def knn_loo(X: np.ndarray, y: np.ndarray, *, k: int = 5, block: int = 2048) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote under cosine similarity.

    Ties between classes go to the class whose tied neighbours are most similar in sum. Blocked, so memory is
    ``block x n``.
    """
    F = np.asarray(X, dtype=np.float32)
    codes = _class_codes(y)
    n = len(F)
    if n < 2:
        raise HeadsError("knn_loo needs at least two rows")
    k = min(k, n - 1)
    norms = np.linalg.norm(F, axis=1, keepdims=True)
    F = F / np.where(norms > 0, norms, 1.0)
    n_classes = codes.max() + 1
    hits = 0
    for start in range(0, n, block):
        sims = F[start : start + block] @ F.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf  # leave the row itself out
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(sims), n_classes))
        top_sims = np.take_along_axis(sims, top, axis=1)
        np.add.at(votes, (rows[:, None], codes[top]), 1.0 + 1e-6 * top_sims)
        hits += int((votes.argmax(axis=1) == codes[start : start + block]).sum())
    return hits / n


def linear_cv(X: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Stratified `folds`-fold CV accuracy of one fixed, fast linear probe: standardize, then a ridge classifier
    (alpha = number of features: a strong enough penalty for wide features, no tuning)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    F = np.asarray(X, dtype=np.float32)
    codes = _class_codes(y)
    folds = min(folds, int(np.bincount(codes).min()))
    if folds < 2:
        raise HeadsError("linear_cv needs at least two rows of every class")
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=float(F.shape[1])))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, F, codes, cv=cv).mean())


SCORES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "logme": logme,
    "hscore": hscore,
    "knn_loo": knn_loo,
    "linear_cv": linear_cv,
}


def stratified_subsample(y: np.ndarray, max_rows: int | None, seed: int = 0) -> np.ndarray:
    """Positions of at most `max_rows` rows keeping class proportions (all rows, in order, when they fit)."""
    n = len(y)
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(n), train_size=max_rows, stratify=y, random_state=seed)
    return np.sort(keep)


def score_representation(X: np.ndarray, y: np.ndarray, scores: list[str] | None = None) -> tuple[dict, dict]:
    """Every requested score of (X, y) and the seconds each took.

    Returns:
        (values, seconds), both keyed by score name.

    Raises:
        HeadsError: an unknown score name, fewer than two classes.
    """
    names = list(SCORES) if scores is None else scores
    unknown = [s for s in names if s not in SCORES]
    if unknown:
        raise HeadsError(f"unknown score {unknown[0]!r}; available: {', '.join(SCORES)}")
    values, seconds = {}, {}
    for name in names:
        started = time.perf_counter()
        values[name] = SCORES[name](X, y)
        seconds[name] = time.perf_counter() - started
    return values, seconds


def rank_agreement(scores: np.ndarray, accuracies: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """How well `scores` order candidates the way their measured `accuracies` do.

    Kendall's tau-b and weighted tau (scipy's hyperbolic weights: agreement among the best candidates counts
    most), each with a 95 % percentile bootstrap CI over candidates (resampled with replacement; resamples where
    tau is undefined, e.g. all one candidate, are dropped).
    """
    from scipy.stats import kendalltau, weightedtau

    scores = np.asarray(scores, dtype=float)
    accuracies = np.asarray(accuracies, dtype=float)
    n = len(scores)
    if n < 3:
        raise HeadsError(f"rank agreement needs at least 3 candidates, got {n}")
    rng = np.random.default_rng(seed)
    taus, wtaus = [], []
    for _ in range(n_boot):
        pick = rng.integers(0, n, n)
        s, a = scores[pick], accuracies[pick]
        if np.ptp(s) == 0 or np.ptp(a) == 0:
            continue
        taus.append(kendalltau(s, a).statistic)
        wtaus.append(weightedtau(s, a).statistic)

    def ci(values: list[float]) -> list[float | None]:
        values = [v for v in values if np.isfinite(v)]
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else [None, None]

    tau = kendalltau(scores, accuracies).statistic
    wtau = weightedtau(scores, accuracies).statistic
    return {
        "kendall_tau": None if not np.isfinite(tau) else float(tau),
        "kendall_tau_ci": ci(taus),
        "weighted_tau": None if not np.isfinite(wtau) else float(wtau),
        "weighted_tau_ci": ci(wtaus),
        "candidates": n,
    }
