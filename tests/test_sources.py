"""Sources: layouts, order, labels, splits, fingerprints, image modes, and their error cases."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from featurize.errors import FeaturizeError
from featurize.sources import CsvSource, DigitsSource, ImageFolderSource, decode_image, open_source

from conftest import PHOTOS, photo, write_image


def test_image_folder_classes_labels_and_order(photo_folder):
    src = open_source(photo_folder)
    assert isinstance(src, ImageFolderSource)
    assert src.classes == ["cat", "coffee", "space"]
    assert [s.id for s in src.samples] == sorted(f"{c}/{f}" for c, _, f in PHOTOS)
    assert [s.index for s in src.samples] == list(range(len(PHOTOS)))
    by_id = {s.id: s for s in src.samples}
    assert by_id["cat/chelsea.jpg"].label == 0
    assert by_id["space/rocket.tiff"].label == 2
    assert all(s.split == "" for s in src.samples)


def test_image_folder_split_layout(split_folder):
    src = open_source(split_folder)
    splits = {s.id.split("/")[0] for s in src.samples}
    assert splits == {"train", "test"}
    assert all(s.split == s.id.split("/")[0] for s in src.samples)
    assert src.classes == ["cat", "coffee", "space"]
    assert all(src.classes[s.label] == s.id.split("/")[1] for s in src.samples)


def test_unlabeled_flat_folder(tmp_path):
    for name in ("b.png", "a.jpg"):
        write_image(tmp_path / name, photo("coffee")[:64, :64])
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(tmp_path)
    assert [s.id for s in src.samples] == ["a.jpg", "b.png"]
    assert src.classes == [] and all(s.label == -1 for s in src.samples)


def test_nested_files_and_hidden_entries(tmp_path):
    write_image(tmp_path / "cat" / "sub" / "x.png", photo("chelsea")[:32, :32])
    write_image(tmp_path / "cat" / ".hidden.png", photo("chelsea")[:32, :32])
    write_image(tmp_path / ".cache" / "y.png", photo("chelsea")[:32, :32])
    src = open_source(tmp_path)
    assert [s.id for s in src.samples] == ["cat/sub/x.png"]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(FeaturizeError, match="no images found in"):
        open_source(tmp_path)


def test_mixed_files_and_class_folders_is_an_error(tmp_path):
    write_image(tmp_path / "a.png", photo("coffee")[:16, :16])
    write_image(tmp_path / "cls" / "b.png", photo("coffee")[:16, :16])
    with pytest.raises(FeaturizeError, match="both image files .* and class folders"):
        open_source(tmp_path)


def test_mixed_split_and_class_folders_is_an_error(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png", photo("coffee")[:16, :16])
    write_image(tmp_path / "dog" / "b.png", photo("coffee")[:16, :16])
    with pytest.raises(FeaturizeError, match=r"mixes split folders \(train\) with other folders \(dog\)"):
        open_source(tmp_path)


def test_missing_source_and_non_csv_file(tmp_path):
    with pytest.raises(FeaturizeError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FeaturizeError, match="not a .csv manifest"):
        open_source(tmp_path / "x.txt")
    with pytest.raises(FeaturizeError, match="unknown builtin dataset 'mnist'"):
        open_source("builtin:mnist")


def test_csv_manifest(photo_folder, tmp_path):
    csv_path = photo_folder / "list.csv"  # beside the images (paths are relative to the manifest), then gone
    csv_path.write_text("path,label,split\ncoffee/coffee.jpg,drink,train\ncat/chelsea.jpg,animal,TEST\nmissing.png,,\n")
    try:
        src = open_source(csv_path)
    finally:
        csv_path.unlink()
    assert isinstance(src, CsvSource)
    assert [s.id for s in src.samples] == ["coffee/coffee.jpg", "cat/chelsea.jpg", "missing.png"]
    assert src.classes == ["animal", "drink"]
    assert [s.label for s in src.samples] == [1, 0, -1]
    assert [s.split for s in src.samples] == ["train", "test", ""]
    assert src.load(1).size == (451, 300)
    with pytest.raises(OSError):  # a listed file that does not exist fails at decode time, for its row only
        src.load(2)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("file,label\na.png,x\n", "no 'path' column"),
        ("path,label,weight\na.png,x,1\n", "unknown column"),
        ("path,label\n", "lists no images"),
        ("path,label\na.png,x,extra\n", "line 2: expected 2 fields"),
        ("path,split\na.png,training\n", "line 2: split must be one of train, val, test"),
        ("path\na.png\n./a.png\n", "line 3: path './a.png' is already listed on line 2"),
        ("path,label\n,x\n", "line 2: empty path"),
    ],
)
def test_csv_errors(tmp_path, content, message):
    p = tmp_path / "m.csv"
    p.write_text(content)
    with pytest.raises(FeaturizeError, match=message):
        open_source(p)


def test_csv_not_utf8(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes(b"path,label\n\xff\xfe\x00garbage\n")
    with pytest.raises(FeaturizeError, match="not UTF-8 text"):
        open_source(p)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_csv_unreadable(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path\na.png\n")
    p.chmod(0)
    with pytest.raises(FeaturizeError, match="cannot read"):
        open_source(p)


def test_csv_that_is_a_folder_named_csv_is_scanned_as_folder(tmp_path):
    d = tmp_path / "weird.csv"
    write_image(d / "a.png", photo("coffee")[:16, :16])
    assert isinstance(open_source(d), ImageFolderSource)


def test_digits_source():
    src = open_source("builtin:digits")
    assert isinstance(src, DigitsSource)
    assert len(src) == 1797 and src.classes == [str(d) for d in range(10)]
    assert src.samples[5].id == "builtin:digits:5"
    splits = np.array([s.split for s in src.samples])
    labels = np.array([s.label for s in src.samples])
    assert set(splits) == {"train", "test"}
    assert abs((splits == "test").mean() - 0.25) < 0.01
    for c in range(10):  # stratified: every class has about a quarter of its samples in test
        assert abs((splits[labels == c] == "test").mean() - 0.25) < 0.05
    img = src.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert max(np.asarray(src.load(i)).max() for i in range(20)) == 255  # 0..16 scaled to the 8-bit range
    assert open_source("builtin:digits").fingerprint() == src.fingerprint()
    assert [s.split for s in open_source("builtin:digits").samples] == list(splits)


def test_fingerprint_changes_with_content_and_labels(tmp_path):
    write_image(tmp_path / "a" / "x.png", photo("coffee")[:32, :32])
    write_image(tmp_path / "b" / "y.png", photo("coffee")[:32, :32])
    first = open_source(tmp_path).fingerprint()
    assert open_source(tmp_path).fingerprint() == first
    write_image(tmp_path / "a" / "x.png", photo("chelsea")[:40, :40])
    os.utime(tmp_path / "a" / "x.png", ns=(1, 1))
    second = open_source(tmp_path).fingerprint()
    assert second != first
    (tmp_path / "b").rename(tmp_path / "c")
    assert open_source(tmp_path).fingerprint() != second


def _rgb_of(tmp_path, img: Image.Image, name: str, **kwargs) -> np.ndarray:
    path = tmp_path / name
    img.save(path, **kwargs)
    out = decode_image(path)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_decode_modes_to_rgb(tmp_path):
    gray = Image.fromarray(photo("camera"))
    assert _rgb_of(tmp_path, gray, "g.png").shape == (512, 512, 3)

    rgba = Image.fromarray(photo("logo"))
    assert _rgb_of(tmp_path, rgba, "l.png").shape == (500, 500, 3)

    cmyk = Image.fromarray(photo("coffee")).convert("CMYK")
    rgb = _rgb_of(tmp_path, cmyk, "c.jpg")
    assert np.abs(rgb.astype(int) - np.asarray(Image.fromarray(photo("coffee")))).mean() < 12

    palette = Image.fromarray(photo("chelsea")).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    assert _rgb_of(tmp_path, palette, "p.png", transparency=0).shape == (300, 451, 3)

    # 16-bit: the full range maps to 0..255 instead of saturating at 255.
    ramp = np.tile(np.linspace(0, 65535, 256), (4, 1)).astype(np.uint16)
    rgb16 = _rgb_of(tmp_path, Image.fromarray(ramp), "r16.png")
    assert rgb16[..., 0].min() == 0 and rgb16[..., 0].max() == 255
    assert 100 < rgb16[0, 128, 0] < 155


def test_decode_applies_exif_orientation(tmp_path):
    img = Image.fromarray(photo("chelsea"))  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert decode_image(tmp_path / "o.jpg").size == (300, 451)


def test_decode_failures_raise(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(OSError):
        decode_image(tmp_path / "empty.jpg")
    with pytest.raises(OSError):
        decode_image(tmp_path / "text.jpg")
