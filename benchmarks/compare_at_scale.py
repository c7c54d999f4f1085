"""compare-heads at scale, measured: the default budgeted comparison run several times on one store, and the
exact RBF SVM fitted once for reference. The numbers of docs/benchmarks.md ("compare-heads at scale") come
from it.

    python examples/fashion_mnist_to_folder.py bench/fashion-images
    python cli.py extract bench/fashion-images --model tf_efficientnet_lite0 --weights packaged --out bench/fashion-lite0.h5
    python benchmarks/compare_at_scale.py bench/fashion-lite0.h5 --runs 3 --out bench/fashion-runs
    python benchmarks/compare_at_scale.py bench/fashion-lite0.h5 --runs 0 --exact-svc standardize,10

Per run: wall seconds against the budget, the winner, every head's mode (dropped, duplicate, skipped, full,
halving, approximated), and actual / predicted seconds; then whether the runs agree. --exact-svc PREP,C fits
``SVC(C, gamma="scale")`` on every training row after PREP (standardize or l2) and scores the test split.
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

from heads.registry import PREPROCESSING, SVC_CACHE_MB  # noqa: E402
from pipelines.compare import DEFAULT_BUDGET_MINUTES, compare_heads  # noqa: E402
from pipelines.report import write_results  # noqa: E402


def modes(comparison) -> dict[str, str]:
    """Every head's mode: how it ran, or why it did not."""
    out = {}
    for r in comparison.rows:
        out[f"{r['representation']}/{r['head']}"] = "approximated" if r["approximated"] else r["mode"]
    for r in comparison.skipped:
        out[f"{r['representation']}/{r['head']}"] = r["mode"]
    return out


def one_run(store: str, budget: float, out: Path | None) -> dict:
    started = time.perf_counter()
    comparison = compare_heads([store], budget=budget, progress=True)
    wall = time.perf_counter() - started
    if out is not None:
        write_results(comparison, out)
    best = comparison.best
    return {
        "seconds": wall,
        "budget_seconds": comparison.budget_seconds,
        "budget_used": wall / comparison.budget_seconds,
        "winner": f"{best['head']} {json.dumps(best['params'], sort_keys=True)}",
        "winner_accuracy": best["accuracy"],
        "modes": modes(comparison),
        "ratios": {r["head"]: r["actual_seconds"] / r["predicted_seconds"]
                   for r in comparison.rows if r["predicted_seconds"]},
        "rows": [{k: r.get(k) for k in ("head", "accuracy", "mode", "approximated", "tune_rows", "components", "params",
                                        "share_seconds", "predicted_seconds", "actual_seconds", "race")}
                 for r in comparison.rows],
        "dropped": comparison.skipped,
    }


def exact_svc(store: str, prep: str, C: float) -> dict:
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    from featurize.store import read_store

    s = read_store(store)
    train, test = (s.split == "train") & s.ok, (s.split == "test") & s.ok
    X = np.asarray(s.features, dtype=np.float32)
    model = make_pipeline(PREPROCESSING[prep](), SVC(C=C, gamma="scale", cache_size=SVC_CACHE_MB))
    started = time.perf_counter()
    model.fit(X[train], s.labels[train])
    fit = time.perf_counter() - started
    started = time.perf_counter()
    accuracy = float((model.predict(X[test]) == s.labels[test]).mean())
    return {"prep": prep, "C": C, "fit_seconds": fit, "predict_seconds": time.perf_counter() - started,
            "accuracy": accuracy, "support_vectors": int(model[-1].support_.size), "train_rows": int(train.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--runs", type=int, default=3, help="default compare-heads runs [default: 3]")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_MINUTES, help="minutes [default: 15]")
    parser.add_argument("--out", type=Path, help="write each run's results here (run-1/, run-2/, ...) and runs.json")
    parser.add_argument("--exact-svc", metavar="PREP,C", help="also fit the exact SVC once, e.g. standardize,10")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        run = one_run(args.store, args.budget, args.out / f"run-{i + 1}" if args.out else None)
        runs.append(run)
        print(f"run {i + 1}: {run['seconds']:.0f} s ({run['budget_used'] * 100:.0f} % of the budget), winner "
              f"{run['winner']} {run['winner_accuracy'] * 100:.2f} %")
        print("  modes: " + ", ".join(f"{k}={v}" for k, v in run["modes"].items()))
        print("  actual/predicted: " + ", ".join(f"{k} {v:.2f}" for k, v in run["ratios"].items()))
    result = {"store": args.store, "runs": runs}
    if runs:
        result["same_winner"] = len({r["winner"] for r in runs}) == 1
        result["same_modes"] = all(r["modes"] == runs[0]["modes"] for r in runs)
        print(f"same winner in every run: {result['same_winner']}; same mode per head: {result['same_modes']}")
    if args.exact_svc:
        prep, C = args.exact_svc.split(",")
        result["exact_svc"] = exact = exact_svc(args.store, prep, float(C))
        print(f"exact SVC ({prep}, C={C}) on {exact['train_rows']} rows: {exact['accuracy'] * 100:.2f} %, fit "
              f"{exact['fit_seconds']:.0f} s, predict {exact['predict_seconds']:.0f} s, "
              f"{exact['support_vectors']} support vectors")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
