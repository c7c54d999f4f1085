"""Image sources: where samples come from, in a deterministic order, with a fingerprint.

Three kinds, chosen by :func:`open_source` from one string:

* an **ImageFolder** directory: ``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` with split
  folders named ``train``, ``val`` and ``test``, or just ``root/<image>`` (unlabeled);
* a **CSV manifest** ``*.csv`` with a header and the columns ``path`` (relative to the CSV's folder),
  optional ``label`` (a class name; empty means unlabeled), optional ``split``, and any number of
  ``label:NAME`` columns -- more label sets (tasks) over the same images, e.g. ``label:species,label:colour``;
* a **builtin** dataset, ``builtin:digits`` (scikit-learn's 1 797 handwritten 8x8 digits as RGB images, with a
  fixed, seeded, stratified train/test split).

A source only lists samples and decodes one of them on request; decoding errors are raised to the caller,
which records them per row (never substituting another sample).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from .errors import FeaturizeError

__all__ = [
    "SPLITS",
    "BUILTIN_DATASETS",
    "Sample",
    "LabelSet",
    "DEFAULT_TASK",
    "Source",
    "ImageFolderSource",
    "CsvSource",
    "DigitsSource",
    "open_source",
    "median_image_side",
    "register_opener",
    "decode_image",
    "image_extensions",
]

SPLITS = ("train", "val", "test")
BUILTIN_DATASETS = ("digits",)

# Decompression bombs: Pillow warns above MAX_IMAGE_PIXELS and raises above twice that. We make the warning
# level an error too, so a huge image becomes a recorded failure instead of eating the machine's memory.
_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

DEFAULT_TASK = "label"  # the task of the plain `label` column (and of image folders and builtins)
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a task's name is an HDF5 group name: /tasks/<name>


@dataclass(frozen=True)
class Sample:
    """One row of a dataset.

    Attributes:
        index: Position in the source, 0..N-1; also the row in the feature store.
        id: Stable identifier: the path relative to the source root, or ``builtin:<name>:<i>``.
        label: Class index into the source's ``classes``, or -1 when unlabeled.
        split: ``train``, ``val``, ``test``, or ``""`` when the source has no split.
    """

    index: int
    id: str
    label: int
    split: str


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) that Pillow can open."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping 16-bit or dropping palette transparency wrongly."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert("L") clips 16/32-bit values at 255; rescale the real range instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        img = Image.fromarray(np.nan_to_num(arr).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image file as 8-bit RGB, with its EXIF orientation applied.

    Args:
        path: the image file.
        draft_size: for JPEGs at least twice this (width, height), let libjpeg decode at a power-of-two
            reduced scale that stays at least this large (Pillow's draft mode): several times faster, with the
            model's antialiased resize after it. None decodes at full size.

    Raises:
        OSError, ValueError, Image.DecompressionBombError: the file is missing, unreadable, not an image, or
            too large. Callers record these per row.
    """
    with warnings.catch_warnings():
        # Pillow only warns between one and two times its pixel limit; we refuse those below, as an error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    with img:
        if img.width * img.height > _MAX_PIXELS:
            raise Image.DecompressionBombError(
                f"image has {img.width * img.height} pixels, more than the limit of {_MAX_PIXELS}"
            )
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


@dataclass(frozen=True)
class LabelSet:
    """One labelling of every sample (a task): class names (sorted) and per sample an index into them, or -1
    where that sample has no label for this task."""

    classes: list[str]
    labels: list[int]


class Source:
    """Base class: a list of samples, their class names, a way to decode one, and a fingerprint.

    Attributes:
        tasks: the named label sets (``label:NAME`` columns of a CSV manifest), in column order; empty for
            sources with one labelling. The samples' own labels are the default task, `default_task`: the plain
            ``label`` column, else the first named set.
    """

    kind: str = ""

    def __init__(self, spec: str, samples: list[Sample], classes: list[str],
                 tasks: dict[str, LabelSet] | None = None, default_task: str = DEFAULT_TASK):
        self.spec = spec
        self.samples = samples
        self.classes = classes
        self.tasks = dict(tasks or {})
        self.default_task = default_task

    def task(self, name: str | None) -> LabelSet:
        """The label set `name` (None or the default task's name: the samples' own labels).

        Raises:
            FeaturizeError: the source has no such task (naming those it has).
        """
        if name is None or name == self.default_task:
            return LabelSet(self.classes, [s.label for s in self.samples])
        if name not in self.tasks:
            raise FeaturizeError(f"{self.spec} has no task {name!r}; it has: {', '.join(self.task_names)}")
        return self.tasks[name]

    @property
    def task_names(self) -> list[str]:
        """Every task: the default first."""
        return [self.default_task] + [t for t in self.tasks if t != self.default_task]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        """Decode sample `index` as an RGB image (raises on failure); see :func:`decode_image` for `draft_size`."""
        raise NotImplementedError

    def read_bytes(self, index: int) -> bytes | None:
        """Sample `index`'s encoded file (raises when it cannot be read), or None for a source that has no
        encoded form (builtins hold arrays): the tensor decoder (:mod:`featurize.decode`) then uses :meth:`load`."""
        return None

    def read_into(self, index: int, take: Callable[[int], memoryview]) -> memoryview | None:
        """Read sample `index`'s encoded bytes into a buffer of the caller's: ``take(size)`` returns a writable
        view of `size` bytes, which this fills and returns. The engine's readers pass views into one pinned
        buffer per batch (:mod:`featurize.stages`), so bytes are copied once, from the page cache to the
        buffer the device reads. None for a source without encoded bytes (see :meth:`read_bytes`)."""
        data = self.read_bytes(index)
        if data is None:
            return None
        view = take(len(data))
        view[:] = data
        return view

    def _fingerprint_rows(self):
        """Yield one JSON-able row per sample that changes when the sample's content may have changed."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 over every sample's id, label, split and file size + mtime (or content, for builtins)."""
        h = hashlib.sha256()
        h.update(json.dumps({"kind": self.kind, "classes": self.classes}).encode())
        for row in self._fingerprint_rows():
            h.update(json.dumps(row, separators=(",", ":")).encode())
            h.update(b"\n")
        if self.tasks:  # only then: a source with one labelling keeps the fingerprint it always had
            h.update(json.dumps({"default_task": self.default_task, "tasks": {
                name: {"classes": t.classes, "labels": t.labels} for name, t in self.tasks.items()}},
                separators=(",", ":")).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        """Plain facts about the source for the store's provenance."""
        return {"kind": self.kind, "spec": self.spec}


class _FileSource(Source):
    """A source whose samples are files below a root folder (ids are posix paths relative to it)."""

    def __init__(self, spec: str, root: Path, samples: list[Sample], classes: list[str],
                 tasks: dict[str, LabelSet] | None = None, default_task: str = DEFAULT_TASK):
        super().__init__(spec, samples, classes, tasks, default_task)
        self.root = root
        self._root_str = str(root)  # os.path.join on strings: a fifth of the cost of Path's / per row

    def path_of(self, index: int) -> Path:
        return self.root / self.samples[index].id

    def load(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        return decode_image(self.path_of(index), draft_size)

    def read_bytes(self, index: int) -> bytes:
        with open(self.path_of(index), "rb") as f:
            return f.read()

    def read_into(self, index: int, take: Callable[[int], memoryview]) -> memoryview:
        fd = os.open(os.path.join(self._root_str, self.samples[index].id), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            view = take(size)
            done = os.preadv(fd, [view], 0)
            while done < size:  # file systems may return less than asked
                got = os.preadv(fd, [view[done:]], done)
                if got == 0:
                    raise OSError(f"{self.samples[index].id} became shorter while it was read")
                done += got
            return view
        finally:
            os.close(fd)

    def _fingerprint_rows(self):
        for s in self.samples:
            try:
                st = os.stat(self.root / s.id)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            yield [s.id, s.label, s.split, size, mtime]

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root.resolve())}


def _is_image(name: str, exts: frozenset[str]) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in exts


def _images_below(folder: Path, root: Path, exts: frozenset[str]) -> list[str]:
    """All image files below `folder`, as sorted posix paths relative to `root` (hidden entries skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if _is_image(name, exts):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


class ImageFolderSource(_FileSource):
    """``root/<class>/*``, ``root/<split>/<class>/*`` or ``root/*`` (unlabeled), in sorted order."""

    kind = "imagefolder"

    @classmethod
    def scan(cls, root: Path, spec: str | None = None) -> "ImageFolderSource":
        exts = image_extensions()
        top_dirs = _subdirs(root)
        top_images = [e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name, exts)]
        split_dirs = [d for d in top_dirs if d in SPLITS]
        layout_hint = f"expected {root}/<class>/<image>, {root}/<split>/<class>/<image> or {root}/<image>"

        if top_dirs and top_images:
            raise FeaturizeError(
                f"{root} has both image files ({top_images[0]}, ...) and class folders ({top_dirs[0]}, ...) at its "
                f"top level; {layout_hint}"
            )
        if split_dirs and len(split_dirs) != len(top_dirs):
            others = [d for d in top_dirs if d not in SPLITS]
            raise FeaturizeError(
                f"{root} mixes split folders ({', '.join(split_dirs)}) with other folders ({', '.join(others)}); "
                f"put every class folder inside {'/'.join(SPLITS)}"
            )

        if not top_dirs:
            entries = [(p, "", "") for p in sorted(top_images)]
        elif split_dirs:
            entries = []
            for split in split_dirs:
                for cls_name in _subdirs(root / split):
                    entries += [(p, cls_name, split) for p in _images_below(root / split / cls_name, root, exts)]
        else:
            entries = []
            for cls_name in top_dirs:
                entries += [(p, cls_name, "") for p in _images_below(root / cls_name, root, exts)]

        if not entries:
            raise FeaturizeError(f"no images found in {root}; {layout_hint}")
        classes = sorted({c for _, c, _ in entries if c})
        class_index = {c: i for i, c in enumerate(classes)}
        entries.sort(key=lambda e: e[0])
        samples = [
            Sample(i, path, class_index[c] if c else -1, split) for i, (path, c, split) in enumerate(entries)
        ]
        return cls(spec or str(root), root, samples, classes)


def class_list(values: list) -> tuple[list[str], list[int]]:
    """Class names (integers sorted as numbers, anything else as text) and each value's index into them, -1
    where the value is missing (None or empty)."""
    present = {v for v in values if v is not None and v != ""}
    numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in present)
    classes = [str(v) for v in sorted(present, key=(lambda v: v) if numeric else str)]
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[str(v)] if v is not None and v != "" else -1 for v in values]


def _label_set(values: list[str]) -> LabelSet:
    return LabelSet(*class_list(values))


class CsvSource(_FileSource):
    """A CSV manifest with a header: ``path`` (required), ``label`` and ``split`` (optional), and any number of
    ``label:NAME`` columns (more tasks over the same images); rows in file order.

    Paths are relative to the CSV's folder (absolute paths are kept as they are). A listed file that does not
    exist is not an error here: its row fails at decode time and is recorded as failed. An empty label cell
    leaves that row unlabeled for that task only.
    """

    kind = "csv"
    HEADER_HINT = "expected a header 'path,label[,split]' (more label sets: label:NAME columns)"

    @classmethod
    def read(cls, csv_path: Path, spec: str | None = None) -> "CsvSource":
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.reader(f))
        except UnicodeDecodeError as e:
            raise FeaturizeError(f"cannot read {csv_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise FeaturizeError(f"cannot read {csv_path}: malformed CSV ({e})") from None
        except OSError as e:
            raise FeaturizeError(f"cannot read {csv_path}: {e.strerror or e}") from None

        rows = [r for r in rows if any(cell.strip() for cell in r)]
        if not rows:
            raise FeaturizeError(f"{csv_path} is empty; {cls.HEADER_HINT} and one row per image")
        header = [h.strip() for h in rows[0]]
        # Column names are case-insensitive; a task keeps the name as written after "label:".
        keys = [h.lower() if not h.lower().startswith("label:") else "label:" + h[6:].strip() for h in header]
        if "path" not in keys:
            raise FeaturizeError(
                f"{csv_path} has no 'path' column in its header (found: {','.join(header)!r}); {cls.HEADER_HINT}"
            )
        unknown = [h for h, k in zip(header, keys) if k not in ("path", "label", "split") and not k.startswith("label:")]
        if unknown:
            raise FeaturizeError(f"{csv_path} has unknown column(s) {', '.join(map(repr, unknown))}; allowed: path, "
                                 "label, split and label:NAME")
        task_names = [k[6:] for k in keys if k.startswith("label:")]
        for name in task_names:
            if not TASK_NAME.fullmatch(name) or name == DEFAULT_TASK:
                raise FeaturizeError(f"{csv_path}: label set name {name!r} must be letters, digits, '_', '.' or "
                                     f"'-' (starting with a letter or digit) and not {DEFAULT_TASK!r} (the plain "
                                     "column's), e.g. label:species")
        repeated = sorted(k for k in set(keys) if keys.count(k) > 1)
        if repeated:
            raise FeaturizeError(f"{csv_path} has column {repeated[0]!r} more than once; give each column once")
        col = {name: keys.index(name) for name in keys}
        if len(rows) == 1:
            raise FeaturizeError(f"{csv_path} lists no images (only a header)")

        parsed, seen = [], {}
        task_values: dict[str, list[str]] = {name: [] for name in task_names}
        for lineno, row in enumerate(rows[1:], start=2):
            if len(row) != len(header):
                raise FeaturizeError(
                    f"{csv_path} line {lineno}: expected {len(header)} fields ({','.join(header)}), got {len(row)}"
                )
            path = row[col["path"]].strip()
            label = row[col["label"]].strip() if "label" in col else ""
            split = row[col["split"]].strip().lower() if "split" in col else ""
            if not path:
                raise FeaturizeError(f"{csv_path} line {lineno}: empty path")
            if split and split not in SPLITS:
                raise FeaturizeError(
                    f"{csv_path} line {lineno}: split must be one of {', '.join(SPLITS)} or empty, got {split!r}"
                )
            norm = Path(path).as_posix()
            if norm in seen:
                raise FeaturizeError(f"{csv_path} line {lineno}: path {path!r} is already listed on line {seen[norm]}")
            seen[norm] = lineno
            parsed.append((norm, label, split))
            for name in task_names:
                task_values[name].append(row[col["label:" + name]].strip())

        tasks = {name: _label_set(values) for name, values in task_values.items()}
        default = DEFAULT_TASK if "label" in col or not task_names else task_names[0]
        base = _label_set([label for _, label, _ in parsed]) if default == DEFAULT_TASK else tasks[default]
        samples = [Sample(i, path, base.labels[i], split) for i, (path, _, split) in enumerate(parsed)]
        return cls(spec or str(csv_path), csv_path.parent, samples, base.classes, tasks, default)


class DigitsSource(Source):
    """scikit-learn's ``load_digits`` as 8x8 RGB images, with a fixed stratified 75/25 train/test split."""

    kind = "builtin"
    test_fraction = 0.25
    split_seed = 0

    def __init__(self, spec: str = "builtin:digits"):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        # Pixel values are 0..16; scale to the full 8-bit range.
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        labels = digits.target.astype(int)
        index = np.arange(len(labels))
        _, test_idx = train_test_split(
            index, test_size=self.test_fraction, stratify=labels, random_state=self.split_seed
        )
        is_test = np.zeros(len(labels), dtype=bool)
        is_test[test_idx] = True
        samples = [
            Sample(i, f"builtin:digits:{i}", int(labels[i]), "test" if is_test[i] else "train")
            for i in range(len(labels))
        ]
        super().__init__(spec, samples, [str(d) for d in digits.target_names])

    def load(self, index: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L").convert("RGB")

    def _fingerprint_rows(self):
        for s in self.samples:
            yield [s.id, s.label, s.split, hashlib.sha256(self.images[s.index].tobytes()).hexdigest()]

    def describe(self) -> dict:
        return {
            **super().describe(),
            "name": "digits",
            "split": {"test_fraction": self.test_fraction, "seed": self.split_seed, "stratified": True},
        }


_OPENERS: list[Callable[[str, dict], "Source | None"]] = []


def median_image_side(source: Source, rows: int = 64) -> int | None:
    """The median shorter side, in pixels, of up to `rows` images spread evenly over `source` (the ones that
    decode); None when none does."""
    n = len(source.samples)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(rows, n))}) if n else []
    sides = []
    for i in picks:
        try:
            sides.append(min(source.load(i).size))
        except Exception:  # noqa: BLE001 -- a row that does not decode says nothing about the others' size
            continue
    return int(np.median(sides)) if sides else None


def register_opener(opener: Callable[[str, dict], "Source | None"]) -> Callable:
    """Register ``opener(spec, options)``: a source for `spec` when it is of its kind, else None (and a clear
    error for options it does not take). :func:`open_source` asks the registered openers, in order, before image
    folders, CSVs and builtins -- how :mod:`featurize.packed` adds tar shards and Parquet without this module
    importing it."""
    _OPENERS.append(opener)
    return opener


def open_source(spec: str | os.PathLike, **options) -> Source:
    """Open a source from what the user typed: a folder, a ``.csv`` file, ``builtin:<name>``, tar shards (one
    ``.tar``, a folder of them, or a brace pattern ``shards/{000000..000099}.tar``), or Parquet / Arrow tables
    (a ``.parquet`` file, a folder of them, or a Hugging Face ``save_to_disk`` folder).

    Args:
        options: for packed sources (:data:`featurize.packed.SOURCE_OPTIONS`): ``image_column``,
            ``label_column``, ``split_column``, ``id_column`` (Parquet), ``label_key`` (tar); None means unset.

    Raises:
        FeaturizeError: the source does not exist, is empty, or is malformed; an option it does not read.
    """
    spec = str(spec)
    for opener in _OPENERS:  # tar shards and tables first (featurize/packed.py registers them)
        source = opener(spec, options)
        if source is not None:
            return source
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name != "digits":
            raise FeaturizeError(
                f"unknown builtin dataset {name!r}; available: {', '.join('builtin:' + n for n in BUILTIN_DATASETS)}"
            )
        return DigitsSource(spec)
    path = Path(spec)
    if not path.exists():
        raise FeaturizeError(
            f"source {spec} does not exist; give an image folder, a CSV manifest, tar shards, Parquet files, or "
            "builtin:digits"
        )
    if path.is_dir():
        try:
            return ImageFolderSource.scan(path, spec)
        except PermissionError as e:
            raise FeaturizeError(f"cannot read folder {e.filename}: permission denied") from None
    if path.suffix.lower() == ".csv":
        return CsvSource.read(path, spec)
    raise FeaturizeError(f"source {spec} is a file but not a .csv manifest, a .tar shard or a .parquet table; give an "
                         "image folder or one of those")
