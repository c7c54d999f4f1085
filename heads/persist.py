"""Saving and loading fitted heads with skops (no pickle), refusing any type that is not scikit-learn's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import HeadsError

__all__ = ["HEAD_FORMAT", "HEAD_FORMAT_VERSION", "save_head", "load_head"]

HEAD_FORMAT = "headbench-head"
HEAD_FORMAT_VERSION = 1
# Types outside these namespaces are never loaded: a head file is data, not code.
_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")
# Ours: plain numpy state, no code to run.
_OWN_ESTIMATORS = (
    "heads.torch_logreg.TorchLogisticRegression",
    "heads.torch_logreg.TorchLinearSVC",
    "heads.torch_knn.TorchKNeighborsClassifier",
    "heads.kernel_approx.ScaledNystroem",
    "heads.kernel_approx.NystroemSVC",
    "heads.blocks.BlockStandardScaler",
    "heads.calibration.CalibratedHead",
    "heads.calibration.Calibrator",
)
_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


def save_head(path: str | Path, model: Any, provenance: dict[str, Any]) -> Path:
    """Write a fitted pipeline and its provenance (JSON) to a ``.skops`` file."""
    import skops.io as sio

    path = Path(path)
    if not path.parent.exists():
        raise HeadsError(f"folder {path.parent} does not exist; create it or choose another --save-best path")
    payload = {
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION,
        "model": model,
        "provenance": json.dumps(provenance, sort_keys=True),
    }
    sio.dump(payload, path)
    return path


def _load_pickled(path: Path, trust: bool) -> Any:
    """joblib/pickle files run code while loading: only with an explicit trust decision."""
    if not trust:
        raise HeadsError(
            f"{path} is a pickle/joblib file, and loading one can run any code it contains; pass --trust only "
            "if you made it yourself, or save heads with compare-heads --save-best (skops)"
        )
    import joblib

    try:
        return joblib.load(path)
    except Exception as e:
        raise HeadsError(f"cannot load head {path}: {type(e).__name__}: {e}") from None


def load_head(path: str | Path, trust: bool = False) -> tuple[Any, dict[str, Any]]:
    """Load a head saved by :func:`save_head`; returns (fitted pipeline, provenance).

    Args:
        path: a ``.skops`` file (checked: only scikit-learn, numpy and scipy types are loaded), or a
            ``.joblib``/``.pkl`` file holding the same payload (loaded only with `trust`).
        trust: allow pickle-based files, which can execute code when loaded.

    Raises:
        HeadsError: missing or damaged file, not a headbench head, an untrusted pickle, or a skops file
            holding types outside scikit-learn, numpy and scipy (never loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise HeadsError(f"head file {path} does not exist")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return _check_payload(_load_pickled(path, trust), path)
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:  # skops raises zipfile/json/key errors on damaged files
        raise HeadsError(f"{path} is not a readable skops file ({type(e).__name__}); save heads with --save-best") from None
    refused = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES) and t not in _OWN_ESTIMATORS]
    if refused:
        raise HeadsError(
            f"{path} contains types that are not scikit-learn's ({', '.join(sorted(refused)[:3])}); refusing to load it"
        )
    try:
        payload = sio.load(path, trusted=untrusted)
    except Exception as e:
        raise HeadsError(f"cannot load head {path}: {type(e).__name__}: {e}") from None
    return _check_payload(payload, path)


def _check_payload(payload: Any, path: Path) -> tuple[Any, dict[str, Any]]:
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise HeadsError(f"{path} holds no headbench head (save heads with compare-heads --save-best)")
    if payload.get("format_version") != HEAD_FORMAT_VERSION:
        raise HeadsError(
            f"{path} has head format version {payload.get('format_version')}; this headbench reads {HEAD_FORMAT_VERSION}"
        )
    return payload["model"], json.loads(payload["provenance"])
