"""Which rows to label first: label-selection strategies for a budget, on frozen features.

Every strategy sees the features of a *pool* -- the candidate rows plus the rows already labelled -- and the
labels of the labelled rows only; it returns the next `budget` candidates in pick order. None looks at a
candidate's label or at any row outside the pool (the caller keeps test rows out of it).

- ``random``: uniform picks among the candidates: the reference every other strategy is measured against.
- ``typiclust`` (Hacohen, Dekel & Weinshall, ICML 2022): k-means into (labelled + budget) clusters; the
  clusters with the fewest labelled rows, largest first, each give their most *typical* row -- the inverse of
  its mean distance to its nearest neighbours within the cluster. Built for budgets of a few labels per class.
- ``probcover`` (Yehuda et al., NeurIPS 2022): balls of radius delta around every row; greedy maximum coverage
  picks the row whose ball covers the most rows no labelled or picked ball covers yet. delta is the largest
  radius at which 95 % of the balls are *pure* under a k-means into as many clusters as classes: a ball is pure
  while it holds no row of another cluster, so the radius is a quantile of each row's distance to its nearest
  row of another cluster (:meth:`SelectionSpace.radius`). When every row is covered, the rest is random.
- ``kcenter`` (k-center greedy, the "core-set" of Sener & Savarese, ICLR 2018): each pick is the candidate
  farthest from every labelled or picked row (the first, without labelled rows, at random).
- ``margin``: a logistic regression fitted on the labelled rows scores every candidate; the rows with the
  smallest gap between the two most probable classes come first. It needs labelled rows of two classes.

All distances are Euclidean between L2-normalised rows (the papers' setting), after a PCA to at most
:data:`DEFAULT_DIMS` dimensions (:class:`SelectionSpace`: fitted once per pool with a fixed seed, so every
strategy and seed shares it; all-pairs work scales with the dimension, and the picks at this width are as good
as at the full one -- docs/label-selection.md measures both). Strategies are a registry like the heads':
:func:`register_strategy`, :func:`get_strategy`, :func:`resolve_strategies`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import HeadsError
from .space import CosineSpace

__all__ = ["DEFAULT_DIMS", "SELECTION_VERSION", "Picks", "SelectionSpace", "Strategy", "STRATEGIES", "register_strategy", "get_strategy",
           "resolve_strategies", "select"]

SELECTION_VERSION = 1  # bump when a strategy's picks change: cached learning-curve draws are keyed by it
DEFAULT_DIMS = 128  # the PCA width of the selection space
PURITY = 0.95  # probcover: the share of pure balls its radius keeps (the paper's alpha)
TYPICALITY_NEIGHBOURS = 20  # typiclust: neighbours in the typicality (the paper's K)
MIN_CLUSTER = 5  # typiclust: smaller clusters are outliers, not picked from while larger ones remain
MAX_CLUSTERS = 500  # typiclust: k-means into at most this many clusters (the paper's cap)
TYPICALITY_SAMPLE = 5000  # typiclust: a cluster's typicality is measured against at most this many of its rows
PROBCOVER_ROWS = 100_000  # probcover: its all-pairs graph is built on at most this many rows of the pool
BLOCK = 1024  # rows per block of an all-pairs product
MAX_EDGES = 400_000_000  # probcover: a graph larger than this (1.6 GB of neighbour indices) is refused


@dataclass
class Picks:
    """What a strategy chose.

    Attributes:
        rows: positions into the pool, in pick order.
        info: per-pick columns, each as long as `rows` (e.g. ``cluster``, ``typicality``, ``distance``).
        summary: what the strategy used as a whole (clusters, radius, coverage), for the user.
    """

    rows: np.ndarray
    info: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class SelectionSpace:
    """The pool's rows as the strategies measure them, and what is worth computing once for every seed.

    Rows are measured in a :class:`heads.space.CosineSpace` (L2-normalised, projected by a PCA fitted on at most
    20 000 rows with a fixed seed to at most `dims` dimensions, normalised again; the audit's space too), so a
    squared distance is ``2 - 2 * cosine``. k-means labels, probcover's radius and its graph are cached per
    setting.
    """

    def __init__(self, X: np.ndarray, *, dims: int = DEFAULT_DIMS, graph_rows: int = PROBCOVER_ROWS):
        if np.ndim(X) != 2 or len(X) == 0:
            raise HeadsError("label selection needs a non-empty pool of feature rows")
        self._raw, self._n, self._dims = X, len(X), dims
        self._X: np.ndarray | None = None
        # probcover's graph is all-pairs: above graph_rows it is built on a fixed uniform sample of the pool
        self.graph_rows = np.arange(len(X)) if len(X) <= graph_rows else \
            np.sort(np.random.default_rng(1).choice(len(X), graph_rows, replace=False))
        self._kmeans: dict[tuple[int, int], np.ndarray] = {}
        self._radius: dict[tuple[int, float], float] = {}
        self._graph: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def X(self) -> np.ndarray:
        """The rows as measured: computed on first use (``random`` never needs them), a block of rows at a time,
        so a pool of a million rows costs its own size once more only at the PCA's width."""
        if self._X is None:
            self._X = CosineSpace(self._raw, dims=self._dims, user="label selection").X
            self._raw = None
        return self._X

    def __len__(self) -> int:
        return self._n

    def kmeans(self, k: int, seed: int) -> np.ndarray:
        """Cluster of every row: scikit-learn's KMeans up to 50 clusters, MiniBatchKMeans above (as TypiClust)."""
        key = (int(k), int(seed))
        if key not in self._kmeans:
            from sklearn.cluster import KMeans, MiniBatchKMeans

            if k <= 50:
                model = KMeans(n_clusters=k, n_init=1, random_state=seed)
            else:
                model = MiniBatchKMeans(n_clusters=k, n_init=3, batch_size=max(1024, 4 * k), random_state=seed)
            self._kmeans[key] = model.fit_predict(self.X).astype(np.int64)
        return self._kmeans[key]

    def radius(self, n_classes: int, purity: float = PURITY) -> float:
        """probcover's delta: the largest radius at which `purity` of the balls hold rows of one k-means cluster
        only (k = `n_classes`); a ball is pure while delta stays below its centre's distance to the nearest row
        of another cluster, so delta is that distance's (1 - purity) quantile."""
        key = (int(n_classes), float(purity))
        if key not in self._radius:
            if n_classes < 2:
                raise HeadsError("probcover sets its radius from k-means into as many clusters as classes, which "
                                 "needs at least 2 classes; give a radius instead")
            labels = self.kmeans(n_classes, 0)[self.graph_rows]
            X = self.X[self.graph_rows]
            nearest_other = np.empty(len(X), dtype=np.float32)
            for start in range(0, len(X), BLOCK):
                sims = X[start:start + BLOCK] @ X.T
                sims[labels[start:start + BLOCK, None] == labels[None, :]] = -np.inf
                nearest_other[start:start + BLOCK] = sims.max(axis=1)
            distance = np.sqrt(np.maximum(2.0 - 2.0 * nearest_other, 0.0))
            self._radius[key] = float(np.quantile(distance, 1.0 - purity))
        return self._radius[key]

    def graph(self, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, indices): the neighbours closer than `radius` (itself included) of every row of
        :attr:`graph_rows`, as a CSR adjacency over positions into :attr:`graph_rows`."""
        key = float(radius)
        if key not in self._graph:
            X = self.X[self.graph_rows]
            threshold = 1.0 - radius * radius / 2.0  # distance < radius  <=>  cosine > threshold
            indptr = [np.zeros(1, dtype=np.int64)]
            parts = []
            total = 0
            for start in range(0, len(X), BLOCK):
                r, c = np.nonzero(X[start:start + BLOCK] @ X.T > threshold)
                parts.append(c.astype(np.int32))
                counts = np.bincount(r, minlength=min(BLOCK, len(X) - start))
                indptr.append(total + np.cumsum(counts))
                total += len(c)
                if total > MAX_EDGES:
                    raise HeadsError(f"probcover's radius {radius:.3g} puts more than {MAX_EDGES // len(X)} rows in "
                                     "the average ball; give a smaller --radius (the purity rule picks one)")
            self._graph[key] = (np.concatenate(indptr), np.concatenate(parts))
        return self._graph[key]


def _gather(indptr: np.ndarray, indices: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Every neighbour of `nodes` (with repeats), from a CSR adjacency."""
    starts, ends = indptr[nodes], indptr[nodes + 1]
    lengths = ends - starts
    if lengths.sum() == 0:
        return np.empty(0, dtype=indices.dtype)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return indices[np.arange(lengths.sum()) + offsets]


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), salt])


# --- the strategies: (space, budget, labeled, y_labeled, seed, options) -> Picks -------------------------------


def _candidates(space: SelectionSpace, labeled: np.ndarray) -> np.ndarray:
    mask = np.ones(len(space), dtype=bool)
    mask[labeled] = False
    return np.flatnonzero(mask)


def _random(space, budget, labeled, y_labeled, seed, options) -> Picks:
    candidates = _candidates(space, labeled)
    return Picks(_rng(seed, 0x5E1EC7).permutation(candidates)[:budget])


def _typicality(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Inverse mean distance of every row of `X` to its `k` nearest others, measured against all of `X` or a
    seeded sample of :data:`TYPICALITY_SAMPLE` rows of it."""
    n = len(X)
    ref_rows = np.arange(n) if n <= TYPICALITY_SAMPLE else np.sort(rng.choice(n, TYPICALITY_SAMPLE, replace=False))
    in_ref = np.full(n, -1)
    in_ref[ref_rows] = np.arange(len(ref_rows))
    ref = X[ref_rows]
    k = max(1, min(k, len(ref_rows) - 1))
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, BLOCK):
        sims = X[start:start + BLOCK] @ ref.T
        own = in_ref[start:start + BLOCK]
        inside = np.flatnonzero(own >= 0)
        sims[inside, own[inside]] = -np.inf  # a row is not its own neighbour
        top = np.partition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else -sims
        distances = np.sqrt(np.maximum(2.0 + 2.0 * top, 0.0))
        out[start:start + BLOCK] = 1.0 / (distances.mean(axis=1) + 1e-5)
    return out


def _typiclust(space, budget, labeled, y_labeled, seed, options) -> Picks:
    rng = _rng(seed, 0x7C1)
    n_clusters = int(min(len(labeled) + budget, MAX_CLUSTERS, len(space)))
    clusters = space.kmeans(n_clusters, seed)
    taken = np.zeros(len(space), dtype=bool)
    taken[labeled] = True
    sizes = np.bincount(clusters, minlength=n_clusters)
    free = np.bincount(clusters[~taken], minlength=n_clusters)
    labelled_in = sizes - free
    order = np.lexsort((-sizes, labelled_in))  # fewest labelled rows first, then the largest
    by_cluster = np.argsort(clusters, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    typical: dict[int, np.ndarray] = {}
    rows, cluster_of, typicality = [], [], []
    while len(rows) < budget:
        # a pass over the clusters in order; tiny ones (outliers) only once the others have nothing left
        eligible = [c for c in order if free[c] > 0 and sizes[c] >= MIN_CLUSTER] or \
            [c for c in order if free[c] > 0]
        if not eligible:
            break
        for c in eligible[:budget - len(rows)]:
            members = by_cluster[starts[c]:starts[c + 1]]
            if c not in typical:
                typical[c] = _typicality(space.X[members], min(TYPICALITY_NEIGHBOURS, len(members) // 2), rng)
            values = np.where(taken[members], -np.inf, typical[c])
            best = int(np.argmax(values))
            taken[members[best]] = True
            free[c] -= 1
            rows.append(members[best])
            cluster_of.append(c)
            typicality.append(values[best])
    cluster_of = np.asarray(cluster_of, dtype=np.int64)
    return Picks(np.asarray(rows, dtype=np.int64),
                 {"cluster": cluster_of, "cluster_size": sizes[cluster_of], "typicality": np.asarray(typicality)},
                 {"clusters": n_clusters, "clusters_picked_from": int(len(np.unique(cluster_of)))})


def _probcover(space, budget, labeled, y_labeled, seed, options) -> Picks:
    rng = _rng(seed, 0x9C0)
    radius = options.get("radius")
    if radius is None:
        n_classes = options.get("n_classes")
        if not n_classes:
            raise HeadsError("probcover sets its radius from the number of classes; give the classes or a radius")
        radius = space.radius(int(n_classes))
    sub = space.graph_rows
    indptr, indices = space.graph(float(radius))
    position = np.full(len(space), -1)
    position[sub] = np.arange(len(sub))
    covered = np.zeros(len(sub), dtype=bool)
    inside = position[labeled][position[labeled] >= 0]
    covered[_gather(indptr, indices, inside)] = True
    outside = labeled[position[labeled] < 0]  # labelled rows off the graph's sample cover what lies near them
    threshold = 1.0 - radius * radius / 2.0
    for start in range(0, len(outside), BLOCK):
        covered |= (space.X[outside[start:start + BLOCK]] @ space.X[sub].T > threshold).any(axis=0)
    count = np.diff(indptr).astype(np.float64)  # uncovered rows each ball would cover
    if covered.any():
        count -= np.bincount(_gather(indptr, indices, np.flatnonzero(covered)), minlength=len(sub))
    pickable = np.ones(len(sub), dtype=bool)
    pickable[inside] = False
    jitter = rng.random(len(sub))  # breaks ties between equal counts, by seed
    picks, gains, coverage = [], [], []
    while len(picks) < budget and pickable.any():
        best = int(np.argmax(np.where(pickable, count + jitter, -1.0)))
        if count[best] <= 0:
            break
        newly = _gather(indptr, indices, np.array([best]))
        newly = newly[~covered[newly]]
        covered[newly] = True
        count -= np.bincount(_gather(indptr, indices, newly), minlength=len(sub))
        pickable[best] = False
        picks.append(int(sub[best]))
        gains.append(len(newly))
        coverage.append(float(covered.mean()))
    if len(picks) < budget:  # every ball is covered: the rest at random, as in the paper
        rest = np.setdiff1d(_candidates(space, labeled), picks)
        extra = rng.permutation(rest)[:budget - len(picks)]
        picks += [int(r) for r in extra]
        gains += [0] * len(extra)
        coverage += [float(covered.mean())] * len(extra)
    return Picks(np.asarray(picks, dtype=np.int64),
                 {"covered": np.asarray(gains), "coverage": np.asarray(coverage),
                  "radius": np.full(len(picks), float(radius))},
                 {"radius": float(radius), "coverage": float(covered.mean()),
                  "mean_degree": float(np.diff(indptr).mean()), "graph_rows": int(len(sub))})


def _kcenter(space, budget, labeled, y_labeled, seed, options) -> Picks:
    X = space.X
    nearest = np.full(len(X), np.inf, dtype=np.float32)  # squared distance to the nearest centre
    for start in range(0, len(labeled), BLOCK):
        sims = X @ X[labeled[start:start + BLOCK]].T
        nearest = np.minimum(nearest, 2.0 - 2.0 * sims.max(axis=1))
    pickable = np.ones(len(X), dtype=bool)
    pickable[labeled] = False
    picks, distances = [], []
    for _ in range(min(budget, int(pickable.sum()))):
        if np.isinf(nearest).all():
            row = int(_rng(seed, 0xC3).choice(np.flatnonzero(pickable)))
        else:
            row = int(np.argmax(np.where(pickable, nearest, -np.inf)))
        distances.append(float(np.sqrt(max(nearest[row], 0.0))) if np.isfinite(nearest[row]) else np.nan)
        picks.append(row)
        pickable[row] = False
        nearest = np.minimum(nearest, 2.0 - 2.0 * (X @ X[row]))
    return Picks(np.asarray(picks, dtype=np.int64), {"distance": np.asarray(distances)},
                 {"max_distance_after": float(np.sqrt(max(nearest[pickable].max(), 0.0))) if pickable.any() else 0.0})


def _margin(space, budget, labeled, y_labeled, seed, options) -> Picks:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if y_labeled is None or len(labeled) == 0 or len(np.unique(y_labeled)) < 2:
        raise HeadsError("margin ranks rows with a head fitted on labelled rows, which needs labelled rows of at "
                         "least two classes; start with typiclust, probcover or random")
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(space.X[labeled], y_labeled)
    candidates = _candidates(space, labeled)
    proba = head.predict_proba(space.X[candidates])
    top2 = np.sort(proba, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    order = np.lexsort((_rng(seed, 0x3A).random(len(candidates)), margin))[:budget]
    return Picks(candidates[order], {"margin": margin[order], "predicted": head.classes_[proba[order].argmax(axis=1)]},
                 {"head": "logistic regression on the labelled rows"})


@dataclass(frozen=True)
class Strategy:
    """One named label-selection strategy.

    Attributes:
        name: registry key, e.g. ``typiclust``.
        description: one line for ``--help`` and the docs.
        pick: ``(space, budget, labeled, y_labeled, seed, options) -> Picks``.
        needs_labels: it fits a model on the labelled rows (margin), so it needs some to start from.
    """

    name: str
    description: str
    pick: Callable[..., Picks]
    needs_labels: bool = False


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry (its name must be new)."""
    if strategy.name in STRATEGIES:
        raise HeadsError(f"a selection strategy named {strategy.name!r} is already registered")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    """The registered strategy `name`; unknown names fail naming the close ones."""
    if name not in STRATEGIES:
        close = difflib.get_close_matches(name, list(STRATEGIES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise HeadsError(f"unknown selection strategy {name!r}{hint}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def resolve_strategies(text: str | list[str]) -> list[str]:
    """``"random,typiclust"`` -> the names, checked, unique, in the given order."""
    names = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not names:
        raise HeadsError("no selection strategy given; choose from " + ", ".join(STRATEGIES))
    return list(dict.fromkeys(get_strategy(n).name for n in names))


for _strategy in (
    Strategy("random", "uniform picks among the candidates: the reference", _random),
    Strategy("typiclust", "the most typical row of each of the largest clusters without labels (TypiClust)",
             _typiclust),
    Strategy("probcover", "greedy maximum coverage of balls of a purity-tuned radius (ProbCover)", _probcover),
    Strategy("kcenter", "the row farthest from every labelled or picked row (k-center greedy, core-set)", _kcenter),
    Strategy("margin", "the smallest top-two probability gap of a head fitted on the labelled rows", _margin,
             needs_labels=True),
):
    register_strategy(_strategy)


def select(X: np.ndarray | SelectionSpace, budget: int, strategy: str = "typiclust", *,
           labeled: np.ndarray | None = None, y_labeled: np.ndarray | None = None, seed: int = 0,
           n_classes: int | None = None, radius: float | None = None, dims: int = DEFAULT_DIMS) -> Picks:
    """The next `budget` rows to label, chosen by `strategy`.

    Args:
        X: the pool's features (candidates and labelled rows), or a :class:`SelectionSpace` built from them.
        budget: rows to pick, at least 1 and at most the candidates.
        strategy: a registered strategy name.
        labeled: positions of the rows already labelled (never picked; they count as covered).
        y_labeled: their labels (margin fits its head on them; no other strategy reads labels).
        seed: the strategy's randomness (k-means, ties, random picks).
        n_classes: probcover's k-means size for its radius (the number of classes the labels will have).
        radius: probcover's radius, instead of the one the purity rule sets.
        dims: the selection space's PCA width (ignored when `X` is a space).

    Returns:
        :class:`Picks`: positions into the pool in pick order, per-pick columns and a summary.
    """
    spec = get_strategy(strategy)
    space = X if isinstance(X, SelectionSpace) else SelectionSpace(X, dims=dims)
    labeled = np.asarray([] if labeled is None else labeled, dtype=np.int64)
    if len(labeled) and (labeled.min() < 0 or labeled.max() >= len(space)):
        raise HeadsError("labelled positions must lie in the pool")
    if len(np.unique(labeled)) != len(labeled):
        raise HeadsError("a labelled row is given twice")
    if y_labeled is not None and len(y_labeled) != len(labeled):
        raise HeadsError("give one label per labelled row")
    n_candidates = len(space) - len(labeled)
    if n_candidates == 0:
        raise HeadsError("there is no row left to pick: every row of the pool is labelled")
    if int(budget) != budget or budget < 1:
        raise HeadsError(f"the budget must be a positive number of rows, got {budget}")
    if budget > n_candidates:
        raise HeadsError(f"the budget ({budget}) is larger than the {n_candidates} rows that can be picked")
    picks = spec.pick(space, int(budget), labeled, None if y_labeled is None else np.asarray(y_labeled), int(seed),
                      {"n_classes": n_classes, "radius": radius})
    assert len(picks.rows) == budget and len(np.unique(picks.rows)) == budget
    return picks
