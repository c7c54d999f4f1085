"""The comparison's plots, used by both report writers: PNG files for report.md (:mod:`pipelines.report`) and
inline SVG for report.html (:mod:`pipelines.html_report`). Each ``plot_*(comparison, path, fmt=None)`` draws
one figure to a path or file object."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from heads.calibration import expected_calibration_error, reliability_bins
from pipelines.compare import Comparison

__all__ = ["plot_accuracy_vs_fit_time", "plot_confusion", "plot_learning_curve", "plot_reliability", "place_labels",
           "curve_rows", "curve_lines", "fit_rows", "selection_pairs", "selection_panel", "CURVE_LINES"]


def plot_accuracy_vs_fit_time(comparison: Comparison, path, fmt: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    representations = list(dict.fromkeys(r["representation"] for r in comparison.rows))
    many = len(representations) > 6  # then the legend goes beside the axes and the labels shrink
    fig, ax = plt.subplots(figsize=(12, 6) if many else (8, 5), dpi=110)
    labels: list[tuple[str, float, float]] = []
    for i, representation in enumerate(representations):
        rows = [r for r in comparison.rows if r["representation"] == representation]
        x = [max(r["fit_seconds"], 1e-4) for r in rows]
        y = [r["accuracy"] * 100 for r in rows]
        err = [[(r["accuracy"] - r["accuracy_ci"][0]) * 100 for r in rows],
               [(r["accuracy_ci"][1] - r["accuracy"]) * 100 for r in rows]]
        ax.errorbar(x, y, yerr=err, fmt="os^Dv<>ph*"[i // 10 % 10], capsize=3, label=representation,
                    color=f"C{i % 10}")
        labels += [(r["head"], xi, yi) for r, xi, yi in zip(rows, x, y)]
    ax.set_xscale("log")
    # whole decades, labelled at the decades only: matplotlib labels minor ticks (2x10^-2, 3x10^-2, ...) when the
    # times span less than a decade or two, and neighbouring ones can overlap
    from matplotlib.ticker import NullFormatter

    span = np.log10([x for _, x, _ in labels])
    first, last = math.floor(span.min() - 0.1), math.ceil(span.max() + 0.1)
    ax.set_xlim(10.0 ** first, 10.0 ** max(last, first + 1))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("fit time of the chosen setting (s, log scale)")
    ax.set_ylabel("test accuracy (%) with 95% bootstrap CI")
    ax.set_title("accuracy vs fit time")
    ax.grid(True, alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    place_labels(ax, labels, fontsize=6 if many else 8)
    fig.savefig(path, format=fmt)
    plt.close(fig)


# Where a point's label may go, in points from the point: right and up first, then around it, then further out.
_LABEL_OFFSETS = [(5, 4), (5, -10), (-5, 4), (-5, -10), (0, 8), (0, -14), (12, 12), (12, -18), (-12, 12),
                  (-12, -18), (20, 0), (-20, 0), (0, 22), (0, -26)]


def place_labels(ax, labels: list[tuple[str, float, float]], fontsize: float = 8) -> None:
    """Annotate points with text that overlaps neither other labels nor the legend and stays inside the axes:
    each label takes the first offset (:data:`_LABEL_OFFSETS`) whose box is free, else the least crowded one."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    taken = []
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    for text, x, y in sorted(labels, key=lambda item: (item[1], -item[2])):
        best, best_overlap = None, None
        for dx, dy in _LABEL_OFFSETS:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, ha=ha)
            box = note.get_window_extent(renderer).expanded(1.05, 1.15)
            overlap = sum(max(0.0, min(box.x1, t.x1) - max(box.x0, t.x0)) * max(0.0, min(box.y1, t.y1) - max(box.y0, t.y0))
                          for t in taken)
            inside = ax.get_window_extent(renderer).contains(box.x0, box.y0) and \
                ax.get_window_extent(renderer).contains(box.x1, box.y1)
            overlap += 0.0 if inside else box.width * box.height
            if best is None or overlap < best_overlap:
                if best is not None:
                    best[0].remove()
                best, best_overlap = (note, box), overlap
            else:
                note.remove()
            if overlap == 0.0:
                break
        taken.append(best[1])


def plot_confusion(comparison: Comparison, path, fmt: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    best = comparison.best
    y_pred = comparison.predictions[(best["representation"], best["head"])]
    n = len(comparison.classes)
    size = min(4 + 0.4 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ConfusionMatrixDisplay.from_predictions(
        comparison.y_scored, y_pred, labels=list(range(n)), display_labels=comparison.classes, ax=ax,
        colorbar=False, include_values=n <= 30, xticks_rotation="vertical" if n > 10 else "horizontal",
    )
    ax.set_title(f"winner: {best['representation']} + {best['head']}")
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    plt.close(fig)


CURVE_LINES = 5  # learning_curve.png draws this many representation x head lines, the best at the most shots


def curve_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """The learning curve's rows for results.json: one per (representation, head, k) and, when ``all`` was asked
    for, the plain comparison's rows as the ``shots: "all"`` points (one seed: the protocol's)."""
    curve = comparison.curve
    if curve is None:
        return []
    rows = list(curve["rows"])
    if "all" in curve["shots"]:
        for r in comparison.rows:
            rows.append({"representation": r["representation"], "backbone": r["backbone"], "head": r["head"],
                         "shots": "all", "seeds": [comparison.plan.seed], "accuracy": r["accuracy"],
                         "accuracy_ci": r["accuracy_ci"], "accuracy_per_seed": [r["accuracy"]], "untuned": False,
                         "params_per_seed": [r["params"]], "n_scored": r["n_scored"], "best": r["rank"] == 1,
                         "p_value_vs_best": r["p_value_vs_best"]})
    return rows


def fit_rows(comparison: Comparison) -> int:
    """Rows the plain comparison fits on: the curve's ``all`` point (holdout: the non-test rows)."""
    return len(comparison.plan.final.fit) if comparison.plan.kind == "holdout" else int(comparison.usable.sum())


def curve_lines(comparison: Comparison) -> list[tuple[str, str]]:
    """(representation, head) of the curve's lines, best first at the largest k."""
    rows = [r for r in comparison.curve["rows"] if r["accuracy"] is not None]
    largest = max(r["shots"] for r in rows)
    at_largest = sorted((r for r in rows if r["shots"] == largest), key=lambda r: -r["accuracy"])
    return [(r["representation"], r["head"]) for r in at_largest]


def plot_learning_curve(comparison: Comparison, path, fmt: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = comparison.curve
    if curve.get("selection"):
        _plot_selection_curve(comparison, path, fmt)
        return
    ks = [k for k in curve["shots"] if k != "all"]
    n_fit = fit_rows(comparison)
    per_class_all = n_fit / len(comparison.classes)
    full = {(r["representation"], r["head"]): r for r in comparison.rows}
    point = {(r["representation"], r["head"], r["shots"]): r for r in curve["rows"]}
    several = len({r["representation"] for r in curve["rows"]}) > 1
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, key in enumerate(curve_lines(comparison)[:CURVE_LINES]):
        drawn = [k for k in ks if point[(*key, k)]["accuracy"] is not None]
        rows = [point[(*key, k)] for k in drawn]
        mean = [r["accuracy"] * 100 for r in rows]
        label = f"{key[0]} + {key[1]}" if several else key[1]
        ax.plot(drawn, mean, marker="o", color=f"C{i}", label=label)
        ax.fill_between(drawn, [r["accuracy_ci"][0] * 100 for r in rows], [r["accuracy_ci"][1] * 100 for r in rows],
                        color=f"C{i}", alpha=0.15)
        if "all" in curve["shots"] and key in full:
            r = full[key]
            ax.errorbar([per_class_all], [r["accuracy"] * 100],
                        yerr=[[(r["accuracy"] - r["accuracy_ci"][0]) * 100], [(r["accuracy_ci"][1] - r["accuracy"]) * 100]],
                        fmt="s", color=f"C{i}", capsize=3)
            ax.plot([drawn[-1], per_class_all], [mean[-1], r["accuracy"] * 100], linestyle=":", color=f"C{i}")
    ticks = ks + ([per_class_all] if "all" in curve["shots"] else [])
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(k) for k in ks] + ([f"all\n({per_class_all:.0f})"] if "all" in curve["shots"] else []))
    ax.minorticks_off()
    ax.set_xlabel("labelled rows per class (log scale)")
    ax.set_ylabel(f"accuracy (%), mean of {len(curve['seeds'])} draws, 95% CI")
    ax.set_title("learning curve")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    plt.close(fig)


SELECTION_PANELS = 4  # learning_curve.png with --selection: one panel per representation x head, this many at most


def selection_pairs(comparison: Comparison) -> list[tuple[str, str]]:
    """(representation, head) of a selection curve, best first by random's (else any strategy's) accuracy at the
    largest number of labels per class."""
    rows = [r for r in comparison.curve["rows"] if r["accuracy"] is not None]
    largest = max(r["shots"] for r in rows)
    reference = "random" if "random" in comparison.curve["selection"] else comparison.curve["selection"][0]
    best = {}
    for r in rows:
        if r["shots"] == largest and r["selection"] == reference:
            best[(r["representation"], r["head"])] = r["accuracy"]
    pairs = list(dict.fromkeys((r["representation"], r["head"]) for r in rows))
    return sorted(pairs, key=lambda pair: -best.get(pair, 0.0))


def selection_panel(ax, rows: list[dict[str, Any]], strategies: list[str], n_classes: int, n_seeds: int) -> None:
    """One representation x head of a selection curve on `ax`: a line per strategy with its CI band (random
    dashed black), labels per class on a log axis with the total budget under each. `rows`: its curve rows."""
    ks = sorted({r["shots"] for r in rows})
    for i, strategy in enumerate(strategies):
        points = sorted((r for r in rows if r["selection"] == strategy and r["accuracy"] is not None),
                        key=lambda r: r["shots"])
        if not points:
            continue
        x = [r["shots"] for r in points]
        style = {"color": "black", "linestyle": "--"} if strategy == "random" else {"color": f"C{i}"}
        ax.plot(x, [r["accuracy"] * 100 for r in points], marker="o", label=strategy, **style)
        ax.fill_between(x, [r["accuracy_ci"][0] * 100 for r in points], [r["accuracy_ci"][1] * 100 for r in points],
                        color=style["color"], alpha=0.12)
    ax.set_xscale("log")
    ax.set_xticks(ks, [f"{k}\n({k * n_classes})" for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("labels per class (total budget)")
    ax.set_ylabel(f"accuracy (%), mean of {n_seeds} seeds, 95% CI")
    ax.grid(True, alpha=0.3)


def _plot_selection_curve(comparison: Comparison, path, fmt: str | None) -> None:
    import matplotlib.pyplot as plt

    curve = comparison.curve
    pairs = selection_pairs(comparison)[:SELECTION_PANELS]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 4.8), dpi=110, squeeze=False)
    for ax, (rep, head) in zip(axes[0], pairs):
        rows = [r for r in curve["rows"] if (r["representation"], r["head"]) == (rep, head)]
        selection_panel(ax, rows, curve["selection"], len(comparison.classes), len(curve["seeds"]))
        ax.set_title(f"{rep} + {head}" if len(pairs) > 1 else f"label selection: {head} on {rep}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    plt.close(fig)


def plot_reliability(comparison: Comparison, path, fmt: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = comparison.best
    run = comparison.runs[(best["representation"], best["head"])]
    y = comparison.y_scored
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    curves = [("before", run["proba_before"], "C1"), ("after", run["proba"], "C0")]
    if best["calibration"] == "none":
        curves = [("no calibration", run["proba"], "C0")]
    for name, proba, color in curves:
        confidence, accuracy, _ = reliability_bins(y, proba)
        ax.plot(confidence, accuracy, marker="o", color=color,
                label=f"{name}: ECE {expected_calibration_error(y, proba) * 100:.2f} %")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted class (mean per bin)")
    ax.set_ylabel("accuracy (per bin)")
    ax.set_title(f"reliability: {best['representation']} + {best['head']} ({best['calibration']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    plt.close(fig)
