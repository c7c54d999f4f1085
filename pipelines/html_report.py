"""report.html: the comparison as one self-contained page -- plots inline as SVG, no network, no external files,
readable at phone width -- rendered from a Jinja2 template (pipelines/templates/report.html)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.compare import Comparison
from pipelines.pages import render_page
from pipelines.plots import plot_accuracy_vs_fit_time, plot_confusion, plot_learning_curve, plot_reliability
from pipelines.scoring import format_ci

__all__ = ["write_html", "inline_svg"]

_COLUMNS = [("rank", True), ("representation", False), ("head", False), ("accuracy %", True), ("95 % CI", True),
            ("balanced acc. %", True), ("macro-F1 %", True), ("ECE %", True), ("fit s", True),
            ("predict µs/sample", True), ("p vs best", True), ("params", False)]
_PROVENANCE = ("backbone", "weights_source", "weights_sha256", "precision", "runtime", "pooling", "data_config",
               "decode", "device", "config_hash", "dataset_fingerprint", "source", "library_versions", "created")


def inline_svg(plot: Callable, comparison: Comparison, prefix: str) -> str:
    """A report plot as an SVG element to inline: no XML prolog, no fixed size (it scales to the page), and its
    ids prefixed so that several plots on one page never share one (clip paths, glyphs)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": prefix}):
        plot(comparison, buffer, fmt="svg")
    text = buffer.getvalue().decode("utf-8")
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    head_end = text.index(">")
    head = re.sub(r'\s(width|height)="[^"]*"', "", text[:head_end])
    text = head + text[head_end:]
    text = re.sub(r'\sid="([^"]+)"', rf' id="{prefix}-\1"', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', text)
    return re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)


def _markdown_html(text: str) -> str:
    import markdown

    html = markdown.markdown(text, extensions=["tables"])
    return html.replace("<table>", '<div class="scroll"><table>').replace("</table>", "</table></div>")


def _number(value: float | None, scale: float = 100.0, digits: int = 2) -> tuple[float, str]:
    if value is None:
        return float("nan"), "–"
    return float(value), f"{value * scale:.{digits}f}"


def _leaderboard(comparison: Comparison) -> list[dict[str, Any]]:
    rows = comparison.rows
    low = min(r["accuracy_ci"][0] for r in rows)
    high = max(r["accuracy_ci"][1] for r in rows)
    span = (high - low) or 1.0
    out = []
    for r in rows:
        balanced, balanced_text = _number(r["balanced_accuracy"])
        macro, macro_text = _number(r["macro_f1"])
        ece, ece_text = _number(r.get("ece"))
        out.append({
            "rank": r["rank"], "representation": r["representation"], "head": r["head"],
            "accuracy": r["accuracy"], "accuracy_text": f"{r['accuracy'] * 100:.2f}",
            "ci_text": format_ci(r), "tie": bool(r["tied_with_best"] and r["rank"] > 1),
            "ci_left": round((r["accuracy_ci"][0] - low) / span * 100, 2),
            "ci_width": round(max((r["accuracy_ci"][1] - r["accuracy_ci"][0]) / span * 100, 0.5), 2),
            "ci_mark": round((r["accuracy"] - low) / span * 100 - 1, 2),
            "balanced": balanced, "balanced_text": balanced_text, "macro_f1": macro, "macro_f1_text": macro_text,
            "ece": ece, "ece_text": ece_text,
            "fit_seconds": r["fit_seconds"], "fit_text": f"{r['fit_seconds']:.3f}",
            "predict_us": r["predict_us_per_sample"], "predict_text": f"{r['predict_us_per_sample']:.1f}",
            "p_value": r["p_value_vs_best"], "p_text": "best" if r["rank"] == 1 else f"{r['p_value_vs_best']:.3g}",
            "params_json": json.dumps(r["params"], sort_keys=True),
        })
    return out


def _per_class(comparison: Comparison) -> list[dict[str, Any]]:
    from sklearn.metrics import confusion_matrix

    best = comparison.best
    n = len(comparison.classes)
    matrix = confusion_matrix(comparison.y_scored, comparison.predictions[(best["representation"], best["head"])],
                              labels=list(range(n)))
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, precision = np.diag(matrix) / support, np.diag(matrix) / predicted
    return [{"name": name, "support": int(support[i]),
             "recall": "–" if support[i] == 0 else f"{recall[i] * 100:.1f}",
             "precision": "–" if predicted[i] == 0 else f"{precision[i] * 100:.1f}"}
            for i, name in enumerate(comparison.classes)]


def _provenance(comparison: Comparison) -> list[dict[str, Any]]:
    stores = []
    for store in comparison.stores:
        fields = []
        for key in _PROVENANCE:
            value = store.attrs.get(key)
            if value is None:
                continue
            fields.append((key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
        stores.append({"path": str(store.path), "fields": fields})
    return stores


def write_html(comparison: Comparison, path: str | Path, command: str | None = None, *,
               sections: list[str] = (), protocol: list[str] = ()) -> Path:
    """Write `comparison` as one self-contained HTML page at `path` (see the module docstring).

    Args:
        command: the command line the page shows.
        sections: report.md's Markdown sections (:func:`pipelines.report.markdown_sections`), rendered below the
            leaderboard; image lines are left out (the page draws its own plots).
        protocol: the protocol's lines (:func:`pipelines.report.protocol_lines`).
    """
    best = comparison.best
    sections = "\n".join(line for line in sections if not line.startswith("!["))
    figures_top = [{"svg": inline_svg(plot_accuracy_vs_fit_time, comparison, "fit"),
                    "caption": "Accuracy against the fit time of the chosen setting, with 95 % bootstrap CIs."}]
    if comparison.curve is not None and comparison.curve["rows"]:
        figures_top.append({"svg": inline_svg(plot_learning_curve, comparison, "curve"),
                            "caption": "Learning curve: accuracy against labelled rows per class."})
    figures_winner = [{"svg": inline_svg(plot_confusion, comparison, "confusion"),
                       "caption": f"Confusion matrix of the winner on the {len(comparison.y_scored)} scored rows."}]
    if best.get("nll") is not None:
        figures_winner.append({"svg": inline_svg(plot_reliability, comparison, "reliability"),
                               "caption": "Reliability diagram of the winner's probabilities."})
    page = render_page(
        "report.html",
        task=comparison.task if len(comparison.stores[0].task_names) > 1 else None,
        best={**best, "params_json": json.dumps(best["params"], sort_keys=True), "accuracy_text": format_ci(best)},
        command=command or "(not recorded: written from Python)",
        protocol=[_markdown_inline(line) for line in protocol],
        columns=[{"title": title, "num": num} for title, num in _COLUMNS],
        rows=_leaderboard(comparison),
        figures_top=figures_top,
        sections=[_markdown_html(sections)],
        per_class=_per_class(comparison),
        figures_winner=figures_winner,
        stores=_provenance(comparison),
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _markdown_inline(text: str):
    """One Markdown line as safe inline HTML (code spans kept)."""
    import markdown
    from markupsafe import Markup

    html = markdown.markdown(text)
    return Markup(html.removeprefix("<p>").removesuffix("</p>"))
