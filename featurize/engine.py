"""The extraction engine: decode in DataLoader workers, run the frozen backbone in batches, yield features.

It knows nothing about stores: it takes a source, a backbone and the sample indices to do, and yields
:class:`FeatureBatch` objects in index order. Per-sample decode failures travel with the batch as error
strings; the backbone only sees the samples that decoded.

Where the time goes, and what the engine does about it:

* decode + resize run in worker processes (JPEG draft mode for large files) and hand over uint8 tensors, a
  quarter of the bytes of float ones; float conversion and normalisation run once per batch on the device;
* the model runs channels_last under ``inference_mode``, with bf16/fp16 autocast where the hardware has it,
  optionally ``torch.compile``d; cuDNN autotuning on CUDA; pinned memory and non-blocking copies on CUDA;
* on a CPU device the model's threads and the decode workers share the cores: most cores go to the model
  (intra-op threads), about a quarter to decoding, which is roughly what a mobile-class backbone needs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .backbones import Backbone
from .decode import DecodeDataset, collate_decoded, draft_size
from .device import (
    DEVICE_CHOICES,
    PRECISION_CHOICES,
    autocast,
    cpu_supports_bf16,
    prepare_model,
    resolve_device,
    resolve_precision,
)
from .errors import FeaturizeError
from .sources import Source
from .stages import FeatureBatch, batched, iter_staged

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "DEVICE_CHOICES",
    "PRECISION_CHOICES",
    "FeatureBatch",
    "resolve_device",
    "resolve_precision",
    "cpu_supports_bf16",
    "default_batch_size",
    "default_workers",
    "default_streams",
    "intra_op_threads",
    "stream_threads",
    "autocast",
    "draft_size",
    "prepare_model",
    "DecodeDataset",
    "collate_decoded",
    "iter_features",
    "steady_rate",
    "use_staged",
]

def default_batch_size(device: torch.device) -> int:
    """128 on GPUs; 8 per stream on CPUs, where small batches keep activations in cache (lite0 bf16 on this
    class of CPU: ~145 img/s at 8 vs ~110 at 32)."""
    return 128 if device.type in ("cuda", "mps") else 8


def default_workers(device: torch.device | None = None) -> int:
    """Decode worker processes for a device.

    GPU/MPS: every core but one decodes (the GPU is fast; decoding is the bottleneck), at most 16.
    CPU: none -- each compute stream decodes its own batches (see :func:`iter_features`).
    """
    if device is not None and device.type in ("cuda", "mps"):
        return max(1, min(16, (os.cpu_count() or 2) - 1))
    return 0


def default_streams(device: torch.device) -> int:
    """Batches computed at once: one on a GPU; on a CPU one per core, at most 4 (each with cores/4 threads).

    Small CNNs at small batches do not scale across intra-op threads (measured on 2 cores, lite0 bf16: one
    batch on 2 threads ~125 img/s, two batches on 1 thread each ~145 img/s, and decoding fits in between).
    """
    if device.type != "cpu":
        return 1
    return max(1, min(4, torch.get_num_threads()))


def stream_threads(device: torch.device, streams: int) -> int:
    """Intra-op threads per stream: on a CPU the streams share the cores; elsewhere the count is unchanged."""
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() // streams)


@contextlib.contextmanager
def intra_op_threads(threads: int):
    """Set torch's intra-op thread count for a block, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_staged(device: torch.device) -> bool:
    """Whether the staged engine (:mod:`featurize.stages`) runs the torch model on `device`: on CUDA always;
    elsewhere when ``HEADBENCH_ENGINE=staged`` asks for it (the GPU's code path on a CPU: tests, debugging).
    CPUs keep the streams, which overlap decoding and compute on the same cores."""
    requested = os.environ.get("HEADBENCH_ENGINE", "auto")
    if requested not in ("auto", "staged", "streams"):
        raise FeaturizeError(f"HEADBENCH_ENGINE must be auto, staged or streams, got {requested!r}")
    if requested == "auto":
        return device.type == "cuda"
    return requested == "staged"


def iter_features(
    source: Source,
    backbone: Backbone,
    indices: Sequence[int],
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
    streams: int | None = None,
    jpeg_draft: bool = True,
    compile: bool = False,
    runtime: "Runtime | None" = None,
    decode: str = "pillow",
    timings: dict[str, float] | None = None,
) -> Iterator[FeatureBatch]:
    """Yield features for `indices` (in that order) in batches.

    Batches run on `streams` threads at once, each with ``cores // streams`` intra-op threads. With no decode
    workers, each stream decodes its own batch (Pillow releases the GIL while decoding and resizing), so the
    cores alternate between decoding and computing without waiting on each other; with workers, a DataLoader
    decodes in separate processes and the streams only compute.

    Args:
        source: where samples come from.
        backbone: the frozen model and its transforms.
        indices: sample indices to do.
        device: where the model runs (moved there, channels_last).
        precision: resolved precision, ``fp32``, ``bf16`` or ``fp16`` (autocast).
        batch_size: samples per forward pass.
        workers: decode worker processes (0: decode inside the streams).
        streams: batches computed concurrently (None: :func:`default_streams`).
        jpeg_draft: let large JPEGs decode at a reduced scale (see :func:`draft_size`); changes features
            slightly, so it belongs in the store's config.
        compile: run the model through ``torch.compile`` (then one stream).
        runtime: a resolved OpenVINO runtime (:func:`featurize.runtime.resolve_runtime`) runs the model instead
            of torch, `streams` defaulting to its optimal number of requests; None or torch: the torch path.
        decode: ``pillow`` (decode workers or streams, Pillow) or ``tensor`` (:mod:`featurize.decode`: on a GPU,
            `workers` threads read bytes and the GPU decodes whole batches; on a CPU, torchvision's decoder runs
            where Pillow would); see :func:`featurize.decode.resolve_decode`.
        timings: filled with ``time.perf_counter()`` stamps: ``model_ready``, ``first_batch``, ``last_batch``
            (when those batches were handed over) and ``closed`` (decoders stopped).
    """
    if batch_size < 1:
        raise FeaturizeError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise FeaturizeError(f"--workers must be 0 or more, got {workers}")
    if decode not in ("pillow", "tensor"):
        raise FeaturizeError(f"decode must be resolved to pillow or tensor (featurize.decode.resolve_decode), got {decode!r}")
    openvino = runtime is not None and runtime.name == "openvino"
    if openvino and batch_size > runtime.batch_size:
        raise FeaturizeError(f"batch size {batch_size} is over the {runtime.batch_size} the OpenVINO model was compiled for")
    if streams is None:
        streams = runtime.requests if openvino else 1 if compile else default_streams(device)
    if streams < 1:
        raise FeaturizeError(f"--streams must be at least 1, got {streams}")
    if not openvino and use_staged(device):
        # the accelerator's engine: read -> decode -> compute -> collect stages (featurize/stages.py)
        yield from iter_staged(source, backbone, indices, device=device, precision=precision, batch_size=batch_size,
                               workers=workers, decode=decode, jpeg_draft=jpeg_draft, compile=compile,
                               timings=timings)
        return
    stamps = timings if timings is not None else {}
    dataset = DecodeDataset(source, backbone, jpeg_draft, decode)
    loader = None
    if workers:
        # Workers start here, before the model moves to the device (a process that has loaded the GPU's
        # libraries is slower to fork), and decode while the model loads; they are stopped explicitly below.
        loader = iter(DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=list(indices),
            num_workers=workers,
            collate_fn=collate_decoded,
            pin_memory=device.type == "cuda",
            prefetch_factor=4,
        ))
        items = loader
    else:
        items = batched(indices, batch_size)
    forward = None if openvino else prepare_model(backbone, device, compile)
    stamps["model_ready"] = time.perf_counter()
    dim = backbone.num_features

    def run(item) -> FeatureBatch:
        batch_indices, images, errors = item if workers else collate_decoded([dataset[i] for i in item])
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        features = np.full((len(errors), dim), np.nan, dtype=np.float32)
        layers = {t["name"]: np.full((len(errors), t["width"]), np.nan, dtype=np.float32) for t in backbone.layers}
        if ok.any() and openvino:  # the runtime's infer releases the GIL: the streams overlap like torch's
            outputs = runtime.infer((images[ok] if not ok.all() else images).numpy())
            features[ok.numpy()] = outputs[0]
            for t, value in zip(backbone.layers, outputs[1:]):
                layers[t["name"]][ok.numpy()] = value
        elif ok.any():
            # inference_mode and autocast are thread-local: entered here, in the stream's own thread.
            with torch.inference_mode(), autocast(device, precision):
                x = images[ok.to(images.device)] if not ok.all() else images
                x = backbone.normalize(x.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
                features[ok.numpy()] = forward(x).float().cpu().numpy()
                for name, value in backbone.take_layers().items():  # tapped in the same forward pass
                    layers[name][ok.numpy()] = value.cpu().numpy()
        return FeatureBatch(batch_indices.numpy(), features, list(errors), layers)

    try:
        with intra_op_threads(stream_threads(device, streams)), ThreadPoolExecutor(streams, thread_name_prefix="headbench-stream") as pool:
            pending: collections.deque = collections.deque()

            def take() -> FeatureBatch:
                batch = pending.popleft().result()
                stamps.setdefault("first_batch", time.perf_counter())
                stamps["last_batch"] = time.perf_counter()
                return batch

            for item in items:
                pending.append(pool.submit(run, item))
                if len(pending) > 2 * streams:  # bounded look-ahead: flat memory, results in order
                    yield take()
            while pending:
                yield take()
    finally:
        if loader is not None and hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()  # now, not whenever the iterator is collected
        stamps["closed"] = time.perf_counter()


def steady_rate(stamps: dict[str, float], rows_after_first: int) -> float | None:
    """Rows per second once the stages are full: the rows after the first batch of features over the time from
    that batch to the last (``first_batch`` and ``last_batch`` of :func:`iter_features`'s `timings`); None for
    a run of one batch."""
    if "first_batch" not in stamps or rows_after_first <= 0:
        return None
    filled = stamps["last_batch"] - stamps["first_batch"]
    return rows_after_first / filled if filled > 0 else None
