"""Shared fixtures: real photographs (scikit-image's bundled images) written as image folders and CSVs."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests must never reach for the network: the hub path fails fast and from the local cache only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Converted OpenVINO models go to a cache of this test session, never the user's (subprocesses inherit it).
os.environ["HEADBENCH_CACHE"] = tempfile.mkdtemp(prefix="headbench-test-cache-")
# --runtime auto means torch in the tests (no conversion per test; torch's features are the reference): OpenVINO
# runs where a test names it, in a subprocess. (The whole suite up to and including the Ray tests also passes
# with auto = OpenVINO in-process, since the hang of two streams' first inferences was fixed in runtime.py.)
os.environ["HEADBENCH_RUNTIME"] = "torch"


def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


# (class, skimage image, file name) -- a few real photographs per class, in several formats.
PHOTOS = [
    ("cat", "chelsea", "chelsea.jpg"),
    ("cat", "cat", "cat.png"),
    ("coffee", "coffee", "coffee.jpg"),
    ("coffee", "coffee", "coffee-small.webp"),
    ("space", "astronaut", "astronaut.bmp"),
    ("space", "rocket", "rocket.tiff"),
    ("space", "hubble_deep_field", "hubble.jpeg"),
]


def write_image(path: Path, array: np.ndarray, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if path.name.startswith("coffee-small"):
        img = img.resize((img.width // 2, img.height // 2))
    img.save(path, **save_kwargs)
    return path


def write_digit_folder(root: Path, *, classes: int, train: int, test: int) -> Path:
    """scikit-learn's digits of the first `classes` classes as PNG files, `train` and `test` of each class in
    ROOT/<split>/<class>/ folders (the builtin's own split)."""
    from featurize.sources import DigitsSource

    source, counts = DigitsSource(), {}
    for s in source.samples:
        wanted = train if s.split == "train" else test
        if s.label >= classes or counts.get((s.split, s.label), 0) >= wanted:
            continue
        counts[(s.split, s.label)] = counts.get((s.split, s.label), 0) + 1
        path = root / s.split / str(s.label) / f"d{s.index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        source.load(s.index).save(path)
    return root


def broken_jpegs(data: bytes) -> tuple[bytes, bytes]:
    """Two broken copies of a JPEG: cut in half (no end-of-image marker: Pillow refuses it as truncated), and a
    complete-looking one (start and end markers, a header Pillow parses) with a bogus Huffman table, which the
    decoder itself refuses."""
    bogus = bytearray(data)
    table = bogus.index(b"\xff\xc4")
    bogus[table + 5 : table + 21] = b"\xff" * 16
    return data[: len(data) // 2], bytes(bogus)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """ROOT/<class>/<image> with 7 real photographs in JPEG, PNG, WebP, BMP and TIFF."""
    root = tmp_path_factory.mktemp("photos")
    for cls, name, filename in PHOTOS:
        write_image(root / cls / filename, photo(name))
    return root


@pytest.fixture(scope="session")
def split_folder(tmp_path_factory) -> Path:
    """ROOT/<split>/<class>/<image> with train and test splits."""
    root = tmp_path_factory.mktemp("splits")
    for i, (cls, name, filename) in enumerate(PHOTOS):
        split = "test" if i % 3 == 2 else "train"
        write_image(root / split / cls / filename, photo(name))
    return root


def assert_same_store(path, reference):
    """The store at `path` holds what `reference` (a FeatureStore) holds: same rows, labels, splits, status,
    error messages and config hash, features within float tolerance; and its run left no partial folder or
    temp file behind. Returns the store."""
    from featurize.store import partial_dir, read_store

    store = read_store(path)
    for name in ("ids", "labels", "split", "status", "errors"):
        np.testing.assert_array_equal(getattr(store, name), getattr(reference, name), err_msg=name)
    np.testing.assert_allclose(store.features.astype(np.float32), reference.features.astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    assert store.attrs["config_hash"] == reference.attrs["config_hash"]
    assert not partial_dir(path).exists() and not list(path.parent.glob("*.tmp"))
    return store


def invoke(runner, args):
    """Run the CLI in-process with string arguments; exceptions that are bugs propagate as tracebacks."""
    from cli import main

    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, expected: str) -> None:
    """Exit code 1, exactly one line 'Error: ...' containing `expected`, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert expected in lines[0], lines[0]


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits, stratified 75/25 split, standardized on the train part, float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train).astype(np.float32), scaler.transform(X_test).astype(np.float32), y_train, y_test


TINY = dict(model="test_resnet", weights="random", precision="fp32", workers=0, progress=False)


@pytest.fixture(scope="session")
def digits_tiny(tmp_path_factory):
    """builtin:digits through a tiny random-weight backbone (fast; features are still informative). Read-only:
    copy it before changing it."""
    from pipelines.extract import extract_features

    return extract_features("builtin:digits", tmp_path_factory.mktemp("d") / "digits-tiny.h5", **TINY).path


@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()
