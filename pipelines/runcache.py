"""compare-heads' committed units of work, so that a killed comparison resumes where it stopped.

A unit is one head on one candidate as the plan decided it, or one head on one learning-curve draw (k rows
per class, one seed). Each finished unit is committed to ``DIR/.runs/<key>/``
(files written and fsynced in a temporary folder, then renamed into place, as store shards are), where the key
is a hash of everything that determines its result:

* the store (its config hash), the candidate (layer), the task, and the rows (labels of every used row);
* the head as it runs: name, grid, preprocessing, and the sized or approximated spec the budget gave it;
* the protocol: kind, folds, seed, and every task's row indices;
* class weighting, calibration, and the planned mode and tuning rows;
* the library versions that change numbers (scikit-learn, numpy, scipy, torch, headbench).

The unit holds the head's run: its scalars and params as JSON, its arrays (predictions, scores, probabilities)
in an ``.npz`` read without pickle, and its fitted pipeline as skops, loaded only when every type in it is
scikit-learn's, numpy's, scipy's or ours (:mod:`heads.persist`). A rerun of the same command reuses every
committed unit; a changed setting misses the cache for the units it changes; ``--fresh`` ignores it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from heads.evaluate import HeadRun
from pipelines.provenance import package_versions

__all__ = ["RunCache", "digest", "unit_key"]

_ARRAYS = ("y_pred", "scores", "proba", "proba_before")
_LIBRARIES = ("scikit-learn", "numpy", "scipy", "torch", "headbench")
_FAULT_ENV = "HEADBENCH_FAULT"  # "after-unit:K": SIGKILL this process once the K-th unit is committed (tests)


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    """The libraries' versions, looked up once per process (every unit's key holds them)."""
    return tuple(package_versions(_LIBRARIES).items())


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def unit_key(*, store_hash: str, candidate: str, task: str, y: np.ndarray, spec, run_spec, plan, class_weight,
             calibrate, mode: str, tune_rows: int | None, approximated: bool, extra: dict | None = None) -> str:
    """The hash of everything that determines one unit's result (see the module docstring); `extra`: what
    else does (a learning-curve draw: k, seed, folds)."""
    identity = {
        "store": store_hash, "candidate": candidate, "task": task, "labels": digest(np.asarray(y, dtype=np.int64)),
        "head": spec.name, "grid": repr(spec.grid), "prep": repr(spec.prep),
        "runs_as": {"description": run_spec.description, "grid": repr(run_spec.grid), "rank": run_spec.rank()},
        "protocol": {"kind": plan.kind, "folds": plan.folds, "seed": plan.seed,
                     "tasks": [[digest(t.fit), digest(t.score)] for t in plan.tasks]},
        "class_weight": class_weight, "calibrate": calibrate, "mode": mode, "tune_rows": tune_rows,
        "approximated": approximated, "versions": dict(_versions()), "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class RunCache:
    """Committed units in `folder` (None: no cache). `fresh` ignores what is there (and replaces it).

    Attributes:
        reused: units taken from the cache in this run; reused_seconds: what they cost when they ran.
        committed: units computed and committed in this run.
    """

    def __init__(self, folder: str | Path | None, fresh: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.fresh = fresh
        self.reused = 0
        self.reused_seconds = 0.0
        self.committed = 0

    @property
    def enabled(self) -> bool:
        """Whether units are committed at all (a folder was given): callers skip computing keys otherwise."""
        return self.folder is not None

    def _get(self, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        if self.folder is None or self.fresh:
            return None
        where = self.folder / key
        try:
            meta = json.loads((where / "run.json").read_text())
            with np.load(where / "arrays.npz", allow_pickle=False) as arrays:
                return meta, {name: arrays[name] for name in arrays.files}
        except Exception:  # a unit that cannot be read is simply computed again
            return None

    def _put(self, key: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], model: Any = None) -> None:
        """Commit a unit atomically: a temporary folder, every file fsynced, then renamed into place."""
        if self.folder is None:
            return
        from heads.persist import save_head

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "run.json").write_text(json.dumps(meta, default=_plain))
        np.savez(tmp / "arrays.npz", **arrays)
        written = [tmp / "run.json", tmp / "arrays.npz"]
        if model is not None:
            try:
                written.append(save_head(tmp / "model.skops", model, {"unit": key}))
            except Exception:  # a model skops cannot hold: this unit is not cached (it is computed on a rerun)
                shutil.rmtree(tmp, ignore_errors=True)
                return
        for path in written:
            _fsync(path)
        final = self.folder / key
        if final.exists():  # --fresh, or a unit that could not be read: replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.committed += 1
        if os.environ.get(_FAULT_ENV) == f"after-unit:{self.committed}":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def load(self, key: str) -> tuple[HeadRun, float, dict[str, Any]] | None:
        """The committed run of unit `key`, the seconds it took and what was saved with it (:meth:`save`'s
        `extra`), or None (not there, ``--fresh``, unreadable)."""
        found = self._get(key)
        if found is None:
            return None
        meta, arrays = found
        model = None
        if (self.folder / key / "model.skops").is_file():
            from heads.persist import load_head

            try:
                model, _ = load_head(self.folder / key / "model.skops")
            except Exception:
                return None
        run = HeadRun(head=meta["head"], params=meta["params"], fit_seconds=meta["fit_seconds"],
                      tune_seconds=meta["tune_seconds"], predict_us_per_sample=meta["predict_us_per_sample"],
                      model=model, calibration=meta["calibration"], tune_rows=meta["tune_rows"],
                      **{name: arrays.get(name) for name in _ARRAYS})
        self.reused += 1
        self.reused_seconds += float(meta["seconds"])
        return run, float(meta["seconds"]), meta.get("extra", {})

    def save(self, key: str, run: HeadRun, seconds: float, extra: dict[str, Any] | None = None) -> None:
        """Commit the run of unit `key`. `extra`: JSON-able facts of the run to give back with it (e.g. what
        the budget's last round did)."""
        meta = {"head": run.head, "params": run.params, "fit_seconds": run.fit_seconds,
                "tune_seconds": run.tune_seconds, "predict_us_per_sample": run.predict_us_per_sample,
                "calibration": run.calibration, "tune_rows": run.tune_rows, "seconds": seconds, "extra": extra or {}}
        self._put(key, meta, {name: getattr(run, name) for name in _ARRAYS if getattr(run, name) is not None},
                  run.model)

    def load_draw(self, key: str) -> dict[str, Any] | None:
        """A learning-curve draw's committed result: ``params``, ``untuned``, ``correct`` (bool per scored row)
        and ``error`` (why the head cannot be fitted on it, or None); None when not committed."""
        found = self._get(key)
        if found is None:
            return None
        meta, arrays = found
        self.reused += 1
        self.reused_seconds += float(meta["seconds"])
        return {**meta, "correct": arrays.get("correct")}

    def save_draw(self, key: str, *, params: dict[str, Any] | None, untuned: bool, correct: np.ndarray | None,
                  error: str | None, seconds: float) -> None:
        """Commit one head's result on one learning-curve draw."""
        self._put(key, {"params": params, "untuned": untuned, "error": error, "seconds": seconds},
                  {} if correct is None else {"correct": np.asarray(correct, dtype=bool)})


def _plain(value: Any) -> Any:
    """numpy scalars in params and calibration as plain JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a unit")
