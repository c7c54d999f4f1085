"""predict: images -> the saved head's backbone (rebuilt from provenance) -> the head -> a CSV of labels."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from featurize.backbones import create_backbone
from featurize.engine import default_batch_size, default_workers, iter_features, resolve_device
from featurize.runtime import resolve_runtime
from featurize.sources import open_source
from featurize.store import LAST_LAYER
from heads import HeadsError
from heads.persist import load_head
from pipelines.scoring import write_csv

__all__ = ["PredictResult", "predict_images", "weights_choice"]


@dataclass
class PredictResult:
    """What a prediction run did.

    Attributes:
        path: the CSV written.
        num_rows: images listed by the source.
        num_failed: images that could not be decoded (empty prediction, reason in the error column).
        accuracy: accuracy on labeled, decoded rows whose class the head knows, overall (key ``all``) and per
            split; empty when the source has no labels.
        num_scored: how many rows that accuracy counts, with the same keys.
    """

    path: Path
    num_rows: int
    num_failed: int
    accuracy: dict[str, float] = field(default_factory=dict)
    num_scored: dict[str, int] = field(default_factory=dict)


def weights_choice(provenance: dict, weights: str | None) -> str:
    """The --weights choice that gives back the weights recorded in `provenance` (a head's or a store's
    ``weights_source``), unless `weights` names them; a weights file must be given again."""
    if weights:
        return weights
    source = str(provenance.get("weights_source", ""))
    if source.startswith("packaged:"):
        return "packaged"
    if source in ("hub", "random"):
        return source
    if source == "none":  # the pixels baseline
        return "auto"
    name = source.removeprefix("file:")
    raise HeadsError(f"the head was trained on features from the weights file {name!r}; pass it with --weights PATH")


def predict_images(
    head_path: str | Path,
    source: str,
    out: str | Path,
    *,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    trust: bool = False,
    proba: bool = False,
    runtime: str = "auto",
    source_options: dict | None = None,
    progress: bool = True,
) -> PredictResult:
    """Predict a class for every image of `source` with a head saved by ``compare-heads --save-best``.

    The backbone, weights, preprocessing, precision, storage dtype and layer(s) are the ones recorded in the
    head, so the head sees features exactly like those it was trained on; weights that differ are refused.
    With `proba`, one ``p:<class>`` column per class holds the head's (calibrated, when it was saved with a
    calibrator) probabilities; each row sums to 1. `runtime` runs the backbone as extract does
    (:func:`featurize.runtime.resolve_runtime`, at the head's recorded precision). Images are decoded as the
    head's store decoded them (Pillow, or torchvision's tensor decoder on this machine's device).

    Raises:
        HeadsError, FeaturizeError: unreadable head, missing weights file, other weights, bad source.
    """
    out = Path(out)
    if not out.parent.exists():
        raise HeadsError(f"folder {out.parent} does not exist; create it or choose another --out")
    model, prov = load_head(head_path, trust=trust)
    src = open_source(source, **{k: v for k, v in (source_options or {}).items() if v is not None})
    blocks = list(prov.get("blocks") or [LAST_LAYER])  # heads saved before layers existed: the default features
    backbone = create_backbone(
        prov["backbone"], weights_choice(prov, weights), image_size=int(prov["data_config"]["input_size"][-1]),
        crop_pct=prov["data_config"].get("crop_pct"), grayscale=bool((prov.get("pooling") or {}).get("grayscale")),
        layers=[b for b in blocks if b != LAST_LAYER],
    )
    if backbone.weights["sha256"] != prov["weights_sha256"]:
        raise HeadsError(
            f"these weights (sha256 {backbone.weights['sha256'][:12]}) are not the ones the head was trained on "
            f"(sha256 {str(prov['weights_sha256'])[:12]}); give the original with --weights PATH"
        )
    if backbone.data_config != prov["data_config"]:
        raise HeadsError(
            f"the preprocessing timm resolves now ({backbone.data_config}) differs from the head's "
            f"({prov['data_config']}); use the timm version recorded in the head"
        )
    if backbone.layers != list(prov.get("layers") or []):
        raise HeadsError(
            f"the layers this timm version taps ({backbone.layers}) differ from the head's ({prov.get('layers')}); "
            "use the timm version recorded in the head"
        )
    dev = resolve_device(device)
    dtype = np.dtype(prov.get("dtype", "float32"))
    classes = list(prov["classes"])
    has_proba = proba and hasattr(model, "predict_proba")
    if proba and not has_proba:
        raise HeadsError(f"{head_path} gives no probabilities; save it again with compare-heads --save-best "
                         "(heads without predict_proba are saved with a temperature-scaled calibrator)")

    size = batch_size or default_batch_size(dev)
    engine = resolve_runtime(runtime, backbone, dev, prov["precision"], size,
                             warn=lambda line: tqdm.write(f"warning: {line}", file=sys.stderr))
    rows, failed = [], 0
    with tqdm(total=len(src), unit="img", desc="predict", disable=not progress) as bar:
        for batch in iter_features(
            src, backbone, range(len(src)), device=dev, precision=engine.precision, batch_size=size,
            workers=default_workers(dev) if workers is None else workers,
            jpeg_draft=prov["decode"]["jpeg_draft"], runtime=engine, decode=prov["decode"].get("decoder", "pillow"),
        ):
            ok = np.array([not e for e in batch.errors])
            parts = [batch.features if b == LAST_LAYER else batch.layers[b] for b in blocks]  # the candidate's columns
            features = np.hstack(parts).astype(dtype).astype(np.float32)  # as the store held them
            ok &= np.isfinite(features).all(axis=1)
            pred = np.full(len(ok), -1)
            probabilities = np.full((len(ok), len(classes)), np.nan)
            if ok.any():
                pred[ok] = model.predict(features[ok])
                if has_proba:
                    p = np.asarray(model.predict_proba(features[ok]), dtype=np.float64)
                    probabilities[np.ix_(ok, model.classes_)] = p / p.sum(axis=1, keepdims=True)  # float32 rounding
            for j, index in enumerate(batch.indices):
                error = batch.errors[j] or ("" if ok[j] else "non-finite features (NaN or Inf)")
                failed += bool(error)
                row = [src.samples[index].id, classes[pred[j]] if ok[j] else ""]
                if has_proba:
                    row += [repr(float(p)) if ok[j] else "" for p in probabilities[j]]
                rows.append(row + [error])
            bar.update(len(batch.indices))

    header = ["id", "prediction"] + ([f"p:{c}" for c in classes] if has_proba else []) + ["error"]
    write_csv(out, header, rows)

    accuracy, scored = {}, {}
    task = prov.get("task")  # a head saved for one label set is scored against the source's labels of that set
    truth = src.task(task) if task is None or task in src.task_names else None
    if truth is not None and truth.classes:
        hits: dict[str, list[bool]] = {}
        for sample, label, row in zip(src.samples, truth.labels, rows):
            if label < 0 or row[-1] or truth.classes[label] not in classes:
                continue
            hit = row[1] == truth.classes[label]
            for key in ("all", sample.split) if sample.split else ("all",):
                hits.setdefault(key, []).append(hit)
        accuracy = {k: float(np.mean(v)) for k, v in hits.items()}
        scored = {k: len(v) for k, v in hits.items()}
    return PredictResult(out, len(src), failed, accuracy, scored)
