"""Sources whose images are packed in a few large files: webdataset tar shards, and Parquet / Arrow tables.

At scale, datasets arrive as webdataset-style tar shards (img2dataset's output) or as Parquet files (Hugging
Face datasets), not as millions of loose files. Both are read in place -- nothing is extracted to disk:

* **tar shards**: one pass over each shard's headers (tarfile skips the member data) gives every member's offset
  and size; a sample's image is then one positioned read (``os.pread``), so the engine's streams and decode
  workers share one file descriptor per shard and reading in row order is sequential within a shard.
* **Parquet / Arrow**: labels, splits and ids are read up front (small columns); the image column is read a
  row group at a time, kept in a small cache, so rows in order read each row group once. A Hugging Face
  ``save_to_disk`` folder (Arrow stream files) is memory-mapped instead.

Both give :class:`~featurize.sources.Source` objects like image folders do: the same ledger, resume,
fingerprint (file sizes and mtimes, plus every sample's id, label and split) and Ray sharding.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from .errors import FeaturizeError
from .sources import Sample, Source, class_list, decode_image, image_extensions, register_opener

__all__ = ["TAR_IMAGE_EXTENSIONS", "SOURCE_OPTIONS", "TarShardSource", "ParquetSource", "open_packed", "expand_shards",
           "find_tables", "looks_like_shards", "looks_like_tables", "split_name"]

# Options of packed sources, by the source kind that reads them (the CLI's --image-column etc.).
SOURCE_OPTIONS = {"image_column": "parquet", "label_column": "parquet", "split_column": "parquet", "id_column": "parquet",
                  "label_key": "tar"}

# The image member of a webdataset sample, in order of preference; then any other extension Pillow opens.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}


def split_name(name: str) -> str | None:
    """Our split for a folder, file-name prefix or column value (``validation`` -> ``val``), or None."""
    return _SPLIT_ALIASES.get(str(name).strip().lower())


class _FileHandles:
    """One read-only descriptor per file and process (decode workers are forked), shared by threads:
    ``os.pread`` reads at an offset without moving a shared position."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fds: dict[tuple[int, str], int] = {}

    def _fd(self, path: Path) -> int:
        key = (os.getpid(), str(path))
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = self._fds[key] = os.open(path, os.O_RDONLY)
        return fd

    def pread(self, path: Path, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(path), size, offset)
        if len(data) != size:
            raise OSError(f"{path.name} is shorter than its index says (read {len(data)} of {size} bytes at {offset}); "
                          "was it changed during the run?")
        return data

    def pread_into(self, path: Path, offset: int, view: memoryview) -> memoryview:
        """:meth:`pread` into a buffer of the caller's."""
        fd = self._fd(path)
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{path.name} is shorter than its index says (read {done} of {len(view)} bytes at "
                              f"{offset}); was it changed during the run?")
            done += got
        return view

    def __getstate__(self):  # pickled to Ray actors / spawned workers: descriptors do not travel
        return {}

    def __setstate__(self, state):
        self.__init__()


# ---------------------------------------------------------------------------------------------------- tar shards


def expand_shards(spec: str) -> list[Path]:
    """The shard files a spec names: a brace pattern (``shards/{000000..000099}.tar``), one ``.tar`` file, or a
    folder (every ``.tar`` in it and in its sub-folders, sorted).

    Raises:
        FeaturizeError: nothing found, or a listed shard is missing.
    """
    if "{" in spec:
        from braceexpand import braceexpand

        paths = [Path(p) for p in braceexpand(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FeaturizeError(f"{len(missing)} of the {len(paths)} shards of {spec} do not exist, e.g. {missing[0]}")
        return paths
    path = Path(spec)
    if path.is_file():
        return [path]
    shards = sorted(path.glob("*.tar")) + sorted(path.glob("*/*.tar"))
    if not shards:
        raise FeaturizeError(f"no .tar shards in {spec}")
    return shards


def looks_like_shards(spec: str) -> bool:
    """True when `spec` names tar shards rather than an image folder or a table."""
    if "{" in spec and ".tar" in spec:
        return True
    path = Path(spec)
    if path.is_file():
        return path.suffix.lower() == ".tar"
    return path.is_dir() and (any(path.glob("*.tar")) or any(path.glob("*/*.tar")))


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the member name up to the first dot of its base name; the rest is the
    extension (lower case)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


class TarShardSource(Source):
    """webdataset-style tar shards: members grouped into samples by key; ids ``<shard>/<key>``.

    A sample's image is its ``.jpg``/``.jpeg``/``.png``/``.webp`` member (else any other image type Pillow
    opens); its label the integer in ``.cls``, else the ``.json``'s ``label`` -- or, when `label_key` is given, that key of the ``.json``; its split the
    shard's folder name (``train``/``val``/``test``), else the ``.json``'s ``split``. A sample without an image
    member stays in the store as a failed row that says so.
    """

    kind = "tar"

    def __init__(self, spec: str, label_key: str | None = None):
        shards = expand_shards(spec)
        self.shards = shards
        self.label_key = label_key
        base = Path(os.path.commonpath([str(p.resolve().parent) for p in shards]))
        self.root = base
        self._handles = _FileHandles()
        pillow_extensions = image_extensions()
        self.members: list[tuple[int, int, int] | None] = []  # (shard, offset, size) of the image, per sample
        ids, values, splits, member_sizes = [], [], [], []
        for s, shard in enumerate(shards):
            name = shard.resolve().relative_to(base).with_suffix("").as_posix()
            folder_split = split_name(shard.parent.name)
            for key, parts in self._index(shard).items():
                image = next((parts[e] for e in TAR_IMAGE_EXTENSIONS if e in parts), None) or next(
                    (parts[e] for e in sorted(parts) if "." + e in pillow_extensions), None)
                meta = self._json(shard, parts.get("json"))
                label = None
                if "cls" in parts and label_key is None:
                    text = self._read(shard, parts["cls"]).decode("utf-8", "replace").strip()
                    try:
                        label = int(text)
                    except ValueError:
                        raise FeaturizeError(f"{shard}: {key}.cls holds {text[:30]!r}, not an integer class") from None
                elif isinstance(meta, dict) and meta.get(label_key or "label") is not None:
                    label = meta[label_key or "label"]
                    if isinstance(label, (list, dict)):
                        raise FeaturizeError(f"{shard}: {key}.json's {label_key!r} is not one class ({label!r}); "
                                             "pick another key with --label-key")
                split = folder_split or ""
                if not split and isinstance(meta, dict) and meta.get("split"):
                    split = split_name(meta["split"]) or ""
                    if not split:
                        raise FeaturizeError(f"{shard}: {key}.json has split {meta['split']!r}; use train, val or test")
                ids.append(f"{name}/{key}")
                values.append(label)
                splits.append(split)
                self.members.append((s, image[0], image[1]) if image else None)
                member_sizes.append(image[1] if image else -1)
        if not ids:
            raise FeaturizeError(f"the shards of {spec} hold no samples")
        classes, labels = class_list(values)
        self._member_sizes = member_sizes
        samples = [Sample(i, ids[i], labels[i], splits[i]) for i in range(len(ids))]
        super().__init__(spec, samples, classes)

    @staticmethod
    def _index(shard: Path) -> "OrderedDict[str, dict[str, tuple[int, int]]]":
        """key -> {extension: (offset, size)}, in the shard's order, from its headers alone."""
        with open(shard, "rb") as f:
            magic = f.read(3)
        if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z":
            raise FeaturizeError(f"{shard} is compressed; webdataset shards are plain .tar files (decompress it, "
                                 "e.g. gunzip)")
        samples: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    base = member.name.rpartition("/")[2]
                    if not member.isfile() or base.startswith((".", "__")):
                        continue
                    key, ext = _split_key(member.name)
                    samples.setdefault(key, {}).setdefault(ext, (member.offset_data, member.size))
        except (tarfile.TarError, OSError) as e:
            raise FeaturizeError(f"cannot read shard {shard}: {e}") from None
        return samples

    def _read(self, shard: Path, where: tuple[int, int]) -> bytes:
        return self._handles.pread(shard, where[0], where[1])

    def _json(self, shard: Path, where: tuple[int, int] | None) -> Any:
        if where is None:
            return None
        try:
            return json.loads(self._read(shard, where))
        except ValueError:
            return None  # a malformed .json only loses what it would have said (label, split)

    def read_bytes(self, index: int) -> bytes:
        member = self.members[index]
        if member is None:
            raise FileNotFoundError(f"no image member ({', '.join('.' + e for e in TAR_IMAGE_EXTENSIONS)}, or another "
                                    "image type) in the shard for this key")
        shard, offset, size = member
        return self._handles.pread(self.shards[shard], offset, size)

    def read_into(self, index: int, take: Callable[[int], memoryview]) -> memoryview:
        member = self.members[index]
        if member is None:
            return super().read_into(index, take)  # raises as read_bytes does
        shard, offset, size = member
        return self._handles.pread_into(self.shards[shard], offset, take(size))

    def load(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        return decode_image(io.BytesIO(self.read_bytes(index)), draft_size)

    def _fingerprint_rows(self):
        yield {"label_key": self.label_key}
        for shard in self.shards:
            st = os.stat(shard)
            yield [shard.name, st.st_size, st.st_mtime_ns]
        for s, size in zip(self.samples, self._member_sizes):
            yield [s.id, s.label, s.split, size]

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "shards": len(self.shards), "label_key": self.label_key}


# ------------------------------------------------------------------------------------------------ Parquet / Arrow


def _hf_saved_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def find_tables(spec: str) -> list[Path]:
    """The table files a spec names: one ``.parquet``/``.arrow`` file, a folder of ``.parquet`` files (any depth,
    sorted), or a Hugging Face ``save_to_disk`` folder (its ``.arrow`` files, split by split)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if _hf_saved_folder(path):
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            return [f for split in splits for f in _arrow_files(path / split)]
        return _arrow_files(path)
    tables = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts))
    if not tables:
        raise FeaturizeError(f"no .parquet files in {spec}")
    return tables


def _arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        if names:
            return [folder / n for n in names]
    return sorted(folder.glob("*.arrow"))


def looks_like_tables(spec: str) -> bool:
    """True when `spec` names Parquet / Arrow tables rather than an image folder."""
    path = Path(spec)
    if path.is_file():
        return path.suffix.lower() in (".parquet", ".arrow")
    if not path.is_dir():
        return False
    return _hf_saved_folder(path) or any(path.glob("*.parquet")) or any(path.glob("*/*.parquet"))


class _Table:
    """One table file: its schema, rows per row group (Parquet) and a reader of one group's image column."""

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self.parquet = path.suffix.lower() == ".parquet"
        try:
            if self.parquet:
                meta = pq.ParquetFile(path).metadata
                self.schema = pq.read_schema(path)
                self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            else:  # record batches are the groups: read zero-copy from the memory map, never combined
                table = self._arrow()
                self.schema = table.schema
                self.group_rows = [len(chunk) for chunk in table.column(0).chunks] if table.num_columns else [0]
        except (pa.ArrowException, OSError) as e:
            raise FeaturizeError(f"cannot read table {path}: {e}") from None
        self.rows = sum(self.group_rows)

    def _arrow(self):
        import pyarrow as pa

        source = pa.memory_map(str(self.path))
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()

    def column(self, name: str) -> list:
        import pyarrow.parquet as pq

        table = pq.read_table(self.path, columns=[name]) if self.parquet else self._arrow().select([name])
        return table.column(0).to_pylist()

    def group(self, g: int, name: str):
        """The image column of row group `g` (an Arrow array)."""
        import pyarrow.parquet as pq

        if self.parquet:
            return pq.ParquetFile(self.path).read_row_group(g, columns=[name]).column(0).combine_chunks()
        return self._arrow().column(name).chunk(g)

    def hf_features(self) -> dict:
        """The Hugging Face features saved with the table, if any (ClassLabel names live there)."""
        meta = self.schema.metadata or {}
        try:
            return json.loads(meta.get(b"huggingface", b"{}")).get("info", {}).get("features", {}) or {}
        except ValueError:
            return {}


def _image_column(schema, requested: str | None, path: Path) -> str:
    import pyarrow as pa

    def holds_images(field) -> bool:
        t = field.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    names = schema.names
    if requested is not None:
        if requested not in names:
            raise FeaturizeError(f"{path} has no column {requested!r} (--image-column); it has {', '.join(names)}")
        if not holds_images(schema.field(requested)):
            raise FeaturizeError(f"{path}: column {requested!r} holds {schema.field(requested).type}, not image bytes "
                                 "or {bytes, path} structs")
        return requested
    candidates = [f.name for f in schema if holds_images(f)]
    preferred = [n for n in ("image", "img", "jpg", "png") if n in candidates]
    if preferred:
        return preferred[0]
    if len(candidates) == 1:
        return candidates[0]
    raise FeaturizeError(f"{path}: cannot tell which column holds the images (columns: {', '.join(names)}); name it "
                         "with --image-column")


class ParquetSource(Source):
    """Parquet files, or a Hugging Face ``save_to_disk`` folder, with one image per row.

    The image column holds encoded image bytes or Hugging Face ``{"bytes", "path"}`` structs (a null ``bytes``
    reads ``path``). Labels come from `label_column` (default ``label`` when there is one; class names from the
    Hugging Face ``ClassLabel`` when saved with the table), splits from `split_column`, else from the Hugging
    Face split folder or a file name starting with the split (``train-00000-of-00004.parquet``). Ids come from
    `id_column`, else ``<file>/<row>``.
    """

    kind = "parquet"
    CACHED_GROUPS = 4  # row groups kept decoded-from-Parquet per process: enough for the streams reading in order

    def __init__(self, spec: str, image_column: str | None = None, label_column: str | None = None,
                 split_column: str | None = None, id_column: str | None = None):
        files = find_tables(spec)
        tables = [_Table(f) for f in files]
        self.files = files
        first = tables[0]
        self.image_column = _image_column(first.schema, image_column, files[0])
        self.options = {"image_column": self.image_column, "label_column": label_column,
                        "split_column": split_column, "id_column": id_column}
        if label_column is None and "label" in first.schema.names:
            label_column = "label"
        for table in tables[1:]:
            for name in (self.image_column, label_column, split_column, id_column):
                if name and name not in table.schema.names:
                    raise FeaturizeError(f"{table.path} has no column {name!r}, unlike {files[0]}")
        for option, name in (("--label-column", label_column), ("--split-column", split_column),
                             ("--id-column", id_column)):
            if name and name not in first.schema.names:
                raise FeaturizeError(f"{files[0]} has no column {name!r} ({option}); it has "
                                     f"{', '.join(first.schema.names)}")
        self.label_column = label_column
        base = Path(spec) if Path(spec).is_dir() else files[0].parent
        self.root = base
        ids, values, splits = [], [], []
        self._where: list[tuple[int, int, int]] = []  # (table, row group, row in group)
        for t, table in enumerate(tables):
            stem = table.path.relative_to(base).with_suffix("").as_posix() if table.path.is_relative_to(base) \
                else table.path.stem
            ids += [str(v) for v in table.column(id_column)] if id_column else [f"{stem}/{r}" for r in range(table.rows)]
            values += table.column(label_column) if label_column else [None] * table.rows
            if split_column:
                for v in table.column(split_column):
                    split = split_name(v) if v not in (None, "") else ""
                    if split is None:
                        raise FeaturizeError(f"{table.path}: split column {split_column!r} holds {v!r}; use train, "
                                             "val (validation) or test, or leave it empty")
                    splits.append(split)
            else:
                splits += [self._split_of(table.path, base)] * table.rows
            for g, n in enumerate(table.group_rows):
                self._where += [(t, g, r) for r in range(n)]
        if len(set(ids)) != len(ids):
            raise FeaturizeError(f"{spec}: ids in {id_column!r} are not unique; pick another --id-column")
        if not ids:
            raise FeaturizeError(f"{spec} has no rows")
        names = first.hf_features().get(label_column or "", {}).get("names") if label_column else None
        if names and all(isinstance(v, int) or v is None for v in values):
            classes = [str(n) for n in names]
            labels = [v if v is not None and 0 <= v < len(names) else -1 for v in values]
        else:
            classes, labels = class_list(values)
        self._tables = tables
        self._cache: OrderedDict[tuple[int, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()
        samples = [Sample(i, ids[i], labels[i], splits[i]) for i in range(len(ids))]
        super().__init__(spec, samples, classes)

    @staticmethod
    def _split_of(path: Path, base: Path) -> str:
        for part in reversed(path.relative_to(base).parts[:-1] if path.is_relative_to(base) else ()):
            if split_name(part):
                return split_name(part)
        prefix = path.name.split("-")[0].split(".")[0]
        return split_name(prefix) or ""

    def _group(self, t: int, g: int):
        key = (os.getpid(), t, g)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        column = self._tables[t].group(g, self.image_column)  # read outside the lock: streams read in parallel
        with self._lock:
            self._cache[key] = column
            while len(self._cache) > self.CACHED_GROUPS:
                self._cache.popitem(last=False)
        return column

    def read_bytes(self, index: int) -> bytes:
        t, g, r = self._where[index]
        value = self._group(t, g)[r].as_py()
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and path:
                with open(Path(path) if Path(path).is_absolute() else self._tables[t].path.parent / path, "rb") as f:
                    return f.read()
            value = data
        if value is None:
            raise ValueError("the image cell is empty")
        return bytes(value)

    def load(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        return decode_image(io.BytesIO(self.read_bytes(index)), draft_size)

    def _fingerprint_rows(self):
        yield self.options
        for path in self.files:
            st = os.stat(path)
            yield [path.name, st.st_size, st.st_mtime_ns]
        for s in self.samples:
            yield [s.id, s.label, s.split]

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root.resolve()), "files": len(self.files), **self.options}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


@register_opener
def open_packed(spec: str, options: dict[str, Any]) -> Source | None:
    """A tar or table source for `spec`, or None when `spec` is neither (then it is an image folder or CSV).

    Raises:
        FeaturizeError: an option given that this kind of source does not read (naming the kind that does).
    """
    given = {k: v for k, v in options.items() if v is not None}
    if spec.startswith("builtin:"):
        kind = None
    elif "{" in spec or Path(spec).exists():
        kind = "parquet" if looks_like_tables(spec) else "tar" if looks_like_shards(spec) else None
    else:
        return None  # nothing there: open_source names the missing source
    unknown = sorted(set(given) - set(SOURCE_OPTIONS))
    if unknown:
        raise FeaturizeError(f"unknown source option(s): {', '.join(unknown)}")
    wrong = [k for k in given if SOURCE_OPTIONS[k] != kind]
    if wrong:
        option = "--" + wrong[0].replace("_", "-")
        raise FeaturizeError(f"{option} is for {SOURCE_OPTIONS[wrong[0]]} sources; {spec} is "
                             f"{'a ' + kind + ' source' if kind else 'an image folder, CSV or builtin'}")
    if kind == "parquet":
        return ParquetSource(spec, **given)
    if kind == "tar":
        return TarShardSource(spec, **given)
    return None

