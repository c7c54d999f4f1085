"""Write Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist) as an image folder of PNG files.

    ROOT/train/<class>/<index>.png   60 000 images
    ROOT/test/<class>/<index>.png    10 000 images

28x28 grey, lossless, in the order of the idx files; `--train N --test N` write the first N of each split.
The benchmarks of compare-heads at scale (docs/benchmarks.md) and of representations extract from it.

Example:
    python examples/fashion_mnist_to_folder.py bench/fashion-images
    python cli.py extract bench/fashion-images bench/fashion-lite0.h5 --model tf_efficientnet_lite0 --weights packaged
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path: Path) -> np.ndarray:
    """One idx file (the MNIST format: magic, dims, big-endian sizes, uint8 data) as an array."""
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_pngs(root: Path, images, labels, classes, split: str | None = None) -> None:
    """images[i] -> root[/split]/classes[labels[i]]/<i>.png"""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / split / classes[label] if split else root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def write_fashion(root: Path, train: int = 60_000, test: int = 10_000, source: Path = FASHION) -> Path:
    """Write the first `train` and `test` images into `root` (built beside it, renamed when complete)."""
    if not source.is_dir():
        raise SystemExit(f"{source} not found: apt-get install dataset-fashion-mnist")
    if root.exists():
        raise SystemExit(f"{root} exists; remove it or pick another folder")
    tmp = root.with_name(root.name + ".tmp")
    for split, prefix, n in zip(("train", "test"), ("train", "t10k"), (train, test)):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        write_pngs(tmp, images, labels, CLASSES, split)
    tmp.rename(root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to create")
    parser.add_argument("--train", type=int, default=60_000, help="first N training images [default: all 60 000]")
    parser.add_argument("--test", type=int, default=10_000, help="first N test images [default: all 10 000]")
    parser.add_argument("--source", type=Path, default=FASHION, help=f"folder of the idx files [default: {FASHION}]")
    args = parser.parse_args()
    write_fashion(args.root, args.train, args.test, args.source)
    print(f"wrote {args.train} + {args.test} images to {args.root}")


if __name__ == "__main__":
    main()
