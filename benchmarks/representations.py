"""Which representation, measured: extract every candidate of one data set, rank them, compare heads on all of
them, and print how far each transferability score's ranking agrees with the best-head accuracy.

One command per data set (the tables of docs/choosing-a-representation.md come from these):

    python benchmarks/representations.py digits  --work bench-repr/digits
    python benchmarks/representations.py lfw     --work bench-repr/lfw
    python benchmarks/representations.py fashion --work bench-repr/fashion

Data sets (real, offline):
    digits   scikit-learn's 1 797 handwritten digits, 8x8 (builtin:digits; its 75/25 train/test split)
    lfw      scikit-image's lfw_subset: 100 faces and 100 non-faces, 25x25 grey (no test split: nested CV)
    fashion  a folder of product photographs: 2 000 train + 1 000 test Fashion-MNIST images, 28x28 grey, from
             Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), first rows of each file

Candidates: tf_efficientnet_lite0/1/2 (packaged ImageNet weights; lite1/2 need the zoo extra) at their last
layer and at every stage, lite0 with crop_pct 1.0, lite0 with random weights, lite0's stages concatenated, and
the pixels. Stores already in --work are reused (rerun to resume after an interruption).

On digits it also measures what --layers stages costs against --layers last (same run, alternated) and checks
that /features is bit-identical, and times `rank` on 12 candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.fashion_mnist_to_folder import write_fashion, write_pngs  # noqa: E402
from featurize.store import StoreError, read_store, verify_store  # noqa: E402
from pipelines.compare import best_accuracy, compare_heads  # noqa: E402
from pipelines.extract import extract_features  # noqa: E402
from pipelines.rank import rank_candidates  # noqa: E402
from pipelines.report import ranking_markdown, write_results  # noqa: E402

HEADS = "logreg,linear-svm,rbf-svm,knn"
LITE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def source_for(name: str, work: Path) -> str:
    """The extract SOURCE of a data set, writing its image folder under `work` the first time."""
    if name == "digits":
        return "builtin:digits"
    folder = work / "images"
    if folder.exists():
        return str(folder)
    if name == "lfw":
        from skimage.data import lfw_subset

        tmp = work / "images.tmp"
        images = (lfw_subset() * 255).round().astype(np.uint8)  # float in [0, 1] -> 8-bit grey
        write_pngs(tmp, images, np.repeat([0, 1], 100), ["face", "not-face"])
        tmp.rename(folder)
    elif name == "fashion":
        write_fashion(folder, train=2000, test=1000)
    else:
        raise SystemExit(f"unknown data set {name!r}; use digits, lfw or fashion")
    return str(folder)


def _store(work: Path, stem: str, source: str, **options) -> tuple[Path, float | None]:
    """Extract (or reuse) one store; returns its path and the extraction seconds (None when reused)."""
    path = work / f"{stem}.h5"
    try:
        verify_store(path)
        return path, None
    except StoreError:
        pass
    started = time.perf_counter()
    extract_features(source, path, overwrite=True, progress=True, **options)
    return path, time.perf_counter() - started


def stages_cost(work: Path, source: str) -> dict:
    """--layers stages vs --layers last with lite0, alternated twice in this run; /features compared bit for bit."""
    seconds = {"last": [], "stages": []}
    paths = {}
    for layers in ("last", "stages", "last", "stages"):
        path = work / f"cost-{layers}.h5"
        started = time.perf_counter()
        extract_features(source, path, model=LITE[0], weights="packaged", layers=layers, overwrite=True,
                         progress=False)
        seconds[layers].append(time.perf_counter() - started)
        paths[layers] = path
    a, b = read_store(paths["last"]), read_store(paths["stages"])
    identical = bool(np.array_equal(a.features.view(np.uint16), b.features.view(np.uint16)))
    for path in paths.values():
        path.unlink()
    best = {k: min(v) for k, v in seconds.items()}
    return {"seconds": seconds, "ratio": best["stages"] / best["last"], "features_bit_identical": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["digits", "lfw", "fashion"])
    parser.add_argument("--work", type=Path, required=True, help="folder for the image folder, stores and results")
    parser.add_argument("--heads", default=HEADS, help=f"heads compared on every candidate [default: {HEADS}]")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    source = source_for(args.dataset, work)
    report: dict = {"dataset": args.dataset, "source": source, "heads": args.heads, "extract_seconds": {}}

    stores = {}
    for model in LITE:
        stem = model.removeprefix("tf_efficientnet_")
        stores[stem], report["extract_seconds"][stem] = _store(work, stem, source, model=model, weights="packaged",
                                                              layers="stages")
    stores["crop1"], report["extract_seconds"]["crop1"] = _store(work, "lite0-crop1", source, model=LITE[0],
                                                                weights="packaged", crop_pct=1.0)
    stores["random"], report["extract_seconds"]["random"] = _store(work, "lite0-random", source, model=LITE[0],
                                                                  weights="random")
    stores["pixels"], report["extract_seconds"]["pixels"] = _store(work, "pixels", source, model="pixels")
    stores["pixels-grey8"], report["extract_seconds"]["pixels-grey8"] = _store(
        work, "pixels-grey8", source, model="pixels", grayscale=True, image_size=8, crop_pct=1.0)

    if args.dataset == "digits":
        report["stages_cost"] = stages_cost(work, source)
        twelve = [f"{stores['lite0']}:all", str(stores["lite1"]), str(stores["lite2"]), str(stores["random"]),
                  str(stores["pixels"]), str(stores["pixels-grey8"]), str(stores["crop1"])]
        started = time.perf_counter()
        ranking = rank_candidates(twelve, progress=False)
        report["rank_12"] = {"candidates": len(ranking.rows), "seconds": time.perf_counter() - started,
                             "per_score_seconds": {s: sum(r["seconds"][s] for r in ranking.rows)
                                                   for s in ranking.meta["scores"]}}

    candidates = [f"{stores[k]}:all" for k in ("lite0", "lite1", "lite2")] + [f"{stores['lite0']}:concat"] + [
        str(stores[k]) for k in ("crop1", "random", "pixels", "pixels-grey8")]
    started = time.perf_counter()
    comparison = compare_heads(candidates, args.heads.split(","), progress=True)
    report["compare_seconds"] = time.perf_counter() - started
    write_results(comparison, work / "results")
    best = best_accuracy(comparison.rows)
    report["protocol"] = comparison.plan.description
    report["best_head_accuracy"] = best
    report["ranking"] = comparison.ranking
    (work / "representations.json").write_text(json.dumps(report, indent=2))

    print(f"\n{args.dataset}: {len(candidates)} arguments, {len(best)} candidates; {report['protocol']}\n")
    print("\n".join(ranking_markdown(comparison)))
    if "stages_cost" in report:
        c = report["stages_cost"]
        print(f"\n--layers stages vs last (lite0, best of 2 each): {c['ratio']:.2f}x, features bit-identical: "
              f"{c['features_bit_identical']}")
        r = report["rank_12"]
        print(f"rank on {r['candidates']} candidates: {r['seconds']:.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in r['per_score_seconds'].items())})")
    print(f"compare-heads: {report['compare_seconds']:.0f} s; wrote {work / 'representations.json'}")


if __name__ == "__main__":
    main()
