"""Write some of scikit-learn's digits as PNG files in an image folder (ROOT/<digit>/<id>.png).

The demo uses it to show `predict` on ordinary image files. The pixels are exactly those of
`builtin:digits` (8x8, scaled to 0..255, lossless PNG), so predictions match the builtin source.

Example:
    python examples/digits_to_folder.py demo/digits-png --split test            # the 450 test digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from featurize.sources import DigitsSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to create")
    parser.add_argument("--split", choices=["train", "test", "all"], default="test")
    parser.add_argument("--limit", type=int, default=None, help="how many images to write (default: every one)")
    args = parser.parse_args()
    source = DigitsSource()
    picked = [s for s in source.samples if args.split == "all" or s.split == args.split][: args.limit]
    for sample in picked:
        path = args.root / source.classes[sample.label] / f"digit-{sample.index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        source.load(sample.index).save(path)
    print(f"wrote {len(picked)} images to {args.root}")


if __name__ == "__main__":
    main()
