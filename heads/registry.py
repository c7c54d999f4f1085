"""The registry of named heads: each a scikit-learn Pipeline (preprocessing step + estimator) and a compact grid.

A head's pipeline has two steps, ``prep`` and ``clf``. ``prep`` is itself a hyper-parameter: its grid values
are names from :data:`PREPROCESSING` (``none``, ``l2``, ``standardize``, ``pca-whiten``), turned into
transformers when the grid is expanded, so every head is tuned over its preprocessing like any other setting.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from .blocks import BlockStandardScaler
from .errors import HeadsError
from .kernel_approx import NystroemSVC
from .torch_knn import TorchKNeighborsClassifier
from .torch_logreg import TorchLogisticRegression

__all__ = ["PREPROCESSING", "HeadSpec", "HEADS", "register_head", "get_head", "list_heads", "resolve_heads"]


def _pca_whiten() -> PCA:
    # Keep 99 % of the variance, whitened; "full" SVD so that a fraction is accepted and results are exact.
    return PCA(n_components=0.99, whiten=True, svd_solver="full")


PREPROCESSING: dict[str, Callable[[], Any]] = {
    "none": lambda: "passthrough",
    "l2": Normalizer,
    "standardize": StandardScaler,
    "pca-whiten": _pca_whiten,
}


@dataclass(frozen=True)
class HeadSpec:
    """One named head.

    Attributes:
        name: registry key, e.g. ``logreg``.
        description: one line for ``python cli.py heads``.
        estimator: builds the unfitted classifier (the ``clf`` step).
        prep: preprocessing names tried (the ``prep`` step's grid).
        grid: the classifier's grid, keys without the ``clf__`` prefix.
        class_weight: whether the estimator takes ``class_weight`` (then the run's weighting is applied).
        sample_bounded: grid keys whose values cannot exceed the number of training samples (e.g. k of kNN);
            larger values are lowered to that number on small data.
        cost_exponent: how the time of one fit on n rows plus scoring n/4 rows grows with n (``n ** exponent``):
            1 for linear models, 2 for kernel SVMs and brute-force kNN. Used to extrapolate timed probes.
        approximation: a cheaper stand-in for this head, used under ``--budget`` when the exact head would not
            fit in its share (e.g. an RBF SVM through a Nystroem kernel map); None: the head is skipped instead.
        probe_rows: the two sizes its cost is first timed at under ``--budget`` (None: 1 000 and 2 000); larger
            for estimators whose cost changes shape above some size (a kernel map of 4 000 components is exact
            below 4 000 rows).
        threaded: the estimator spreads one fit over every core itself (torch): searches then run its fits one
            at a time with all threads instead of one fit per core.
        blocks: block widths of concatenated layers: the pipeline then starts with a
            :class:`~heads.blocks.BlockStandardScaler` (set through :meth:`on_blocks`, never at registration).
        family: heads of the same family are the same model in different implementations (``logreg`` and
            ``torch-logreg``): by default compare-heads runs one of them, the faster one on this device.
        rank_param: an approximation's size parameter (e.g. ``n_components`` of a kernel map): its registered
            value is the largest it runs at, and the one probed; the budget lowers it when the share is smaller
            (:meth:`with_rank`). Its fits have a fixed part (the rank's decomposition) that the cost model keeps.
        path_param: a grid key the estimator can follow as a path with ``warm_start`` (e.g. ``C``): the grid
            search then fits each split's preprocessing once and walks the values in increasing order, each
            fit starting from the previous solution.
    """

    name: str
    description: str
    estimator: Callable[[], BaseEstimator]
    prep: tuple[str, ...]
    grid: dict[str, list] = field(default_factory=dict)
    class_weight: bool = False
    sample_bounded: tuple[str, ...] = ()
    cost_exponent: float = 1.0
    approximation: "HeadSpec | None" = None
    path_param: str | None = None
    threaded: bool = False
    probe_rows: tuple[int, int] | None = None
    blocks: tuple[int, ...] | None = None
    family: str | None = None
    rank_param: str | None = None

    def pipeline(self) -> Pipeline:
        steps = [("prep", PREPROCESSING[self.prep[0]]()), ("clf", self.estimator())]
        if self.blocks is not None:
            steps.insert(0, ("blocks", BlockStandardScaler(self.blocks)))
        return Pipeline(steps)

    def on_blocks(self, widths: tuple[int, ...] | None) -> "HeadSpec":
        """This head (and its approximation) for features made of blocks of these widths side by side: a
        :class:`BlockStandardScaler` step comes first. None: the head as registered."""
        if widths is None:
            return self
        approximation = self.approximation.on_blocks(widths) if self.approximation is not None else None
        return replace(self, blocks=tuple(widths), approximation=approximation)

    def rank(self) -> int | None:
        """The approximation's size (its `rank_param`'s value), None for exact heads."""
        return None if self.rank_param is None else int(self.estimator().get_params()[self.rank_param])

    def with_rank(self, rank: int) -> "HeadSpec":
        """This approximation at another size (e.g. more Nystroem components); the description follows."""
        if self.rank_param is None:
            raise ValueError(f"head {self.name!r} has no size to change")
        make, key = self.estimator, self.rank_param
        return replace(self, estimator=lambda: make().set_params(**{key: rank}),
                       description=self.description.replace(f"{self.rank():,}".replace(",", " "),
                                                            f"{rank:,}".replace(",", " ")))

    def param_grid(self, n_train: int | None = None) -> dict[str, list]:
        """The GridSearchCV grid: preprocessing transformers plus ``clf__``-prefixed estimator settings.

        Args:
            n_train: the smallest number of rows any setting is fitted on; bounds `sample_bounded` keys.
        """
        grid: dict[str, list] = {"prep": [PREPROCESSING[p]() for p in self.prep]}
        for key, values in self.grid.items():
            if n_train is not None and key in self.sample_bounded:
                values = sorted({min(v, n_train) for v in values})
            grid[f"clf__{key}"] = list(values)
        return grid

    def untuned(self, n_train: int) -> dict[str, Any]:
        """The setting run when there is nothing to tune on (one example per class): the first preprocessing
        and, per grid key, the estimator's own default when the grid has it, else the grid's middle value
        (bounded by `n_train` like :meth:`param_grid`)."""
        defaults = self.estimator().get_params()
        params: dict[str, Any] = {}
        for key, values in self.param_grid(n_train).items():
            name = key.removeprefix("clf__")
            params[key] = defaults[name] if key != "prep" and defaults.get(name) in values else values[len(values) // 2]
        params["prep"] = self.param_grid(n_train)["prep"][0]
        return params

    def grid_size(self) -> int:
        size = len(self.prep)
        for values in self.grid.values():
            size *= len(values)
        return size


HEADS: dict[str, HeadSpec] = {}

# libsvm's kernel cache: its default (200 MB) holds a few thousand kernel rows; at 60 000 rows a larger cache
# cuts the exact SVM's fit several-fold. Two parallel fits of this size fit any machine we run on.
SVC_CACHE_MB = 2000


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add a head to the registry; names are unique."""
    if spec.name in HEADS:
        raise ValueError(f"head {spec.name!r} is already registered")
    unknown = [p for p in spec.prep if p not in PREPROCESSING]
    if unknown:
        raise ValueError(f"head {spec.name!r}: unknown preprocessing {unknown}; allowed: {list(PREPROCESSING)}")
    HEADS[spec.name] = spec
    return spec


register_head(HeadSpec(
    "logreg", "multinomial logistic regression (lbfgs)",
    lambda: LogisticRegression(max_iter=2000),
    prep=("standardize",), grid={"C": [0.01, 0.1, 1.0]}, class_weight=True, family="logreg",
))
register_head(HeadSpec(
    "torch-logreg", "multinomial logistic regression, full-batch L-BFGS in torch (float32, CPU or CUDA)",
    lambda: TorchLogisticRegression(),
    prep=("standardize",), grid={"C": [0.01, 0.1, 1.0]}, class_weight=True, path_param="C", threaded=True,
    family="logreg",
))
register_head(HeadSpec(
    "linear-svm", "linear SVM (liblinear, one-vs-rest)",
    lambda: LinearSVC(max_iter=5000),
    prep=("l2",), grid={"C": [1.0, 10.0, 100.0]}, class_weight=True,
))
register_head(HeadSpec(
    "rbf-svm", "kernel SVM, RBF kernel, gamma='scale' (large stores: Nystroem approximation under --budget)",
    lambda: SVC(kernel="rbf", gamma="scale", cache_size=SVC_CACHE_MB, break_ties=True),
    prep=("l2", "standardize"), grid={"C": [1.0, 10.0]}, class_weight=True, cost_exponent=2.0,
    approximation=HeadSpec(
        "rbf-svm", "RBF kernel approximated by 4 000 Nystroem components, then a linear SVM (squared hinge)",
        lambda: NystroemSVC(n_components=4000),
        prep=("l2", "standardize"), grid={"C": [1.0, 10.0]}, class_weight=True, threaded=True,
        probe_rows=(4000, 8000), rank_param="n_components",
    ),
))
register_head(HeadSpec(
    "knn", "k nearest neighbours, cosine distance, distance-weighted votes",
    lambda: KNeighborsClassifier(metric="cosine", weights="distance", algorithm="brute"),
    prep=("none",), grid={"n_neighbors": [1, 5, 10, 20]}, sample_bounded=("n_neighbors",), cost_exponent=2.0,
    family="knn",
))
register_head(HeadSpec(
    "torch-knn", "k nearest neighbours, cosine, distance-weighted; batched matmul + top-k in torch (CPU or CUDA)",
    lambda: TorchKNeighborsClassifier(weights="distance"),
    prep=("none",), grid={"n_neighbors": [1, 5, 10, 20]}, sample_bounded=("n_neighbors",), cost_exponent=2.0,
    threaded=True, family="knn",
))
register_head(HeadSpec(
    "ridge", "ridge regression classifier (one-vs-rest least squares)",
    lambda: RidgeClassifier(),
    prep=("standardize", "l2"), grid={"alpha": [0.1, 1.0, 10.0, 100.0]}, class_weight=True,
))
register_head(HeadSpec(
    "centroid", "nearest class mean (prototype) classifier",
    lambda: NearestCentroid(),
    prep=("l2", "standardize", "pca-whiten"),
))
register_head(HeadSpec(
    "lda", "linear discriminant analysis with Ledoit-Wolf shrinkage",
    lambda: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),
    prep=("none",),
))


def get_head(name: str) -> HeadSpec:
    """The registered head called `name`; unknown names fail with close suggestions."""
    try:
        return HEADS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(HEADS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise HeadsError(f"unknown head {name!r}; {hint}available: {', '.join(HEADS)}") from None


def list_heads(pattern: str = "*") -> list[HeadSpec]:
    """Registered heads whose names match an fnmatch `pattern`, in registration order."""
    return [spec for name, spec in HEADS.items() if fnmatch.fnmatchcase(name, pattern)]


def resolve_heads(names: list[str] | None) -> list[HeadSpec]:
    """Heads for the given names or patterns (all heads when none are given), without repeats."""
    if not names:
        return list(HEADS.values())
    out: dict[str, HeadSpec] = {}
    for name in names:
        matched = list_heads(name) if any(c in name for c in "*?[") else [get_head(name)]
        if not matched:
            raise HeadsError(f"no head matches {name!r}; available: {', '.join(HEADS)}")
        out.update((spec.name, spec) for spec in matched)
    return list(out.values())
