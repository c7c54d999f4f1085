"""compare-heads: representations (stores, their layers) x heads, one protocol for all, metrics with CIs and paired
tests; under a budget on large stores, a race that spends the time on the heads that can win; with three or more
representations, how far transferability scores agree with the measured ranking."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from featurize.store import FeatureStore
from heads import HeadsError, Plan, bootstrap_ci, fit_head, mcnemar_p_value, paired_difference_ci, plan_protocol
from heads import resolve_heads, run_head
from heads.budget import DEFAULT_BUDGET_MINUTES, PROBE_ROWS, Allocator, HeadBudget, LastRound, full_plan, head_jobs
from heads.fewshot import ALL
from heads.selection import resolve_strategies
from heads.race import RACE_FRACTION, RUNG_FACTOR, Contender, confirm, cut, drop_duplicates, probe_head, race_split
from heads.persist import save_head
from heads.transferability import SCORES, rank_agreement, stratified_subsample
from pipelines.candidates import (CONCAT, LAST, Candidate, align_stores, concat_candidate, distinct_stores,
                                  layer_candidates, name_candidates, parse_candidates, usable_rows)
from pipelines.provenance import library_versions
from pipelines.curves import learning_curve, scored_rows_note, selection_curve
from pipelines.rank import DEFAULT_MAX_ROWS, DEFAULT_RANK_BY, check_score, score_candidates
from pipelines.runcache import RunCache, unit_key
from pipelines.scoring import format_ci, score_fields

__all__ = ["Comparison", "compare_heads", "align_stores", "best_accuracy", "save_best_head", "task_names", "SIGNIFICANCE", "DEFAULT_BUDGET_MINUTES",
           "MIN_CANDIDATES_FOR_TRUST"]

SIGNIFICANCE = 0.05
# With fewer candidates a rank correlation says nothing.
MIN_CANDIDATES_FOR_TRUST = 3
TWIN_WARNING = 0.01  # without --exclude-duplicates, warn when more than this share of scored rows has a feature twin
TWIN_CHECK_LIMIT = 5e9  # the quick twin check runs when scored rows x rows is at most this (an exact search)


LEADERBOARD_FIELDS = ("rank", "task", "representation", "head", "accuracy", "accuracy_ci", "balanced_accuracy",
                      "macro_f1", "ece", "fit_seconds", "p_value_vs_best", "tied_with_best", "params")


@dataclass(repr=False)
class Comparison:
    """The result of compare-heads.

    Attributes:
        rows: one dict per representation x head, best first (the fields of results.json).
        plan: the protocol every row used.
        stores: the distinct stores, in the order given.
        candidates: the representations compared (ranked-out ones included).
        classes: class names.
        usable: boolean mask of store rows used (labeled and ok in every store).
        excluded_failed: rows left out because they failed in at least one store.
        excluded_unlabeled: rows left out because they have no label.
        y_scored: true labels of the scored rows (plan order).
        predictions: per row key (representation, head): predictions on the scored rows.
        runs: per row key: what is needed to refit or save the head.
        skipped: heads that did not run: representation, backbone, head, mode (``dropped`` by the race,
            ``duplicate`` of an equivalent head, ``skipped`` by the budget), reason, predicted_seconds, and
            ``race`` (held-out accuracy per rung) when raced.
        budget_seconds: the time budget (None: no budget, every head runs the full protocol).
        seconds: wall time of the whole comparison.
        parallel: where the parallel fits ran: joblib's backend (``loky`` locally, ``ray`` on a cluster) and
            the number of parallel fits.
        ranking: with ``--top`` or at least three representations: transferability scores per candidate
            (``scores``), which were ranked out, and per score Kendall's tau and weighted tau against each
            candidate's best-head accuracy with bootstrap CIs (``agreement``); None otherwise.
        curve: with ``shots``: the learning curve (:mod:`pipelines.curves`): ``shots``, ``seeds``, ``scored``
            (which rows each point is scored on), ``seconds`` and ``rows`` (one per representation x head x k);
            None otherwise.
        representation: with ``representation="auto"``: ``winner`` (the best row's representation, head and
            accuracy), ``reference`` (the default features, their best head and accuracy), ``difference`` and
            ``difference_ci`` (the winner's best head minus the reference's, paired on the scored rows; None
            when the race dropped every head on the reference: ``reference_dropped`` then holds the best one's
            held-out accuracy and the reason), ``candidates`` (how many were ranked), ``ran`` (those that ran
            heads), ``concat`` (the concatenated candidates), ``rank_seconds``; else None.
        units: the run cache (:mod:`pipelines.runcache`): ``reused`` units and the ``reused_seconds`` they took
            when they ran, and units ``committed`` by this run.
        duplicates: with ``exclude_duplicates``: the audit folder read, ``pairs`` in it, ``twinned`` (scored rows
            with a near-duplicate among the rows their head was fitted on) of ``scored``; every row then also has
            ``accuracy_without_twins`` and its ``accuracy_without_twins_ci``. None otherwise.
        twin_check: without ``exclude_duplicates``: the quick feature check (``signal``, ``threshold``,
            ``representation``; ``twinned`` of ``scored`` rows have a row their head was fitted on at that feature
            cosine or above, their ``share``, ``warn`` when it exceeds :data:`TWIN_WARNING`, ``seconds``; or
            ``skipped`` and why). None with ``exclude_duplicates``.
    """

    rows: list[dict[str, Any]]
    plan: Plan
    stores: list[FeatureStore]
    classes: list[str]
    usable: np.ndarray
    excluded_failed: int
    excluded_unlabeled: int
    y_scored: np.ndarray
    predictions: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    runs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    budget_seconds: float | None = None
    seconds: float = 0.0
    parallel: str = ""
    candidates: list[Candidate] = field(default_factory=list)
    ranking: dict[str, Any] | None = None
    curve: dict[str, Any] | None = None
    units: dict[str, Any] = field(default_factory=dict)
    representation: dict[str, Any] | None = None
    twin_check: dict[str, Any] | None = None
    duplicates: dict[str, Any] | None = None

    @property
    def best(self) -> dict[str, Any]:
        return self.rows[0]

    @property
    def task(self) -> str:
        """The label set compared (the stores' default one unless ``task`` was given)."""
        return self.stores[0].task_name

    def leaderboard(self, fields: tuple[str, ...] = LEADERBOARD_FIELDS) -> list[dict[str, Any]]:
        """The leaderboard, best first: one dict per representation x head with `fields` (results.json has
        every field; missing ones are None)."""
        return [{k: r.get(k) for k in fields} for r in self.rows]

    def to_frame(self, fields: tuple[str, ...] = LEADERBOARD_FIELDS):
        """:meth:`leaderboard` as a pandas DataFrame (pandas is not a dependency of headbench: install it to
        use this)."""
        try:
            import pandas
        except ImportError:
            raise HeadsError("Comparison.to_frame needs pandas (pip install pandas); Comparison.leaderboard() "
                             "gives the same rows as dicts") from None
        return pandas.DataFrame(self.leaderboard(fields))

    def __repr__(self) -> str:
        best = self.best
        return (f"Comparison(task={self.task!r}, rows={len(self.rows)}, best={best['representation']!r} + "
                f"{best['head']!r} at {format_ci(best)} %, protocol={self.plan.kind!r}, seconds={self.seconds:.1f})")


def _threads_for(spec):
    """All cores for a head that spreads one fit over them itself; the comparison's per-fit limit otherwise."""
    return threadpool_limits(limits=os.cpu_count() or 1) if spec.threaded else contextlib.nullcontext()


def _summary_params(params: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen setting (holdout), or the one chosen most often across outer folds (nested CV)."""
    as_json = [json.dumps(p, sort_keys=True) for p in params]
    return json.loads(collections.Counter(as_json).most_common(1)[0][0])


def _rank(candidates: list[Candidate], usable: np.ndarray, y: np.ndarray, plan: Plan, max_rows: int | None,
          seed: int, progress: bool) -> tuple[list[dict[str, Any]], int]:
    """Transferability scores of every candidate on the plan's non-test rows (a stratified subsample)."""
    fit = plan.final.fit  # holdout: every non-test row; nested CV: every row
    keep = fit[stratified_subsample(y[fit], max_rows, seed)]
    mask = np.zeros(len(usable), bool)
    mask[np.flatnonzero(usable)[keep]] = True
    return score_candidates(candidates, mask, y[keep], progress=progress), len(keep)


AUTO_TOP = 3  # representation auto: heads run on this many of the best-ranked candidates (plus the default features)
AUTO_CONCAT = 3  # representation auto: the best-ranked single representations concatenated into one more candidate


def _auto_requested(representation: str | None, candidates: list[Candidate]) -> bool:
    if representation not in (None, "auto", "given"):
        raise HeadsError(f"--representation must be auto or given, got {representation!r}")
    plain = [c for c in candidates if c.layer == LAST]
    if representation == "auto":
        if not any(c.store.layer_names for c in plain):
            raise HeadsError("--representation auto chooses among a store's layers, and no store given without a "
                             "layer holds any; extract with --representation auto (or --layers stages) first")
        return True
    if representation == "given":
        return False
    return bool(plain) and all(c.store.attrs.get("representation", {}).get("kind") == "auto" for c in plain) \
        and len(plain) == len(candidates)


def _auto_candidates(candidates: list[Candidate], usable: np.ndarray, y: np.ndarray, plan: Plan,
                     rank_rows: int | None, seed: int, rank_by: str, progress: bool):
    """(candidates, their scores, rows scored, names that always run) of ``representation="auto"``: every store
    given without a layer expanded into its default features and every layer, the best-ranked of those
    concatenated, all scored on the training rows only (:func:`_rank`)."""
    singles = []
    for c in candidates:
        singles += layer_candidates(c) if c.layer == LAST and c.store.layer_names else [c]
    name_candidates(singles)
    scores, n_rows = _rank(singles, usable, y, plan, rank_rows, seed, progress)
    by_name = {r["candidate"]: r for r in scores}
    concats = []
    for store in distinct_stores(singles):
        own = sorted((c for c in singles if c.store is store and c.layer != CONCAT),
                     key=lambda c: -by_name[c.name][rank_by])
        if len(own) > 1:
            concats.append(concat_candidate(store, [c.layer for c in own[:AUTO_CONCAT]]))
    everything = name_candidates(singles + concats)  # the singles keep their names; the concatenations get theirs
    if concats:
        scores += _rank(concats, usable, y, plan, rank_rows, seed, progress)[0]
    keep = [c.name for c in everything if c.layer == LAST]
    return everything, scores, n_rows, keep


def _auto_outcome(rows: list[dict[str, Any]], predictions, y_scored: np.ndarray, keep: list[str],
                  ranking: dict[str, Any], skipped: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """What ``representation="auto"`` chose and how far it beat the default features: paired on the scored rows
    when a head on the default features reached them, else what the race saw on held-out training rows."""
    frozen = [r for r in rows if r["mode"] != "finetune"]
    winner = frozen[0]
    reference = keep[0]
    out = {"winner": winner["representation"], "winner_head": winner["head"], "winner_accuracy": winner["accuracy"],
           "reference": reference, "reference_head": None, "reference_accuracy": None, "reference_dropped": None,
           "difference": None, "difference_ci": None, "candidates": len(ranking["scores"]),
           "ran": sorted({r["representation"] for r in frozen}), "rank_seconds": ranking["seconds"],
           "concat": [r["candidate"] for r in ranking["scores"] if ":concat(" in r["candidate"]]}
    best = next((r for r in frozen if r["representation"] == reference), None)
    if best is not None:
        a = predictions[(winner["representation"], winner["head"])] == y_scored
        b = predictions[(reference, best["head"])] == y_scored
        difference, low, high = paired_difference_ci(a, b, n_boot=n_boot, seed=seed)
        out.update(difference=difference, difference_ci=[low, high], reference_head=best["head"],
                   reference_accuracy=best["accuracy"])
        return out
    raced = [s for s in skipped if s["representation"] == reference and s.get("race")]
    if raced:  # every head on the default features was dropped by the race: what it saw is the evidence
        top = max(raced, key=lambda s: s["race"]["rung_accuracy"][-1])
        out["reference_dropped"] = {"head": top["head"], "held_out_accuracy": top["race"]["rung_accuracy"][-1],
                                    "held_out_rows": top["race"]["rung_rows"][-1], "reason": top["reason"]}
    return out


def best_accuracy(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The best head's accuracy of every representation that ran heads."""
    best: dict[str, float] = {}
    for r in rows:
        best[r["representation"]] = max(best.get(r["representation"], 0.0), r["accuracy"])
    return best


def _agreement(scores: list[dict[str, Any]], rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Per score: Kendall's tau and weighted tau between score and best-head accuracy over the candidates run."""
    best = best_accuracy(rows)
    ran = [s for s in scores if s["candidate"] in best]
    if len(ran) < MIN_CANDIDATES_FOR_TRUST:
        return {}
    accuracy = np.array([best[s["candidate"]] for s in ran])
    return {name: rank_agreement(np.array([s[name] for s in ran]), accuracy, seed=seed) for name in SCORES}


def compare_heads(
    store_paths: list[str | Path],
    heads: list[str] | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    jobs: int | None = None,
    class_weight: str | None = None,
    n_boot: int = 1000,
    budget: float | None = DEFAULT_BUDGET_MINUTES,
    top: int | None = None,
    rank_by: str = DEFAULT_RANK_BY,
    rank_rows: int | None = DEFAULT_MAX_ROWS,
    shots: list[int | str] | None = None,
    seeds: int = 5,
    selection: list[str] | str | None = None,
    representation: str | None = None,
    calibrate: str | None = None,
    task: str | None = None,
    cache_dir: str | Path | None = None,
    fresh: bool = False,
    include: list[str | Path] | None = None,
    exclude_duplicates: str | Path | None = None,
    progress: bool = True,
) -> Comparison:
    """Train and compare every head on every representation under one protocol.

    Args:
        store_paths: candidates (:mod:`pipelines.candidates`): ``STORE.h5``, ``STORE.h5:LAYER``,
            ``STORE.h5:all``, ``STORE.h5:concat``; all stores of the same samples.
        heads: head names or patterns (all registered heads when None).
        folds: K of every stratified K-fold split.
        seed: seed of folds, estimators and bootstrap.
        jobs: parallel CV fits (None: all cores).
        class_weight: ``balanced`` or None, for every head that accepts it.
        n_boot: bootstrap resamples for the CIs.
        budget: minutes for the whole comparison (None: no budget, the full protocol for every head). Stores
            with fewer than 4000 fit rows always get the full protocol; on larger ones the heads race
            (:mod:`heads.race`: held-out probes, paired cuts, duplicates, rung 1) and the survivors are planned
            by :mod:`heads.budget` (successive halving on tuning subsets, sized approximations, skips), the
            leader last with all that is left; each decision reported per row.
        top: run the heads only on the `top` candidates best by `rank_by`; the others are reported as ranked
            out, with their scores. None: every candidate.
        rank_by: the transferability score that picks the top candidates.
        rank_rows: score candidates on a stratified subsample of at most this many non-test rows.
        shots: labelled rows per class for a learning curve (:func:`heads.fewshot.parse_shots`); every head on
            the same `seeds` draws of k rows per class, tuned on them alone, before the plain comparison (which
            always runs: ``all`` puts it on the curve). Its time counts against the budget.
        seeds: draws per k.
        selection: label-selection strategies (:mod:`heads.selection`: ``random``, ``typiclust``, ``probcover``,
            ``kcenter``, ``margin``): instead of k rows per class drawn with their labels known, each strategy
            picks k x classes rows without seeing a label, per seed, and the curve has one line per strategy
            (:func:`pipelines.curves.selection_curve`; with ``random``, every other one's gain over it). Needs
            `shots`.
        representation: ``auto``: each store given without a layer is expanded into its default features and
            every stored layer; all are ranked by `rank_by` on the training rows, the best ranked
            (:data:`AUTO_CONCAT`) are concatenated as one more candidate, and heads run on the best
            :data:`AUTO_TOP` (or `top`) of them plus the default features, the reference the winner is measured
            against (``Comparison.representation``: the winner, its paired difference from the default
            features with a CI, what the choice cost). ``given``: the candidates as named. None: ``auto`` for
            stores extracted with ``representation="auto"``, else ``given``.
        calibrate: ``none``, ``temperature``, ``sigmoid`` or ``isotonic`` (:mod:`heads.calibration`), fitted on
            out-of-fold logits of the fit rows; None: ``temperature`` for heads without probabilities (their
            NLL, Brier and ECE need some), ``none`` for the rest.
        task: which label set of the stores to predict (``label:NAME`` columns of a CSV manifest; None: the
            default one); every row names it.
        cache_dir: where finished units are committed (:mod:`pipelines.runcache`; the CLI uses ``DIR/.runs``
            with ``--out DIR``): a rerun after an interruption reuses them. None: no cache.
        fresh: ignore what `cache_dir` holds (and replace it).
        include: finished ``finetune`` run folders (:mod:`pipelines.finetuning`) whose rows join the leaderboard,
            paired with the heads on the same test rows (their ids and labels checked), with their cost (seconds,
            parameters trained). Needs stores with a test split (the holdout protocol).
        exclude_duplicates: an ``audit`` output folder: every row is also scored without the scored rows that
            have a near-duplicate (by its duplicates.csv) among the rows their head was fitted on (the test
            split's training rows; under nested CV, each outer fold's), reported side by side.
        progress: show a progress bar.

    Raises:
        HeadsError, FeaturizeError: unreadable stores or layers, stores of different samples, unknown heads, too
            few samples for the folds, a single class.
    """
    started_at = time.perf_counter()
    if budget is not None and not budget > 0:
        raise HeadsError(f"--budget must be a positive number of minutes, got {budget}")
    if top is not None and top < 1:
        raise HeadsError(f"--top must be at least 1, got {top}")
    check_score(rank_by)
    if seeds < 1:
        raise HeadsError(f"--seeds must be at least 1, got {seeds}")
    specs = resolve_heads(heads)
    if selection is not None:
        selection = resolve_strategies(selection)
        if not shots or not any(k != ALL for k in shots):
            raise HeadsError("--selection draws the learning curve's training rows: give --shots too, e.g. "
                             "--shots 1,2,4,8 --selection random,typiclust")
    if class_weight not in (None, "balanced"):
        raise HeadsError(f"--class-weight must be 'balanced' or 'none', got {class_weight!r}")
    jobs = jobs or os.cpu_count() or 1
    candidates = parse_candidates(store_paths, task=task)
    auto = _auto_requested(representation, candidates)
    stores = distinct_stores(candidates)
    labeled, usable = usable_rows(stores)
    ref = stores[0]
    y = ref.labels[usable]
    plan = plan_protocol(y, ref.split[usable], folds=folds, seed=seed, classes=ref.classes)
    y_scored = y[plan.scored]
    n_classes = len(ref.classes)
    included = _included_runs(include or [], ref, usable, plan, y_scored, n_boot, seed)
    twins = None if exclude_duplicates is None else _twinned_rows(exclude_duplicates, ref.ids[usable], plan)
    loaded: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}  # the twin check's matrix, kept for the heads

    def load(cand: Candidate) -> np.ndarray:
        key = (str(cand.store.path), tuple(cand.blocks))
        if key not in loaded:
            loaded[key] = cand.load(usable)
        return loaded[key]

    twin_check = _feature_twins(candidates[0], load, plan, int(usable.sum())) if twins is None else None

    ranking: dict[str, Any] | None = None
    keep: list[str] = []  # candidates that run heads whatever their rank (auto: the default features)
    scores = None
    if auto:
        started = time.perf_counter()
        candidates, scores, n_rows, keep = _auto_candidates(candidates, usable, y, plan, rank_rows, seed, rank_by,
                                                            progress)
        top = AUTO_TOP if top is None else top
    running = candidates
    if top is not None or len(candidates) >= MIN_CANDIDATES_FOR_TRUST:
        if scores is None:
            started = time.perf_counter()
            scores, n_rows = _rank(candidates, usable, y, plan, rank_rows, seed, progress)
        ranking = {"rank_by": rank_by, "top": top, "rows_scored": n_rows, "scores": scores, "ranked_out": [],
                   "seconds": time.perf_counter() - started}
        if top is not None and top < len(candidates):
            order = sorted(scores, key=lambda r: -r[rank_by])
            kept = {r["candidate"] for r in order[:top]} | set(keep)
            running = [c for c in candidates if c.name in kept]
            ranking["ranked_out"] = [r for r in order if r["candidate"] not in kept]

    rows, predictions, runs, skipped = [], {}, {}, []
    cache = RunCache(cache_dir, fresh)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    n_fit = min(len(t.fit) for t in plan.tasks)
    budget_seconds = None if budget is None else float(budget) * 60.0
    probing = budget_seconds is not None and n_fit >= 2 * PROBE_ROWS[-1]
    units = [(c, spec.on_blocks(c.block_widths)) for c in running for spec in specs]
    named = set(heads or [])
    features: dict[str, np.ndarray] = {}
    race: dict[tuple[str, str], Contender] = {}
    leader = None
    with tqdm(total=len(units), desc="compare-heads", unit="head", disable=not progress) as bar, \
            threadpool_limits(limits=threads):
        for cand in running:
            features[cand.name] = load(cand)
        loaded.clear()  # a candidate ranked out gives its matrix back
        curve = None
        if shots:
            started = time.perf_counter()
            ks = [k for k in shots if k != ALL]
            draws = [seed + i for i in range(seeds)]
            curve_units = _without_duplicates(units, named, [])
            curve = {"shots": list(shots), "seeds": draws, "scored": scored_rows_note(plan, selection),
                     "selection": selection}
            if selection:
                curve["rows"] = selection_curve(curve_units, features, y, plan, ks, draws, selection,
                                                n_classes=n_classes, folds=folds, jobs=jobs,
                                                class_weight=class_weight, n_boot=n_boot, seed=seed, bar=bar,
                                                cache=cache)
            else:
                curve["rows"] = learning_curve(curve_units, features, y, plan, ks, draws, folds=folds, jobs=jobs,
                                               class_weight=class_weight, n_boot=n_boot, seed=seed, bar=bar,
                                               cache=cache) if ks else []
            curve["seconds"] = time.perf_counter() - started
        allocator = Allocator(budget_seconds or 0.0, plan, jobs=jobs, n_classes=n_classes, leader_last=probing)
        units_run = _Units(y, plan, n_classes, jobs, class_weight, seed, n_boot, y_scored, calibrate, allocator, cache,
                           rows, predictions, runs)
        if probing:
            race, leader = _race(units, features, y, plan, jobs, named, class_weight, seed, bar, allocator,
                                 started_at + budget_seconds)
            for cand, spec in units:
                contender = race[(cand.name, spec.name)]
                if contender.status != "racing":
                    skipped.append({"representation": cand.name, "backbone": cand.backbone, "head": spec.name,
                                    "mode": contender.status, "reason": contender.reason,
                                    "predicted_seconds": full_plan(spec, contender.probe.cost, plan, jobs),
                                    "race": contender.summary()})
                    bar.update(1)
            units = [u for u in units if race[(u[0].name, u[1].name)].status == "racing"]
            order = allocator.order([(c.name, s.name) for c, s in units])
            if leader is not None:
                order.remove(leader.key)
                order.append(leader.key)  # the leader runs last, with everything the others left
            units.sort(key=lambda u: order.index((u[0].name, u[1].name)))
        else:
            units = _without_duplicates(units, named, skipped)

        for position, (cand, spec) in enumerate(units):
            key = (cand.name, spec.name)
            if probing:  # units reused from an earlier run charge the time they took then
                remaining = budget_seconds - (time.perf_counter() - started_at) - cache.reused_seconds
                decision = allocator.decide(key, remaining, [(c.name, s.name) for c, s in units[position:]])
                decision.probe_seconds = race[key].seconds
            else:
                why = "no budget (--exhaustive)" if budget_seconds is None else \
                    f"small store ({n_fit} fit rows): the full protocol"
                decision = HeadBudget("full", spec, tune_rows=n_fit, reason=why)
            bar.set_postfix_str(f"{cand.name} / {spec.name} ({decision.mode})")
            if decision.mode == "skipped":
                skipped.append({"representation": cand.name, "backbone": cand.backbone, "head": spec.name,
                                "mode": "skipped", "reason": decision.reason,
                                "predicted_seconds": decision.predicted_seconds,
                                **({"race": race[key].summary()} if key in race else {})})
                bar.update(1)
                continue
            _run_unit(units_run, cand, spec, decision, features[cand.name], race.get(key))
            bar.update(1)
        if probing and leader is not None:
            _second_pass(units_run, leader, budget_seconds - (time.perf_counter() - started_at) - cache.reused_seconds,
                         features, bar)

    if not rows:
        raise HeadsError(f"every head was skipped by the budget of {budget} minutes; raise --budget or use --exhaustive")
    for row, y_pred, proba in included:
        key = (row["representation"], row["head"])
        rows.append(row)
        predictions[key] = y_pred
        runs[key] = {"finetune": row["run_dir"], "model": None, "candidate": None, "proba": proba,
                     "proba_before": proba, "calibration": "none"}
    rows.sort(key=lambda r: (-r["accuracy"], -r["balanced_accuracy"], r["fit_seconds"]))
    best_correct = predictions[(rows[0]["representation"], rows[0]["head"])] == y_scored
    for rank, row in enumerate(rows, start=1):
        correct = predictions[(row["representation"], row["head"])] == y_scored
        row["rank"] = rank
        row["p_value_vs_best"] = 1.0 if rank == 1 else mcnemar_p_value(best_correct, correct)
        row["tied_with_best"] = bool(row["p_value_vs_best"] >= SIGNIFICANCE)
    _versus_best_frozen(rows, predictions, y_scored, n_boot, seed)
    if twins is not None:
        _without_twins(rows, predictions, y_scored, twins, n_classes, n_boot, seed)
    if ranking is not None:
        ranking["agreement"] = _agreement(ranking["scores"], rows, seed)
    chosen = _auto_outcome(rows, predictions, y_scored, keep, ranking, skipped, n_boot, seed) if auto else None
    return Comparison(
        rows=rows,
        plan=plan,
        stores=stores,
        classes=ref.classes,
        usable=usable,
        excluded_failed=int((labeled & ~usable).sum()),
        excluded_unlabeled=int((~labeled).sum()),
        y_scored=y_scored,
        predictions=predictions,
        runs=runs,
        skipped=skipped,
        budget_seconds=budget_seconds,
        seconds=time.perf_counter() - started_at,
        parallel=_parallel_backend(jobs),
        candidates=candidates,
        ranking=ranking,
        curve=curve,
        representation=chosen,
        duplicates=None if twins is None else {k: v for k, v in twins.items() if k != "mask"},
        twin_check=twin_check,
        units={"reused": cache.reused, "reused_seconds": cache.reused_seconds, "committed": cache.committed},
    )


def _included_runs(paths: list, ref: FeatureStore, usable: np.ndarray, plan: Plan, y_scored: np.ndarray,
                   n_boot: int, seed: int) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray | None]]:
    """The rows of fine-tuned runs (``--include``), on the plan's scored rows; checked before any head runs."""
    if not paths:
        return []
    from pipelines.finetuning import load_run  # torch and timm: imported only when a run is joined

    if plan.kind != "holdout":
        raise HeadsError("--include needs stores with a test split: a fine-tuned run is scored on the test rows, "
                         "and without a test split the heads are scored by nested CV on every row")
    ids = ref.ids[usable][plan.scored]
    joined, seen = [], {}
    for path in paths:
        row, y_pred, proba = load_run(path).join(ids, y_scored, ref.classes, ref.task_name,
                                                 ref.attrs.get("dataset_fingerprint"), n_boot, seed)
        key = (row["representation"], row["head"])
        if key in seen:
            raise HeadsError(f"--include {path} and {seen[key]} are both {key[0]}; give the run folders other names")
        seen[key] = path
        joined.append((row, y_pred, proba))
    return joined


def _twinned_rows(audit_dir: str | Path, ids: np.ndarray, plan: Plan) -> dict[str, Any]:
    """Which scored rows (plan order) have a near-duplicate, by `audit_dir`/duplicates.csv (written by ``audit``),
    among the rows their own task was fitted on: the test split's fit rows, or each outer fold's."""
    import csv

    path = Path(audit_dir) / "duplicates.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"id_a", "id_b"} <= set(reader.fieldnames):
                raise HeadsError(f"{path} has no id_a,id_b columns; give a folder written by `python cli.py audit`")
            pairs = [(r["id_a"], r["id_b"]) for r in reader]
    except OSError as e:
        raise HeadsError(f"--exclude-duplicates {audit_dir}: cannot read {path} ({e.strerror or e}); run "
                         "`python cli.py audit STORE --out DIR` first and give DIR") from None
    position = {str(i): n for n, i in enumerate(ids)}
    unknown = [i for pair in pairs for i in pair if i not in position]
    if pairs and len(unknown) == 2 * len(pairs):
        raise HeadsError(f"no id of {path} is a row of this store (e.g. {unknown[0]!r}): the audit is of another "
                         "store; audit this one")
    a = np.array([position.get(x, -1) for x, _ in pairs], dtype=np.int64)
    b = np.array([position.get(y, -1) for _, y in pairs], dtype=np.int64)
    known = (a >= 0) & (b >= 0)  # rows that failed or have no label in this comparison are not scored or fitted
    mask = _twin_mask(a[known], b[known], plan, len(ids))
    return {"audit": str(audit_dir), "pairs": int(len(pairs)), "twinned": int(mask.sum()), "scored": int(len(mask)),
            "mask": mask}


def _twin_mask(a: np.ndarray, b: np.ndarray, plan: Plan, n: int) -> np.ndarray:
    """Per scored row (plan order): does a pair (a, b) (positions among the `n` usable rows) join it to a row its
    own task was fitted on?"""
    mask = []
    for task in plan.tasks:
        fitted = np.zeros(n, bool)
        fitted[task.fit] = True
        twinned = np.zeros(n, bool)
        twinned[a[fitted[b]]] = True
        twinned[b[fitted[a]]] = True
        mask.append(twinned[task.score])
    return np.concatenate(mask)


def _feature_twins(candidate: Candidate, load: Callable[[Candidate], np.ndarray], plan: Plan,
                   n: int) -> dict[str, Any]:
    """compare-heads' quick look for test rows the heads could have memorised (without --exclude-duplicates):
    scored rows whose feature cosine to a row their task was fitted on is near 1, relative to the data's own
    spacing (:func:`heads.audit.feature_twins`). Near-identical twins only:
    ``audit`` confirms with the pixels and finds re-encoded, resized and cropped copies too. Skipped (and said)
    on stores too large for an exact search in passing."""
    from heads.audit import feature_twins

    started = time.perf_counter()
    scored = np.unique(np.concatenate([task.score for task in plan.tasks]))
    out: dict[str, Any] = {"signal": "features", "representation": candidate.name}
    if len(scored) * n > TWIN_CHECK_LIMIT:
        return {**out, "skipped": f"{len(scored):,} scored x {n:,} rows is too large a search to do in passing; "
                                  "run `python cli.py audit` for the near-duplicates"}
    X = load(candidate)  # the candidate's usable rows, as the heads will read them
    if not np.isfinite(X).all():
        return {**out, "skipped": "rows with NaN or infinite features"}
    a, b, threshold = feature_twins(X, scored)
    mask = _twin_mask(a, b, plan, n)
    return {**out, "threshold": threshold, "twinned": int(mask.sum()), "scored": int(len(mask)),
            "share": float(mask.mean()) if len(mask) else 0.0, "warn": bool(mask.mean() > TWIN_WARNING)
            if len(mask) else False, "seconds": time.perf_counter() - started}


def _without_twins(rows: list[dict[str, Any]], predictions: dict, y_scored: np.ndarray, twins: dict[str, Any],
                   n_classes: int, n_boot: int, seed: int) -> None:
    """Each row's accuracy (with its bootstrap CI) on the scored rows that have no near-duplicate among the rows
    their head was fitted on."""
    clean = ~twins["mask"]
    for row in rows:
        if not clean.any():
            row["accuracy_without_twins"], row["accuracy_without_twins_ci"] = None, None
            continue
        y_pred = predictions[(row["representation"], row["head"])][clean]
        row["accuracy_without_twins"] = float(np.mean(y_pred == y_scored[clean]))
        row["accuracy_without_twins_ci"] = [float(v) for v in
                                            bootstrap_ci(y_scored[clean], y_pred, n_classes, n_boot, seed=seed)["accuracy"]]


def _versus_best_frozen(rows: list[dict[str, Any]], predictions: dict, y_scored: np.ndarray, n_boot: int,
                        seed: int) -> None:
    """Each fine-tuned row (``--include``) gets ``vs_best_frozen``: its accuracy minus the best frozen head's on the
    same rows, with a paired bootstrap CI and the exact McNemar p-value -- what fine-tuning gains or loses."""
    frozen = next((r for r in rows if r.get("run_dir") is None), None)
    if frozen is None:
        return
    reference = predictions[(frozen["representation"], frozen["head"])] == y_scored
    for row in rows:
        if row.get("run_dir") is None:
            continue
        correct = predictions[(row["representation"], row["head"])] == y_scored
        difference, low, high = paired_difference_ci(correct, reference, n_boot=n_boot, seed=seed)
        row["vs_best_frozen"] = {"representation": frozen["representation"], "head": frozen["head"],
                                 "difference": difference, "difference_ci": [low, high],
                                 "p_value": mcnemar_p_value(correct, reference)}


def _race(units, features, y, plan: Plan, jobs: int, named: set[str], class_weight, seed: int, bar,
          allocator: Allocator, deadline: float):
    """Probe every (representation, head), drop duplicates, heads that cannot run even alone before `deadline`
    (a perf_counter time) and heads that cannot win; confirm the survivors on more rows (:mod:`heads.race`).
    Returns the contenders by key and the leader (None when none can run)."""
    pool, holdout = race_split(y, plan.final.fit if plan.kind == "holdout" else plan.tasks[0].fit, seed)
    race: dict[tuple[str, str], Contender] = {}
    for cand, spec in units:
        bar.set_postfix_str(f"probing {cand.name} / {spec.name}")
        X = features[cand.name]
        with _threads_for(spec):
            probe = probe_head(spec, X, y, pool, holdout, class_weight=class_weight, seed=seed)
        contender = race[(cand.name, spec.name)] = Contender((cand.name, spec.name), spec, probe)
        rows = min(RUNG_FACTOR * probe.rows, len(pool))
        if spec.approximation is not None:  # at the exact head's best setting, scored where rung 1 scores the
            with _threads_for(spec.approximation):  # exact head: the difference is the fidelity
                contender.approximation = probe_head(spec.approximation, X, y, pool, holdout, settings=[probe.params],
                                                     class_weight=class_weight, seed=seed, sizes=(rows // 2, rows))
        allocator.add(contender.key, spec, contender.probe.cost,
                      contender.approximation.cost if contender.approximation else None)
    contenders = list(race.values())
    left = deadline - time.perf_counter()
    for c in contenders:
        if c.status == "racing" and allocator.minimum(c.key) > left:
            c.status = "skipped"
            c.reason = (f"cannot run even alone in the {max(left, 0):.0f}s left: needs {allocator.minimum(c.key):.0f}s"
                        + (" even approximated" if c.approximation else ", and it has no approximation"))
    if not any(c.status == "racing" for c in contenders):
        return race, None
    cut(contenders)  # before duplicates: a pair that cannot win is dropped whichever implementation is faster
    drop_duplicates(contenders, plan, jobs, named)
    leader = cut(contenders)
    allowance = RACE_FRACTION * allocator.budget_seconds
    for c in contenders:
        rows = min(RUNG_FACTOR * c.probe.rows, len(pool))
        if c.status != "racing" or rows < 2 * c.probe.rows:
            continue
        predicted = c.probe.cost.seconds(rows)
        if predicted > allowance:  # rung 1 would eat the budget it is meant to plan
            continue
        bar.set_postfix_str(f"rung 1: {c.key[0]} / {c.key[1]} on {rows} rows")
        with _threads_for(c.spec):
            confirm(c, features[c.key[0]], y, pool, holdout, class_weight=class_weight, seed=seed, rows=rows)
        allocator.add(c.key, c.spec, c.probe.cost, c.approximation.cost if c.approximation else None, c.fidelity)
    return race, cut(contenders, incumbent=leader)


def _without_duplicates(units, named: set[str], skipped: list) -> list:
    """Without probes (small stores, --exhaustive): of each family, the first registered head, unless every
    member was named."""
    kept, seen = [], {}
    for cand, spec in units:
        group = (cand.name, spec.family)
        if spec.family is None or spec.name in named:
            kept.append((cand, spec))
        elif group in seen and seen[group] not in named:
            skipped.append({"representation": cand.name, "backbone": cand.backbone, "head": spec.name,
                            "mode": "duplicate", "predicted_seconds": None,
                            "reason": f"same model as {seen[group]}; name both to run both"})
        else:
            seen.setdefault(group, spec.name)
            kept.append((cand, spec))
    return kept


@dataclass
class _Units:
    """What every unit of one comparison shares, passed down once: the labels and the protocol, how heads are
    fitted and scored, the time allocator and run cache, and the leaderboard being built (rows, predictions and
    runs by (representation, head))."""

    y: np.ndarray
    plan: Plan
    n_classes: int
    jobs: int
    class_weight: str | None
    seed: int
    n_boot: int
    y_scored: np.ndarray
    calibrate: str | None
    allocator: Allocator
    cache: RunCache
    rows: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    runs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def _run_unit(u: _Units, cand: Candidate, spec, decision: HeadBudget, X, contender: Contender | None,
              replace: bool = False) -> None:
    """Run one head as decided -- or take its committed run from the cache -- and add (or, with `replace`, put in
    place of its earlier run) its row."""
    y, plan, n_classes, jobs, class_weight, seed = u.y, u.plan, u.n_classes, u.jobs, u.class_weight, u.seed
    calibrate, cache, allocator, y_scored = u.calibrate, u.cache, u.allocator, u.y_scored
    tune_rows = None if decision.mode == "full" else decision.tune_rows
    resize = None
    if decision.mode == "halving" and decision.target_seconds is not None:
        resize = LastRound(decision, plan, jobs=jobs, n_classes=n_classes)
    key_hash = unit_key(store_hash=str(cand.store.attrs.get("config_hash")), candidate=cand.name,
                        task=cand.store.task_name, y=y, spec=spec, run_spec=decision.spec, plan=plan,
                        class_weight=class_weight, calibrate=calibrate, mode=decision.mode,
                        tune_rows=decision.tune_rows, approximated=decision.approximated) if cache.enabled else ""
    cached = cache.load(key_hash)
    if cached is not None:
        run, actual, extra = cached
        resized = extra.get("resized", "")
    else:
        started = time.perf_counter()
        with _threads_for(decision.spec):
            run = run_head(decision.spec, X, y, plan, n_classes, jobs=head_jobs(decision.spec, jobs),
                           class_weight=class_weight, seed=seed, tune_rows=tune_rows, calibrate=calibrate,
                           resize=resize)
        actual = time.perf_counter() - started
        resized = resize.note() if resize is not None else ""
        cache.save(key_hash, run, actual, {"resized": resized})
    allocator.record(decision.predicted_seconds, actual)
    scored = score_fields(y_scored, run.y_pred, n_classes, scores=run.scores, proba=run.proba,
                          proba_before=run.proba_before, calibration=run.calibration["method"],
                          temperatures=run.calibration["temperature"], n_boot=u.n_boot, seed=seed)
    row = {
        "representation": cand.name,
        "backbone": cand.backbone,
        "layer": cand.layer,
        "store": str(cand.store.path),
        "head": spec.name,
        "task": cand.store.task_name,
        **scored,
        "fit_seconds": run.fit_seconds,
        "tune_seconds": run.tune_seconds,
        "predict_us_per_sample": run.predict_us_per_sample,
        "params": _summary_params(run.params),
        "n_scored": int(len(y_scored)),
        "mode": decision.mode,
        "tune_rows": run.tune_rows if run.tune_rows is not None else decision.tune_rows,
        "planned_tune_rows": decision.tune_rows,
        "approximated": decision.approximated,
        "components": decision.spec.rank(),
        "method": decision.spec.description,
        "share_seconds": decision.share_seconds,
        "predicted_seconds": decision.predicted_seconds,
        "actual_seconds": actual,
        "probe_seconds": decision.probe_seconds,
        "budget_note": decision.reason + resized,
        "cached": cached is not None,
    }
    if contender is not None:
        row["race"] = contender.summary()
    if plan.kind == "nested-cv":
        row["params_per_fold"] = run.params
    key = (cand.name, spec.name)
    if replace:
        u.rows[:] = [r for r in u.rows if (r["representation"], r["head"]) != key]
    u.rows.append(row)
    u.predictions[key] = run.y_pred
    u.runs[key] = {"spec": decision.spec, "candidate": cand, "X": X, "model": run.model,
                 "tune_rows": tune_rows if run.tune_rows is None else run.tune_rows,
                 "proba": run.proba, "proba_before": run.proba_before, "calibration": run.calibration["method"]}


SECOND_PASS_ABOVE = 0.1  # a second pass runs when more than this share of the budget is left


def _better(new: HeadBudget, old: dict[str, Any]) -> bool:
    """Whether plan `new` runs the head more exactly than the run `old` (a row) did."""
    if new.mode == "skipped":
        return False
    if old["approximated"] != new.approximated:
        return old["approximated"]
    if new.approximated:  # never a smaller approximation, whatever its tuning rows
        rank, old_rank = new.spec.rank() or 0, old.get("components") or 0
        return rank > old_rank or (rank == old_rank and new.tune_rows >= 1.5 * old["tune_rows"])
    return (new.mode == "full" and old["mode"] != "full") or new.tune_rows >= 1.5 * max(old["tune_rows"], 1)


def _second_pass(u: _Units, leader: Contender, remaining: float, features, bar) -> None:
    """No idle budget: when the leader ran reduced (approximated, or tuned on a subset) and more than
    SECOND_PASS_ABOVE of the budget is left, plan it again with what is left and run it when that is more exact."""
    old = next((r for r in u.rows if (r["representation"], r["head"]) == leader.key), None)
    if old is None or remaining < SECOND_PASS_ABOVE * u.allocator.budget_seconds or old["mode"] == "full":
        return
    decision = u.allocator.decide(leader.key, remaining, [leader.key])
    if not _better(decision, old):
        return
    decision.reason = f"second pass with the {remaining:.0f}s left: {decision.reason}"
    decision.probe_seconds = 0.0
    bar.set_postfix_str(f"second pass: {leader.key[0]} / {leader.key[1]} ({decision.mode})")
    _run_unit(u, u.runs[leader.key]["candidate"], leader.spec, decision, features[leader.key[0]], leader, replace=True)


def _parallel_backend(jobs: int) -> str:
    """joblib's active backend (``ray`` inside :func:`pipelines.cluster.joblib_on_ray`) and the fits at once."""
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    name = type(backend).__name__.removesuffix("Backend").lower()
    return f"{name}, {jobs} parallel fit{'s' if jobs > 1 else ''}"


def task_names(store_paths: list[str | Path]) -> list[str]:
    """Every label set of the first candidate's store, its default first (``--task all``)."""
    return parse_candidates(store_paths[:1])[0].store.task_names


def save_best_head(comparison: Comparison, path: str | Path, *, jobs: int | None = None,
                   class_weight: str | None = None) -> Path:
    """Save the winning frozen head (refit as the protocol says) with its provenance, via skops. A fine-tuned run
    (``--include``) is not a head on these stores' features: when one ranks first, the best head after it is saved
    (the run folder holds its own head for its own backbone)."""
    best = next(r for r in comparison.rows if comparison.runs[(r["representation"], r["head"])]["candidate"] is not None)
    run = comparison.runs[(best["representation"], best["head"])]
    candidate: Candidate = run["candidate"]
    store: FeatureStore = candidate.store
    model = run["model"]
    if model is None:  # nested CV: tune by CV on every usable row, refit on all of them
        y = store.labels[comparison.usable]
        model = fit_head(run["spec"], run["X"], y, comparison.plan.final, jobs=jobs or os.cpu_count() or 1,
                         class_weight=class_weight, seed=comparison.plan.seed, tune_rows=run["tune_rows"],
                         calibrate=run["calibration"]).best_estimator_
    attrs = store.attrs
    provenance = {
        "head": best["head"],
        "params": best["params"],
        "representation": best["representation"],
        "layer": candidate.layer,
        "blocks": candidate.blocks,
        "classes": comparison.classes,
        "task": comparison.task,
        "backbone": attrs.get("backbone"),
        "weights_source": attrs.get("weights_source"),
        "weights_sha256": attrs.get("weights_sha256"),
        "data_config": attrs.get("data_config"),
        "pooling": attrs.get("pooling"),
        "decode": store.config.get("decode"),
        "precision": attrs.get("precision"),
        "runtime": (attrs.get("runtime") or {}).get("name", "torch"),
        "dtype": attrs.get("dtype"),
        "num_features": candidate.width,
        "layers": [t for t in store.layers if t["name"] in candidate.blocks],
        "store_config_hash": attrs.get("config_hash"),
        "store": str(store.path),
        "protocol": comparison.plan.description,
        "accuracy": best["accuracy"],
        "accuracy_ci": best["accuracy_ci"],
        "calibration": best.get("calibration"),
        "temperature": best.get("temperature"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "library_versions": library_versions(),
    }
    return save_head(path, model, provenance)
