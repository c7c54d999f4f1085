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


def load_head(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a head saved by :func:`save_head`; returns (fitted pipeline, provenance).

    Raises:
        HeadsError: missing or damaged file, not a headbench head, or it holds types outside scikit-learn,
            numpy and scipy (never loaded).
    """
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise HeadsError(f"head file {path} does not exist")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:  # skops raises zipfile/json/key errors on damaged files
        raise HeadsError(f"{path} is not a readable skops file ({type(e).__name__}); save heads with --save-best") from None
    refused = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
    if refused:
        raise HeadsError(
            f"{path} contains types that are not scikit-learn's ({', '.join(sorted(refused)[:3])}); refusing to load it"
        )
    try:
        payload = sio.load(path, trusted=untrusted)
    except Exception as e:
        raise HeadsError(f"cannot load head {path}: {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise HeadsError(f"{path} is a skops file but not a headbench head (save heads with compare-heads --save-best)")
    if payload.get("format_version") != HEAD_FORMAT_VERSION:
        raise HeadsError(
            f"{path} has head format version {payload.get('format_version')}; this headbench reads {HEAD_FORMAT_VERSION}"
        )
    return payload["model"], json.loads(payload["provenance"])
