"""Run one head through a protocol plan: tune by grid search on each task's fit rows, refit, predict scored rows."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from .errors import HeadsError
from .protocol import Plan, Task
from .registry import PREPROCESSING, HeadSpec
from .schedule import FACTOR, halving_schedule, stratified_subset

__all__ = ["HeadRun", "Tuned", "run_head", "fit_head", "calibration_method", "calibrate_head", "readable_params", "base_pipeline", "quiet_fits", "score_rows",
           "labels_follow_scores"]


@dataclass
class HeadRun:
    """What one head produced on the scored rows of a plan.

    Attributes:
        head: head name.
        params: chosen setting per task (one for holdout, one per outer fold for nested CV).
        y_pred: predictions for ``plan.scored`` rows, in that order.
        scores: [n, n_classes] decision scores or probabilities (None when the head gives neither).
        proba: [n, n_classes] probabilities (None when the head gives none).
        fit_seconds: mean time of refitting the chosen setting on a task's fit rows.
        tune_seconds: total time of the searches (all settings x folds, refits included).
        predict_us_per_sample: prediction time per scored row, in microseconds.
        model: the fitted pipeline of a holdout plan (None for nested CV: see :func:`fit_head`).
        proba_before: with calibration, the probabilities before it (the head's own, or a softmax of its
            decision scores); else the same as `proba`.
        calibration: the method (``none``, ``temperature``, ``sigmoid``, ``isotonic``) and, for temperature,
            the fitted temperature per task.
        tune_rows: with successive halving, the rows its last round tuned on (the largest over tasks).
    """

    head: str
    params: list[dict[str, Any]]
    y_pred: np.ndarray
    scores: np.ndarray | None
    proba: np.ndarray | None
    fit_seconds: float
    tune_seconds: float
    predict_us_per_sample: float
    model: Pipeline | None = None
    proba_before: np.ndarray | None = None
    calibration: dict[str, Any] | None = None
    tune_rows: int | None = None


def _prep_name(value: Any) -> str:
    for name, make in PREPROCESSING.items():
        made = make()
        if (isinstance(value, str) and value == made) or (not isinstance(value, str) and type(value) is type(made)):
            return name
    return repr(value)


def readable_params(params: dict[str, Any]) -> dict[str, Any]:
    """A chosen grid point with transformer objects named and the ``clf__`` prefix dropped."""
    out = {}
    for key, value in params.items():
        out[key.removeprefix("clf__")] = _prep_name(value) if key == "prep" else value
    return out


@dataclass
class Tuned:
    """A tuned head: the chosen setting and the pipeline refit with it on all of the task's fit rows."""

    best_params_: dict[str, Any]
    best_estimator_: Pipeline
    refit_time_: float
    tune_rows_: int | None = None  # rows the last round of successive halving tuned on (None: the plain search)


def base_pipeline(spec: HeadSpec, class_weight: str | None, seed: int) -> Pipeline:
    """`spec`'s pipeline with the run's seed and class weighting applied where the estimator takes them."""
    pipeline = spec.pipeline()
    clf_params = pipeline.named_steps["clf"].get_params()
    if "random_state" in clf_params:
        pipeline.set_params(clf__random_state=seed)
    if spec.class_weight:
        pipeline.set_params(clf__class_weight=class_weight)
    return pipeline


@contextlib.contextmanager
def quiet_fits():
    """Silence the expected warnings of grid fits (non-convergence, constant features within a class)."""
    with warnings.catch_warnings():
        # Non-converged settings are scored as they are; the search picks among them honestly.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # NearestCentroid warns when a feature is constant within a class (common with sparse activations).
        warnings.filterwarnings("ignore", message=".*within_class_std_dev_.*", category=UserWarning)
        # Ridge with little regularisation on correlated features: solved anyway; the CV scores judge it.
        warnings.simplefilter("ignore", LinAlgWarning)
        # NearestCentroid on one row per class: no within-class spread to estimate (predict does not need it).
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="sklearn.neighbors._nearest_centroid")
        yield


def _subset_cv(task: Task, subset: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The task's CV splits restricted to `subset` (positions in the fit rows), re-indexed into the subset."""
    where = np.full(len(task.fit), -1)
    where[subset] = np.arange(len(subset))
    return [(where[train][where[train] >= 0], where[val][where[val] >= 0]) for train, val in task.cv]


def _halving(spec: HeadSpec, X: np.ndarray, y: np.ndarray, task: Task, tune_rows: int, jobs: int,
             class_weight: str | None, seed: int, resize=None) -> Tuned:
    """Successive halving (factor ``FACTOR``) on a stratified subset of `tune_rows` fit rows, the schedule of
    ``HalvingGridSearchCV(min_resources="exhaust")`` (:func:`heads.schedule.halving_schedule`): each round scores
    its candidates over the task's CV splits restricted to that round's stratified rows and keeps the best
    third, the last round the best one (first best in grid order). With `resize` (an object with
    ``last_round_rows(task, done, seconds, rows)``, e.g. :class:`heads.budget.LastRound`), the last round's
    rows are set from the time the earlier rounds actually took. Then the refit on every fit row."""
    from sklearn.model_selection import ParameterGrid


    pipeline = base_pipeline(spec, class_weight, seed)
    X_fit, y_fit = X[task.fit], y[task.fit]
    params: dict[str, Any] = {}
    tuned_rows = 0
    if tune_rows > 0 and spec.grid_size() > 1:
        subset = stratified_subset(y_fit, tune_rows, seed)
        n_classes = len(np.unique(y_fit))
        schedule = halving_schedule(spec.grid_size(), len(subset), len(task.cv), n_classes)
        train_fraction = min(len(train) for train, _ in task.cv) / len(task.fit)
        candidates = list(ParameterGrid(spec.param_grid(max(1, int(schedule[0][1] * train_fraction)))))
        started = time.perf_counter()
        for i, (_, rows) in enumerate(schedule):
            last = i == len(schedule) - 1
            if last and i > 0 and resize is not None:
                rows = resize.last_round_rows(task, schedule[:i], time.perf_counter() - started, rows)
            if rows == len(subset):
                positions = subset
            elif rows < len(subset):
                positions = subset[stratified_subset(y_fit[subset], rows, seed + i)]
            else:  # the last round grown past the planned subset: a larger stratified draw of the fit rows
                positions = stratified_subset(y_fit, rows, seed)
            search = GridSearchCV(pipeline, [{k: [v] for k, v in c.items()} for c in candidates], cv=_subset_cv(
                task, positions), scoring="accuracy", refit=False, n_jobs=jobs, error_score="raise")
            search.fit(X_fit[positions], y_fit[positions])
            scores = search.cv_results_["mean_test_score"]
            keep = 1 if last else math.ceil(len(candidates) / FACTOR)
            order = sorted(range(len(candidates)), key=lambda j: (-scores[j], j))  # ties: grid order
            candidates = [candidates[j] for j in sorted(order[:keep])]
            tuned_rows = len(positions)
        params = candidates[0]
    elif spec.grid_size() == 1:
        params = {key: values[0] for key, values in spec.param_grid(len(task.fit)).items()}
    model = clone(pipeline).set_params(**params)
    started = time.perf_counter()
    model.fit(X_fit, y_fit)
    return Tuned(params, model, time.perf_counter() - started, tuned_rows)


def _path_scores(pipeline: Pipeline, path_key: str, values: list, others: list[dict], X: np.ndarray,
                 y: np.ndarray, train: np.ndarray, val: np.ndarray) -> dict[tuple[int, Any], float]:
    """Validation accuracy of every (other setting, path value) on one split, walking the path warm-started."""
    scores = {}
    for i, params in enumerate(others):
        model = clone(pipeline).set_params(**params)
        steps = model[:-1]  # every step before the classifier, fitted once per split and setting
        X_train = steps.fit_transform(X[train], y[train])
        X_val = steps.transform(X[val])
        clf = model.named_steps["clf"].set_params(warm_start=True)
        for value in values:
            clf.set_params(**{path_key: value}).fit(X_train, y[train])
            scores[(i, value)] = float((clf.predict(X_val) == y[val]).mean())
    return scores


def _path_search(spec: HeadSpec, X: np.ndarray, y: np.ndarray, task: Task, jobs: int, class_weight: str | None,
                 seed: int) -> Tuned:
    """Grid search for a head with a warm-startable path parameter: per split, each preprocessing is fitted
    once and the path values are fitted in increasing order from the previous solution. Scores and the choice
    (mean validation accuracy, first best in grid order) are those of ``GridSearchCV``."""
    from joblib import Parallel, delayed
    from sklearn.model_selection import ParameterGrid

    pipeline = base_pipeline(spec, class_weight, seed)
    grid = spec.param_grid(min(len(train) for train, _ in task.cv))
    path_key = f"clf__{spec.path_param}"
    values = sorted(grid.pop(path_key))
    others = list(ParameterGrid(grid))
    X_fit, y_fit = X[task.fit], y[task.fit]
    per_split = Parallel(n_jobs=min(jobs, len(task.cv)))(
        delayed(_path_scores)(pipeline, spec.path_param, values, others, X_fit, y_fit, train, val)
        for train, val in task.cv
    )
    # GridSearchCV's candidate order (path value, then the other settings); ties go to the first.
    order = [(i, value) for value in values for i in range(len(others))]
    mean = {key: float(np.mean([scores[key] for scores in per_split])) for key in order}
    best_other, best_value = max(order, key=lambda key: mean[key])
    params = {**others[best_other], path_key: best_value}
    model = clone(pipeline).set_params(**params)
    started = time.perf_counter()
    model.fit(X_fit, y_fit)
    return Tuned(params, model, time.perf_counter() - started)


def calibration_method(spec: HeadSpec, calibrate: str | None) -> str:
    """The calibration `spec` gets: `calibrate` for a head with ``predict_proba``; for one without, its
    temperature-scaled decision scores unless another method is asked for (probabilities, and so NLL, Brier
    and ECE, need one). None: ``none`` for heads with probabilities, ``temperature`` for the rest."""
    from .calibration import METHODS

    if calibrate is not None and calibrate not in METHODS:
        raise HeadsError(f"--calibrate must be one of {', '.join(METHODS)}; got {calibrate!r}")
    if hasattr(spec.pipeline(), "predict_proba"):
        return calibrate or "none"
    return calibrate if calibrate not in (None, "none") else "temperature"


CALIBRATION_ROWS = 5000  # out-of-fold logits of at most this many fit rows (stratified) fit the calibrator


def shares_global_rng(pipeline: Pipeline) -> bool:
    """Whether the pipeline's classifier is fitted by libsvm or liblinear (scikit-learn's SVMs, and logistic
    regression's liblinear solver), which draw from ONE process-wide random generator: two such fits at once in
    threads interleave their draws, and identical runs then differ in the 7th digit. Fit those one at a time
    (processes, as GridSearchCV's, each have their own)."""
    clf = pipeline.steps[-1][1]
    clf = getattr(clf, "estimator", clf)
    return type(clf).__module__.startswith("sklearn.svm") or getattr(clf, "solver", None) == "liblinear"


def _oof_logits(pipeline: Pipeline, X: np.ndarray, y: np.ndarray, classes: np.ndarray, cv,
                jobs: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits over `classes`, rows): out-of-fold logits of `pipeline` over the validation rows of `cv`
    (positions in X); a class missing from a fold's training rows gets -1e9."""
    from joblib import Parallel, delayed

    from .calibration import head_logits

    def fold(train, val):
        with quiet_fits():
            model = clone(pipeline).fit(X[train], y[train])
            logits = head_logits(model, X[val])
        full = np.full((len(val), len(classes)), -1e9)
        full[:, np.searchsorted(classes, model.classes_)] = logits
        return full

    threads = 1 if shares_global_rng(pipeline) else min(jobs, len(cv))
    parts = Parallel(n_jobs=threads, prefer="threads")(delayed(fold)(train, val) for train, val in cv)
    return np.concatenate(parts), np.concatenate([val for _, val in cv])


def calibrate_head(spec: HeadSpec, tuned: Tuned, X: np.ndarray, y: np.ndarray, task: Task, method: str, *,
                   jobs: int = 1, seed: int = 0) -> Tuned:
    """`tuned` with its refit model wrapped in a :class:`~heads.calibration.CalibratedHead` whose calibrator is
    fitted on out-of-fold logits of the chosen setting: over the task's CV splits restricted to at most
    :data:`CALIBRATION_ROWS` stratified fit rows (the validation split alone when the plan has one). The scored
    rows never take part. Unchanged when `method` is ``none`` or the task has no CV (one example per class)."""
    from .calibration import CalibratedHead, Calibrator

    if method == "none" or not task.cv:
        return tuned
    X_fit, y_fit = X[task.fit], y[task.fit]
    subset = stratified_subset(y_fit, CALIBRATION_ROWS, seed)
    cv = [(subset[train], subset[val]) for train, val in _subset_cv(task, subset) if len(val)]
    classes = np.unique(y_fit)
    logits, rows = _oof_logits(clone(tuned.best_estimator_), X_fit, y_fit, classes, cv, 1 if spec.threaded else jobs)
    calibrator = Calibrator(method).fit(logits, np.searchsorted(classes, y_fit[rows]))
    model = CalibratedHead(tuned.best_estimator_, calibrator)
    return Tuned(tuned.best_params_, model, tuned.refit_time_, tuned.tune_rows_)


def fit_head(
    spec: HeadSpec, X: np.ndarray, y: np.ndarray, task: Task, *, jobs: int = 1, class_weight: str | None = None,
    seed: int = 0, tune_rows: int | None = None, calibrate: str = "none", resize=None,
) -> Tuned:
    """Tune `spec` on the task's fit rows and refit the best setting on all of them.

    Args:
        tune_rows: None: grid search over the task's CV splits on every fit row (the plain protocol). A number:
            successive halving on a stratified subset of that many fit rows (0: nothing tuned, the grid's
            only setting fitted), then the refit on every fit row.
        resize: with `tune_rows`, what sizes the last halving round from the time the earlier ones took
            (:class:`heads.budget.LastRound`); None keeps the planned rows.
        calibrate: the calibration method (:func:`calibrate_head`; resolve a user's choice with
            :func:`calibration_method`); ``none`` leaves the head as fitted.
    """
    with quiet_fits():
        if tune_rows is not None:
            tuned = _halving(spec, X, y, task, tune_rows, jobs, class_weight, seed, resize)
        elif spec.path_param is not None and spec.grid_size() > 1:
            tuned = _path_search(spec, X, y, task, jobs, class_weight, seed)
        else:
            n_train = min(len(train) for train, _ in task.cv)
            search = GridSearchCV(base_pipeline(spec, class_weight, seed), spec.param_grid(n_train), cv=task.cv,
                                  scoring="accuracy", n_jobs=jobs, refit=True, error_score="raise")
            search.fit(X[task.fit], y[task.fit])
            tuned = Tuned(search.best_params_, search.best_estimator_, search.refit_time_)
    return calibrate_head(spec, tuned, X, y, task, calibrate, jobs=jobs, seed=seed)


def _full_columns(values: np.ndarray, present: np.ndarray, n_classes: int, fill: float) -> np.ndarray:
    """Scores over the estimator's classes_ spread to all class columns (absent classes get `fill`)."""
    full = np.full((len(values), n_classes), fill, dtype=np.float64)
    full[:, present] = values
    return full


PARALLEL_SCORING_ROWS = 2000  # from this many scored rows on, scoring is split over `jobs` threads


def labels_follow_scores(estimator) -> bool:
    """Whether `estimator`'s predict is exactly ``classes_[argmax(scores)]`` of its own predict_proba (kNN) or
    decision_function (an SVC with ``break_ties``, more than two classes), so one pass gives both: for these two
    every scored row costs a kernel row or a neighbour search, and a second pass would double the scoring."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    clf = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    if isinstance(clf, KNeighborsClassifier):
        return True
    return isinstance(clf, SVC) and clf.break_ties and clf.decision_function_shape == "ovr" and \
        len(getattr(clf, "classes_", (0, 1, 2))) > 2


def _score_chunk(model, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    from .calibration import CalibratedHead, head_logits

    if isinstance(model, CalibratedHead):  # one pass: the head's logits give both probabilities and labels
        logits = head_logits(model.head, X)
        proba = model.calibrator.transform(logits)
        if model.calibrator.method != "temperature":
            labels = model.classes_[np.argmax(proba, axis=1)]
        elif labels_follow_scores(model.head):  # a temperature keeps the argmax of the head's own scores
            labels = model.classes_[np.argmax(logits, axis=1)]
        else:
            labels = model.head.predict(X)
        return labels, proba, logits
    proba = model.predict_proba(X) if hasattr(model, "predict_proba") else None
    decision = model.decision_function(X) if proba is None and hasattr(model, "decision_function") else None
    if labels_follow_scores(model):
        labels = model.classes_[np.argmax(proba if proba is not None else decision, axis=1)]
    else:
        labels = model.predict(X)
    return labels, proba, decision


def score_rows(model, X: np.ndarray, *, jobs: int = 1) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(labels, probabilities or None, decision scores or None) of a fitted pipeline on `X` (of a
    :class:`~heads.calibration.CalibratedHead`: calibrated probabilities and the head's uncalibrated logits).

    With `jobs` > 1 and many rows, the rows are split into `jobs` chunks scored in threads: libsvm, BLAS and the
    distance computations release the GIL, so an exact kernel SVM (single-threaded in libsvm) predicts `jobs`
    times faster; each chunk's result is exactly what one call would give.
    """
    if jobs <= 1 or len(X) < PARALLEL_SCORING_ROWS:
        return _score_chunk(model, X)
    from concurrent.futures import ThreadPoolExecutor

    chunks = np.array_split(np.arange(len(X)), jobs)
    with ThreadPoolExecutor(jobs) as pool:
        parts = list(pool.map(lambda rows: _score_chunk(model, X[rows]), chunks))
    labels = np.concatenate([p[0] for p in parts])
    proba = np.concatenate([p[1] for p in parts]) if parts[0][1] is not None else None
    decision = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
    return labels, proba, decision


def run_head(
    spec: HeadSpec,
    X: np.ndarray,
    y: np.ndarray,
    plan: Plan,
    n_classes: int,
    *,
    jobs: int = 1,
    class_weight: str | None = None,
    seed: int = 0,
    tune_rows: int | None = None,
    calibrate: str | None = None,
    resize=None,
) -> HeadRun:
    """Tune, refit and predict `spec` on every task of `plan` (the scored rows never take part in tuning).

    `tune_rows` and `resize` as in :func:`fit_head` (None: the plain grid search); `calibrate` as in
    :func:`calibration_method` (None: heads without probabilities get a temperature).
    """
    from scipy.special import softmax

    from .calibration import CalibratedHead

    params, preds, scores, probas, befores, fit_times, temperatures, halved = [], [], [], [], [], [], [], []
    tune_seconds = predict_seconds = 0.0
    search = None
    method = calibration_method(spec, calibrate)
    for task in plan.tasks:
        started = time.perf_counter()
        search = fit_head(spec, X, y, task, jobs=jobs, class_weight=class_weight, seed=seed, tune_rows=tune_rows,
                          calibrate=method, resize=resize)
        tune_seconds += time.perf_counter() - started
        calibrated = isinstance(search.best_estimator_, CalibratedHead)
        if calibrated and method == "temperature":
            temperatures.append(search.best_estimator_.calibrator.temperature_)
        fit_times.append(search.refit_time_)
        if search.tune_rows_ is not None:
            halved.append(search.tune_rows_)
        params.append(readable_params(search.best_params_))
        model = search.best_estimator_
        X_score = X[task.score]
        started = time.perf_counter()
        labels, proba, decision = score_rows(model, X_score, jobs=1 if spec.threaded else jobs)
        preds.append(labels)
        predict_seconds += time.perf_counter() - started
        present = model.classes_
        if proba is not None:
            proba = _full_columns(proba, present, n_classes, 0.0)
            probas.append(proba / proba.sum(axis=1, keepdims=True))  # float32 rounding: rows sum to 1 again
            scores.append(probas[-1])
            before = _full_columns(softmax(decision, axis=1), present, n_classes, 0.0) if calibrated else probas[-1]
            befores.append(before)
        elif decision is not None and decision.ndim == 2:
            scores.append(_full_columns(decision, present, n_classes, -np.inf))
    n_scored = sum(len(t.score) for t in plan.tasks)
    return HeadRun(
        head=spec.name,
        params=params,
        y_pred=np.concatenate(preds).astype(np.int64),
        scores=np.concatenate(scores) if len(scores) == len(plan.tasks) else None,
        proba=np.concatenate(probas) if len(probas) == len(plan.tasks) else None,
        fit_seconds=float(np.mean(fit_times)),
        tune_seconds=tune_seconds,
        predict_us_per_sample=predict_seconds / max(n_scored, 1) * 1e6,
        model=search.best_estimator_ if plan.kind == "holdout" and search is not None else None,
        proba_before=np.concatenate(befores) if len(befores) == len(plan.tasks) else None,
        calibration={"method": method if temperatures or method != "temperature" else "none",
                     "temperature": temperatures or None},
        tune_rows=max(halved) if halved else None,
    )
