"""What the host spends per image on the GPU's code path, measured on any machine (no GPU needed).

The staged engine (featurize/stages.py) runs end to end on real JPEG files -- read into per-batch buffers,
headers scanned, batches assembled, stages handed over, features collected, the store written -- with an injected
stub decoder (the batch is "decoded" at once: nothing is written into the preallocated input) and a null model
(returns preallocated features). What is left is the host's own cost: the ceiling it puts on any GPU.

    python benchmarks/host_overhead.py --json host.json                      # 20 000 generated JPEGs, batch 128
    python benchmarks/host_overhead.py --images DIR --batch-size 128 --workers 2

Prints and writes (``--json``): ``images_per_second``, ``wall_us_per_image`` and ``cpu_us_per_image`` (process
CPU time), ``loop_us_per_image`` and ``finalize_us_per_image`` (the stream of batches, and the store's final
HDF5 assembly after it), ``with_model_calls`` (the same run with a null model that makes ``--model-calls`` tiny
torch calls per batch, holding the GIL between them as an eager forward's launches do),
``torch_calls_per_batch`` per stage at the batch size and at a quarter of it (a second, counted run: counting
slows the run, so the timing comes from the first), ``blocking_syncs_per_batch`` per stage (every wait
on the device the engine makes, counted by the engine itself), ``critical_path_syncs_per_batch`` (read, decode
and compute stages: what would stall the GPU's feed), the header scan's microseconds per image, and the machine.

``simulated_device`` is the same run against a device that takes time: the stub decoder blocks its thread as
long as a batched decode of its rows takes at ``--device-ips``'s first rate (torchvision's nvJPEG call blocks),
and the null model makes its torch calls and then launches the batch on a :class:`SimulatedDevice` that runs
forwards one after another at the second rate while the host goes on; the collect stage waits for each batch's
turn (the sleeps release the GIL, as a thread waiting on the device does). Decode and forward are taken as
independent (the hardware JPEG decoder beside the SMs): a shared GPU is slower. Defaults: the planners' H200,
nvJPEG + resize 23 700 img/s and lite0's forward 21 154 img/s. If the stages overlap, the run goes at the
slowest of decode, forward and the host (``bound_ips``); one after the other it would go at ``serial_ips``.
``ratio_to_bound`` is what a GPU of those speeds can expect from this host; ``steady_ips`` the rate from the
first batch to the last.

``resize_of_many_sizes`` is the decode stage's resizing of a batch of photographs that share no size (on
CUDA they go to :meth:`PillowResample.padded`): run on PyTorch's meta device, which computes shapes only, it
counts the device operations a batch issues (each a launch on a GPU; views not counted) and the host's time per
batch outside them (Python, numpy, the weights' planning, and the counter's own cost per operation: an upper
bound), for sizes new to the decoder and for sizes seen before.

``pillow_path`` is the other GPU path: ``--workers`` Pillow decode processes feeding the stages (the null
model), on ``--pillow-images`` images, against its decode capacity (``--workers`` times one process's decode
rate, as ``bench`` defines it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurize.backbones import create_backbone  # noqa: E402
from featurize.decode import device_takes  # noqa: E402
from featurize.engine import steady_rate  # noqa: E402
from featurize.jpeg import is_complete, scan_jpeg  # noqa: E402
from featurize.sources import open_source  # noqa: E402
from featurize.stages import EngineProbe, iter_staged  # noqa: E402
from featurize.store import StoreWriter  # noqa: E402
from pipelines.bench import make_bench_images  # noqa: E402

CPU = torch.device("cpu")


H200 = (23_700.0, 21_154.0)  # img/s: batched nvJPEG + resize, lite0's forward (bf16, batch 128); issue 25's table


class StubDecoder:
    """Takes what nvJPEG would take and "decodes" it at once: the preallocated input stays as it is. With
    `images_per_second`, it sleeps as long as a device decode of the batch's JPEG rows would take."""

    def __init__(self, images_per_second: float | None = None):
        self.seconds_per_image = 1.0 / images_per_second if images_per_second else 0.0

    def accepts(self, header) -> bool:
        return device_takes(header, cuda=True)

    def decode(self, batch, write) -> list[int]:
        if self.seconds_per_image:
            time.sleep(len(batch.jpeg_rows) * self.seconds_per_image)
        return []


class SimulatedDevice:
    """A device that runs forwards one after another while the host goes on, as a CUDA stream does: a launch
    returns at once, and its batch is ready when the device has run it and every batch launched before it."""

    def __init__(self, images_per_second: float):
        self.seconds_per_image = 1.0 / images_per_second
        self.free_at = 0.0  # when the device has run everything launched so far (the compute thread's clock)
        self.ready: collections.deque = collections.deque()  # per launched batch, in order: when it is done

    def launch(self, rows: int) -> float:
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + rows * self.seconds_per_image
        return self.free_at

    def wait(self, ready: float | None = None) -> None:
        """Until the next launched batch (or `ready`) is done: the collect stage's wait on its copy."""
        delay = (self.ready.popleft() if ready is None else ready) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def null_model(batch_size: int, dim: int, calls: int = 0, device: SimulatedDevice | None = None):
    """Preallocated features at once; with `calls`, that many tiny torch operations first, holding the GIL
    between them as an eager forward's kernel launches do (lite0: about 200 per batch); with `device`, each
    forward is then launched on it (the first, the engine's warm-up, is waited for, as the engine does)."""
    features = torch.ones(batch_size, dim)
    scratch = torch.zeros(1)
    warmed = []

    def forward(x):
        for _ in range(calls):
            scratch.add_(0)
        if device is not None:
            ready = device.launch(batch_size)
            if warmed:
                device.ready.append(ready)
            else:
                device.wait(ready)
                warmed.append(True)
        return features

    return forward


def machine() -> dict:
    flags, model = set(), ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return {"cpu": model, "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__}


def run(source, backbone, rows, batch_size: int, workers: int, out: Path, probe: EngineProbe,
        model_calls: int = 0, device_ips: tuple[float, float] | None = None, decode: str = "tensor") -> dict:
    """One pass through the stages into a store; wall and process-CPU time. `device_ips`: (decode, forward)
    images per second of a simulated device (see the module's docstring); `decode`: ``tensor`` (reader
    threads and the stub decoder) or ``pillow`` (`workers` Pillow decode processes)."""
    decode_ips, forward_ips = device_ips or (None, None)
    device = SimulatedDevice(forward_ips) if forward_ips else None
    dim = backbone.num_features
    writer = StoreWriter(out, {"host_overhead": True}, len(source), dim, overwrite=True)
    stamps: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in iter_staged(source, backbone, rows, device=CPU, precision="bf16", batch_size=batch_size,
                             workers=workers, decode=decode, decoder=StubDecoder(decode_ips),
                             forward=null_model(batch_size, dim, model_calls, device), probe=probe,
                             timings=stamps):
        if device is not None:
            device.wait()
        writer.add(batch.indices, batch.features, batch.errors, batch.layers)
    loop = time.perf_counter() - wall
    if len(rows) == len(source):
        samples = source.samples
        writer.finalize([s.id for s in samples], [s.label for s in samples], [s.split for s in samples],
                        source.classes, {})
    else:
        writer.abandon()  # the counted runs do part of the rows: their partial store is left in the temp folder
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "loop_s": loop, "failed_rows": writer.num_failed,
            "steady_ips": steady_rate(stamps, len(rows) - min(batch_size, len(rows))),
            "first_batch_s": stamps["first_batch"] - stamps["model_ready"]}


def header_scan_us(source, count: int = 2000) -> float:
    datas = [source.read_bytes(i) for i in range(min(count, len(source)))]
    started = time.perf_counter()
    for data in datas:
        scan_jpeg(data)
        is_complete(data)
    return (time.perf_counter() - started) / len(datas) * 1e6


def pillow_path(source, backbone, count: int, batch_size: int, workers: int, tmp: Path) -> dict:
    """The Pillow-process path (`workers` decode processes hand over decoded batches; the decode stage copies and
    normalises them) with the null model, against its decode capacity: `workers` times one process's decode +
    transform rate, as ``bench`` defines it. On a CPU the normalisation runs on the host, which on a GPU is
    the device's work, so the ratio is a floor."""
    from pipelines.bench import _decode_ips

    per_worker = _decode_ips(backbone, source, min(count, 200))
    result = run(source, backbone, range(count), batch_size, workers, tmp / "pillow.h5", EngineProbe(),
                 decode="pillow")
    capacity = per_worker * workers
    return {"images": count, "workers": workers, "decode_ips_per_worker": per_worker, "decode_capacity_ips": capacity,
            "images_per_second": count / result["loop_s"], "ratio_to_capacity": count / result["loop_s"] / capacity,
            "steady_ips": result["steady_ips"],
            "steady_ratio_to_capacity": result["steady_ips"] / capacity if result["steady_ips"] else None,
            "first_batch_seconds": result["first_batch_s"]}


class _DeviceOps(TorchDispatchMode):
    """Counts the operations that reach a device (views aside) and the time spent inside them."""

    VIEWS = {"view", "_unsafe_view", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "expand",
             "permute", "alias", "as_strided", "unbind", "split", "detach", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.ops, self.inside = 0, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        started = time.perf_counter()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.inside += time.perf_counter() - started
            self.ops += func.__name__.split(".")[0] not in self.VIEWS


def resize_of_many_sizes(backbone, batch_size: int, seed: int = 0) -> dict:
    """Device operations and host milliseconds per batch when every image of the batch has its own size (240 to
    1 200 px a side), resized as the decode stage does on CUDA (``PillowResample.padded``), on the meta device:
    sizes the decoder has seen, and the same batch to a decoder that has not."""
    import numpy as np

    from featurize.decode import PillowResample, tensor_steps

    steps = tensor_steps(backbone)
    if not steps or not isinstance(steps[0], PillowResample):
        return {"skipped": f"{backbone.name}'s preprocessing is not one fused resize + crop"}
    rng = np.random.default_rng(seed)
    meta = torch.device("meta")
    images = [(i, torch.empty(3, int(h), int(w), dtype=torch.uint8, device=meta))
              for i, (w, h) in enumerate(rng.integers(240, 1201, size=(batch_size, 2)))]
    warm = PillowResample(steps[0].fused)
    list(warm.padded(images))  # the first call's one-off costs; and these sizes are now seen
    out = {"batch_size": batch_size}
    for label in ("seen_sizes", "new_sizes"):
        counted, host = [], []
        for _ in range(3):
            # new sizes: the same batch to a decoder that has not seen them
            resample = PillowResample(steps[0].fused) if label == "new_sizes" else warm
            with _DeviceOps() as ops:
                started = time.perf_counter()
                assert sum(len(positions) for positions, _ in resample.padded(images)) == batch_size
                host.append(time.perf_counter() - started - ops.inside)
            counted.append(ops.ops)
        out[label] = {"device_ops_per_batch": max(counted), "host_ms_per_batch": min(host) * 1e3}
    return out


def measure(folder: Path, batch_size: int, workers: int, model: str, tmp: Path, model_calls: int = 200,
            device_ips: tuple[float, float] = H200, pillow_images: int = 2000) -> dict:
    source = open_source(folder)
    for i in range(len(source)):  # into the page cache: the measure is the host's work, not the disk's
        source.read_bytes(i)
    backbone = create_backbone(model, "random")
    n = len(source)
    timed = EngineProbe()
    result = run(source, backbone, range(n), batch_size, workers, tmp / "host.h5", timed)
    batches = -(-n // batch_size)
    out = {
        "images": n, "batch_size": batch_size, "workers": workers, "model": model,
        "images_per_second": n / result["wall_s"],
        "wall_us_per_image": result["wall_s"] / n * 1e6,
        "cpu_us_per_image": result["cpu_s"] / n * 1e6,
        # of the wall time: the loop (engine + the writer's shards) and the store's final assembly (HDF5)
        "loop_us_per_image": result["loop_s"] / n * 1e6,
        "finalize_us_per_image": (result["wall_s"] - result["loop_s"]) / n * 1e6,
        "failed_rows": result["failed_rows"],
        "blocking_syncs_per_batch": {k: v / batches for k, v in sorted(timed.syncs.items()) if k != "startup"},
        "startup_syncs": timed.syncs["startup"],
        "critical_path_syncs_per_batch": sum(timed.syncs[k] for k in ("read", "decode", "compute")) / batches,
        "forwards": len(timed.forward_rows), "forward_rows": sorted(set(timed.forward_rows)),
        "forward_threads": len(timed.forward_threads),
    }
    # the same with a model that keeps the compute thread busy in Python as a launch-bound forward does
    busy = run(source, backbone, range(n), batch_size, workers, tmp / "busy.h5", EngineProbe(), model_calls)
    out["with_model_calls"] = {"calls_per_batch": model_calls, "images_per_second": n / busy["wall_s"],
                               "wall_us_per_image": busy["wall_s"] / n * 1e6,
                               "loop_us_per_image": busy["loop_s"] / n * 1e6}
    # the same against a device that takes time: do the stages overlap it, and does the host keep up?
    simulated = run(source, backbone, range(n), batch_size, workers, tmp / "device.h5", EngineProbe(), model_calls,
                    device_ips)
    decode_ips, forward_ips = device_ips
    host_ips = n / busy["loop_s"]
    bound = min(decode_ips, forward_ips, host_ips)
    out["simulated_device"] = {
        "decode_ips": decode_ips, "forward_ips": forward_ips, "model_calls_per_batch": model_calls,
        "host_ips": host_ips, "bound_ips": bound,
        "serial_ips": 1.0 / (1.0 / decode_ips + 1.0 / forward_ips + 1.0 / host_ips),
        "images_per_second": n / simulated["loop_s"], "ratio_to_bound": n / simulated["loop_s"] / bound,
        "with_finalize_ips": n / simulated["wall_s"], "steady_ips": simulated["steady_ips"],
        "first_batch_seconds": simulated["first_batch_s"],
    }
    calls = {}
    for size in (batch_size, max(1, batch_size // 4)):
        # steady state: the calls of a run of 40 batches minus those of a run of 10, per extra batch, so the
        # buffers made once at the start (slots, pinned buffers, arenas) are not spread over the batches
        counts = []
        for batches_run in (10, 40):
            counted = EngineProbe(count_calls=True)
            run(source, backbone, range(min(n, batches_run * size)), size, workers, tmp / f"calls-{size}.h5", counted)
            counts.append(counted.calls)
        extra = min(n, 40 * size) // size - min(n, 10 * size) // size
        stages = sorted(set(counts[0]) | set(counts[1]))
        calls[str(size)] = {k: round((counts[1][k] - counts[0][k]) / max(extra, 1), 2) for k in stages}
    out["torch_calls_per_batch"] = calls
    out["header_scan_us_per_image"] = header_scan_us(source)
    out["resize_of_many_sizes"] = resize_of_many_sizes(backbone, batch_size)
    if pillow_images:
        out["pillow_path"] = pillow_path(source, backbone, min(n, pillow_images), batch_size, workers, tmp)
    out["machine"] = machine()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="a folder of JPEGs (default: generated, 500x375, quality 90)")
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="reader threads (default: cores - 1, as on a GPU machine)")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="gives the input size and feature width")
    parser.add_argument("--model-calls", type=int, default=200,
                        help="torch calls the busy null model makes per batch (default: about lite0's forward)")
    parser.add_argument("--device-ips", default=f"{H200[0]:.0f},{H200[1]:.0f}",
                        help="DECODE,FORWARD images per second of the simulated device (default: the planners' "
                             "H200 with lite0)")
    parser.add_argument("--pillow-images", type=int, default=2000,
                        help="images for the Pillow-process path against its decode capacity (0: skip it)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    try:
        device_ips = tuple(float(v) for v in args.device_ips.split(","))
        if len(device_ips) != 2 or min(device_ips) <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"--device-ips takes two positive rates, DECODE,FORWARD; got {args.device_ips!r}")
    with tempfile.TemporaryDirectory(prefix="headbench-host-") as tmp:
        tmp = Path(tmp)
        folder = args.images or make_bench_images(tmp / "images", args.num_images, workers=os.cpu_count() or 1)
        result = measure(folder, args.batch_size, args.workers, args.model, tmp, args.model_calls, device_ips,
                         args.pillow_images)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
