"""bench-heads: what heads cost at scale, and whether the fast paths give the same answers.

On a store, or on realistic synthetic features (:mod:`heads.synthetic`) written as a store, one run measures:

* ``logreg``: scikit-learn's lbfgs vs ``torch-logreg`` at the same C and preprocessing -- fit seconds of the
  whole pipeline and of the classifier alone on standardized rows, test accuracy, speed-ups (CPU, and CUDA
  when present);
* ``c_path``: torch-logreg along the C grid, each fit cold vs warm-started from the previous C;
* ``rbf_svm``: exact ``SVC`` vs its Nystroem approximation, both fitted on the same training subset;
* ``compare_heads``: the whole default ``compare-heads`` run (every registered head, default budget), its
  wall time, winner and the per-head plan.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from featurize.store import StoreWriter, read_store
from heads import get_head
from heads.budget import DEFAULT_BUDGET_MINUTES
from heads.schedule import stratified_subset
from heads.synthetic import synthetic_features
from pipelines.provenance import library_versions

__all__ = ["write_synthetic_store", "run_heads_benchmark"]


def write_synthetic_store(path: str | Path, n: int = 60_000, d: int = 1280, classes: int = 10, *,
                          test_fraction: float = 1 / 6, seed: int = 0, overwrite: bool = False) -> Path:
    """Write synthetic features (:func:`heads.synthetic.synthetic_features`) as a store with a train/test split."""
    X, y = synthetic_features(n, d, classes, seed=seed)
    split = np.full(n, "train", dtype=object)
    split[np.random.default_rng(seed + 1).permutation(n)[: int(round(n * test_fraction))]] = "test"
    config = {"synthetic": {"n": n, "d": d, "classes": classes, "seed": seed, "test_fraction": test_fraction}}
    block = 8192
    writer = StoreWriter(Path(path), config, n, d, dtype="float16", shard_size=block, overwrite=overwrite)
    try:
        for start in range(0, n, block):
            stop = min(start + block, n)
            writer.add(np.arange(start, stop), X[start:stop], [""] * (stop - start))
        return writer.finalize([f"synthetic-{i:07d}" for i in range(n)], y.tolist(), split.tolist(),
                               [f"class-{c}" for c in range(classes)],
                               {"backbone": "synthetic", "source": f"synthetic:{n}x{d}x{classes}"})
    except BaseException:
        writer.abandon()
        raise


def _timed_fit(model, X: np.ndarray, y: np.ndarray) -> float:
    started = time.perf_counter()
    model.fit(X, y)
    return time.perf_counter() - started


def _accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(X) == y).mean())


def _logreg(X_train, y_train, X_test, y_test, Z_train, C: float, devices: list[str]) -> dict[str, Any]:
    """Pipelines (standardize + classifier, as compare-heads fits them) and the classifiers alone on the
    standardized rows `Z_train`, scikit-learn's lbfgs vs torch-logreg on each device, at the same C."""
    out: dict[str, Any] = {"C": C}
    sk = get_head("logreg").pipeline().set_params(clf__C=C)
    out["sklearn_fit_s"] = _timed_fit(sk, X_train, y_train)
    out["sklearn_accuracy"] = _accuracy(sk, X_test, y_test)
    out["sklearn_iterations"] = int(np.max(sk.named_steps["clf"].n_iter_))
    out["sklearn_clf_fit_s"] = _timed_fit(sk.named_steps["clf"], Z_train, y_train)
    for device in devices:
        ours = get_head("torch-logreg").pipeline().set_params(clf__C=C, clf__device=device)
        if device == "cuda":  # the first CUDA fit pays for context creation and kernel loading
            get_head("torch-logreg").pipeline().set_params(clf__C=C, clf__device=device).fit(X_train[:256], y_train[:256])
        out[f"torch_{device}_fit_s"] = _timed_fit(ours, X_train, y_train)
        out[f"torch_{device}_accuracy"] = _accuracy(ours, X_test, y_test)
        out[f"torch_{device}_iterations"] = int(ours.named_steps["clf"].n_iter_[0])
        out[f"torch_{device}_clf_fit_s"] = _timed_fit(ours.named_steps["clf"], Z_train, y_train)
        out[f"speedup_{device}"] = out["sklearn_fit_s"] / out[f"torch_{device}_fit_s"]
        out[f"clf_speedup_{device}"] = out["sklearn_clf_fit_s"] / out[f"torch_{device}_clf_fit_s"]
        out[f"accuracy_delta_{device}_points"] = (out[f"torch_{device}_accuracy"] - out["sklearn_accuracy"]) * 100
    return out


def _c_path(Z: np.ndarray, y_train, Cs: list[float]) -> dict[str, Any]:
    """torch-logreg on standardized rows `Z`, fitted at each C from zeros vs warm-started from the previous C."""
    from heads.torch_logreg import TorchLogisticRegression

    TorchLogisticRegression(max_iter=2).fit(Z[:256], y_train[:256])  # warm-up: torch's first-call costs
    cold = [_timed_fit(TorchLogisticRegression(C=C), Z, y_train) for C in sorted(Cs)]
    model = TorchLogisticRegression(warm_start=True)
    warm = [_timed_fit(model.set_params(C=C), Z, y_train) for C in sorted(Cs)]
    return {"Cs": sorted(Cs), "cold_fit_s": cold, "warm_fit_s": warm, "cold_total_s": sum(cold),
            "warm_total_s": sum(warm), "speedup": sum(cold) / sum(warm)}


def _rbf_svm(X_train, y_train, X_test, y_test, rows: int, seed: int) -> dict[str, Any]:
    subset = stratified_subset(y_train, rows, seed)
    exact_spec, approx_spec = get_head("rbf-svm"), get_head("rbf-svm").approximation
    out: dict[str, Any] = {"train_rows": int(len(subset)), "prep": "l2", "C": 10.0}
    for name, spec in (("exact", exact_spec), ("nystroem", approx_spec)):
        model = spec.pipeline().set_params(clf__C=10.0)
        if "random_state" in model.named_steps["clf"].get_params():
            model.set_params(clf__random_state=seed)
        out[f"{name}_fit_s"] = _timed_fit(model, X_train[subset], y_train[subset])
        started = time.perf_counter()
        out[f"{name}_accuracy"] = _accuracy(model, X_test, y_test)
        out[f"{name}_predict_s"] = time.perf_counter() - started
    out["speedup"] = out["exact_fit_s"] / out["nystroem_fit_s"]
    out["accuracy_delta_points"] = (out["nystroem_accuracy"] - out["exact_accuracy"]) * 100
    return out


def run_heads_benchmark(
    store: str | Path | None = None,
    *,
    n: int = 60_000,
    d: int = 1280,
    classes: int = 10,
    seed: int = 0,
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0),
    svm_rows: int = 10_000,
    budget: float = DEFAULT_BUDGET_MINUTES,
    compare: bool = True,
    keep_store: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure head costs on `store` (or on synthetic features of n x d, `classes`); returns a JSON-able dict."""
    import torch

    from pipelines.compare import compare_heads

    with tempfile.TemporaryDirectory(prefix="headbench-bench-heads-") as tmp:
        if store is None:
            path = Path(keep_store) if keep_store else Path(tmp) / "synthetic.h5"
            store = write_synthetic_store(path, n, d, classes, seed=seed, overwrite=True)
            data = f"synthetic: {n} x {d} float16, {classes} classes, seed {seed} (heads.synthetic)"
        else:
            data = str(store)
        fs = read_store(store)
        usable = (fs.labels >= 0) & fs.ok
        X, y = fs.features[usable].astype(np.float32), fs.labels[usable]
        split = fs.split[usable]
        if not (split == "test").any():
            test = np.zeros(len(y), bool)
            test[stratified_subset(y, len(y) // 6, seed)] = True
        else:
            test = split == "test"
        X_train, y_train, X_test, y_test = X[~test], y[~test], X[test], y[test]
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        result: dict[str, Any] = {
            "data": data,
            "train_rows": int(len(y_train)),
            "test_rows": int(len(y_test)),
            "features": int(X.shape[1]),
            "classes": int(len(np.unique(y))),
            "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "library_versions": library_versions(),
        }
        from sklearn.preprocessing import StandardScaler

        Z_train = StandardScaler().fit_transform(X_train).astype(np.float32)  # once, for every classifier-alone fit
        result["logreg"] = [_logreg(X_train, y_train, X_test, y_test, Z_train, C, devices) for C in Cs]
        result["c_path"] = _c_path(Z_train, y_train, list(Cs))
        result["rbf_svm"] = _rbf_svm(X_train, y_train, X_test, y_test, min(svm_rows, len(y_train)), seed)
        if compare:
            comparison = compare_heads([store], budget=budget, seed=seed, progress=progress)
            result["compare_heads"] = {
                "budget_minutes": budget,
                "seconds": comparison.seconds,
                "winner": comparison.best["head"],
                "winner_accuracy": comparison.best["accuracy"],
                "heads": [{k: r[k] for k in ("head", "accuracy", "mode", "tune_rows", "approximated",
                                              "predicted_seconds", "actual_seconds", "probe_seconds", "params")}
                          for r in comparison.rows],
                "skipped": comparison.skipped,
            }
    return result
