"""Learning curves: every representation x head trained on k labelled rows per class, for several k and seeds.

The draws (:mod:`heads.fewshot`) are made once from the labels and shared by every head and representation, so
each point of the curve is paired across heads. Rows come back in the shape of results.json's
``learning_curve`` list: one per (representation, head, k), with the mean over seeds, its 95 % CI, the
per-seed accuracies, whether the setting was untuned (k = 1), the best head at that k and every other head's
paired p-value against it; a head that cannot be fitted on k rows per class (LDA on one) gets a row with
``accuracy`` None and the ``error``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sklearn.base import clone

from heads.evaluate import base_pipeline, fit_head, quiet_fits, readable_params
from heads.fewshot import ShotResult, curve_point, draw_shots, paired_p_value, shot_task
from heads.protocol import Plan
from pipelines.runcache import RunCache, unit_key

__all__ = ["learning_curve", "scored_rows_note"]


def scored_rows_note(plan: Plan) -> str:
    """Which rows a few-shot point is scored on, for the report."""
    if plan.kind == "holdout":
        return f"the {len(plan.final.score)} test rows"
    return "every usable row outside the draw (no test split)"


def _fit_draw(spec, X: np.ndarray, y: np.ndarray, task, *, jobs: int, class_weight, seed: int):
    """(fitted pipeline, chosen setting, untuned) for one draw: tuned by CV on the drawn rows, or -- with one
    row per class, no CV -- the head's untuned setting."""
    if not task.cv:
        params = spec.untuned(len(task.fit))
        model = clone(base_pipeline(spec, class_weight, seed)).set_params(**params)
        with quiet_fits():
            model.fit(X[task.fit], y[task.fit])
        return model, params, True
    tuned = fit_head(spec, X, y, task, jobs=jobs, class_weight=class_weight, seed=seed)
    return tuned.best_estimator_, tuned.best_params_, False


def learning_curve(units, features: dict[str, np.ndarray], y: np.ndarray, plan: Plan, shots: list[int],
                   seeds: list[int], *, folds: int, jobs: int, class_weight: str | None, n_boot: int, seed: int,
                   bar=None, cache: RunCache | None = None) -> list[dict[str, Any]]:
    """Run every (candidate, spec) in `units` on every (k, seed) draw and summarise per (candidate, head, k).

    Args:
        units: (candidate, head spec) pairs, as compare-heads runs them.
        features: candidate name -> its feature matrix over the usable rows.
        y: labels of the usable rows.
        plan: the comparison's protocol: draws come from its final fit rows (all rows without a test split);
            scored are its test rows (the rows outside the draw without a test split).
        shots: labelled rows per class, ascending.
        seeds: one draw per seed.
        cache: where each head's result on each draw is committed, and taken from on a rerun
            (:mod:`pipelines.runcache`).
    """
    pool = plan.final.fit if plan.kind == "holdout" else np.arange(len(y))
    draws = draw_shots(y[pool], shots, seeds)
    results: dict[tuple[str, str, int], list[ShotResult]] = {}
    unfit: dict[tuple[str, str, int], str] = {}  # heads that cannot be fitted on k rows per class, and why
    for (k, draw_seed), drawn in draws.items():
        score = plan.final.score if plan.kind == "holdout" else np.setdiff1d(np.arange(len(y)), pool[drawn])
        task = shot_task(pool, drawn, score, y, folds=folds, seed=draw_seed)
        for cand, spec in units:
            if bar is not None:
                bar.set_postfix_str(f"{k} shots, seed {draw_seed}: {cand.name} / {spec.name}")
            X = features[cand.name]
            if (cand.name, spec.name, k) in unfit:
                continue
            key = unit_key(store_hash=str(cand.store.attrs.get("config_hash")), candidate=cand.name,
                           task=cand.store.task_name, y=y, spec=spec, run_spec=spec, plan=plan,
                           class_weight=class_weight, calibrate=None, mode="shots", tune_rows=None,
                           approximated=False, extra={"shots": k, "seed": draw_seed, "folds": folds}) \
                if cache is not None and cache.enabled else ""
            done = cache.load_draw(key) if key else None
            if done is None:
                started = time.perf_counter()
                try:
                    model, params, untuned = _fit_draw(spec, X, y, task, jobs=jobs, class_weight=class_weight,
                                                       seed=draw_seed)
                    with quiet_fits():  # labels only: a 1-shot NearestCentroid has no spread for probabilities
                        labels = model.predict(X[task.score])
                    done = {"params": readable_params(params), "untuned": untuned, "correct": labels == y[task.score],
                            "error": None}
                except ValueError as e:  # e.g. LDA on one row per class: more samples than classes needed
                    done = {"params": None, "untuned": False, "correct": None, "error": str(e).splitlines()[0]}
                if key:
                    cache.save_draw(key, **done, seconds=time.perf_counter() - started)
            if done["error"] is not None:
                unfit[(cand.name, spec.name, k)] = done["error"]
                results.pop((cand.name, spec.name, k), None)
                continue
            results.setdefault((cand.name, spec.name, k), []).append(
                ShotResult(draw_seed, done["params"], np.asarray(done["correct"], dtype=bool), done["untuned"]))
    rows = []
    backbone = {cand.name: cand.backbone for cand, _ in units}
    for k in shots:
        at_k = {key: value for key, value in results.items() if key[2] == k}
        if not at_k:
            continue
        points = {key: curve_point(value, n_boot=n_boot, seed=seed) for key, value in at_k.items()}
        best = max(points, key=lambda key: points[key].accuracy)
        for key, point in points.items():
            rows.append({
                "representation": key[0], "backbone": backbone[key[0]], "head": key[1], "shots": k,
                "seeds": point.seeds, "accuracy": point.accuracy, "accuracy_ci": list(point.accuracy_ci),
                "accuracy_per_seed": point.per_seed, "untuned": point.untuned, "params_per_seed": point.params,
                "n_scored": int(len(at_k[key][0].correct)), "best": key == best,
                "p_value_vs_best": 1.0 if key == best else paired_p_value(at_k[best], at_k[key]),
            })
    for (name, head, k), why in unfit.items():
        rows.append({"representation": name, "backbone": backbone[name], "head": head, "shots": k, "seeds": seeds,
                     "accuracy": None, "accuracy_ci": None, "accuracy_per_seed": None, "untuned": k == 1,
                     "params_per_seed": None, "n_scored": 0, "best": False, "p_value_vs_best": None,
                     "error": f"cannot be fitted on {k} row(s) per class: {why}"})
    return rows
