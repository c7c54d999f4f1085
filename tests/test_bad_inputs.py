"""A catalogue of hostile inputs: each is converted correctly or recorded with its reason; neighbours untouched."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from featurize.store import STATUS_FAILED, STATUS_OK, read_store
from pipelines.extract import extract_features

from conftest import photo

GOOD = ["good-cat.png", "good-coffee.jpg", "good-rocket.png"]
# name -> (expected status, expected start of the recorded error)
CASES = {
    "truncated.jpg": (STATUS_FAILED, "OSError: image file is truncated"),
    "zero-bytes.jpg": (STATUS_FAILED, "UnidentifiedImageError: cannot identify image file"),
    "text.jpg": (STATUS_FAILED, "UnidentifiedImageError: cannot identify image file"),
    "bomb.png": (STATUS_FAILED, "DecompressionBombError: Image size (1600000000 pixels) exceeds limit"),
    "bomb-mid.png": (STATUS_FAILED, "DecompressionBombError: image has 100000000 pixels, more than the limit"),
    "sixteen-bit.png": (STATUS_OK, ""),
    "cmyk.jpg": (STATUS_OK, ""),
    "palette-transparent.png": (STATUS_OK, ""),
    "sliver.png": (STATUS_OK, ""),
    "missing.png": (STATUS_FAILED, "FileNotFoundError: [Errno 2] No such file or directory"),
    "a-folder.png": (STATUS_FAILED, "IsADirectoryError: [Errno 21] Is a directory"),
    "loop-a.jpg": (STATUS_FAILED, "OSError: [Errno 40] Too many levels of symbolic links"),
}


def _bomb_png(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels (no real pixel data behind it)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _write_catalogue(root):
    root.mkdir()
    Image.fromarray(photo("chelsea")).save(root / GOOD[0])
    Image.fromarray(photo("coffee")).save(root / GOOD[1], quality=90)
    Image.fromarray(photo("rocket")).save(root / GOOD[2])
    full = (root / GOOD[1]).read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "zero-bytes.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "bomb.png").write_bytes(_bomb_png(40000))  # over twice Pillow's limit: Pillow refuses to open it
    (root / "bomb-mid.png").write_bytes(_bomb_png(10000))  # between one and two limits: Pillow only warns
    ramp = np.tile(np.linspace(0, 65535, 300), (200, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(root / "sixteen-bit.png")
    Image.fromarray(photo("astronaut")).convert("CMYK").save(root / "cmyk.jpg")
    pal = Image.fromarray(photo("coffee")).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(root / "palette-transparent.png", transparency=0)
    Image.fromarray(np.full((3, 3000, 3), 120, np.uint8)).save(root / "sliver.png")
    (root / "a-folder.png").mkdir()
    os.symlink(root / "loop-b.jpg", root / "loop-a.jpg")
    os.symlink(root / "loop-a.jpg", root / "loop-b.jpg")
    rows = ["path,label"] + [f"{name},good" for name in GOOD] + [f"{name},bad" for name in CASES]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    clean = root / "clean.csv"
    clean.write_text("\n".join(["path,label"] + [f"{name},good" for name in GOOD]) + "\n")
    return root / "list.csv", clean


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    hostile, clean = _write_catalogue(root / "src")
    options = dict(model="test_resnet", weights="random", precision="fp32", workers=0, progress=False)
    result = extract_features(hostile, root / "hostile.h5", max_failures="100%", **options)
    return result, read_store(result.path), read_store(extract_features(clean, root / "clean.h5", **options).path)


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 10


@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_input_is_converted_or_recorded(stores, name):
    _, store, _ = stores
    row = list(store.ids).index(name)
    status, reason = CASES[name]
    assert store.status[row] == status, store.errors[row]
    assert store.errors[row].startswith(reason), store.errors[row]
    if status == STATUS_OK:
        assert np.isfinite(store.features[row]).all()
    else:
        assert np.isnan(store.features[row]).all()


def test_neighbours_are_untouched(stores):
    _, store, clean = stores
    for i, name in enumerate(clean.ids):
        row = list(store.ids).index(name)
        assert store.status[row] == STATUS_OK
        np.testing.assert_allclose(store.features[row].astype(np.float32), clean.features[i].astype(np.float32),
                                   rtol=1e-3, atol=1e-3)


def test_failure_summary_by_reason(stores):
    result, store, _ = stores
    assert result.num_failed == int((store.status == STATUS_FAILED).sum()) == 8
    assert result.failure_reasons == {"OSError": 2, "UnidentifiedImageError": 2, "DecompressionBombError": 2,
                                      "FileNotFoundError": 1, "IsADirectoryError": 1}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions_are_recorded(tmp_path):
    Image.fromarray(photo("coffee")).save(tmp_path / "a.png")
    Image.fromarray(photo("coffee")).save(tmp_path / "b.png")
    (tmp_path / "b.png").chmod(0)
    result = extract_features(tmp_path, tmp_path.parent / "perm.h5", model="test_resnet", weights="random",
                              workers=0, progress=False, max_failures=1)
    assert read_store(result.path).errors[1].startswith("PermissionError")
