"""audit.html: what an audit found, as one self-contained page -- the worst near-duplicate pairs, label issues and
outliers with their images inline (when the store's source images are reachable), counts per split and class --
rendered from a Jinja2 template (pipelines/templates/audit.html) with report.html's look."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable

__all__ = ["write_audit_html", "picture_uri", "SHOWN_PAIRS", "SHOWN_ISSUES", "SHOWN_OUTLIERS"]

SHOWN_PAIRS = 30  # near-duplicate pairs on the page (cross-split first); all of them are in duplicates.csv
SHOWN_ISSUES = 30  # flagged label issues on the page, worst first
SHOWN_OUTLIERS = 20
PICTURE = 96  # longest side of an inline picture, in pixels


def picture_uri(image) -> str:
    """A PIL image as a small inline ``data:`` URI: at most :data:`PICTURE` pixels a side (never enlarged; the page
    scales small ones up without smoothing), PNG for small images, JPEG for photographs."""
    from PIL import Image

    image = image.copy() if image.mode in ("RGB", "L") else image.convert("RGB")
    image.thumbnail((PICTURE, PICTURE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small = max(image.size) <= 64
    image.save(buffer, format="PNG" if small else "JPEG", **({} if small else {"quality": 85}))
    kind = "png" if small else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _shown_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cross_first = sorted(pairs, key=lambda p: p["split_a"] == p["split_b"])  # stable: most similar first in each
    return [{**p, "cross": p["split_a"] != p["split_b"]} for p in cross_first[:SHOWN_PAIRS]]


def write_audit_html(summary: dict[str, Any], pairs: list[dict[str, Any]], issues: list[dict[str, Any]] | None,
                     outliers: list[dict[str, Any]], path: str | Path,
                     picture: Callable[[str], Any | None] | None = None) -> Path:
    """Render the audit as `path` (written atomically).

    Args:
        summary: audit.json's content (``duplicates``, ``label_issues``, ``outliers``, ``counts``, ``notes``).
        pairs, issues, outliers: all rows of duplicates.csv, label_issues.csv (None without labels) and
            outliers.csv, as dicts, in their files' order.
        picture: id -> PIL image of that row (or None when it cannot be read); None when the images are not at
            hand (the page then shows the ids alone).
    """
    from featurize.store import write_atomic
    from pipelines.pages import render_page

    def uri(row_id: str) -> str | None:
        if picture is None:
            return None
        try:
            image = picture(row_id)
        except Exception:  # unreadable now: the page says "no image" for it, the audit itself stands
            return None
        return None if image is None else picture_uri(image)

    d, rule = summary["duplicates"], summary["duplicates"]["rule"]
    shown_pairs = [{**p, "img_a": uri(p["id_a"]), "img_b": uri(p["id_b"])} for p in _shown_pairs(pairs)]
    shown_issues = None if issues is None else \
        [{**r, "img": uri(r["id"])} for r in [r for r in issues if r["issue"]][:SHOWN_ISSUES]]
    shown_outliers = [{**r, "img": uri(r["id"])} for r in outliers[:SHOWN_OUTLIERS]]
    recall = ", ".join(f"{k} {v:.2f}" for k, v in sorted(rule.get("recall_by_kind", {}).items()))
    rule_text = (f"A pair is a near-duplicate at feature cosine ≥ {rule['threshold']:.3f}"
                 + (f" and pixel similarity ≥ {rule['min_pixel']:.3f}" if rule.get("min_pixel") is not None else "")
                 + (f", calibrated on copies of {rule['sample']} images: recall {rule['recall']:.2f} ({recall}), "
                    f"{rule['false_match_rate'] * 100:.1f} % of {rule['others']} other images pass."
                    if rule.get("calibrated") else
                    " (given, not calibrated)." if rule.get("user_threshold") else " (the uncalibrated default)."))
    li = summary.get("label_issues")
    lines = [f"{d['pairs']} near-duplicate pairs in {d['clusters']} clusters, {d['cross_split']} of them across "
             "splits.",
             f"{d['test_with_twin']} of the {d['test_rows']} test rows have a near-duplicate outside the test split."
             if d["test_rows"] else "No test split: no test row can leak.",
             f"{li['count']} label issues." if li else "No label issues looked for.",
             f"{summary['outliers']['count']} outliers."]
    page = render_page(
        "audit.html", store_name=Path(summary["store"]).name, representation=summary["representation"], task=summary["task"],
        rows=summary["rows"], labelled=summary["labelled"], summary=lines, notes=summary.get("notes", []),
        splits=summary["counts"]["splits"], classes=summary["counts"]["classes"], rule=rule_text,
        pairs=shown_pairs, issues=shown_issues, issues_method=_sentence(li["method"]) if li else "",
        issues_why="the task has no labels, or --no-labels was given." if li is None else "",
        outliers=shown_outliers, outliers_method=_sentence(summary["outliers"]["score"]))

    def write(tmp: Path) -> None:
        tmp.write_text(page, encoding="utf-8")

    return write_atomic(Path(path), write)
