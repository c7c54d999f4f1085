"""Peak memory of `cli.py extract` at two dataset sizes: memory must not grow with the number of images.

Generates N JPEGs (crops of scikit-image's photographs), runs the real CLI in a subprocess, and samples the
resident set size of its whole process tree (the CLI and any decode workers) every 20 ms with psutil.

Example:
    python benchmarks/peak_rss.py --sizes 2000 8000 --model tf_efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.bench import make_bench_images  # noqa: E402


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss_of_extract(images: Path, out: Path, model: str, weights: str) -> tuple[int, float]:
    cmd = [sys.executable, str(ROOT / "cli.py"), "extract", str(images), "--model", model, "--weights", weights,
           "--out", str(out), "--overwrite", "-q"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"extract failed with exit code {proc.returncode}")
    return peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="headbench-rss-") as tmp:
        tmp = Path(tmp)
        pool = make_bench_images(tmp / "pool", 200, size=(200, 150))
        for n in args.sizes:
            folder = tmp / f"n{n}"
            folder.mkdir()
            for i in range(n):  # hard links: n distinct files, no extra disk
                (folder / f"{i:06d}.jpg").hardlink_to(pool / f"bench-{i % 200:05d}.jpg")
            peak, seconds = peak_rss_of_extract(folder, tmp / f"n{n}.h5", args.model, args.weights)
            results.append({"images": n, "peak_rss_mb": peak / 2**20, "seconds": seconds})
            print(f"{n:>7} images: peak RSS {peak / 2**20:8.1f} MiB ({seconds:.1f} s)", flush=True)
    ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"peak RSS ratio {results[-1]['images']} vs {results[0]['images']} images: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratio": ratio, "model": args.model}, indent=2))


if __name__ == "__main__":
    main()
