"""Write a comparison to disk: results.json, results.csv, report.md and PNG plots (:mod:`pipelines.plots`;
learning_curve.png with --shots), and report.html (:mod:`pipelines.html_report`, given this module's Markdown
sections)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from heads.calibration import ECE_BINS
from heads.transferability import SCORES
from pipelines.compare import Comparison, best_accuracy
from pipelines.html_report import write_html
from pipelines.plots import (
    curve_lines,
    curve_rows,
    fit_rows,
    plot_accuracy_vs_fit_time,
    plot_confusion,
    plot_learning_curve,
    plot_reliability,
    selection_pairs,
)
from pipelines.curves import selection_verdicts
from pipelines.scoring import format_ci, write_prediction_csv

__all__ = ["write_results", "write_task_summary", "format_ci", "format_tau", "ranking_markdown", "CSV_FIELDS"]

CSV_FIELDS = (
    "rank", "task", "representation", "backbone", "layer", "head", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy",
    "macro_f1", "top5_accuracy", "log_loss", "fit_seconds", "tune_seconds", "predict_us_per_sample",
    "p_value_vs_best", "tied_with_best", "params", "mode", "tune_rows", "approximated", "predicted_seconds",
    "actual_seconds", "probe_seconds", "nll", "brier", "ece", "calibration", "temperature", "trained_params",
    "device", "run_dir",
)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _race_cell(race: dict[str, Any] | None) -> str:
    """Held-out accuracy at each rung, e.g. ``84.10 (2000) → 86.35 (8000)``."""
    if not race:
        return "–"
    return " → ".join(f"{a * 100:.2f} ({n})" for a, n in zip(race["rung_accuracy"], race["rung_rows"]))


def _fidelity(race: dict[str, Any] | None) -> str:
    if not race or race.get("fidelity") is None:
        return "–"
    return f"{race['fidelity'] * 100:+.2f} pts at {race['fidelity_rows']} rows"


def _cost_section(comparison: Comparison) -> list[str]:
    """The race and the budget: per head its held-out accuracy at each rung, its share, how it ran, predicted vs
    actual cost, and why it was dropped, approximated or skipped."""
    budget = comparison.budget_seconds
    raced = any(r.get("race") for r in comparison.rows)
    lines = [
        "## Cost and budget" + (": the race" if raced else ""),
        "",
        f"Budget: {'none (--exhaustive)' if budget is None else f'{budget / 60:g} min'}; "
        f"whole comparison took {comparison.seconds:.0f} s ({comparison.parallel}). Costs are wall seconds of tuning + refit + scoring "
        "(probes listed apart); predictions come from timed probes extrapolated by each head's complexity.",
        "",
    ]
    if raced:
        lines += [
            "Every head was first probed on subsets of the training rows and scored on the same held-out training "
            "rows (accuracy % (training rows) per rung); heads whose paired 95 % upper bound stays below the "
            "leader were dropped, the rest given shares of the budget, the leader last with all that remained. "
            "Fidelity: the approximation's held-out accuracy minus the exact head's, trained on the same rows.",
            "",
        ]
    lines += [
        "| representation | head | race: held-out % (rows) | mode | tuning rows | approximated | fidelity | share s "
        "| predicted s | actual s | actual / predicted | race s | why |",
        "|---|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in comparison.rows:
        ratio = "–" if not r["predicted_seconds"] else f"{r['actual_seconds'] / r['predicted_seconds']:.2f}"
        lines.append(
            f"| {r['representation']} | {r['head']} | {_race_cell(r.get('race'))} | {r['mode']} | {r['tune_rows']} | "
            f"{'yes: ' + r['method'] if r['approximated'] else 'no'} | {_fidelity(r.get('race'))} | "
            f"{_seconds(r.get('share_seconds'))} | {_seconds(r['predicted_seconds'])} | "
            f"{r['actual_seconds']:.1f} | {ratio} | {r['probe_seconds']:.1f} | {r['budget_note']} |"
        )
    for r in comparison.skipped:
        lines.append(f"| {r['representation']} | {r['head']} | {_race_cell(r.get('race'))} | {r['mode']} | – | – | "
                     f"{_fidelity(r.get('race'))} | – | {_seconds(r['predicted_seconds'])} | – | – | "
                     f"{_seconds((r.get('race') or {}).get('race_seconds'))} | {r['reason']} |")
    return lines + [""]


def format_tau(value: float | None, ci: list) -> str:
    """A tau with its CI, signed: ``+0.61 [+0.31, +0.84]`` (``–`` when undefined)."""
    if value is None:
        return "–"
    low, high = ci
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]" if low is not None else f"{value:+.2f}"


def ranking_markdown(comparison: Comparison) -> list[str]:
    """Transferability scores per candidate, the ranked-out ones, and how far each score's order is trusted."""
    ranking = comparison.ranking
    if ranking is None:
        return []
    best = best_accuracy(comparison.rows)
    names = list(SCORES)
    lines = [
        "## Representations: transferability scores and how far to trust them",
        "",
        f"Scores of every candidate on {ranking['rows_scored']} non-test rows, without training heads "
        f"({ranking['seconds']:.1f} s in all); best-head accuracy from the leaderboard above."
        + (f" Heads ran on the {ranking['top']} best by `{ranking['rank_by']}` only (`--top`)." if ranking["top"] else ""),
        "",
        "| representation | width | best-head accuracy % | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for s in sorted(ranking["scores"], key=lambda s: -best.get(s["candidate"], -1.0)):
        acc = f"{best[s['candidate']] * 100:.2f}" if s["candidate"] in best else "ranked out"
        lines.append(f"| {s['candidate']} | {s['width']} | {acc} | " + " | ".join(f"{s[n]:.4g}" for n in names) + " |")
    agreement = ranking.get("agreement") or {}
    lines.append("")
    if agreement:
        n = next(iter(agreement.values()))["candidates"]
        lines += [
            f"Agreement of each score's order with the best-head accuracy over the {n} candidates that ran "
            "(Kendall's tau-b; weighted tau counts the top of the ranking most; 95 % bootstrap CI over "
            "candidates). A CI that reaches 0 means this ranking cannot be trusted on this data.",
            "",
            "| score | Kendall tau [95 % CI] | weighted tau [95 % CI] | seconds (all candidates) |",
            "|---|---|---|---:|",
        ]
        for name, a in agreement.items():
            seconds = sum(s["seconds"][name] for s in ranking["scores"])
            lines.append(f"| {name} | {format_tau(a['kendall_tau'], a['kendall_tau_ci'])} | "
                         f"{format_tau(a['weighted_tau'], a['weighted_tau_ci'])} | {seconds:.1f} |")
    else:
        lines.append("Fewer than 3 candidates ran heads: no rank agreement to report.")
    return lines + [""]


def _representation_section(comparison: Comparison) -> list[str]:
    chosen = comparison.representation
    if not chosen:
        return []
    ranking = comparison.ranking
    lines = ["## Representation chosen (auto)", ""]
    if chosen["winner"] == chosen["reference"]:
        lines.append(f"The default features ({chosen['reference']}) won; no layer or concatenation beat them.")
    elif chosen["difference"] is not None:
        low, high = chosen["difference_ci"]
        lines.append(f"**{chosen['winner']}** won: {chosen['winner_head']} at {chosen['winner_accuracy'] * 100:.2f} % "
                     f"against {chosen['reference_accuracy'] * 100:.2f} % for the default features "
                     f"({chosen['reference']} + {chosen['reference_head']}): **{chosen['difference'] * 100:+.2f} "
                     f"points** [{low * 100:+.2f}, {high * 100:+.2f}], paired on the {len(comparison.y_scored)} "
                     "scored rows.")
    else:
        dropped = chosen["reference_dropped"]
        lines.append(f"**{chosen['winner']}** won ({chosen['winner_head']}, {chosen['winner_accuracy'] * 100:.2f} %). "
                     f"No head on the default features ({chosen['reference']}) reached the test rows"
                     + (f": the race dropped them on held-out training rows — the best, {dropped['head']}: "
                        f"{dropped['reason']}." if dropped else "."))
    lines += ["", f"{chosen['candidates']} candidates — the default features, every stored layer and the "
              f"best-ranked ones side by side ({', '.join(chosen['concat']) or 'none'}) — were ranked by "
              f"{ranking['rank_by']} on {ranking['rows_scored']} training rows (never the test rows) in "
              f"{chosen['rank_seconds']:.0f} s of the budget; heads ran on {', '.join(chosen['ran'])}. Every "
              "candidate's scores and cost are in the Representations section.", ""]
    return lines


def _selection_section(comparison: Comparison) -> list[str]:
    curve = comparison.curve
    ks = [k for k in curve["shots"] if k != "all"]
    n_classes = len(comparison.classes)
    point = {(r["representation"], r["head"], r["selection"], r["shots"]): r for r in curve["rows"]
             if r.get("selection") is not None}
    lines = [
        "## Label selection: learning curves per strategy",
        "",
        f"At k labels per class, each strategy picked k × {n_classes} rows of the training rows without seeing a "
        f"label (in rounds: each budget extends the last; margin's first round is random, it needs labels), for "
        f"each of {len(curve['seeds'])} seeds (seeds {', '.join(map(str, curve['seeds']))}), in the representation "
        "being evaluated; each head was tuned on the picked rows alone (stratified CV with as many folds as the "
        "rarest picked class allows, else its untuned default, marked *). "
        f"Scored on {curve['scored']}. Accuracy %: mean over seeds [95 % CI, bootstrap over seeds and scored rows]; "
        "the gain over random on the same seeds and rows in points [95 % CI]; classes: the classes the picks "
        f"covered (mean over seeds, of {n_classes}). Took {curve['seconds']:.0f} s.",
        "",
    ]
    for rep, head in selection_pairs(comparison):
        lines += [f"**{rep} + {head}**", "",
                  "| strategy | " + " | ".join(f"{k} per class ({k * n_classes})" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for strategy in curve["selection"]:
            cells = []
            for k in ks:
                r = point.get((rep, head, strategy, k))
                if r is None or r["accuracy"] is None:
                    cells.append("–")
                    continue
                text = f"{r['accuracy'] * 100:.1f} [{r['accuracy_ci'][0] * 100:.1f}, {r['accuracy_ci'][1] * 100:.1f}]"
                text += "*" if r["untuned"] else ""
                if r.get("gain_vs_random") is not None:
                    gain = (f"{r['gain_vs_random'] * 100:+.1f} [{r['gain_ci'][0] * 100:+.1f}, "
                            f"{r['gain_ci'][1] * 100:+.1f}]")
                    text += f"<br>{'**' + gain + '**' if r['gain_ci'][0] > 0 else gain}"
                text += f"<br>classes {sum(r['classes_covered']) / len(r['classes_covered']):.1f}"
                cells.append(text)
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines.append("")
    verdicts = selection_verdicts(curve["rows"])
    lines += [f"- {v}" for v in verdicts] + ([""] if verdicts else [])
    lines += [f"- {r['head']} on {r['representation']}, {r['error']}" if r.get("head") else f"- {r['error']}"
              for r in curve["rows"] if r["accuracy"] is None]
    return [*lines, "", "![label selection](learning_curve.png)", ""]


def _curve_section(comparison: Comparison) -> list[str]:
    curve = comparison.curve
    if curve is None or not curve["rows"]:
        return []
    if curve.get("selection"):
        return _selection_section(comparison)
    ks = [k for k in curve["shots"] if k != "all"]
    with_all = "all" in curve["shots"]
    full = {(r["representation"], r["head"]): r for r in comparison.rows}
    point = {(r["representation"], r["head"], r["shots"]): r for r in curve["rows"]}
    n_fit = fit_rows(comparison)
    lines = [
        "## Learning curve",
        "",
        f"Every head trained on k labelled rows per class, drawn {len(curve['seeds'])} times (seeds "
        f"{', '.join(map(str, curve['seeds']))}); the draws are the same for every head and representation and "
        "nested across k (each seed's 2-shot draw holds its 1-shot draw). Settings tuned by stratified CV on the "
        "drawn rows alone (min(k, folds) folds); at k = 1 each head runs its untuned default (marked *). "
        f"Scored on {curve['scored']}. Accuracy %: mean over seeds [95 % CI, bootstrap over seeds and scored "
        "rows]; **bold**: the best at that k; ≈: not distinguishable from it (exact McNemar test on the pooled "
        f"predictions, p ≥ 0.05). Took {curve['seconds']:.0f} s."
        + (f" The `all` column is the leaderboard ({n_fit} fit rows, about {n_fit / len(comparison.classes):.0f} "
           "per class)." if with_all else ""),
        "",
        "| representation | head | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in ks)
        + (" | all |" if with_all else " |"),
        "|---|---|" + "---|" * (len(ks) + with_all),
    ]
    for key in curve_lines(comparison):
        cells = []
        for k in ks:
            r = point[(*key, k)]
            if r["accuracy"] is None:
                cells.append("–")
                continue
            text = f"{r['accuracy'] * 100:.1f} [{r['accuracy_ci'][0] * 100:.1f}, {r['accuracy_ci'][1] * 100:.1f}]"
            text += "*" if r["untuned"] else ""
            cells.append(f"**{text}**" if r["best"] else text + (" ≈" if r["p_value_vs_best"] >= 0.05 else ""))
        if with_all:
            cells.append(format_ci(full[key]) if key in full else "–")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {r['head']}" + (f" on {r['representation']}" if len({x['representation'] for x in
                                                                                  curve['rows']}) > 1 else "")
                    + f", {r['error']}" for r in curve["rows"] if r["accuracy"] is None]]
    return [*lines, "", "![learning curve](learning_curve.png)", ""]


def _calibration_section(comparison: Comparison) -> list[str]:
    rows = [r for r in comparison.rows if r.get("nll") is not None]
    if not rows:
        return []
    lines = [
        "## Calibration",
        "",
        "How far each head's probabilities can be trusted, on the scored rows: NLL (log-loss), Brier score (mean "
        f"squared distance to the one-hot label) and ECE ({ECE_BINS} equal-width bins of the top-label confidence, "
        "L1), with 95 % bootstrap CIs; before → after calibration. Calibrators are fitted on out-of-fold "
        "predictions of the training rows, never on the scored rows; heads without probabilities are scored "
        "from a softmax of their decision scores (before: temperature 1).",
        "",
        "| representation | head | calibration | temperature | NLL | Brier | ECE % |",
        "|---|---|---|---:|---|---|---|",
    ]
    for r in rows:
        before = r["before_calibration"] or {}
        changed = r["calibration"] != "none"

        def cell(metric: str, scale: float = 1.0, digits: int = 3) -> str:
            low, high = r[f"{metric}_ci"]
            now = f"{r[metric] * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
            return f"{before[metric] * scale:.{digits}f} → {now}" if changed and metric in before else now

        temperature = f"{r['temperature']:.3g}" if r.get("temperature") else "–"
        lines.append(f"| {r['representation']} | {r['head']} | {r['calibration']} | {temperature} | {cell('nll')} | "
                     f"{cell('brier')} | {cell('ece', 100, 2)} |")
    return [*lines, "", "![reliability diagram of the winner](reliability_diagram.png)", ""]


def protocol_lines(comparison: Comparison) -> list[str]:
    """The data and protocol of a comparison, one Markdown line each (the report's list)."""
    return [
        *[f"store `{s.path}`: backbone {s.attrs.get('backbone')}, weights {s.attrs.get('weights_source')}, "
          f"config hash `{str(s.attrs.get('config_hash'))[:12]}`" for s in comparison.stores],
        f"classes: {len(comparison.classes)}; rows used: {int(comparison.usable.sum())}; left out: "
        f"{comparison.excluded_failed} failed in at least one store, {comparison.excluded_unlabeled} unlabeled",
        f"protocol: {comparison.plan.description}; seed {comparison.plan.seed}",
        "probabilities: " + ", ".join(sorted({f"{r['head']}: {r['calibration']}" for r in comparison.rows
                                               if r.get("calibration") not in (None, "none")}) or ["uncalibrated"])
        + " (calibrated on out-of-fold predictions of the training rows; see Calibration)",
        f"uncertainty: 95 % percentile bootstrap over the {len(comparison.y_scored)} scored rows; "
        "p-value: exact McNemar test against the winner on the same rows; "
        "rows with p ≥ 0.05 are not distinguishable from the winner (marked ≈)",
    ]


def twin_warning(check: dict) -> str:
    """The one line compare-heads prints (and report.md repeats) when the quick feature check finds too many
    scored rows with a near-identical twin among their head's fit rows."""
    return (f"warning: {check['twinned']} of {check['scored']} scored rows ({check['share'] * 100:.1f} %) have a "
            f"near-identical twin (feature cosine >= {check['threshold']:.4g}) among the rows their head was fitted "
            "on, and heads that memorise are rewarded for them: find every near-duplicate with `python cli.py audit "
            "STORE --out DIR` and score without them with --exclude-duplicates DIR")


def _duplicates_section(comparison: Comparison) -> list[str]:
    check = comparison.twin_check
    if check and check.get("warn"):
        line = twin_warning(check)[len("warning: "):]
        return ["## Near-duplicates", "", line[0].upper() + line[1:] + ".", ""]
    d = comparison.duplicates
    if not d:
        return []
    lines = ["## Near-duplicates (--exclude-duplicates)", "",
             f"{d['twinned']} of the {d['scored']} scored rows have a near-duplicate among the rows their head was "
             f"fitted on (by the audit in {d['audit']}: {d['pairs']} pairs). A head that memorises is rewarded for "
             "them; the accuracy without them is the one to trust.", "",
             "| representation | head | accuracy % [95 % CI] | without the twinned rows % [95 % CI] |",
             "|---|---|---:|---:|"]
    for r in comparison.rows:
        if r.get("accuracy_without_twins") is None:
            continue
        low, high = r["accuracy_without_twins_ci"]
        lines.append(f"| {r['representation']} | {r['head']} | {format_ci(r)} | "
                     f"{r['accuracy_without_twins'] * 100:.2f} [{low * 100:.1f}, {high * 100:.1f}] |")
    return lines + [""]


def markdown_sections(comparison: Comparison) -> list[str]:
    """The report's sections after the leaderboard, as Markdown: learning curve, calibration, representations,
    cost and budget (their plots are referenced as PNG files)."""
    return [*_duplicates_section(comparison), *_representation_section(comparison), *_finetune_section(comparison), *_curve_section(comparison), *_calibration_section(comparison),
            *ranking_markdown(comparison), *_cost_section(comparison)]


def _finetune_section(comparison: Comparison) -> list[str]:
    """Fine-tuned runs (``--include``) against the best frozen head on the same test rows."""
    runs = [r for r in comparison.rows if r.get("vs_best_frozen")]
    if not runs:
        return []
    lines = ["## Fine-tuning vs frozen features", "",
             "Each fine-tuned run against the best frozen head, paired on the same test rows: the accuracy "
             "difference with a bootstrap 95 % CI over the rows, the exact McNemar p-value, and what it cost.", "",
             "| run | head | what trained | accuracy % [95 % CI] | vs best frozen head | difference, points [95 % CI] "
             "| p | parameters trained | seconds | device |",
             "|---|---|---|---|---|---|---:|---:|---:|---|"]
    for r in runs:
        v = r["vs_best_frozen"]
        low, high = v["difference_ci"]
        lines.append(f"| {r['representation']} | {r['head']} | {r['method']} | {format_ci(r)} | "
                     f"{v['representation']} + {v['head']} | {v['difference'] * 100:+.2f} [{low * 100:+.2f}, "
                     f"{high * 100:+.2f}] | {v['p_value']:.3g} | {r['trained_params']:,} | {r['fit_seconds']:.0f} | "
                     f"{r['device']} |")
    return lines + [""]


def _markdown(comparison: Comparison) -> str:
    best = comparison.best
    lines = [
        "# compare-heads report" + (f": task {comparison.task}" if len(comparison.stores[0].task_names) > 1 else ""),
        "",
        f"**Winner:** {best['representation']} + {best['head']} (`{json.dumps(best['params'], sort_keys=True)}`), "
        f"accuracy {format_ci(best)} %.",
        "",
        "## Data and protocol",
        "",
        *[f"- {line}" for line in protocol_lines(comparison)],
        "",
        "## Leaderboard",
        "",
        "| rank | representation | head | accuracy % [95 % CI] | balanced acc. % | macro-F1 % | top-5 % | log-loss "
        "| ECE % | fit s | predict µs/sample | p vs best | params |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in comparison.rows:
        top5 = f"{r['top5_accuracy'] * 100:.2f}" if r["top5_accuracy"] is not None else "–"
        loss = f"{r['log_loss']:.3f}" if r["log_loss"] is not None else "–"
        ece = f"{r['ece'] * 100:.2f}" if r.get("ece") is not None else "–"
        mark = " ≈" if r["tied_with_best"] and r["rank"] > 1 else ""
        lines.append(
            f"| {r['rank']} | {r['representation']} | {r['head']} | {format_ci(r)}{mark} | "
            f"{r['balanced_accuracy'] * 100:.2f} | {r['macro_f1'] * 100:.2f} | {top5} | {loss} | {ece} | "
            f"{r['fit_seconds']:.3f} | {r['predict_us_per_sample']:.1f} | "
            f"{'best' if r['rank'] == 1 else format(r['p_value_vs_best'], '.3g')} | "
            f"`{json.dumps(r['params'], sort_keys=True)}` |"
        )
    lines += ["", *markdown_sections(comparison)]
    lines += [
        "## Plots",
        "",
        "![accuracy vs fit time](accuracy_vs_fit_time.png)",
        "",
        "![confusion matrix of the winner](confusion_matrix.png)",
        "",
    ]
    return "\n".join(lines)


def prediction_file_name(representation: str, head: str) -> str:
    """``<candidate>__<head>.csv``: the representation's display name (backbone[:layer]) with characters unsafe
    in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{representation}__{head}") + ".csv"


def write_predictions(comparison: Comparison, out_dir: Path) -> list[Path]:
    """``out_dir/predictions/<candidate>__<head>.csv`` per leaderboard row (:func:`write_prediction_csv`: the
    probabilities the metrics were computed from, where the head has them) for every scored row, in the
    protocol's order."""
    folder = out_dir / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    ids = comparison.stores[0].ids[comparison.usable][comparison.plan.scored]
    written = []
    for r in comparison.rows:
        key = (r["representation"], r["head"])
        written.append(write_prediction_csv(folder / prediction_file_name(*key), ids, comparison.classes,
                                            comparison.y_scored, comparison.predictions[key],
                                            comparison.runs[key].get("proba")))
    return written


def write_results(comparison: Comparison, out_dir: str | Path, *, predictions: bool = False,
                  command: str | None = None) -> list[Path]:
    """Write results.json, results.csv, report.md, report.html (self-contained; `command` is the command line
    it shows), accuracy_vs_fit_time.png and confusion_matrix.png (and reliability_diagram.png,
    learning_curve.png, predictions/ when there is something to show)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": comparison.task,
        "protocol": comparison.plan.kind,
        "protocol_description": comparison.plan.description,
        "folds": comparison.plan.folds,
        "seed": comparison.plan.seed,
        "classes": comparison.classes,
        "rows_used": int(comparison.usable.sum()),
        "excluded_failed": comparison.excluded_failed,
        "excluded_unlabeled": comparison.excluded_unlabeled,
        "n_scored": int(len(comparison.y_scored)),
        "stores": [str(s.path) for s in comparison.stores],
        "budget_seconds": comparison.budget_seconds,
        "seconds": comparison.seconds,
        "parallel": comparison.parallel,
        "skipped": comparison.skipped,
        "candidates": [{"candidate": c.name, "store": str(c.store.path), "layer": c.layer} for c in comparison.candidates],
        "ranking": comparison.ranking,
        "units": comparison.units,
        "representation": comparison.representation,
        "duplicates": comparison.duplicates,
        "twin_check": comparison.twin_check,
        "learning_curve": None if comparison.curve is None else {
            k: comparison.curve.get(k) for k in ("shots", "seeds", "scored", "seconds", "selection")},
    }
    written = [out / name for name in
               ("results.json", "results.csv", "report.md", "accuracy_vs_fit_time.png", "confusion_matrix.png")]
    document = {"rows": comparison.rows, "meta": meta}
    if comparison.curve is not None:
        document["learning_curve"] = curve_rows(comparison)
    written[0].write_text(json.dumps(document, indent=2))
    with open(written[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in comparison.rows:
            writer.writerow({
                **{k: r[k] for k in CSV_FIELDS if k in r},
                "accuracy_ci_low": r["accuracy_ci"][0],
                "accuracy_ci_high": r["accuracy_ci"][1],
                "params": json.dumps(r["params"], sort_keys=True),
            })
    written[2].write_text(_markdown(comparison))
    plot_accuracy_vs_fit_time(comparison, written[3])
    plot_confusion(comparison, written[4])
    if comparison.best.get("nll") is not None:
        written.append(out / "reliability_diagram.png")
        plot_reliability(comparison, written[-1])
    if comparison.curve is not None and comparison.curve["rows"]:
        written.append(out / "learning_curve.png")
        plot_learning_curve(comparison, written[-1])
    if predictions:
        written.append(out / "predictions")
        write_predictions(comparison, out)
    written.append(write_html(comparison, out / "report.html", command=command, sections=markdown_sections(comparison),
                              protocol=protocol_lines(comparison)))
    return written


def write_task_summary(comparisons: list[Comparison], out_dir: str | Path) -> list[Path]:
    """For ``--task all``: results.json with every task's rows (each names its task) and meta, and report.md
    with each task's winner and a link to its own report (``TASK/report.md``, from :func:`write_results`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = {"tasks": [c.task for c in comparisons], "rows": [r for c in comparisons for r in c.rows],
                "meta": {c.task: {"classes": c.classes, "rows_used": int(c.usable.sum()),
                                  "excluded_unlabeled": c.excluded_unlabeled, "n_scored": int(len(c.y_scored)),
                                  "protocol_description": c.plan.description, "seconds": c.seconds}
                         for c in comparisons}}
    lines = ["# compare-heads report: every task", "",
             f"Stores: {', '.join(f'`{s.path}`' for s in comparisons[0].stores)}. One leaderboard per label set, "
             "each under the same protocol on the rows labelled for it.", "",
             "| task | classes | rows used | winner | accuracy % [95 % CI] | report |", "|---|---:|---:|---|---|---|"]
    for c in comparisons:
        best = c.best
        lines.append(f"| {c.task} | {len(c.classes)} | {int(c.usable.sum())} | {best['representation']} + "
                     f"{best['head']} | {format_ci(best)} | [{c.task}/report.md]({c.task}/report.md) |")
    written = [out / "results.json", out / "report.md"]
    written[0].write_text(json.dumps(document, indent=2))
    written[1].write_text("\n".join(lines + [""]))
    return written
