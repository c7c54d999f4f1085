"""bench: how close extraction runs to the hardware limit, and what reduced precision costs in quality.

Every number comes from one run on one machine, so the ratios are meaningful even on a noisy machine:

* ``forward_ips`` -- the model alone on synthetic tensors (the engine's batch size, precision, channels_last);
* ``end_to_end_ips`` -- ``extract`` from a folder of JPEGs into a store (decode, transfer, model, writes);
* ``naive_ips`` -- the hand-written loop: one image at a time, fp32, NCHW, PIL + timm transform;
* ``decode_ips_per_worker`` -- decode + per-image transform in one process; ``decode_capacity_ips`` -- that
  times the decode workers, what the JPEG path can be fed at most (with tensor decoding,
  ``ratio_cpu_decode_vs_decode_capacity`` is the Pillow processes' end-to-end share of it);
* ``predecoded_ips`` -- the engine from already decoded uint8 images (copy to the device, normalise, model,
  features back), i.e. everything but decoding; ``ratio_predecoded_vs_forward`` is the engine's own overhead;
* ``decoder`` -- who decoded the JPEGs in the end-to-end run (``pillow`` or ``tensor``: ``--decode``); with
  tensor decoding the same run also measures the Pillow path, ``end_to_end_cpu_decode_ips`` (and its
  ``cpu_decode_first_batch_seconds``), and its ratio;
* ``startup_seconds``, ``first_batch_seconds``, ``shutdown_seconds`` -- of the end-to-end run: call to model
  ready, model ready to the first batch of features, last batch to the finished store;
  ``end_to_end_steady_ips`` -- its rate from the first batch of features to the last (``end_to_end_ips``
  counts the start-up too, which on a fast GPU is a large part of a run of some thousand images); ``nonfinite_rows`` --
  its rows whose features came out NaN/Inf (the store writer records them as failed);
* ``write_mb_s`` -- the store writer (shards + manifest + fsync, then the atomic final HDF5) on synthetic rows;
* ``bf16_min_cosine`` / ``bf16_mean_cosine`` -- bf16 vs fp32 features of the same images;
* ``bf16_probe_acc_delta`` -- logistic-regression test accuracy on builtin:digits with bf16 minus fp32
  features, in percentage points.

All of these are the torch runtime's. With ``openvino`` among the runtimes (:mod:`featurize.runtime`), the same
run adds ``openvino_*``: its start-up from an empty cache and from a warm one, forward and end-to-end speed,
their ratios to torch's, the 2-core compute bound ``cores / (cores / forward + 1 / decode_per_core)`` and the
end-to-end share of it, min/mean cosine to torch fp32 features, and the digits probe's accuracy delta.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featurize.backbones import create_backbone
from featurize.engine import (
    autocast,
    default_batch_size,
    default_streams,
    default_workers,
    draft_size,
    intra_op_threads,
    iter_features,
    prepare_model,
    resolve_device,
    resolve_precision,
    stream_threads,
)
from featurize.errors import FeaturizeError
from featurize.runtime import resolve_runtime
from featurize.sources import Source, open_source
from featurize.store import StoreWriter, read_store
from heads import get_head
from pipelines.extract import extract_features
from pipelines.provenance import library_versions

__all__ = ["run_benchmark", "make_bench_images"]

BENCH_PHOTOS = ("coffee", "astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


def make_bench_images(folder: Path, count: int = 500, size: tuple[int, int] = (500, 375), seed: int = 0,
                      workers: int = 0, varied: bool = False) -> Path:
    """Write `count` JPEGs of `size` (w, h), random crops of scikit-image's bundled photographs (``workers``
    processes share the encoding; the same files whatever their number). `varied`: each crop's width and
    height drawn between half of `size` and `size`, so that nearly every image has a size of its own, as
    photographs do (another sequence of draws: the equal-size images stay the ones they always were)."""
    if importlib.util.find_spec("skimage") is None:
        raise FeaturizeError("the default benchmark images come from scikit-image: pip install scikit-image, "
                             "or give a folder of images with --images DIR")
    rng = np.random.default_rng(seed)
    shapes = [_bench_photo(name).shape for name in BENCH_PHOTOS]
    crops = []  # every image's (index, photo, top, left, mirrored, width, height), drawn in one sequence
    for i in range(count):
        k = i % len(BENCH_PHOTOS)
        w, h = size
        if varied:
            w = int(rng.integers(max(1, w // 2), min(w, shapes[k][1]) + 1))
            h = int(rng.integers(max(1, h // 2), min(h, shapes[k][0]) + 1))
        y = int(rng.integers(0, shapes[k][0] - h + 1))
        x = int(rng.integers(0, shapes[k][1] - w + 1))
        crops.append((i, k, y, x, bool(rng.random() < 0.5), w, h))
    folder.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        _write_bench_images(folder, crops)
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_bench_images, [folder] * workers, [crops[j::workers] for j in range(workers)]))
    return folder


@functools.lru_cache(maxsize=None)
def _bench_photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _write_bench_images(folder: Path, crops: list[tuple[int, int, int, int, bool, int, int]]) -> None:
    from PIL import Image

    for i, k, y, x, mirrored, w, h in crops:
        crop = _bench_photo(BENCH_PHOTOS[k])[y : y + h, x : x + w]
        if mirrored:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"bench-{i:05d}.jpg", quality=90)


def _timed(fn: Callable[[], int], min_seconds: float = 3.0, min_rounds: int = 3) -> float:
    """Items per second of `fn` (which returns how many items it did), repeated for a stable reading."""
    done, rounds, started = 0, 0, time.perf_counter()
    while rounds < min_rounds or time.perf_counter() - started < min_seconds:
        done += fn()
        rounds += 1
    return done / (time.perf_counter() - started)


def _forward_ips(backbone, device, precision: str, batch_size: int, streams: int, compile: bool) -> float:
    """The model alone, run exactly as the engine runs it: `streams` concurrent batches, same threads."""
    forward = prepare_model(backbone, device, compile)
    x = torch.randn(batch_size, *backbone.data_config["input_size"], device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    def one_stream(rounds: int) -> None:
        with torch.inference_mode(), autocast(device, precision):
            for _ in range(rounds):
                forward(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> int:
        rounds = 4
        list(pool.map(one_stream, [rounds] * streams))
        return rounds * streams * batch_size

    with intra_op_threads(stream_threads(device, streams)), ThreadPoolExecutor(streams) as pool:
        list(pool.map(one_stream, [2] * streams))  # warm-up: allocator, oneDNN/cuDNN kernel choice, compilation
        return _timed(step)


def _predecoded_ips(backbone, source: Source, count: int, device, precision: str, batch_size: int,
                    streams: int, compile: bool) -> float:
    """The engine's path from already decoded uint8 images: host-to-device copy, normalisation, model, features
    back to host -- everything but decoding, at the same batch size, precision and streams as the engine."""
    transform, draft = backbone.image_transform, draft_size(backbone.data_config)
    images = torch.stack([transform(source.load(i % len(source), draft)) for i in range(count)])
    batches = [images[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    forward = prepare_model(backbone, device, compile)

    def one_batch(batch) -> int:
        with torch.inference_mode(), autocast(device, precision):
            x = backbone.normalize(batch.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            forward(x).float().cpu().numpy()
        return len(batch)

    with intra_op_threads(stream_threads(device, streams)), ThreadPoolExecutor(streams) as pool:
        list(pool.map(one_batch, batches[: 2 * streams]))  # warm-up
        return _timed(lambda: sum(pool.map(one_batch, batches)))


def _naive_ips(model_name: str, spec: dict[str, Any], source: Source, count: int, device: torch.device) -> float:
    """The loop people write first: one image at a time, fp32, NCHW, PIL + timm's transform, on the device."""
    backbone = create_backbone(model_name, **spec)
    model, transform = backbone.model.to(device), backbone.transform
    paths = [source.path_of(i) for i in range(min(count, len(source)))]
    from PIL import Image

    def one(path) -> None:
        model(transform(Image.open(path).convert("RGB")).unsqueeze(0).to(device)).cpu()

    def loop() -> int:
        with torch.no_grad():
            for path in paths:
                one(path)
        return len(paths)

    with torch.no_grad():
        one(paths[0])  # warm-up
    return _timed(loop, min_seconds=2.0, min_rounds=1)


def _decode_ips(backbone, source: Source, count: int) -> float:
    transform, draft = backbone.image_transform, draft_size(backbone.data_config)
    indices = range(min(count, len(source)))

    def loop() -> int:
        for i in indices:
            transform(source.load(i, draft))
        return len(indices)

    return _timed(loop, min_seconds=2.0, min_rounds=1)


def _write_mb_s(folder: Path, rows: int = 20_000, dim: int = 1280) -> float:
    features = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    path = folder / "write-bench.h5"
    started = time.perf_counter()
    writer = StoreWriter(path, {"bench": True}, rows, dim, overwrite=True)
    for start in range(0, rows, 256):
        stop = min(start + 256, rows)
        writer.add(np.arange(start, stop), features[start:stop], [""] * (stop - start))
    writer.finalize([str(i) for i in range(rows)], [0] * rows, [""] * rows, ["x"], {})
    seconds = time.perf_counter() - started
    return rows * dim * 2 / 1e6 / seconds


def _features(source, model_name, spec, precision, device, batch_size, workers, streams, limit,
              runtime: str = "torch") -> np.ndarray:
    backbone = create_backbone(model_name, **spec)
    indices = range(min(limit, len(source)))
    engine = resolve_runtime(runtime, backbone, device, precision, batch_size)
    return np.concatenate([b.features for b in iter_features(source, backbone, indices, device=device,
                                                              precision=engine.precision, batch_size=batch_size,
                                                              workers=workers, streams=streams if runtime == "torch"
                                                              else None, runtime=engine)])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    return (a[ok] * b[ok]).sum(1) / np.linalg.norm(a[ok], axis=1) / np.linalg.norm(b[ok], axis=1)


@contextlib.contextmanager
def _cache_at(folder: Path):
    """Point the converted-model cache at `folder` for a block (a cold start measured without touching the
    user's cache)."""
    before = os.environ.get("HEADBENCH_CACHE")
    os.environ["HEADBENCH_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HEADBENCH_CACHE", None)
        else:
            os.environ["HEADBENCH_CACHE"] = before


def _openvino_measures(model: str, spec: dict[str, Any], folder: Path, source: Source, tmp: Path, device: torch.device,
                       precision: str, batch: int, workers: int, torch_result: dict[str, Any],
                       reference: np.ndarray | None, reference_probe: float | None) -> dict[str, Any]:
    """The OpenVINO runtime measured like torch in the same run (see the module docstring)."""
    out: dict[str, Any] = {}
    backbone = create_backbone(model, **spec)
    with _cache_at(tmp / "openvino-cache"):
        started = time.perf_counter()
        cold = resolve_runtime("openvino", backbone, device, precision, batch)
        out["openvino_first_start_s"] = time.perf_counter() - started
        started = time.perf_counter()
        engine = resolve_runtime("openvino", backbone, device, precision, batch)
        out["openvino_second_start_s"] = time.perf_counter() - started
        del cold
        out.update(openvino_version=engine.version, openvino_precision=engine.precision,
                   openvino_requests=engine.requests)
        channels, height, width = backbone.data_config["input_size"]
        x = np.random.default_rng(0).integers(0, 256, size=(batch, channels, height, width), dtype=np.uint8)
        if backbone.mean is None:
            x = x.astype(np.float32) / 255.0

        def step(pool) -> int:
            rounds = 4
            list(pool.map(lambda _: [engine.infer(x) for _ in range(rounds)], range(engine.requests)))
            return rounds * engine.requests * batch

        with ThreadPoolExecutor(engine.requests) as pool:
            step(pool)  # warm-up
            out["openvino_forward_ips"] = _timed(lambda: step(pool))
        e2e = extract_features(folder, tmp / "e2e-openvino.h5", model=model, **spec, device=str(device),
                               precision=precision, batch_size=batch, workers=workers, runtime="openvino",
                               progress=False)
        out["openvino_end_to_end_ips"] = e2e.images_per_second
        if reference is not None:
            cosine = _cosines(reference, _features(source, model, spec, precision, device, batch, workers, None,
                                                   limit=len(reference), runtime="openvino"))
            out["openvino_min_cosine"], out["openvino_mean_cosine"] = float(cosine.min()), float(cosine.mean())
        if reference_probe is not None:
            store = extract_features("builtin:digits", tmp / "digits-openvino.h5", model=model, **spec,
                                     device=str(device), precision=precision, batch_size=batch, workers=workers,
                                     runtime="openvino", progress=False)
            out["openvino_probe_acc_delta"] = (_probe_accuracy(store.path) - reference_probe) * 100
    cores = os.cpu_count() or 1
    per_core = torch_result["decode_ips_per_worker"]
    out["openvino_compute_bound_ips"] = cores / (cores / out["openvino_forward_ips"] + 1 / per_core)
    out["ratio_openvino_end_to_end_vs_compute_bound"] = out["openvino_end_to_end_ips"] / out["openvino_compute_bound_ips"]
    out["ratio_openvino_vs_torch_forward"] = out["openvino_forward_ips"] / torch_result["forward_ips"]
    out["ratio_openvino_vs_torch_end_to_end"] = out["openvino_end_to_end_ips"] / torch_result["end_to_end_ips"]
    return out


def _probe_accuracy(store_path: Path) -> float:
    store = read_store(store_path)
    train, test = store.split == "train", store.split == "test"
    probe = get_head("logreg").pipeline().set_params(clf__C=0.1)
    X = store.features.astype(np.float32)
    probe.fit(X[train], store.labels[train])
    return float((probe.predict(X[test]) == store.labels[test]).mean())


def _machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(
    model: str = "tf_efficientnet_lite0",
    *,
    weights: str = "auto",
    image_size: int | None = None,
    images: str | Path | None = None,
    num_images: int = 500,
    naive_images: int = 60,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    streams: int | None = None,
    compile: bool = False,
    quality: bool = True,
    runtimes: tuple[str, ...] = ("torch",),
    decode: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Measure extraction speed and reduced-precision quality in one run; returns a JSON-able dict.

    `runtimes`: ``torch`` is always measured (the reference); with ``openvino`` too, its measures are added
    (``openvino_*``)."""
    unknown = [r for r in runtimes if r not in ("torch", "openvino")]
    if unknown:
        raise FeaturizeError(f"bench --runtime takes torch and/or openvino, got {', '.join(unknown)}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    batch = batch_size or default_batch_size(dev)
    n_workers = default_workers(dev) if workers is None else workers
    n_streams = (1 if compile else default_streams(dev)) if streams is None else streams
    spec = {"weights": weights, "image_size": image_size}  # the backbone as every measure builds it
    backbone = create_backbone(model, **spec)

    with tempfile.TemporaryDirectory(prefix="headbench-bench-") as tmp:
        tmp = Path(tmp)
        folder = Path(images) if images else make_bench_images(tmp / "images", num_images)
        source = open_source(folder)
        result: dict[str, Any] = {
            "model": model,
            "weights": backbone.weights["source"],
            "input_size": list(backbone.data_config["input_size"]),
            "precision": prec,
            "batch_size": batch,
            "workers": n_workers,
            "streams": n_streams,
            "compile": compile,
            "images": len(source),
            "image_folder": str(folder) if images else f"generated: {num_images} JPEGs 500x375 (scikit-image crops)",
            "machine": _machine(dev),
            "library_versions": library_versions(),
        }
        result["forward_ips"] = _forward_ips(backbone, dev, prec, batch, n_streams, compile)
        e2e = extract_features(folder, tmp / "e2e.h5", model=model, **spec, device=device, precision=prec,
                               batch_size=batch, workers=n_workers, streams=n_streams, compile=compile,
                               runtime="torch", decode=decode, progress=progress)
        result["end_to_end_ips"] = e2e.images_per_second
        result["end_to_end_steady_ips"] = e2e.steady_images_per_second
        result["decoder"] = e2e.decoder
        for key in ("startup_seconds", "first_batch_seconds", "shutdown_seconds"):
            result[key] = getattr(e2e, key)
        result["nonfinite_rows"] = sum(n for reason, n in e2e.failure_reasons.items()  # the writer's own check
                                       if reason.startswith("non-finite"))
        if e2e.decoder == "tensor":  # the same run, decoded by Pillow: what tensor decoding gains
            cpu = extract_features(folder, tmp / "e2e-cpu.h5", model=model, **spec, device=device,
                                   precision=prec, batch_size=batch, workers=n_workers, streams=n_streams,
                                   compile=compile, runtime="torch", decode="cpu", progress=progress)
            result["end_to_end_cpu_decode_ips"] = cpu.images_per_second
            result["end_to_end_cpu_decode_steady_ips"] = cpu.steady_images_per_second
            result["cpu_decode_first_batch_seconds"] = cpu.first_batch_seconds
            result["ratio_end_to_end_vs_cpu_decode"] = e2e.images_per_second / cpu.images_per_second
        result["naive_ips"] = _naive_ips(model, spec, source, naive_images, dev)
        result["decode_ips_per_worker"] = _decode_ips(backbone, source, min(200, len(source)))
        result["predecoded_ips"] = _predecoded_ips(backbone, source, min(max(4 * batch, 256), 1024), dev, prec, batch,
                                                   n_streams, compile)
        result["ratio_predecoded_vs_forward"] = result["predecoded_ips"] / result["forward_ips"]
        # The JPEG path against what the decode side can feed: workers (or, with none, the streams) decoding.
        result["decode_capacity_ips"] = result["decode_ips_per_worker"] * max(n_workers, 1)
        result["ratio_end_to_end_vs_decode_capacity"] = result["end_to_end_ips"] / result["decode_capacity_ips"]
        if "end_to_end_cpu_decode_ips" in result:  # the capacity is the Pillow processes': their path's share of it
            result["ratio_cpu_decode_vs_decode_capacity"] = (result["end_to_end_cpu_decode_ips"]
                                                             / result["decode_capacity_ips"])
        result["write_mb_s"] = _write_mb_s(tmp)
        result["ratio_end_to_end_vs_forward"] = result["end_to_end_ips"] / result["forward_ips"]
        if e2e.steady_images_per_second:
            result["ratio_steady_vs_forward"] = e2e.steady_images_per_second / result["forward_ips"]
        result["speedup_vs_naive"] = result["end_to_end_ips"] / result["naive_ips"]

        fp32 = None
        if quality:
            fp32 = _features(source, model, spec, "fp32", dev, batch, n_workers, n_streams, limit=200)
            bf16 = _features(source, model, spec, "bf16", dev, batch, n_workers, n_streams, limit=200)
            cosine = _cosines(fp32, bf16)
            result["bf16_min_cosine"] = float(cosine.min())
            result["bf16_mean_cosine"] = float(cosine.mean())
            accuracy = {}
            for p in ("fp32", "bf16"):
                store = extract_features("builtin:digits", tmp / f"digits-{p}.h5", model=model, **spec,
                                         device=device, precision=p, batch_size=batch, workers=n_workers,
                                         streams=n_streams, runtime="torch", progress=progress)
                accuracy[p] = _probe_accuracy(store.path)
            result["probe_accuracy_fp32"] = accuracy["fp32"]
            result["probe_accuracy_bf16"] = accuracy["bf16"]
            result["bf16_probe_acc_delta"] = (accuracy["bf16"] - accuracy["fp32"]) * 100
        if "openvino" in runtimes:
            result.update(_openvino_measures(model, spec, folder, source, tmp, dev, precision, batch, n_workers,
                                             result, fp32, result.get("probe_accuracy_fp32")))
    return result
