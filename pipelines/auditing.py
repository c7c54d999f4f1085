"""audit: is the evaluation honest, and are the labels right? Near-duplicates within and across splits, label
issues and outliers of one store (:mod:`heads.audit` does the arithmetic), written as CSV and JSON.

Near-duplicate pairs are found among each row's nearest others in the stored features and decided by a rule
calibrated on the store's own images: a sample of them is copied (JPEG re-encoded, rescaled, cropped, mirrored),
the copies are embedded exactly as the store was (same backbone, weights, preprocessing, precision, runtime), and
the rule is chosen on the copies' similarity to their sources against each image's similarity to its
second-nearest other image (the nearest may be a duplicate the data already has). When the source images are
reachable, the pixels must agree too (:func:`heads.audit.pixel_similarity`: grey thumbnails, mirror-forgiving,
crop-aligned): on small images the features alone cannot tell a re-encoded copy from a similar other image.
Without the images the rule falls back to a features-only threshold and says so.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from featurize.errors import FeaturizeError
from featurize.sources import Source, open_source
from featurize.store import LAST_LAYER, read_features, read_store, write_atomic
from heads import HeadsError
from heads.audit import (DEFAULT_NEIGHBOURS, OOF_CS, THUMB, UNCALIBRATED_THRESHOLD, CosineSpace, Rule, calibrate,
                         cosine_neighbours, duplicate_pairs, far_out, label_issues, measure,
                         out_of_fold_probabilities, outlier_scores, pair_clusters, pixel_similarity)
from pipelines.audit_html import write_audit_html
from pipelines.candidates import parse_candidates
from pipelines.scoring import write_csv

__all__ = ["AuditResult", "audit", "make_copy", "COPY_KINDS", "DEFAULT_SAMPLE", "AUDIT_VERSION"]

AUDIT_VERSION = 1  # audit.json's schema (docs/audit.md)
DEFAULT_SAMPLE = 200  # images copied to calibrate the near-duplicate rule (x 4 kinds of copy)
# Rows whose second-nearest other row stands for "not a copy" in the calibration. They cost no embedding, so there
# are many: the rule's bound is the 99th percentile of their similarities, and from 200 of them that rested on the
# 2nd-highest value (the pixel bound of the same planted set moved between 0.985 and 0.989 from draw to draw).
OTHERS = 5000
COPY_KINDS = ("jpeg", "rescale", "crop", "flip")
TOP_PAIRS_JSON = 50  # the most similar pairs repeated in audit.json (all of them are in duplicates.csv)


@dataclass
class AuditResult:
    """What an audit found.

    Attributes:
        out: the folder written.
        rows: rows audited (decoded); ``labelled``: those with a label.
        duplicates: ``pairs`` (list of dicts: id_a, id_b, split_a, split_b, cosine, pixel, cluster),
            ``clusters``, ``cross_split`` (pairs whose rows are in different splits), ``test_with_twin`` (test
            rows with a near-duplicate outside the test split), ``rule`` (:class:`heads.audit.Rule` as a dict),
            ``search`` (how neighbours were found).
        label_issues: ``rows`` (dicts: id, split, given, suggested, quality, issue), ``count``, per class, the
            head that gave the probabilities; None when the task has no labels.
        outliers: ``rows`` (id, split, label, score), ``fence``, ``count``.
        seconds: per step.
        notes: what the audit could not do and why (no images, no labels, ...), one line each.
        counts: ``splits`` and ``classes``: per split and per class, ``rows``, ``in_pairs`` (rows in a
            near-duplicate pair), ``label_issues``, ``outliers``; per split also ``cross`` (rows with a twin in
            another split).
    """

    out: Path
    rows: int
    labelled: int
    duplicates: dict[str, Any]
    label_issues: dict[str, Any] | None
    outliers: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        issues = "no labels" if self.label_issues is None else f"{self.label_issues['count']} label issues"
        return (f"AuditResult({self.rows} rows: {len(self.duplicates['pairs'])} near-duplicate pairs "
                f"({self.duplicates['cross_split']} across splits), {issues}, {self.outliers['count']} outliers)")


def make_copy(image, kind: str, rng: np.random.Generator):
    """A near-duplicate of a PIL image: ``jpeg`` (re-encoded at quality 70-85; returned as the decoded JPEG),
    ``rescale`` (to 70-90 % of its size; up to 150-250 % instead when that would leave a side under 16 pixels,
    where a smaller copy would no longer show the same thing), ``crop`` (3-8 % cut from each side, at least one
    pixel in all), ``flip`` (mirrored)."""
    import io

    from PIL import Image, ImageOps

    image = image.convert("RGB")
    w, h = image.size
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(70, 86)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "rescale":
        f = rng.uniform(0.7, 0.9)
        if min(w, h) * f < 16:
            f = rng.uniform(1.5, 2.5)
        return image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BICUBIC)
    if kind == "crop":
        cut = (rng.uniform(0.03, 0.08, size=4) * [w, h, w, h]).astype(int)
        if not cut.any():
            cut[rng.integers(4)] = 1
        box = (int(cut[0]), int(cut[1]), w - int(cut[2]), h - int(cut[3]))
        return image.crop(box) if box[2] > box[0] and box[3] > box[1] else image
    if kind == "flip":
        return ImageOps.mirror(image)
    raise ValueError(f"unknown kind of copy {kind!r}; use one of {', '.join(COPY_KINDS)}")


def thumbnail(image) -> np.ndarray:
    """The grey THUMB x THUMB thumbnail (bilinear, antialiased when shrinking; uint8) the pixel similarity
    compares: a small image enlarged this way and its enlarged copy shrunk back end up alike (a box filter
    enlarges blockily, and rescaled copies of 28-px images then correlated at a median 0.96 instead of 0.999)."""
    from PIL import Image

    return np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)


def _thumbnail_paths(paths: list[str]) -> np.ndarray:
    from PIL import Image

    out = np.zeros((len(paths), THUMB, THUMB), np.uint8)
    for n, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img.draft("L", (2 * THUMB, 2 * THUMB))  # JPEGs: decode at a reduced scale
                out[n] = thumbnail(img)
        except Exception:  # unreadable now: a flat thumbnail, which correlates with nothing
            pass
    return out


def _thumbnails(src: Source, rows: np.ndarray, progress: bool) -> np.ndarray:
    """[len(rows), THUMB, THUMB] grey thumbnails of the source's rows, decoded in parallel processes."""
    from joblib import Parallel, delayed, effective_n_jobs

    out = np.zeros((len(rows), THUMB, THUMB), dtype=np.uint8)
    chunk = 2048
    starts = range(0, len(rows), chunk)
    if hasattr(src, "path_of"):
        work = (delayed(_thumbnail_paths)([str(src.path_of(int(i))) for i in rows[s:s + chunk]]) for s in starts)
        results = Parallel(n_jobs=min(effective_n_jobs(-1), max(1, len(rows) // chunk)), return_as="generator")(work)
    else:
        results = (np.stack([thumbnail(src.load(int(i))) for i in rows[s:s + chunk]]) for s in starts)
    with tqdm(total=len(rows), unit="img", desc="thumbnails", disable=not progress) as bar:
        for s, block in zip(starts, results):
            out[s:s + len(block)] = block
            bar.update(len(block))
    return out


def _recorded_source(meta, images: str | None) -> tuple[Source | None, str | None]:
    """The store's source images (or `images` instead), checked to list the store's rows; else None and why."""
    recorded = meta.attrs.get("source") or {}
    spec = images or recorded.get("spec")
    if not spec:
        return None, "the store records no source"
    options = {k: recorded[k] for k in ("image_column", "label_column", "split_column", "id_column")
               if recorded.get(k)}
    try:
        src = open_source(spec, **options)
    except (FeaturizeError, OSError, ValueError) as e:
        return None, f"the source images ({spec}) are not reachable: {str(e).splitlines()[0]}"
    ids = [s.id for s in src.samples]
    if len(ids) != len(meta.ids) or any(a != str(b) for a, b in zip(ids, meta.ids)):
        return None, f"the source at {spec} no longer lists the store's rows (changed since extraction)"
    return src, None


def _copies_features(meta, blocks: list[str], images: list, progress: bool) -> np.ndarray:
    """The candidate's features of PIL `images`, computed exactly as the store's (its extraction settings)."""
    from pipelines.extract import extract_features
    from pipelines.predict import weights_choice

    attrs = meta.attrs
    layers = [b for b in blocks if b != LAST_LAYER]
    tmp = Path(tempfile.mkdtemp(prefix="headbench-audit-"))
    try:
        folder = tmp / "images"
        folder.mkdir()
        for i, img in enumerate(images):
            img.save(folder / f"{i:06d}.png")
        decoder = (attrs.get("decode") or {}).get("decoder")
        extract_features(
            str(folder), tmp / "copies.h5", model=attrs["backbone"],
            weights=weights_choice({"weights_source": attrs.get("weights_source", "")}, None),
            image_size=int(attrs["data_config"]["input_size"][-1]), crop_pct=attrs["data_config"].get("crop_pct"),
            grayscale=bool((attrs.get("pooling") or {}).get("grayscale")), layers=",".join(layers) or None,
            precision=attrs.get("precision", "auto"), dtype=attrs.get("dtype", "float16"),
            runtime=(attrs.get("runtime") or {}).get("name", "auto"), decode="tensor" if decoder == "tensor" else "cpu",
            jpeg_draft=bool((attrs.get("decode") or {}).get("jpeg_draft", True)), progress=progress,
        )
        copies = read_store(tmp / "copies.h5")
        parts = [read_features(copies, b).astype(np.float32) for b in blocks]
        return parts[0] if len(parts) == 1 else np.hstack(parts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _calibrate(meta, blocks, src, space, neighbours, thumbs, sample_rows, other_rows, rows, seed, progress):
    """The rule measured on copies of `sample_rows` against the second-nearest others of `other_rows` (positions
    into the audited rows)."""
    rng = np.random.default_rng(seed)
    images, kinds, sources = [], [], []
    for position in sample_rows:
        original = src.load(int(rows[position])).convert("RGB")
        for kind in COPY_KINDS:
            images.append(make_copy(original, kind, rng))
            kinds.append(kind)
            sources.append(position)
    features = space.transform(_copies_features(meta, blocks, images, progress))
    sources, kinds = np.asarray(sources), np.asarray(kinds)
    cosine = np.einsum("ij,ij->i", features, space.X[sources])
    other = min(1, neighbours.index.shape[1] - 1)  # the second-nearest: the nearest may be a natural duplicate
    others_at = neighbours.index[other_rows, other]
    others = neighbours.similarity[other_rows, other]
    copies = {k: cosine[kinds == k] for k in COPY_KINDS}
    copy_px = other_px = None
    if thumbs is not None:
        pixel = pixel_similarity(thumbs, sources, np.arange(len(images)),
                                 b_thumbs=np.stack([thumbnail(img) for img in images]))
        copy_px = {k: pixel[kinds == k] for k in COPY_KINDS}
        other_px = pixel_similarity(thumbs, other_rows, others_at)
    rule = calibrate(copies, others, copy_pixel=copy_px, other_pixel=other_px)
    details = {"copies": {k: _quantiles(v) for k, v in copies.items()}, "other": _quantiles(others),
               "other_is": "second-nearest" if other else "nearest"}
    if copy_px is not None:
        details["copies_pixel"] = {k: _quantiles(v) for k, v in copy_px.items()}
        details["other_pixel"] = _quantiles(other_px)
    return rule, details, (copies, others, copy_px, other_px)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [0, 5, 50, 95, 100]) if len(values) else [np.nan] * 5
    return dict(zip(("min", "p5", "median", "p95", "max"), (round(float(v), 4) for v in q)))


def audit(
    store: str | Path,
    out: str | Path,
    *,
    task: str | None = None,
    threshold: float | None = None,
    min_pixel: float | None = None,
    sample: int = DEFAULT_SAMPLE,
    neighbours: int = DEFAULT_NEIGHBOURS,
    images: str | None = None,
    labels: bool = True,
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> AuditResult:
    """Audit one representation of a store: near-duplicates, label issues, outliers; write them to `out`.

    Args:
        store: ``STORE.h5`` or ``STORE.h5:LAYER`` (``:concat`` too).
        out: folder for audit.json, duplicates.csv, label_issues.csv and outliers.csv (created; files replaced
            atomically).
        task: which label set (default: the store's first).
        threshold: the feature cosine a near-duplicate pair needs, instead of the calibrated one; `min_pixel`:
            the pixel similarity it needs instead of the calibrated one (only with reachable images).
        sample: images copied to calibrate the rule (each in every kind of :data:`COPY_KINDS`).
        neighbours: nearest others searched per row.
        images: where the source images are, when they moved since extraction (default: the recorded source).
        labels: look for label issues (5-fold out-of-fold logistic regression, cleanlab); False skips them.
        folds, seed: of the out-of-fold probabilities and the calibration sample.

    Raises:
        HeadsError, StoreError: a missing layer or task, NaN features, fewer than two rows, one class.
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    out = Path(out)
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise HeadsError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    if min_pixel is not None and not -1.0 <= min_pixel <= 1.0:
        raise HeadsError(f"--min-pixel is a correlation in [-1, 1], got {min_pixel}")
    candidate = parse_candidates([store], task=task)[0]
    meta = candidate.store
    rows = np.flatnonzero(meta.ok)
    if len(rows) < 2:
        raise HeadsError(f"{meta.path.name} has {len(rows)} decoded row(s); an audit compares rows with each "
                         "other and needs at least 2")
    y_all = meta.labels[rows]
    labelled = y_all >= 0
    n_classes = len(np.unique(y_all[labelled]))
    if labels and labelled.any() and n_classes < 2:
        raise HeadsError(f"task {meta.task_name!r} of {meta.path.name} has one class: label issues need at least "
                         "two; audit duplicates and outliers only with --no-labels")
    X = candidate.load(meta.ok)
    if not np.isfinite(X).all():
        bad = rows[~np.isfinite(X).all(axis=1)]
        raise HeadsError(f"{meta.path.name} has {len(bad)} row(s) with NaN or infinite features (e.g. "
                         f"{meta.ids[bad[0]]!r}); re-extract them")
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    space = CosineSpace(X)
    found = cosine_neighbours(space.X, neighbours, seed=seed)
    seconds["neighbours"] = time.perf_counter() - t

    t = time.perf_counter()
    src, why = _recorded_source(meta, images)
    thumbs = None
    if src is not None:
        thumbs = _thumbnails(src, rows, progress)
    else:
        notes.append(f"{why}: near-duplicates are decided by the features alone")
    seconds["thumbnails"] = time.perf_counter() - t

    t = time.perf_counter()
    calibration: dict[str, Any] = {}
    if threshold is not None:
        rule = Rule(float(threshold), min_pixel if thumbs is not None else None, user_threshold=True,
                    signal="features+pixels" if thumbs is not None and min_pixel is not None else "features")
    elif src is None:
        rule = Rule(UNCALIBRATED_THRESHOLD)
        notes.append(f"the threshold is the uncalibrated default (cosine {UNCALIBRATED_THRESHOLD}); give the "
                     "images with --images to calibrate it, or set --threshold")
    else:
        m = min(sample, len(rows))
        sample_rows = np.sort(np.random.default_rng(seed).choice(len(rows), m, replace=False))
        other_rows = np.sort(np.random.default_rng(seed + 1).choice(len(rows), min(OTHERS, len(rows)),
                                                                     replace=False))
        try:
            rule, calibration, measured = _calibrate(meta, candidate.blocks, src, space, found, thumbs,
                                                     sample_rows, other_rows, rows, seed, progress)
        except (FeaturizeError, HeadsError) as e:  # e.g. weights no longer available
            rule = Rule(UNCALIBRATED_THRESHOLD)
            notes.append(f"could not embed calibration copies ({str(e).splitlines()[0]}); the threshold is the "
                         f"uncalibrated default (cosine {UNCALIBRATED_THRESHOLD})")
        else:
            if min_pixel is not None:
                rule.min_pixel, rule.user_threshold = float(min_pixel), True
                measure(rule, *measured)
    seconds["calibration"] = time.perf_counter() - t

    t = time.perf_counter()
    a, b, cosine, pixel = duplicate_pairs(found, rule, thumbs)
    seconds["pairs"] = time.perf_counter() - t
    cluster = pair_clusters(len(rows), a, b)
    split = np.asarray(meta.split)[rows]
    ids = np.asarray(meta.ids)[rows]
    cross = split[a] != split[b]
    fit_side = np.zeros(len(rows), bool)  # rows with a twin outside the test split, seen from each test row
    test = split == "test"
    for p, q in ((a, b), (b, a)):
        fit_side[p[test[p] & ~test[q]]] = True
    pairs = [{"id_a": str(ids[i]), "id_b": str(ids[j]), "split_a": str(split[i]), "split_b": str(split[j]),
              "cosine": round(float(c), 4), "pixel": None if pixel is None else round(float(pixel[n]), 4),
              "cluster": int(cluster[i])} for n, (i, j, c) in enumerate(zip(a, b, cosine))]
    duplicates = {"pairs": pairs, "clusters": int(cluster.max() + 1) if len(a) else 0, "cross_split": int(cross.sum()),
                  "test_with_twin": int(fit_side.sum()), "test_rows": int(test.sum()), "rule": rule.to_dict(),
                  "calibration": calibration, "search": found.method}

    issues = None
    t = time.perf_counter()
    if not labelled.any():
        notes.append(f"task {meta.task_name!r} has no labels: duplicates and outliers only")
    elif not labels:
        notes.append("label issues skipped (--no-labels)")
    else:
        classes = np.unique(y_all[labelled])
        y = np.searchsorted(classes, y_all[labelled])
        probabilities, C = out_of_fold_probabilities(X[labelled], y, folds=folds, seed=seed)
        is_issue, quality, suggested = label_issues(y, probabilities)
        where = np.flatnonzero(labelled)
        names = np.asarray(meta.classes)[classes]
        order = np.argsort(quality, kind="stable")
        issue_rows = [{"id": str(ids[where[i]]), "split": str(split[where[i]]), "given": str(names[y[i]]),
                       "suggested": str(names[suggested[i]]), "quality": round(float(quality[i]), 6),
                       "issue": bool(is_issue[i])} for i in order]
        per_class = {str(names[c]): int((is_issue & (y == c)).sum()) for c in range(len(classes))}
        issues = {"rows": issue_rows, "count": int(is_issue.sum()), "per_class": per_class, "folds": folds,
                  "head": f"torch-logreg (standardised, C={C:g}: the lowest held-out log loss of the first fold on "
                  f"the path {', '.join(f'{c:g}' for c in OOF_CS)}), out-of-fold", "C": C,
                  "method": "cleanlab find_label_issues (prune_by_noise_rate), ranked by self-confidence label "
                            "quality"}
    seconds["label_issues"] = time.perf_counter() - t

    scores = outlier_scores(found)
    fence = far_out(scores)
    outlying = np.flatnonzero(scores > fence)
    outlying = outlying[np.argsort(-scores[outlying], kind="stable")]
    label_names = np.asarray(list(meta.classes) + [""])
    outlier_rows = [{"id": str(ids[i]), "split": str(split[i]), "label": str(label_names[y_all[i]]),
                     "score": round(float(scores[i]), 6)} for i in outlying]
    outliers = {"rows": outlier_rows, "count": len(outlier_rows), "fence": round(fence, 6),
                "unlabelled": int((y_all[outlying] < 0).sum()),
                "score": f"mean cosine distance to the {found.method['k']} nearest others; outliers above the "
                         "third quartile + 3 interquartile ranges"}
    flagged = np.zeros(len(rows), bool)
    if issues is not None:
        flagged[np.flatnonzero(labelled)[is_issue]] = True
    counts = _counts(split, y_all, list(meta.classes), cluster >= 0, a, b, flagged, outlying)
    seconds["total"] = time.perf_counter() - started

    result = AuditResult(out, len(rows), int(labelled.sum()), duplicates, issues, outliers, seconds, notes, counts)
    position = {str(i): n for n, i in enumerate(ids)}
    picture = None if src is None else (lambda row_id: src.load(int(rows[position[row_id]])))
    _write(result, meta, candidate, store, picture)
    return result


def _counts(split: np.ndarray, y: np.ndarray, classes: list[str], in_pair: np.ndarray, a: np.ndarray,
            b: np.ndarray, flagged: np.ndarray, outlying: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    """Per split and per class: rows, rows in a near-duplicate pair, label issues, outliers (and per split, rows
    with a twin in another split)."""
    cross = np.zeros(len(split), bool)
    other = split[a] != split[b]
    cross[a[other]] = cross[b[other]] = True
    outlier = np.zeros(len(split), bool)
    outlier[outlying] = True

    def row(name: str, members: np.ndarray, with_cross: bool) -> dict[str, Any]:
        out = {"name": name, "rows": int(members.sum()), "in_pairs": int((members & in_pair).sum()),
               "label_issues": int((members & flagged).sum()), "outliers": int((members & outlier).sum())}
        return {**out, "cross": int((members & cross).sum())} if with_cross else out

    splits = [row(str(s), split == s, True) for s in sorted(set(split.tolist()))]
    per_class = [row(name, y == c, False) for c, name in enumerate(classes) if (y == c).any()]
    if (y < 0).any():
        per_class.append(row("(no label)", y < 0, False))
    return {"splits": splits, "classes": per_class}


def _write(result: AuditResult, meta, candidate, spec, picture) -> None:
    out = result.out
    write_csv(out / "duplicates.csv", ["id_a", "id_b", "split_a", "split_b", "cosine", "pixel", "cluster"],
              ([p["id_a"], p["id_b"], p["split_a"], p["split_b"], p["cosine"],
                "" if p["pixel"] is None else p["pixel"], p["cluster"]] for p in result.duplicates["pairs"]))
    if result.label_issues is not None:
        write_csv(out / "label_issues.csv", ["id", "split", "given", "suggested", "quality", "issue"],
                  ([r["id"], r["split"], r["given"], r["suggested"], r["quality"], int(r["issue"])]
                   for r in result.label_issues["rows"]))
    write_csv(out / "outliers.csv", ["id", "split", "label", "score"],
              ([r["id"], r["split"], r["label"], r["score"]] for r in result.outliers["rows"]))
    summary = {
        "audit_version": AUDIT_VERSION, "store": str(meta.path), "representation": candidate.name or str(spec),
        "task": meta.task_name, "rows": result.rows, "labelled": result.labelled,
        "duplicates": {**{k: v for k, v in result.duplicates.items() if k != "pairs"},
                       "pairs": len(result.duplicates["pairs"]),
                       "top_pairs": result.duplicates["pairs"][:TOP_PAIRS_JSON]},
        "label_issues": None if result.label_issues is None else
        {**{k: v for k, v in result.label_issues.items() if k != "rows"},
         "top": [r for r in result.label_issues["rows"] if r["issue"]][:TOP_PAIRS_JSON]},
        "outliers": {**{k: v for k, v in result.outliers.items() if k != "rows"},
                     "top": result.outliers["rows"][:TOP_PAIRS_JSON]},
        "counts": result.counts,
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()}, "notes": result.notes,
    }

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(summary, indent=2, default=_plain))

    write_atomic(out / "audit.json", write)
    write_audit_html(summary, result.duplicates["pairs"], None if result.label_issues is None else
                     result.label_issues["rows"], result.outliers["rows"], out / "audit.html", picture)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")
