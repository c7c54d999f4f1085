"""Ray extraction vs the local engine, in one run: steady-state images/s of both on the same source, the
ratio, the actors' start-up time, and whether the features are identical.

The local engine runs first with this machine's defaults; then a Ray runtime (local with --num-cpus, or
--address) starts its actors, the script waits until every actor is up (start-up is reported on its own,
since it is paid once per run, not per image), and times the shards alone.

Example:
    python benchmarks/ray_extract.py --num-cpus 2
    python benchmarks/ray_extract.py --address 10.0.0.1:6379 --source /shared/photos --shard-size 1024
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurize.backbones import create_backbone  # noqa: E402
from featurize.engine import default_batch_size, iter_features, resolve_device, resolve_precision  # noqa: E402
from featurize.sources import open_source  # noqa: E402
from pipelines.cluster import RayExtractPool, ray_session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="builtin:digits")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of a local Ray runtime (no --address).")
    parser.add_argument("--address", help="An existing Ray cluster instead of a local runtime.")
    parser.add_argument("--skip-local", action="store_true", help="Only the Ray side (a head node without the "
                                                                  "workers' hardware, say).")
    args = parser.parse_args()

    src = open_source(args.source)
    n = len(src)
    local, local_seconds = None, 0.0
    if not args.skip_local:
        backbone = create_backbone(args.model, args.weights)
        device = resolve_device("auto")
        precision = resolve_precision("auto", device)
        started = time.perf_counter()
        batches = list(iter_features(src, backbone, range(n), device=device, precision=precision,
                                     batch_size=default_batch_size(device), workers=0 if device.type == "cpu" else 4))
        local_seconds = time.perf_counter() - started
        local = np.concatenate([b.features for b in batches]).astype(np.float16)
        print(f"local engine ({device}, {precision}): {n / local_seconds:.1f} img/s")

    if args.address is None:
        import ray

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    with ray_session(args.address) as ray:
        options = {"weights": args.weights, "image_size": None, "device": "auto", "precision": "auto",
                   "batch_size": None, "workers": None, "streams": None, "jpeg_draft": True, "compile": False}
        started = time.perf_counter()
        pool = RayExtractPool(args.source, args.model, options, report=print)
        try:
            pool.wait_for_all()  # every actor up before the clock starts
            up = time.perf_counter() - started
            shards = [range(s, min(s + args.shard_size, n)) for s in range(0, n, args.shard_size)]
            started = time.perf_counter()
            out = np.zeros((n, pool.description["num_features"]), np.float16)
            for batch in pool.batches(shards, "float16"):
                out[batch.indices] = batch.features
            seconds = time.perf_counter() - started
        finally:
            pool.shutdown()
        print(f"{pool.placement}, up in {up:.1f} s; steady state: {n / seconds:.1f} img/s")
    if local is not None:
        print(f"ratio ray / local: {local_seconds / seconds:.2f}")
        print(f"features identical to the local engine's: {np.array_equal(local, out, equal_nan=True)}")


if __name__ == "__main__":
    main()
