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
from heads.selection import SELECTION_VERSION, SelectionSpace, get_strategy, select
from pipelines.runcache import RunCache, digest, unit_key

__all__ = ["learning_curve", "draw_selection", "selection_curve", "selection_verdicts", "scored_rows_note"]


def scored_rows_note(plan: Plan, selection: list[str] | None = None) -> str:
    """Which rows a few-shot point is scored on, for the report."""
    if plan.kind == "holdout":
        return f"the {len(plan.final.score)} test rows"
    if selection:
        return "the usable rows no strategy picked at the largest budget of the seed (no test split)"
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


def _scored_draw(cache: RunCache | None, key: str, spec, X: np.ndarray, y: np.ndarray, task, *, jobs: int,
                 class_weight, seed: int) -> dict[str, Any]:
    """One head on one draw -- taken from the cache when it holds it, else fitted and committed: the setting it
    ran, whether untuned, which scored rows it got right, or why it cannot be fitted. A draw of one class (a
    selection that found no second) predicts that class everywhere: what labelling only it gives."""
    done = cache.load_draw(key) if key else None
    if done is not None:
        return done
    started = time.perf_counter()
    present = np.unique(y[task.fit])
    if len(present) == 1:
        done = {"params": {}, "untuned": True, "correct": y[task.score] == present[0], "error": None}
    else:
        try:
            model, params, untuned = _fit_draw(spec, X, y, task, jobs=jobs, class_weight=class_weight, seed=seed)
            with quiet_fits():  # labels only: a 1-shot NearestCentroid has no spread for probabilities
                labels = model.predict(X[task.score])
            done = {"params": readable_params(params), "untuned": untuned, "correct": labels == y[task.score],
                    "error": None}
        except ValueError as e:  # e.g. LDA on one row per class: more samples than classes needed
            done = {"params": None, "untuned": False, "correct": None, "error": str(e).splitlines()[0]}
    if key:
        cache.save_draw(key, **done, seconds=time.perf_counter() - started)
    return done


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
            done = _scored_draw(cache, key, spec, X, y, task, jobs=jobs, class_weight=class_weight, seed=draw_seed)
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


def draw_selection(space: SelectionSpace, y_pool: np.ndarray, budgets: list[int], strategy: str, seed: int,
                    n_classes: int) -> tuple[list[np.ndarray], bool, float]:
    """One strategy's picks at every budget, in rounds: each budget extends the previous picks (as a labelling
    campaign does), the labels of what was picked revealed before the next round. A strategy that needs labels
    (margin) starts cold: its first round is random. Returns (picks per budget, started cold, seconds)."""
    started = time.perf_counter()
    spec = get_strategy(strategy)
    picked = np.empty(0, dtype=np.int64)
    out, cold = [], False
    for budget in budgets:
        more = budget - len(picked)
        if more > 0:
            ready = not spec.needs_labels or len(np.unique(y_pool[picked])) >= 2
            cold |= not ready
            chosen = select(space, more, strategy if ready else "random", labeled=picked, seed=seed,
                            y_labeled=y_pool[picked] if spec.needs_labels and ready else None, n_classes=n_classes)
            picked = np.concatenate([picked, chosen.rows])
        out.append(np.sort(picked))
    return out, cold, time.perf_counter() - started


def selection_curve(units, features: dict[str, np.ndarray], y: np.ndarray, plan: Plan, shots: list[int],
                    seeds: list[int], strategies: list[str], *, n_classes: int, folds: int, jobs: int,
                    class_weight: str | None, n_boot: int, seed: int, bar=None,
                    cache: RunCache | None = None) -> list[dict[str, Any]]:
    """Learning curves with the training rows chosen by label-selection strategies (:mod:`heads.selection`)
    instead of drawn k per class: at k labels per class, each strategy picks k x classes rows of the pool
    without seeing a label (the budget as a total, as a labelling campaign spends it), per seed and per
    representation (distances are measured in the representation being evaluated).

    The pool is the protocol's final fit rows (every usable row without a test split). Scored are the test rows
    or, without a test split, the rows no strategy picked at the largest budget of that seed -- the same rows
    for every strategy, so their accuracies are paired. Each row of the result is one (representation, head,
    strategy, k): the curve point, the classes the picks covered per seed, and -- when ``random`` is among the
    strategies -- the gain over it with a 95 % CI (bootstrap over seeds and scored rows) and McNemar's p-value.
    """
    pool = plan.final.fit if plan.kind == "holdout" else np.arange(len(y))
    budgets = [k * n_classes for k in shots]
    fits = [(k, b) for k, b in zip(shots, budgets) if b <= len(pool)]
    names = list(dict.fromkeys(cand.name for cand, _ in units))
    results: dict[tuple[str, str, str, int], list[ShotResult]] = {}
    covered: dict[tuple[str, str, int], list[int]] = {}
    cold: dict[tuple[str, str], bool] = {}
    unfit: dict[tuple[str, str, str, int], str] = {}
    seconds: dict[str, float] = dict.fromkeys(strategies, 0.0)
    for name in names:
        space = SelectionSpace(features[name][pool])
        for draw_seed in seeds:
            picks = {}
            for strategy in strategies:
                if bar is not None:
                    bar.set_postfix_str(f"selecting: {name}, {strategy}, seed {draw_seed}")
                picks[strategy], was_cold, took = draw_selection(space, y[pool], [b for _, b in fits], strategy,
                                                                  draw_seed, n_classes)
                cold[(name, strategy)] = cold.get((name, strategy), False) or was_cold
                seconds[strategy] += took
            if plan.kind == "holdout":
                score = plan.final.score
            else:
                score = np.setdiff1d(np.arange(len(y)), pool[np.concatenate([p[-1] for p in picks.values()])])
            for strategy in strategies:
                for (k, _), drawn in zip(fits, picks[strategy]):
                    covered.setdefault((name, strategy, k), []).append(int(len(np.unique(y[pool[drawn]]))))
                    task = shot_task(pool, drawn, score, y, folds=folds, seed=draw_seed)
                    for cand, spec in (u for u in units if u[0].name == name):
                        if (name, spec.name, strategy, k) in unfit:
                            continue
                        if bar is not None:
                            bar.set_postfix_str(f"{strategy}, {k} per class, seed {draw_seed}: {name} / {spec.name}")
                        key = unit_key(store_hash=str(cand.store.attrs.get("config_hash")), candidate=name,
                                       task=cand.store.task_name, y=y, spec=spec, run_spec=spec, plan=plan,
                                       class_weight=class_weight, calibrate=None, mode="selection", tune_rows=None,
                                       approximated=False,
                                       extra={"shots": k, "seed": draw_seed, "folds": folds, "selection": strategy,
                                              "strategies": SELECTION_VERSION, "drawn": digest(drawn)}) \
                            if cache is not None and cache.enabled else ""
                        done = _scored_draw(cache, key, spec, features[name], y, task, jobs=jobs,
                                            class_weight=class_weight, seed=draw_seed)
                        if done["error"] is not None:
                            unfit[(name, spec.name, strategy, k)] = done["error"]
                            results.pop((name, spec.name, strategy, k), None)
                            continue
                        results.setdefault((name, spec.name, strategy, k), []).append(
                            ShotResult(draw_seed, done["params"], np.asarray(done["correct"], dtype=bool),
                                       done["untuned"]))
    backbone = {cand.name: cand.backbone for cand, _ in units}
    rows = []
    for key, value in results.items():
        name, head, strategy, k = key
        point = curve_point(value, n_boot=n_boot, seed=seed)
        row = {"representation": name, "backbone": backbone[name], "head": head, "selection": strategy, "shots": k,
               "budget": k * n_classes, "seeds": point.seeds, "accuracy": point.accuracy,
               "accuracy_ci": list(point.accuracy_ci), "accuracy_per_seed": point.per_seed, "untuned": point.untuned,
               "params_per_seed": point.params, "n_scored": int(len(value[0].correct)),
               "classes_covered": covered[(name, strategy, k)], "cold_start": cold[(name, strategy)],
               "selection_seconds": seconds[strategy] / max(len(names) * len(seeds), 1)}
        reference = results.get((name, head, "random", k))
        if reference is not None and strategy != "random":
            by_seed = {r.seed: r for r in reference}
            diffs = [ShotResult(r.seed, {}, r.correct.astype(np.float64) - by_seed[r.seed].correct) for r in value
                     if r.seed in by_seed]
            gain = curve_point(diffs, n_boot=n_boot, seed=seed)
            row.update({"gain_vs_random": gain.accuracy, "gain_ci": list(gain.accuracy_ci),
                        "p_value_vs_random": paired_p_value(value, reference)})
        rows.append(row)
    for (name, head, strategy, k), why in unfit.items():
        rows.append({"representation": name, "backbone": backbone[name], "head": head, "selection": strategy,
                     "shots": k, "budget": k * n_classes, "seeds": seeds, "accuracy": None, "accuracy_ci": None,
                     "accuracy_per_seed": None, "untuned": False, "params_per_seed": None, "n_scored": 0,
                     "classes_covered": covered.get((name, strategy, k)), "cold_start": cold.get((name, strategy)),
                     "error": f"cannot be fitted on the {k * n_classes} rows {strategy} picked: {why}"})
    for k, b in zip(shots, budgets):
        if b > len(pool):
            rows.append({"representation": None, "head": None, "selection": None, "shots": k, "budget": b,
                         "accuracy": None, "error": f"{k} per class is {b} rows, more than the {len(pool)} in the pool"})
    return rows


def selection_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """For each (representation, head, strategy) with a gain over random: at which budgets it pays (the gain's
    95 % CI above zero) and from which one on it stops, in one sentence each."""
    out = []
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("gain_vs_random") is not None:
            groups.setdefault((r["representation"], r["head"], r["selection"]), []).append(r)
    several = len({(rep, head) for rep, head, _ in groups}) > 1
    for (rep, head, strategy), points in groups.items():
        points = sorted(points, key=lambda r: r["shots"])
        where = f" ({rep} + {head})" if several else ""

        def gain(r):
            return f"{r['gain_vs_random'] * 100:+.1f} [{r['gain_ci'][0] * 100:+.1f}, {r['gain_ci'][1] * 100:+.1f}]"

        pays = [r for r in points if r["gain_ci"][0] > 0]
        hurts = [r for r in points if r["gain_ci"][1] < 0]
        if not pays:
            best = max(points, key=lambda r: r["gain_vs_random"])
            text = (f"{strategy}{where} never beats random with confidence here (its best: {gain(best)} points at "
                    f"{best['shots']} per class)")
        else:
            first_not = next((r for r in points if r["shots"] > pays[0]["shots"] and r["gain_ci"][0] <= 0), None)
            text = (f"{strategy}{where} beats random at " + ", ".join(f"{r['shots']} ({gain(r)})" for r in pays)
                    + " labels per class")
            text += (f"; it stops paying at {first_not['shots']} per class ({gain(first_not)})" if first_not else
                     "; it still pays at the largest budget")
        if hurts:
            text += "; it is worse than random at " + ", ".join(f"{r['shots']} ({gain(r)})" for r in hurts)
        out.append(text + ".")
    return out
