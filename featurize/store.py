"""HDF5 feature stores: a crash-safe writer (shards + manifest, atomic finalize) and a validating reader.

While extracting, rows are committed in fixed-size shards to ``STORE.h5.partial/``: each shard is written to
a temp file, fsynced and renamed into place, and only then recorded in ``manifest.json`` (itself replaced
atomically). A rerun with the same config hash resumes from the committed shards. The finished store is
written to a temp file inside the partial folder, fsynced and renamed onto ``STORE.h5``, so ``STORE.h5``
either does not exist or is complete. See docs/store-format.md for the layout.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .errors import FeaturizeError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DTYPES",
    "STATUS_OK",
    "STATUS_FAILED",
    "StoreError",
    "config_hash",
    "config_changes",
    "partial_dir",
    "check_writable",
    "StoreWriter",
    "FeatureStore",
    "read_store",
]

FORMAT_NAME = "headbench-feature-store"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
STATUS_OK, STATUS_FAILED = 0, 1
_STATUS_DTYPE = h5py.enum_dtype({"ok": STATUS_OK, "failed": STATUS_FAILED}, basetype="u1")
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20
_MANIFEST = "manifest.json"
_REQUIRED = ("features", "labels", "ids", "split", "status", "errors", "classes")


class StoreError(FeaturizeError):
    """A store that cannot be written or read as asked (exists, damaged, wrong format, other config)."""


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a resolved extraction config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the settings that differ between two configs (e.g. ``weights.sha256``)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def partial_dir(path: Path) -> Path:
    """Where an unfinished store keeps its committed shards."""
    return path.with_name(path.name + ".partial")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class StoreWriter:
    """Writes one store in shards of `shard_size` rows; resumes from a matching partial folder.

    Args:
        path: the final ``.h5`` file.
        config: the resolved extraction config (everything that changes the features); hashed.
        num_rows: number of samples in the source.
        num_features: width of the feature vectors.
        dtype: ``float16`` or ``float32`` storage.
        shard_size: rows per shard (resume granularity); a resumed run keeps the one it started with.
        overwrite: replace an existing store and discard any partial one.

    Raises:
        StoreError: the store exists (without `overwrite`), or a partial one was made with another config.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        num_rows: int,
        num_features: int,
        *,
        dtype: str = "float16",
        shard_size: int = 1024,
        overwrite: bool = False,
    ):
        if dtype not in DTYPES:
            raise StoreError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if shard_size < 1:
            raise StoreError(f"--shard-size must be at least 1, got {shard_size}")
        check_writable(path, overwrite)
        self.path = Path(path)
        self.partial = partial_dir(self.path)
        self.config = config
        self.config_hash = config_hash(config)
        self.num_rows = num_rows
        self.num_features = num_features
        self.dtype = np.dtype(dtype)
        self.resumed_rows = 0
        self.num_failed = 0
        self.failure_reasons: dict[str, int] = {}
        if overwrite and self.partial.exists():
            shutil.rmtree(self.partial)
        if self.partial.exists():
            self._resume()
        else:
            self.shard_size = shard_size
            self.committed: dict[int, int] = {}
            self.partial.mkdir(parents=True)
            self._write_manifest()
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        # Complete shards are written by one background thread, overlapped with compute; the bounded queue
        # keeps memory flat (at most two shards wait) and the single writer keeps manifest updates ordered.
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._writer_error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_shards, name="store-writer", daemon=True)
        self._writer.start()
        self.bytes_written = 0
        self.write_seconds = 0.0

    # -- shards ------------------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def _shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_rows))

    def _shard_file(self, k: int) -> Path:
        return self.partial / f"shard-{k:06d}.npz"

    def pending_indices(self) -> list[int]:
        """Sample indices whose shards are not committed yet, in order."""
        return [i for k in range(self.num_shards) if k not in self.committed for i in self._shard_range(k)]

    def _resume(self) -> None:
        try:
            manifest = json.loads((self.partial / _MANIFEST).read_text())
            old_config, shard_size = manifest["config"], int(manifest["shard_size"])
            shards = {int(k): int(v["rows"]) for k, v in manifest["shards"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            raise StoreError(
                f"{self.partial} holds an unfinished run whose manifest is missing or damaged; "
                "pass --overwrite to start over"
            ) from None
        if manifest.get("config_hash") != self.config_hash:
            changed = ", ".join(config_changes(old_config, self.config)) or "config hash"
            raise StoreError(
                f"{self.partial} holds an unfinished run with other settings (changed: {changed}); "
                "rerun with the same settings to resume, or pass --overwrite to start over"
            )
        self.shard_size = shard_size
        self.committed = {k: rows for k, rows in shards.items() if self._shard_file(k).is_file()}
        self.resumed_rows = sum(self.committed.values())

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config_hash": self.config_hash,
            "config": self.config,
            "num_rows": self.num_rows,
            "num_features": self.num_features,
            "dtype": self.dtype.name,
            "shard_size": self.shard_size,
            "shards": {str(k): {"rows": rows} for k, rows in sorted(self.committed.items())},
        }
        _atomic_write_bytes(self.partial / _MANIFEST, json.dumps(manifest, indent=1).encode())

    def add(self, indices: np.ndarray, features: np.ndarray, errors: Sequence[str]) -> None:
        """Buffer rows (features float32, NaN where failed); commit every shard that becomes complete.

        Rows whose features are not finite after the cast to the storage dtype are recorded as failed.
        """
        with np.errstate(over="ignore"):  # overflow to inf is caught below and recorded per row
            stored = features.astype(self.dtype)
        for row, index in enumerate(indices):
            k = int(index) // self.shard_size
            if k not in self._buffers:
                n = len(self._shard_range(k))
                self._buffers[k] = (np.full((n, self.num_features), np.nan, self.dtype), np.zeros(n, bool), [""] * n)
            feats, filled, errs = self._buffers[k]
            pos = int(index) - k * self.shard_size
            error = errors[row]
            if not error and not np.isfinite(stored[row]).all():
                error = f"non-finite features (NaN or Inf) in {self.dtype.name}"
            if not error:
                feats[pos] = stored[row]
            errs[pos] = error
            filled[pos] = True
            if filled.all():
                feats, _, errs = self._buffers.pop(k)
                self._raise_writer_error()
                self._queue.put((k, feats, errs))

    def _raise_writer_error(self) -> None:
        if self._writer_error is not None:
            raise StoreError(f"writing shards to {self.partial} failed: {self._writer_error}") from self._writer_error

    def _write_shards(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._writer_error is None:
                try:
                    self._commit(*item)
                except BaseException as e:  # reported to the caller on its next add() or close()
                    self._writer_error = e

    def _commit(self, k: int, feats: np.ndarray, errs: list[str]) -> None:
        started = time.perf_counter()
        target = self._shard_file(k)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, features=feats, errors=np.array(errs, dtype=str))
            f.flush()
            os.fsync(f.fileno())
            self.bytes_written += f.tell()
        os.replace(tmp, target)
        self.committed[k] = len(errs)
        self._write_manifest()
        self.write_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Wait until every complete shard is committed (also after an error, so a rerun can resume from them).

        Raises:
            StoreError: a shard could not be written.
        """
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self._raise_writer_error()

    def _read_shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self._shard_file(k), allow_pickle=False) as z:
            return z["features"], z["errors"]

    # -- finalize ----------------------------------------------------------------------------------------------

    def finalize(
        self,
        ids: Sequence[str],
        labels: Sequence[int],
        split: Sequence[str],
        classes: Sequence[str],
        attrs: dict[str, Any],
    ) -> Path:
        """Write the complete store atomically and remove the partial folder.

        Args:
            ids, labels, split: one entry per sample, in index order.
            classes: class names (labels index into them).
            attrs: provenance attributes (JSON-able values are stored as JSON strings when not scalar).
        """
        self.close()
        missing = [k for k in range(self.num_shards) if k not in self.committed]
        if missing:
            raise StoreError(f"cannot finalize {self.path}: {len(missing)} shard(s) were never committed")
        n, d = self.num_rows, self.num_features
        tmp = self.partial / "store.h5.tmp"
        # Rows per chunk: a power of two near 1 MiB that divides the shard size, so shard copies fill whole chunks.
        pow2 = 1 << max(0, (_CHUNK_BYTES // max(1, d * self.dtype.itemsize)).bit_length() - 1)
        chunk_rows = max(1, min(n, math.gcd(self.shard_size, pow2)))
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", shape=(n, d), dtype=self.dtype, chunks=(chunk_rows, d) if n else None)
            status = np.empty(n, np.uint8)
            errors = np.empty(n, dtype=object)
            for k in range(self.num_shards):
                rows = self._shard_range(k)
                shard_feats, shard_errors = self._read_shard(k)
                feats[rows.start : rows.stop] = shard_feats
                errors[rows.start : rows.stop] = [str(e) for e in shard_errors]
                status[rows.start : rows.stop] = np.where(shard_errors == "", STATUS_OK, STATUS_FAILED)
            self.num_failed = int((status == STATUS_FAILED).sum())
            self.failure_reasons = dict(collections.Counter(e.split(":", 1)[0] for e in errors if e))
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            f.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=_STR)
            f.create_dataset("split", data=np.asarray(list(split), dtype=object), dtype=_STR)
            f.create_dataset("status", data=status, dtype=_STATUS_DTYPE)
            f.create_dataset("errors", data=errors, dtype=_STR)
            f.create_dataset("classes", data=np.asarray(list(classes), dtype=object), dtype=_STR)
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config_hash"] = self.config_hash
            f.attrs["config"] = json.dumps(self.config, sort_keys=True)
            f.attrs["dtype"] = self.dtype.name
            f.attrs["num_failed"] = self.num_failed
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        shutil.rmtree(self.partial)
        return self.path


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse early when the output exists (without overwrite) or its folder does not."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise StoreError(f"{path} is a folder; --out must be a file path such as features.h5")
    if not path.parent.exists():
        raise StoreError(f"folder {path.parent} does not exist; create it or choose another --out")


@dataclass
class FeatureStore:
    """A finished store read into memory.

    Attributes:
        path: the file.
        features: [N, D] array (None when read with ``features=False``).
        labels: [N] int64, -1 for unlabeled rows.
        ids, split, errors: [N] str arrays.
        status: [N] uint8, STATUS_OK or STATUS_FAILED.
        classes: class names.
        attrs: root attributes, JSON strings decoded.
        shape: (N, D) of the features dataset.
    """

    path: Path
    features: np.ndarray | None
    labels: np.ndarray
    ids: np.ndarray
    split: np.ndarray
    status: np.ndarray
    errors: np.ndarray
    classes: list[str]
    attrs: dict[str, Any]
    shape: tuple[int, int]

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of rows whose features are valid."""
        return self.status == STATUS_OK

    @property
    def config(self) -> dict[str, Any]:
        return self.attrs["config"]


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _strings(ds: h5py.Dataset) -> np.ndarray:
    return np.array(ds.asstr()[()], dtype=str) if len(ds) else np.array([], dtype=str)


def read_store(path: str | os.PathLike, features: bool = True) -> FeatureStore:
    """Open and validate a feature store.

    Args:
        path: the ``.h5`` file.
        features: read the feature matrix too (False reads only the metadata).

    Raises:
        StoreError: the file is missing, not HDF5, not a headbench store, of a newer format, or inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (an unfinished extraction: rerun the same extract command to finish it)" if partial_dir(path).exists() else ""
        raise StoreError(f"store {path} does not exist{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise StoreError(f"{path} is not a readable HDF5 file (damaged or not a feature store)") from None
    with f:
        if _decode_attr(f.attrs.get("format")) != FORMAT_NAME:
            raise StoreError(f"{path} is an HDF5 file but not a headbench feature store (no format={FORMAT_NAME} attribute)")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format version {version}; this headbench reads version {FORMAT_VERSION}"
            )
        absent = [name for name in _REQUIRED if name not in f]
        if absent:
            raise StoreError(f"{path} is missing dataset(s) {', '.join(absent)}; the store is damaged")
        shape = tuple(f["features"].shape)
        lengths = {name: len(f[name]) for name in _REQUIRED if name != "classes"}
        if len(shape) != 2 or len(set(lengths.values())) != 1:
            raise StoreError(f"{path} has datasets of different lengths ({lengths}); the store is damaged")
        return FeatureStore(
            path=path,
            features=f["features"][()] if features else None,
            labels=f["labels"][()].astype(np.int64),
            ids=_strings(f["ids"]),
            split=_strings(f["split"]),
            status=f["status"][()].astype(np.uint8),
            errors=_strings(f["errors"]),
            classes=[str(c) for c in _strings(f["classes"])],
            attrs={k: _decode_attr(v) for k, v in f.attrs.items()},
            shape=shape,
        )
