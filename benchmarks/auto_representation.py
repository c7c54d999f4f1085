"""The representation grid of issue 28: backbones x crops x {last layer, best stage, every stage side by side,
--representation auto}, each with the default budgeted compare-heads, wall times included.

    python benchmarks/auto_representation.py IMAGES --work bench/r28g \\
        --backbones lite0,lite1,lite2 --crops 1.0,0.875 --cells auto,last,stage,concat

IMAGES: an image folder with train/ and test/ split folders (examples/fashion_mnist_to_folder.py writes the full
Fashion-MNIST as one). Per backbone x crop, one store holds every stage (crop 1.0 stores are extracted with
--representation auto, which picks crop 1.0 by itself for images smaller than the model's input; the others
with --layers stages and --crop-pct). Then one default compare-heads per cell, in the order given:

    auto    STORE.h5 --representation auto (the acceptance path: extract auto, then default compare-heads)
    last    STORE.h5 --representation given: the last layer only
    stage   STORE.h5:LAYER: the single stage ranked best on the training rows by the auto cell's ranking
            (run auto first; never chosen on test rows), or the one --stage names
    concat  STORE.h5:concat: every stage and the last layer side by side

Cells already in WORK/grid.json are skipped, so the grid can be run piecewise and resumed; every cell is
written as soon as it finishes. Prints the markdown table of docs/choosing-a-representation.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurize.store import StoreError, verify_store  # noqa: E402
from pipelines.compare import compare_heads  # noqa: E402
from pipelines.extract import extract_features  # noqa: E402
from pipelines.report import write_results  # noqa: E402
from pipelines.scoring import format_ci  # noqa: E402

CELLS = ("auto", "last", "stage", "concat")


def cpu_name() -> str:
    """The CPU model and whether it has AVX512-BF16 (numbers on these machines depend on it)."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    name = fields.get("Model name", "unknown CPU").strip()
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs, " + (
        "AVX512-BF16" if "avx512_bf16" in flags else "AVX512" if "avx512f" in flags else "no AVX512")


def store_for(work: Path, images: str, backbone: str, crop: float, log: dict) -> Path:
    """The every-stage store of one backbone x crop, extracted the first time (its seconds go to `log`)."""
    model = f"tf_efficientnet_{backbone}"
    path = work / f"{backbone}-crop{crop:g}.h5"
    key = path.name
    try:
        verify_store(path)
        return path
    except StoreError:
        pass
    options = {"representation": "auto"} if crop == 1.0 else {"layers": "stages", "crop_pct": crop}
    started = time.perf_counter()
    extract_features(images, path, model=model, weights="packaged", overwrite=True, progress=True, **options)
    log[key] = {"seconds": time.perf_counter() - started, "options": options}
    return path


def best_stage(grid: dict, cell_key: str) -> str:
    """The stage with the best ranking score in the auto cell of the same store (training rows only)."""
    auto = grid.get(f"{cell_key}/auto")
    if auto is None:
        raise SystemExit(f"cell 'stage' of {cell_key} needs its 'auto' cell first (the ranking it picks from)")
    stages = [s for s in auto["scores"] if ":" in s["candidate"] and ":concat(" not in s["candidate"]]
    return max(stages, key=lambda s: s[auto["rank_by"]])["candidate"].rsplit(":", 1)[1]


def run_cell(grid: dict, work: Path, store: Path, cell_key: str, cell: str, stage: str | None = None) -> dict:
    if cell == "auto":
        candidates, representation = [str(store)], "auto"
    elif cell == "last":
        candidates, representation = [str(store)], "given"
    elif cell == "stage":
        candidates, representation = [f"{store}:{stage or best_stage(grid, cell_key)}"], "given"
    else:
        candidates, representation = [f"{store}:concat"], "given"
    started = time.perf_counter()
    comparison = compare_heads(candidates, representation=representation, progress=True)
    seconds = time.perf_counter() - started
    write_results(comparison, work / "results" / cell_key.replace("/", "-") / cell)
    frozen = [r for r in comparison.rows if r["mode"] != "finetune"]
    best = frozen[0]
    out = {"candidates": candidates, "representation": best["representation"], "head": best["head"],
           "accuracy": best["accuracy"], "accuracy_ci": best["accuracy_ci"],
           "params": best.get("params"), "seconds": seconds, "budget_seconds": comparison.budget_seconds}
    if comparison.ranking is not None:
        out["scores"] = comparison.ranking["scores"]
        out["rank_by"] = comparison.ranking["rank_by"]
    if comparison.representation is not None:
        out["auto"] = {k: comparison.representation[k] for k in
                       ("winner", "reference", "reference_accuracy", "difference", "difference_ci",
                        "reference_dropped", "rank_seconds", "ran")}
    return out


def table(grid: dict, extracts: dict) -> list[str]:
    lines = ["| backbone | crop | cell | winner (representation, head) | test accuracy % [95 % CI] | "
             "compare-heads wall | extraction |",
             "|---|---:|---|---|---:|---:|---:|"]
    for key, r in grid.items():
        store_key, cell = key.rsplit("/", 1)
        backbone, crop = store_key.split("-crop")
        extract = extracts.get(f"{store_key}.h5", {}).get("seconds")
        layer = r["representation"].split(":", 1)[1] if ":" in r["representation"] else "last layer"
        lines.append(f"| {backbone} | {crop} | {cell} | {layer}, "
                     f"{r['head']} | {format_ci(r)} | {r['seconds']:.0f} s | "
                     f"{'' if extract is None else f'{extract:.0f} s'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", help="image folder with train/ and test/ splits")
    parser.add_argument("--work", type=Path, required=True, help="folder for the stores, grid.json and reports")
    parser.add_argument("--backbones", default="lite0,lite1,lite2")
    parser.add_argument("--crops", default="1.0,0.875")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"any of {', '.join(CELLS)}, in this order")
    parser.add_argument("--stage", help="the layer of the 'stage' cell, instead of the best one by the auto cell's "
                        "ranking (e.g. blocks.6, when the auto cell of that store was not run)")
    parser.add_argument("--table", action="store_true", help="only print the table of what grid.json holds")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    path = work / "grid.json"
    saved = json.loads(path.read_text()) if path.exists() else {"cpu": cpu_name(), "cells": {}, "extracts": {}}
    grid, extracts = saved["cells"], saved["extracts"]
    cells = args.cells.split(",")
    if unknown := set(cells) - set(CELLS):
        raise SystemExit(f"unknown cells {sorted(unknown)}; use {', '.join(CELLS)}")
    if not args.table:
        for backbone in args.backbones.split(","):
            for crop in map(float, args.crops.split(",")):
                store = store_for(work, args.images, backbone, crop, extracts)
                path.write_text(json.dumps(saved, indent=2))
                for cell in cells:
                    key = f"{backbone}-crop{crop:g}/{cell}"
                    if key in grid:
                        continue
                    grid[key] = run_cell(grid, work, store, key.rsplit("/", 1)[0], cell, args.stage)
                    path.write_text(json.dumps(saved, indent=2))
                    print(f"{key}: {format_ci(grid[key])} % in {grid[key]['seconds']:.0f} s", flush=True)
    print(f"\n{saved['cpu']}\n")
    print("\n".join(table(grid, extracts)))


if __name__ == "__main__":
    main()
