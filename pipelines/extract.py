"""extract: source -> frozen backbone -> feature store, resumable, with provenance."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from featurize.backbones import PIXELS, check_model_name, create_backbone, input_side
from featurize.decode import resolve_decode
from featurize.errors import FeaturizeError
from featurize.engine import (default_batch_size, default_workers, iter_features, resolve_device, steady_rate,
                              use_staged)
from featurize.runtime import resolve_runtime
from featurize.sources import median_image_side, open_source
from featurize.stages import jpeg_decoder_name
from featurize.store import FORMAT_VERSION, StoreWriter, check_writable
from pipelines.provenance import library_versions

__all__ = ["ExtractResult", "extract_features", "allowed_failures", "DEFAULT_MAX_FAILURES"]


@dataclass
class ExtractResult:
    """What an extraction did.

    Attributes:
        path: the finished store.
        num_rows: samples in the store.
        num_failed: rows recorded as failed.
        resumed_rows: rows taken from an earlier, interrupted run.
        seconds: wall time of this run's extraction loop.
        images_per_second: rows computed by this run per second of that loop.
        failure_reasons: failed-row counts by error type.
        config_hash: the store's config hash.
        runtime: what ran the model (:meth:`featurize.runtime.Runtime.describe`: name, version, precision, and
            for OpenVINO its start-up seconds).
        decoder: ``pillow`` or ``tensor`` (:func:`featurize.decode.resolve_decode`).
        startup_seconds: from the call to the model being ready to run (local runs).
        first_batch_seconds: from the model being ready to the first batch of features (local runs).
        steady_images_per_second: rows per second from the first batch of features to the last, the rate once
            the stages are full, without start-up (local runs of more than one batch). On a fast GPU a run of
            a few thousand images is over in a second or two, and ``images_per_second`` is mostly start-up.
        shutdown_seconds: from the last batch of features to the finished store (decoders stopped, shards
            written, store finalised).
        representation: with ``representation="auto"``, what it chose and why (layers, crop_pct,
            median_image_side, input_side, crop_reason); else None.
    """

    path: Path
    num_rows: int
    num_failed: int
    resumed_rows: int
    seconds: float
    images_per_second: float
    config_hash: str
    failure_reasons: dict[str, int] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    decoder: str = "pillow"
    startup_seconds: float | None = None
    first_batch_seconds: float | None = None
    steady_images_per_second: float | None = None
    shutdown_seconds: float | None = None
    representation: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"ExtractResult(path={str(self.path)!r}, rows={self.num_rows}, failed={self.num_failed}, "
                f"resumed={self.resumed_rows}, images_per_second={self.images_per_second:.1f}, "
                f"runtime={self.runtime.get('name', 'torch')!r}, decoder={self.decoder!r})")


DEFAULT_MAX_FAILURES = "5%"


def allowed_failures(spec: str | int, total: int) -> int:
    """How many failed rows `--max-failures` allows: a count (``100``) or a share of all rows (``5%``).

    Raises:
        FeaturizeError: the value is neither.
    """
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return math.floor(total * share / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise FeaturizeError(
            f"--max-failures must be a count such as 10 or a share such as 5%, got {text!r}"
        ) from None


def _warn(line: str) -> None:
    tqdm.write(f"warning: {line}", file=sys.stderr)


@contextlib.contextmanager
def _commit_on_error(writer: StoreWriter):
    """On any interruption, still commit the shards that are complete, so that a rerun resumes after them."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            writer.abandon()
        raise


def _auto_representation(src, model: str, image_size: int | None, layers: str | None,
                         crop_pct: float | None) -> tuple[str, float | None, dict[str, Any]]:
    """(layers, crop_pct, what was chosen and why) for ``representation="auto"``."""
    if model == PIXELS:
        raise FeaturizeError("--representation auto chooses the layers and the crop of a timm backbone; --model "
                             "pixels has neither: leave --representation out")
    layers = "stages" if layers in (None, "", "last") else layers
    side, target = median_image_side(src), input_side(model, image_size)
    why = "given" if crop_pct is not None else None
    if crop_pct is None and side is not None and side < target:
        crop_pct, why = 1.0, f"images of {side} px, smaller than the {target} px input: no crop"
    return layers, crop_pct, {"kind": "auto", "layers": layers, "crop_pct": crop_pct, "median_image_side": side,
                              "input_side": target, "crop_reason": why or "the model's own crop"}


def extract_features(
    source: str,
    out: str | Path,
    *,
    model: str,
    weights: str = "auto",
    image_size: int | None = None,
    crop_pct: float | None = None,
    grayscale: bool = False,
    layers: str | None = None,
    representation: str = "default",
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float16",
    batch_size: int | None = None,
    workers: int | None = None,
    streams: int | None = None,
    shard_size: int = 1024,
    jpeg_draft: bool = True,
    compile: bool = False,
    runtime: str = "auto",
    decode: str = "auto",
    source_options: dict[str, Any] | None = None,
    max_failures: str | int = DEFAULT_MAX_FAILURES,
    overwrite: bool = False,
    ray: str | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Embed every sample of `source` with a frozen timm backbone into the HDF5 store `out`.

    A run that was interrupted resumes from its committed shards when called again with the same settings
    (with or without Ray). Batch size, worker count and Ray do not change the features, so they may differ
    between the runs.

    Args:
        model: a timm model name, or ``pixels`` (the resized pixels scaled to [0, 1], flattened: the baseline).
        crop_pct: timm's ``crop_pct`` (1.0: resize without cropping); None keeps the model's own.
        grayscale: pixels only: one grey channel.
        layers: intermediate layers stored beside the features, from the same forward pass: ``last`` (none),
            ``stages``, or module names / stage indices (:func:`featurize.backbones.resolve_layers`).
        representation: ``default`` (what `layers` and `crop_pct` say), or ``auto``: what compare-heads'
            choice of representation needs -- every stage (unless `layers` names some) and, unless `crop_pct`
            is given, no crop (1.0) when the source's images are smaller than the model's input (their median
            shorter side, over 64 images spread over the source): small centred items keep their edges. The
            choice and what it was based on are in the config and the store's ``representation`` attribute.
        runtime: ``auto`` (OpenVINO on a CPU when installed and the model converts, else torch), ``torch`` or
            ``openvino`` (:mod:`featurize.runtime`); part of the config, so a resume must use the same one.
        decode: ``auto`` (GPU decoding on CUDA, Pillow elsewhere), ``cpu`` (Pillow), ``gpu`` (nvJPEG) or
            ``tensor`` (torchvision's decoder on the model's device); see :func:`featurize.decode.resolve_decode`.
            Tensor decoding is part of the config (its pixels differ slightly from Pillow's).
        source_options: for tar and Parquet sources: ``label_key``; ``image_column``, ``label_column``,
            ``split_column``, ``id_column`` (:func:`featurize.sources.open_source`).
        ray: None: run here. An address (``HOST:PORT``, ``auto``, ``ray://...``) or ``local``: spread the shards
            over a Ray cluster's actors (:mod:`pipelines.cluster`); the store is the same as a local run's.

    Raises:
        FeaturizeError: bad source, model, weights, device or options; store exists or was started with
            other settings.
        ClusterError: Ray missing or unreachable, or the cluster could not finish.
    """
    called = time.perf_counter()
    out = Path(out)
    check_writable(out, overwrite)
    source_options = {k: v for k, v in (source_options or {}).items() if v is not None}
    limit_spec = str(max_failures)
    check_model_name(model)  # cheap, so a typo fails before a large folder is scanned
    src = open_source(source, **source_options)
    chosen = None
    if representation == "auto":
        layers, crop_pct, chosen = _auto_representation(src, model, image_size, layers, crop_pct)
    elif representation != "default":
        raise FeaturizeError(f"--representation must be default or auto, got {representation!r}")
    allowed = allowed_failures(limit_spec, len(src))
    fingerprint = src.fingerprint()
    stamps: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if ray is None:
            backbone = create_backbone(model, weights, image_size=image_size, crop_pct=crop_pct, grayscale=grayscale,
                                       layers=layers)
            dev = resolve_device(device)
            batch = batch_size or default_batch_size(dev)
            engine = resolve_runtime(runtime, backbone, dev, precision, batch, warn=_warn)
            decoder = resolve_decode(decode, dev, backbone)
            computed = {"backbone": backbone.name, "weights": backbone.weights, "data_config": backbone.data_config,
                        "pooling": backbone.pooling, "num_features": backbone.num_features,
                        "precision": engine.precision, "layers": backbone.layers, "runtime": engine.name,
                        "runtime_info": engine.describe(), "decoder": decoder}
            if decoder == "tensor" and engine.name == "torch" and use_staged(dev):
                computed["jpeg_decoder"] = jpeg_decoder_name()  # the staged engine's: HEADBENCH_JPEG_DECODER
            placement = str(dev)

            def batches(shards: list[range]):
                return iter_features(
                    src, backbone, [i for rows in shards for i in rows], device=dev, precision=engine.precision,
                    batch_size=batch, workers=default_workers(dev) if workers is None else workers, streams=streams,
                    jpeg_draft=jpeg_draft, compile=compile, runtime=engine, decode=decoder, timings=stamps,
                )
        else:
            from pipelines.cluster import RayExtractPool, ray_session

            stack.enter_context(ray_session(ray))
            pool = RayExtractPool(source, model, {
                "weights": weights, "image_size": image_size, "crop_pct": crop_pct, "grayscale": grayscale,
                "layers": layers, "device": device, "precision": precision,
                "batch_size": batch_size, "workers": workers, "streams": streams, "jpeg_draft": jpeg_draft,
                "compile": compile, "runtime": runtime, "decode": decode, "source_options": source_options,
            }, report=lambda line: tqdm.write(line, file=sys.stderr))
            stack.callback(pool.shutdown)
            computed = pool.description
            if computed["dataset"]["fingerprint"] != fingerprint:
                raise FeaturizeError(
                    f"the Ray workers see other data under {source} than this machine does (different "
                    "fingerprint); put the source on storage every node mounts at the same path"
                )
            placement = pool.placement

            def batches(shards: list[range]):
                return pool.batches(shards, dtype)

        config: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "backbone": computed["backbone"],
            "weights": computed["weights"],
            "data_config": computed["data_config"],
            "pooling": computed["pooling"],
            "decode": {"jpeg_draft": jpeg_draft},
            "precision": computed["precision"],
            "dtype": dtype,
            "dataset": {"kind": src.kind, "fingerprint": fingerprint, "num_rows": len(src)},
        }
        if computed["layers"]:  # only then: a store without layers keeps the config (and hash) it always had
            config["layers"] = computed["layers"]
        if computed["runtime"] != "torch":  # the same: a store computed by torch keeps its config and hash
            config["runtime"] = computed["runtime"]
        if computed["decoder"] != "pillow":  # the same: Pillow-decoded stores keep theirs
            config["decode"]["decoder"] = computed["decoder"]
        if computed.get("jpeg_decoder", "torchvision") != "torchvision":  # the same: torchvision-decoded ones too
            config["decode"]["jpeg_decoder"] = computed["jpeg_decoder"]
        if src.tasks:  # the same: the label sets' contents are in the fingerprint, their names here
            config["dataset"]["tasks"] = src.task_names
        if chosen is not None:  # the same: only an auto representation is recorded as one
            config["representation"] = chosen
        writer = StoreWriter(
            out, config, len(src), computed["num_features"], dtype=dtype, shard_size=shard_size, overwrite=overwrite,
            layers=computed["layers"],
        )
        pending = writer.pending_shards()
        first_rows = 0  # the first batch's, which the steady rate leaves out
        started = time.perf_counter()
        with tqdm(
            total=len(src), initial=writer.resumed_rows, unit="img", desc=f"extract {computed['backbone']}",
            disable=not progress,
        ) as bar, _commit_on_error(writer):
            for batch in batches(pending):
                writer.add(batch.indices, batch.features, batch.errors, batch.layers)
                first_rows = first_rows or len(batch.indices)
                bar.update(len(batch.indices))
                if writer.failed_rows > allowed:
                    example = next((f"{src.samples[i].id}: {e}" for i, e in zip(batch.indices, batch.errors) if e), "")
                    raise FeaturizeError(
                        f"{writer.failed_rows} images failed, more than --max-failures {limit_spec} allows "
                        f"({allowed} of {len(src)}); e.g. {example}. {out} was not written; fix the inputs or "
                        "raise --max-failures"
                    )
        seconds = time.perf_counter() - started
        stamps.setdefault("last_batch", time.perf_counter())

    samples = src.samples
    path = writer.finalize(
        ids=[s.id for s in samples],
        labels=[s.label for s in samples],
        split=[s.split for s in samples],
        classes=src.classes,
        tasks={name: (t.classes, t.labels) for name, t in src.tasks.items()},
        default_task=src.default_task,
        attrs={
            "backbone": computed["backbone"],
            "weights_source": computed["weights"]["source"],
            "weights_sha256": computed["weights"]["sha256"],
            "data_config": computed["data_config"],
            "pooling": computed["pooling"],
            "decode": config["decode"],
            "precision": computed["precision"],
            "runtime": computed["runtime_info"],
            "device": placement,
            "num_features": computed["num_features"],
            **({"layers": computed["layers"]} if computed["layers"] else {}),
            **({"representation": chosen} if chosen is not None else {}),
            "dataset_fingerprint": config["dataset"]["fingerprint"],
            "source": src.describe(),
            "library_versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    computed_rows = sum(len(rows) for rows in pending)
    finished = time.perf_counter()
    return ExtractResult(
        path=path,
        num_rows=len(src),
        num_failed=writer.num_failed,
        resumed_rows=writer.resumed_rows,
        seconds=seconds,
        images_per_second=computed_rows / seconds if seconds > 0 else 0.0,
        config_hash=writer.config_hash,
        failure_reasons=writer.failure_reasons,
        runtime=computed["runtime_info"],
        decoder=computed["decoder"],
        startup_seconds=stamps["model_ready"] - called if "model_ready" in stamps else None,
        first_batch_seconds=stamps["first_batch"] - stamps["model_ready"] if "first_batch" in stamps else None,
        steady_images_per_second=steady_rate(stamps, computed_rows - first_rows),
        shutdown_seconds=finished - stamps["last_batch"],
        representation=chosen,
    )
