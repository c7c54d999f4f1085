"""Where the JPEG path's time goes at the start and end of a GPU run: the decode DataLoader alone (15 workers),
forked from a process without CUDA, from one holding a CUDA context, and from a forkserver.

    N=3000 W=15 python benchmarks/gpu_jpeg_diag.py

Prints, per start method, when the first batch arrived, when the last did, and when the loop ended (worker
shutdown). docs/benchmarks.md has one H100 session's output.
"""
import os, time, tempfile, multiprocessing
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from pipelines.bench import make_bench_images
from featurize.sources import open_source
from featurize.backbones import create_backbone
from featurize.engine import DecodeDataset, collate_decoded

def main():
    n = int(os.environ.get("N", 3000)); workers = int(os.environ.get("W", 15))
    folder = make_bench_images(Path(tempfile.mkdtemp()) / "img", n)
    ds = DecodeDataset(open_source(folder), create_backbone("tf_efficientnet_lite0", "random"), True)
    for label, ctx in (("fork, no CUDA", None), ("fork, CUDA initialised", None), ("forkserver, CUDA initialised", "forkserver")):
        if "CUDA" in label and torch.cuda.is_available():
            torch.zeros(1, device="cuda")
        if ctx:
            c = multiprocessing.get_context(ctx); c.set_forkserver_preload(["featurize.engine"]); ctx = c
        t0 = time.perf_counter(); times = []
        for _ in DataLoader(ds, batch_size=128, sampler=list(range(n)), num_workers=workers, collate_fn=collate_decoded,
                            pin_memory=torch.cuda.is_available(), prefetch_factor=4, multiprocessing_context=ctx):
            times.append(time.perf_counter() - t0)
        end = time.perf_counter() - t0
        print(f"{label}: first batch {times[0]:.2f} s, last {times[-1]:.2f} s, loop ends (workers shut down) {end:.2f} s", flush=True)

if __name__ == "__main__":
    main()
