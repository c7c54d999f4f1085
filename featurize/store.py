"""HDF5 feature stores: a crash-safe writer (shards + manifest, atomic finalize) and a validating reader.

While extracting, the store is built inside ``STORE.h5.partial/``: ``store.h5.tmp`` is made at the start with
every feature chunk allocated (nothing written: a sparse file), and rows are committed a shard at a time --
written straight to their chunks' places in that file, fsynced, and only then recorded in ``manifest.json``
(itself replaced atomically). Only the HDF5 metadata made at the start is ever read back, and the rows' bytes
are never copied again. A rerun with the same config hash resumes from the committed shards. At the end the
small datasets (ids, labels, status, ...) are added, the file is fsynced and renamed onto ``STORE.h5``, so
``STORE.h5`` either does not exist or is complete. See docs/store-format.md for the layout.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
from filelock import FileLock, Timeout

from .errors import FeaturizeError, error_text

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYERS_GROUP",
    "TASKS_GROUP",
    "LAST_LAYER",
    "DTYPES",
    "STATUS_OK",
    "STATUS_FAILED",
    "StoreError",
    "config_hash",
    "config_changes",
    "partial_dir",
    "write_atomic",
    "check_writable",
    "StoreWriter",
    "FeatureStore",
    "read_store",
    "read_features",
    "verify_store",
    "verify_store_isolated",
    "VERIFY_MEMORY_LIMIT",
]

FORMAT_NAME = "headbench-feature-store"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
STATUS_OK, STATUS_FAILED = 0, 1
_STATUS_DTYPE = h5py.enum_dtype({"ok": STATUS_OK, "failed": STATUS_FAILED}, basetype="u1")
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20
_MANIFEST = "manifest.json"
_LOCK = ".lock"
_DATA = "store.h5.tmp"  # the store being built, inside the partial folder
_LAYOUT = "in-place"  # the manifest's "layout": rows written into _DATA (older runs wrote shard-K.npz files)
_REQUIRED = ("features", "labels", "ids", "split", "status", "errors", "classes")
# Intermediate layers live in /layers/<name>, listed (name, width, pooling) in the "layers" attribute.
LAYERS_GROUP = "layers"
# More label sets (tasks) live in /tasks/<name>/{labels,classes}, named in the "tasks" attribute; /labels and
# /classes hold the default task, named in "default_task" ("label" when the attribute is absent).
TASKS_GROUP = "tasks"
DEFAULT_TASK = "label"
# The name of the default representation (the pooled pre-logits in /features) wherever layers are named.
LAST_LAYER = "last"


# Crash tests set HEADBENCH_FAULT to kill this process (SIGKILL, no clean-up) at one named point:
# "after-rows:N" (N rows buffered), "mid-commit:K" (shard K's rows written and fsynced, not yet recorded),
# "after-shard:K" (shard K committed and recorded), "mid-finalize" (final temp store written, not renamed).
_FAULT_ENV = "HEADBENCH_FAULT"


def _fault(point: str) -> None:
    if os.environ.get(_FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


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


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Write `path` through ``PATH.tmp`` beside it (`write(tmp)` fills it), fsynced, renamed into place, and the
    rename made durable: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _cast_rows(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """`values` in the storage dtype, and which rows are finite there. float32 -> float16 through torch when it
    is already loaded (the engines load it): its vectorised conversion is several times numpy's, which a writer
    that keeps up with a GPU notices (1280 features x 20 000 rows: ~6 us of a row's ~40)."""
    torch = sys.modules.get("torch")
    if torch is not None and dtype == np.float16 and values.dtype == np.float32 and values.flags.c_contiguous \
            and values.flags.writeable:
        cast = torch.from_numpy(values).to(torch.float16)
        return cast.numpy(), torch.isfinite(cast).all(dim=1).numpy()
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    return cast, np.isfinite(cast).all(axis=1)


def _chunk_shape(num_rows: int, shard_size: int, width: int, itemsize: int) -> tuple[int, int] | None:
    """Rows per chunk: a power of two near 1 MiB that divides the shard size, so a shard fills whole chunks."""
    pow2 = 1 << max(0, (_CHUNK_BYTES // max(1, width * itemsize)).bit_length() - 1)
    return (max(1, min(num_rows, math.gcd(shard_size, pow2))), width) if num_rows else None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class _RowFile:
    """The store being built (``store.h5.tmp``): an HDF5 file made at the start with every chunk of its row
    datasets allocated (fill never: a sparse file), whose rows are then written straight to their chunks'
    places with ``pwrite``. During a run nothing but row bytes is written, so a kill cannot damage the HDF5
    metadata or a committed shard; the rows are never copied again.

    Args:
        widths: dataset path -> row width (``features``, ``layers/<name>``).
    """

    def __init__(self, path: Path, widths: dict[str, int], dtype: np.dtype, offsets: dict[str, tuple[int, np.ndarray]]):
        self.path, self.widths, self.itemsize = path, widths, dtype.itemsize
        self._offsets = offsets  # dataset -> (rows per chunk, byte offset of each chunk)
        self._fd = os.open(path, os.O_RDWR)

    @classmethod
    def create(cls, path: Path, num_rows: int, widths: dict[str, int], dtype: np.dtype, shard_size: int,
               config_hash_: str) -> "_RowFile":
        tmp = path.with_name(path.name + ".new")
        with h5py.File(tmp, "w") as f:
            for name, width in widths.items():
                chunks = _chunk_shape(num_rows, shard_size, width, dtype.itemsize)
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                if chunks:
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # every chunk has its place from the start
                    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # ... and nothing is written there until its rows
                f.create_dataset(name, shape=(num_rows, width), dtype=dtype, chunks=chunks, dcpl=dcpl)
            f.attrs["config_hash"] = config_hash_
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        made = cls.open(path, num_rows, widths, dtype, config_hash_)
        if made is None:
            raise StoreError(f"could not read back {path} right after making it")
        return made

    @classmethod
    def open(cls, path: Path, num_rows: int, widths: dict[str, int], dtype: np.dtype,
             config_hash_: str) -> "_RowFile | None":
        """The file of an earlier run of this config, or None when it is missing, damaged or another's."""
        offsets = {}
        try:
            with h5py.File(path, "r") as f:
                if _decode_attr(f.attrs.get("config_hash")) != config_hash_:
                    return None
                for name, width in widths.items():
                    ds = f[name]
                    if ds.shape != (num_rows, width) or ds.dtype != dtype or (num_rows and not ds.chunks):
                        return None
                    rows = ds.chunks[0] if num_rows else 1
                    offsets[name] = (rows, np.array([ds.id.get_chunk_info_by_coord((r, 0)).byte_offset
                                                     for r in range(0, num_rows, rows)], dtype=np.int64))
        except Exception:  # unreadable (killed while it was made, or damaged): the run starts over
            return None
        return cls(path, widths, dtype, offsets)

    def write(self, name: str, start: int, rows: np.ndarray) -> int:
        """Write `rows` (C-contiguous, the file's dtype) as rows ``start ...``; returns the bytes written."""
        per_chunk, offsets = self._offsets[name]
        row_bytes = self.widths[name] * self.itemsize
        data = memoryview(np.ascontiguousarray(rows)).cast("B")
        done = 0
        while done < len(rows):
            chunk, within = divmod(start + done, per_chunk)
            take = min(per_chunk - within, len(rows) - done)
            _pwrite_all(self._fd, data[done * row_bytes : (done + take) * row_bytes],
                        int(offsets[chunk]) + within * row_bytes)
            done += take
        return len(data)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
        layers: intermediate layers stored beside the features, each ``{"name", "width", ...}`` (written to
            ``/layers/<name>``; they belong in `config` too, so that they are hashed).

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
        layers: Sequence[dict[str, Any]] = (),
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
        self.layer_widths = {str(t["name"]): int(t["width"]) for t in layers}
        self.dtype = np.dtype(dtype)
        self.resumed_rows = 0
        self.num_failed = 0
        self.failure_reasons: dict[str, int] = {}
        self._rows_added = 0
        self.failed_rows = 0  # failed rows so far, committed shards of an earlier run included
        self._shard_failed: dict[int, int] = {}
        self._errors: dict[int, dict[int, str]] = {}  # failed rows (position in shard -> reason) of shards written here
        self._widths = {"features": num_features, **{f"{LAYERS_GROUP}/{n}": w for n, w in self.layer_widths.items()}}
        self._rows: _RowFile | None = None
        fresh = not (self.partial / _MANIFEST).exists()
        self.partial.mkdir(exist_ok=True)
        self._lock = FileLock(self.partial / _LOCK, blocking=False)
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreError(
                f"another extract is writing {self.path} right now (lock {self.partial / _LOCK}); wait for it or "
                "choose another --out"
            ) from None
        if overwrite and not fresh:
            self._clear_partial()
            fresh = True
        if not fresh:
            self._resume()
            self._rows = _RowFile.open(self.partial / _DATA, num_rows, self._widths, self.dtype, self.config_hash)
            if self._rows is None:  # the run's file is missing or damaged (killed while it was made): start over
                self._clear_partial()
                fresh = True
        if fresh:
            self.shard_size = shard_size
            self.committed: dict[int, int] = {}
            self._shard_failed, self.resumed_rows, self.failed_rows = {}, 0, 0
            self._rows = _RowFile.create(self.partial / _DATA, num_rows, self._widths, self.dtype, self.shard_size,
                                         self.config_hash)
            self._write_manifest()
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}
        # Complete shards are written by one background thread, overlapped with compute; the bounded queue
        # keeps memory flat (at most two shards wait) and the single writer keeps manifest updates ordered.
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._writer_error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_shards, name="store-writer", daemon=True)
        self._writer.start()
        self.bytes_written = 0
        self.write_seconds = 0.0

    def _clear_partial(self) -> None:
        for entry in self.partial.iterdir():  # keep the lock file we hold
            if entry.name != _LOCK:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    # -- shards ------------------------------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def _shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_rows))

    def _errors_file(self, k: int) -> Path:
        return self.partial / f"errors-{k:06d}.json"

    def pending_shards(self) -> list[range]:
        """The row ranges of the shards not committed yet, in order (one unit of distributed work each)."""
        return [self._shard_range(k) for k in range(self.num_shards) if k not in self.committed]

    def pending_indices(self) -> list[int]:
        """Sample indices whose shards are not committed yet, in order."""
        return [i for rows in self.pending_shards() for i in rows]

    def _resume(self) -> None:
        try:
            manifest = json.loads((self.partial / _MANIFEST).read_text())
            old_config, shard_size = manifest["config"], int(manifest["shard_size"])
            shards = {int(k): int(v["rows"]) for k, v in manifest["shards"].items()}
            failed = {int(k): int(v.get("failed", 0)) for k, v in manifest["shards"].items()}
            layout = manifest.get("layout")
        except (OSError, ValueError, KeyError, TypeError):
            self._lock.release()
            raise StoreError(
                f"{self.partial} holds an unfinished run whose manifest is missing or damaged; "
                "pass --overwrite to start over"
            ) from None
        if manifest.get("config_hash") != self.config_hash:
            self._lock.release()
            changed = ", ".join(config_changes(old_config, self.config)) or "config hash"
            raise StoreError(
                f"{self.partial} holds an unfinished run with other settings (changed: {changed}); "
                "rerun with the same settings to resume, or pass --overwrite to start over"
            )
        if layout != _LAYOUT:
            self._lock.release()
            raise StoreError(
                f"{self.partial} holds an unfinished run written by an earlier version of headbench (shard files); "
                "pass --overwrite to start over"
            )
        self.shard_size = shard_size
        # a shard with failed rows is committed only with its errors file (written before the manifest names it)
        self.committed = {k: rows for k, rows in shards.items() if not failed[k] or self._errors_file(k).is_file()}
        self.resumed_rows = sum(self.committed.values())
        self._shard_failed = {k: failed[k] for k in self.committed}
        self.failed_rows = sum(self._shard_failed.values())

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": _LAYOUT,
            "config_hash": self.config_hash,
            "config": self.config,
            "num_rows": self.num_rows,
            "num_features": self.num_features,
            "dtype": self.dtype.name,
            "shard_size": self.shard_size,
            "shards": {
                str(k): {"rows": rows, "failed": self._shard_failed.get(k, 0)} for k, rows in sorted(self.committed.items())
            },
        }
        data = json.dumps(manifest, indent=1).encode()
        write_atomic(self.partial / _MANIFEST, lambda tmp: tmp.write_bytes(data))

    def add(self, indices: np.ndarray, features: np.ndarray, errors: Sequence[str],
            layers: dict[str, np.ndarray] | None = None) -> None:
        """Buffer rows (features float32, NaN where failed; one array per tapped layer); commit every shard that
        becomes complete.

        Rows whose features (or any layer's) are not finite after the cast to the storage dtype are recorded as
        failed. Rows are copied a shard at a time (numpy, no per-row Python), so one writer keeps up with many
        GPUs.
        """
        indices = np.asarray(indices, dtype=np.int64)
        layers = layers or {}
        missing = sorted(set(self.layer_widths) - set(layers))
        if missing:
            raise StoreError(f"rows for {self.path} came without layer(s) {', '.join(missing)}")
        stored, finite = _cast_rows(features, self.dtype)  # overflow to inf is recorded per row below
        stored_layers = {}
        for name in self.layer_widths:
            stored_layers[name], layer_finite = _cast_rows(layers[name], self.dtype)
            finite &= layer_finite
        errs = np.array(list(errors), dtype=object)
        non_finite = (errs == "") & ~finite
        errs[non_finite] = f"non-finite features (NaN or Inf) in {self.dtype.name}"
        cut = self._fault_row(len(indices))
        for part in (slice(0, cut), slice(cut, None)) if cut else (slice(None),):
            self._add_rows(indices[part], stored[part], errs[part], {k: v[part] for k, v in stored_layers.items()})
            if os.environ.get(_FAULT_ENV) == f"after-rows:{self._rows_added}":
                self._queue.join()  # the shards completed before this row are committed: the point is the same
                _fault(f"after-rows:{self._rows_added}")  # in every run, however busy the machine

    def _fault_row(self, rows: int) -> int | None:
        """Where an ``after-rows:N`` crash point falls inside the next `rows` rows (crash tests only)."""
        point = os.environ.get(_FAULT_ENV, "")
        if point.startswith("after-rows:"):
            cut = int(point.split(":", 1)[1]) - self._rows_added
            if 0 < cut < rows:
                return cut
        return None

    def _add_rows(self, indices: np.ndarray, stored: np.ndarray, errs: np.ndarray,
                  layers: dict[str, np.ndarray]) -> None:
        shards = indices // self.shard_size
        for k in np.unique(shards).tolist():
            rows = np.flatnonzero(shards == k)
            if k not in self._buffers:
                n = len(self._shard_range(k))
                self._buffers[k] = (np.full((n, self.num_features), np.nan, self.dtype), np.zeros(n, bool),
                                    np.full(n, "", dtype=object),
                                    {name: np.full((n, w), np.nan, self.dtype) for name, w in self.layer_widths.items()})
            feats, filled, shard_errs, shard_layers = self._buffers[k]
            pos = indices[rows] - k * self.shard_size
            ok = errs[rows] == ""
            feats[pos[ok]] = stored[rows[ok]]
            for name, values in shard_layers.items():
                values[pos[ok]] = layers[name][rows[ok]]
            shard_errs[pos] = errs[rows]
            filled[pos] = True
            self.failed_rows += int((~ok).sum())
            self._rows_added += len(rows)
            if filled.all():
                feats, _, shard_errs, shard_layers = self._buffers.pop(k)
                self._raise_writer_error()
                self._queue.put((k, feats, shard_errs.tolist(), shard_layers))

    def _raise_writer_error(self) -> None:
        if self._writer_error is not None:
            raise StoreError(f"writing shards to {self.partial} failed: {self._writer_error}") from self._writer_error

    def _write_shards(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            if self._writer_error is None:
                try:
                    self._commit(*item)
                except BaseException as e:  # reported to the caller on its next add() or close()
                    self._writer_error = e
            self._queue.task_done()

    def _commit(self, k: int, feats: np.ndarray, errs: list[str], layers: dict[str, np.ndarray]) -> None:
        started = time.perf_counter()
        start = k * self.shard_size
        self.bytes_written += self._rows.write("features", start, feats)
        for name, values in layers.items():
            self.bytes_written += self._rows.write(f"{LAYERS_GROUP}/{name}", start, values)
        failed = {i: e for i, e in enumerate(errs) if e}
        if failed:
            data = json.dumps(failed).encode()
            write_atomic(self._errors_file(k), lambda tmp: tmp.write_bytes(data))
        self._rows.sync()
        _fault(f"mid-commit:{k}")
        self.committed[k] = len(errs)
        self._shard_failed[k] = len(failed)
        self._errors[k] = failed
        self._write_manifest()
        _fault(f"after-shard:{k}")
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

    def abandon(self) -> None:
        """Stop after an error: commit what is complete (so a rerun resumes), release the lock, keep the rest."""
        try:
            self.close()
        finally:
            if self._rows is not None:
                self._rows.close()
            self._lock.release()

    def _shard_errors(self, k: int) -> dict[int, str]:
        if k not in self._errors:  # committed by an earlier run
            failed = json.loads(self._errors_file(k).read_text()) if self._shard_failed.get(k) else {}
            self._errors[k] = {int(i): str(e) for i, e in failed.items()}
        return self._errors[k]

    # -- finalize ----------------------------------------------------------------------------------------------

    def finalize(
        self,
        ids: Sequence[str],
        labels: Sequence[int],
        split: Sequence[str],
        classes: Sequence[str],
        attrs: dict[str, Any],
        tasks: dict[str, tuple[Sequence[str], Sequence[int]]] | None = None,
        default_task: str = DEFAULT_TASK,
    ) -> Path:
        """Write the complete store atomically and remove the partial folder.

        Args:
            ids, labels, split: one entry per sample, in index order.
            classes: class names (labels index into them).
            attrs: provenance attributes (JSON-able values are stored as JSON strings when not scalar).
            tasks: more label sets, name -> (classes, labels); `labels`/`classes` are the one named
                `default_task`.
        """
        self.close()
        missing = [k for k in range(self.num_shards) if k not in self.committed]
        if missing:
            raise StoreError(f"cannot finalize {self.path}: {len(missing)} shard(s) were never committed")
        n = self.num_rows
        tmp = self.partial / _DATA
        self._rows.close()
        status = np.full(n, STATUS_OK, np.uint8)
        errors = np.full(n, "", dtype=object)
        for k in range(self.num_shards):
            for i, error in self._shard_errors(k).items():
                row = k * self.shard_size + i
                status[row], errors[row] = STATUS_FAILED, error
        self.num_failed = int((status == STATUS_FAILED).sum())
        self.failure_reasons = dict(collections.Counter(e.split(":", 1)[0] for e in errors if e))
        with h5py.File(tmp, "r+") as f:
            for name in [name for name in f if name not in ("features", LAYERS_GROUP)]:
                del f[name]  # written by a finalize that was killed before its rename: written again
            for key in list(f.attrs):
                del f.attrs[key]
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            f.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=_STR)
            f.create_dataset("split", data=np.asarray(list(split), dtype=object), dtype=_STR)
            f.create_dataset("status", data=status, dtype=_STATUS_DTYPE)
            f.create_dataset("errors", data=errors, dtype=_STR)
            f.create_dataset("classes", data=np.asarray(list(classes), dtype=object), dtype=_STR)
            for name, (task_classes, task_labels) in (tasks or {}).items():
                f.create_dataset(f"{TASKS_GROUP}/{name}/labels", data=np.asarray(task_labels, dtype=np.int64))
                f.create_dataset(f"{TASKS_GROUP}/{name}/classes", data=np.asarray(list(task_classes), dtype=object),
                                 dtype=_STR)
            if tasks:
                f.attrs["tasks"] = json.dumps(list(tasks))
                f.attrs["default_task"] = default_task
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
        _fault("mid-finalize")
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._lock.release()
        shutil.rmtree(self.partial)
        return self.path


def _discard_finished_partial(path: Path) -> None:
    """Remove a partial folder left by a run killed after its final rename, before its clean-up.

    Only when the finished store and the partial run have the same config hash (the store is that run's).
    """
    partial = partial_dir(path)
    if not (path.is_file() and partial.is_dir()):
        return
    try:
        manifest_hash = json.loads((partial / _MANIFEST).read_text())["config_hash"]
        with h5py.File(path, "r") as f:
            store_hash = _decode_attr(f.attrs.get("config_hash"))
    except Exception:  # unreadable either way: leave both for the user to inspect
        return
    if manifest_hash == store_hash:
        shutil.rmtree(partial, ignore_errors=True)


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse early when the output exists (without overwrite) or its folder does not."""
    path = Path(path)
    _discard_finished_partial(path)
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
        tasks: every label set, name -> (classes, labels): the default task (/labels, /classes) first, then
            those of /tasks.
        task_name: which label set `labels` and `classes` are (the default task, unless :meth:`with_task`
            chose another).
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
    tasks: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    task_name: str = DEFAULT_TASK

    @property
    def default_task(self) -> str:
        return str(self.attrs.get("default_task", DEFAULT_TASK))

    @property
    def task_names(self) -> list[str]:
        """Every label set, the default first."""
        return list(self.tasks) or [self.default_task]

    def with_task(self, name: str | None) -> "FeatureStore":
        """This store with `labels` and `classes` of the task `name` (None: the default task); the arrays are
        shared, not copied.

        Raises:
            StoreError: the store has no such task (naming those it has).
        """
        name = self.default_task if name is None else name
        if name == self.task_name:
            return self
        if name not in self.tasks:
            raise StoreError(f"{self.path} has no task {name!r}; it has: {', '.join(self.task_names)}")
        classes, labels = self.tasks[name]
        return dataclasses.replace(self, labels=labels, classes=list(classes), task_name=name)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of rows whose features are valid."""
        return self.status == STATUS_OK

    @property
    def config(self) -> dict[str, Any]:
        return self.attrs["config"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The intermediate layers stored beside the features: ``{"name", "width", "pooling"}`` each."""
        return list(self.attrs.get("layers") or [])

    @property
    def layer_names(self) -> list[str]:
        return [str(t["name"]) for t in self.layers]


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
        StoreError: the file is missing, not HDF5, not a headbench store, of a newer format, inconsistent, or
            damaged (any error the HDF5 library raises while reading it).
    """
    path = Path(path)
    if not path.is_file():
        hint = " (an unfinished extraction: rerun the same extract command to finish it)" if partial_dir(path).exists() else ""
        raise StoreError(f"store {path} does not exist{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise StoreError(f"{path} is not a readable HDF5 file (damaged or not a feature store)") from None
    try:
        with f:
            return _read_open_store(f, path, features)
    except StoreError:
        raise
    except Exception as e:  # h5py raises OSError, KeyError, ValueError, ... on damaged files
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise StoreError(f"{path} is damaged: {type(e).__name__}{': ' + reason if reason else ''}") from None


def _read_open_store(f: h5py.File, path: Path, features: bool) -> FeatureStore:
    if _decode_attr(f.attrs.get("format")) != FORMAT_NAME:
        raise StoreError(f"{path} is an HDF5 file but not a headbench feature store (no format={FORMAT_NAME} attribute)")
    version = f.attrs.get("format_version", -1)
    if not isinstance(version, (int, np.integer)) or int(version) != FORMAT_VERSION:
        raise StoreError(f"{path} has store format version {version}; this headbench reads version {FORMAT_VERSION}")
    absent = [name for name in _REQUIRED if name not in f or not isinstance(f[name], h5py.Dataset)]
    if absent:
        raise StoreError(f"{path} is missing dataset(s) {', '.join(absent)}; the store is damaged")
    shape = tuple(f["features"].shape)
    lengths = {name: f[name].shape[0] if f[name].ndim else -1 for name in _REQUIRED if name != "classes"}
    if len(shape) != 2 or len(set(lengths.values())) != 1:
        raise StoreError(f"{path} has datasets of inconsistent shapes ({lengths}); the store is damaged")
    if "config" not in f.attrs or not isinstance(_decode_attr(f.attrs["config"]), dict):
        raise StoreError(f"{path} has no readable config attribute; the store is damaged")
    for layer in _decode_attr(f.attrs.get("layers", "[]")) or []:
        where = f"{LAYERS_GROUP}/{layer['name']}"
        if where not in f or f[where].shape != (shape[0], int(layer["width"])):
            raise StoreError(f"{path} lists layer {layer['name']!r} but /{where} is missing or not "
                             f"{shape[0]} x {layer['width']}; the store is damaged")
    default = str(_decode_attr(f.attrs.get("default_task", DEFAULT_TASK)))
    labels, classes = f["labels"][()].astype(np.int64), [str(c) for c in _strings(f["classes"])]
    tasks = {default: (classes, labels)}
    n_rows = shape[0]
    for name in _decode_attr(f.attrs.get("tasks", "[]")) or []:
        where = f"{TASKS_GROUP}/{name}"
        if f"{where}/labels" not in f or f"{where}/classes" not in f or f[f"{where}/labels"].shape != (n_rows,):
            raise StoreError(f"{path} lists task {name!r} but /{where}/labels (of {n_rows} rows) or /{where}/classes "
                             "is missing; the store is damaged")
        if str(name) != default:
            tasks[str(name)] = ([str(c) for c in _strings(f[f"{where}/classes"])],
                                f[f"{where}/labels"][()].astype(np.int64))
    return FeatureStore(
        path=path,
        features=f["features"][()] if features else None,
        labels=labels,
        ids=_strings(f["ids"]),
        split=_strings(f["split"]),
        status=f["status"][()].astype(np.uint8),
        errors=_strings(f["errors"]),
        classes=classes,
        attrs={k: _decode_attr(v) for k, v in f.attrs.items()},
        shape=shape,
        tasks=tasks,
        task_name=default,
    )


def read_features(store: FeatureStore, layer: str | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """One representation of a store as a matrix: ``/features`` (`layer` None or ``last``) or ``/layers/<layer>``.

    Args:
        store: a store read with :func:`read_store` (its features need not be loaded).
        layer: which representation.
        rows: a boolean mask of the rows to return (all when None).

    Raises:
        StoreError: the store has no such layer (naming those it has), or it cannot be read.
    """
    if layer in (None, LAST_LAYER) and store.features is not None:
        return store.features if rows is None else store.features[rows]
    if layer not in (None, LAST_LAYER) and layer not in store.layer_names:
        have = ", ".join([LAST_LAYER] + store.layer_names)
        raise StoreError(f"{store.path} has no layer {layer!r}; it holds: {have}")
    where = "features" if layer in (None, LAST_LAYER) else f"{LAYERS_GROUP}/{layer}"
    try:
        with h5py.File(store.path, "r") as f:
            values = f[where][()]
    except Exception as e:  # damaged chunks surface here
        raise StoreError(f"{store.path}: /{where} cannot be read ({type(e).__name__})") from None
    return values if rows is None else values[rows]


def verify_store(path: str | os.PathLike, block_rows: int = 8192) -> dict[str, Any]:
    """Check that a store is complete and sound; returns a summary, or raises naming the first problem.

    Checks: format and version, datasets and shapes, width against ``num_features``, labels within the
    classes, split names, unique ids, status values and ``num_failed``, errors present exactly on failed rows,
    finite features on every ok row (read in blocks, so memory stays flat), and the config hash.

    Raises:
        StoreError: the first problem found.
    """
    store = read_store(path, features=False)
    n, d = store.shape
    problems = []
    if int(store.attrs.get("num_features", d)) != d:
        problems.append(f"features have {d} columns but num_features says {store.attrs['num_features']}")
    if len(store.labels) and (store.labels.min() < -1 or store.labels.max() >= len(store.classes)):
        problems.append(f"labels outside -1..{len(store.classes) - 1}")
    for name, (task_classes, task_labels) in store.tasks.items():
        if len(task_labels) and (task_labels.min() < -1 or task_labels.max() >= len(task_classes)):
            problems.append(f"task {name!r} has labels outside -1..{len(task_classes) - 1}")
    with h5py.File(store.path, "r") as f:  # a named default task is stored twice: /tasks/<name> and /labels
        where = f"{TASKS_GROUP}/{store.default_task}"
        if where in f and not (np.array_equal(f[f"{where}/labels"][()], store.labels)
                               and [str(c) for c in _strings(f[f"{where}/classes"])] == store.classes):
            problems.append(f"/labels and /classes differ from /{where}, the default task's")
    bad_split = sorted(set(store.split.tolist()) - {"train", "val", "test", ""})
    if bad_split:
        problems.append(f"unknown split names {bad_split[:3]}")
    if len(set(store.ids.tolist())) != n:
        problems.append("ids are not unique")
    if not np.isin(store.status, (STATUS_OK, STATUS_FAILED)).all():
        problems.append("status holds values other than ok/failed")
    failed = store.status == STATUS_FAILED
    if int(store.attrs.get("num_failed", -1)) != int(failed.sum()):
        problems.append(f"num_failed says {store.attrs.get('num_failed')} but {int(failed.sum())} rows failed")
    if ((store.errors != "") != failed).any():
        problems.append("error messages do not match the failed rows")
    if store.attrs.get("config_hash") != config_hash(store.config):
        problems.append("config_hash does not match the config (edited or damaged attributes)")
    if [t["name"] for t in store.config.get("layers", [])] != store.layer_names:
        problems.append("the layers attribute does not match the config's layers")
    if not problems:
        try:
            with h5py.File(store.path, "r") as f:
                for where in ["features"] + [f"{LAYERS_GROUP}/{name}" for name in store.layer_names]:
                    for start in range(0, n, block_rows):
                        block = f[where][start : start + block_rows]
                        ok = store.status[start : start + block_rows] == STATUS_OK
                        bad = np.flatnonzero(ok & ~np.isfinite(block).all(axis=1))
                        if len(bad):
                            what = "features" if where == "features" else f"values in /{where}"
                            problems.append(f"row {start + bad[0]} ({store.ids[start + bad[0]]}) is ok but has NaN/Inf {what}")
                            break
        except Exception as e:  # damaged chunks surface here
            problems.append(f"features cannot be read ({type(e).__name__})")
    if problems:
        raise StoreError(f"{store.path} is not sound: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return {
        "path": str(store.path),
        "rows": n,
        "features": d,
        "layers": store.layer_names,
        "failed": int(failed.sum()),
        "format_version": store.attrs["format_version"],
        "config_hash": store.attrs["config_hash"],
    }


VERIFY_MEMORY_LIMIT = 2 * 1024**3  # what verify may allocate beyond what the process already holds


def _address_space() -> int | None:
    """This process's virtual address space in bytes (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _verify_child(path: str, memory_limit: int, conn) -> None:
    """In the forked child: cap the address space, verify, send ("ok", summary) or ("error", one line)."""
    import resource

    try:
        used = _address_space()
        if used is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            cap = used + memory_limit
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        conn.send(("ok", verify_store(path)))
    except StoreError as e:
        conn.send(("error", str(e)))
    except MemoryError:
        conn.send(("error", f"{path} is damaged: reading its structure needed more than "
                            f"{memory_limit / 1024**3:.0f} GiB (a damaged length field?)"))
    except Exception as e:  # anything else the HDF5 library raises on a damaged file
        conn.send(("error", f"{path} is damaged: {error_text(e)}"))
    finally:
        conn.close()
        os._exit(0)  # no atexit handlers, no flushing of the parent's buffers


def verify_store_isolated(path: str | os.PathLike, memory_limit: int = VERIFY_MEMORY_LIMIT,
                          timeout: float | None = None) -> dict[str, Any]:
    """:func:`verify_store` in a forked child whose address space may grow by at most `memory_limit` bytes.

    A damaged HDF5 length field can make the library allocate gigabytes before it fails (seen: 4.9 GB for 57
    damaged bytes); capped, that becomes one "damaged" line instead of a machine out of memory. A child that
    the library crashes, or that runs past `timeout` (default: 60 s plus 10 s per GiB of file), is reported the
    same way. Where fork or address-space limits do not exist, it is :func:`verify_store` itself.

    Raises:
        StoreError: the first problem found, in one line.
    """
    import multiprocessing

    path = Path(path)
    if "fork" not in multiprocessing.get_all_start_methods() or _address_space() is None:
        return verify_store(path)
    if timeout is None:
        timeout = 60.0 + 10.0 * (path.stat().st_size / 1024**3 if path.is_file() else 0.0)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_verify_child, args=(str(path), memory_limit, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            child.kill()
            raise StoreError(f"{path}: verifying took over {timeout:.0f} s and was stopped; the store is likely "
                             "damaged")
        kind, value = receive.recv()
    except EOFError:  # the child died without a word: the HDF5 library crashed on the file
        child.join(5)
        raise StoreError(f"{path} is damaged: the HDF5 library crashed reading it (exit code {child.exitcode})") \
            from None
    finally:
        receive.close()
        child.join(5)
    if kind == "ok":
        return value
    raise StoreError(value)

