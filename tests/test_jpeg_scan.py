"""The lean JPEG header scan (featurize/jpeg.py) agrees with Pillow on size, mode, progressive and orientation
for every kind of JPEG the engine meets, and refuses what it cannot read with certainty."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from featurize.jpeg import is_complete, scan_jpeg

from conftest import photo


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _exif(orientation: int, big_endian: bool = False) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "headbench"  # another tag before it in the same IFD
    if big_endian:
        exif.endian = ">"
    return exif


def _cases() -> dict[str, bytes]:
    rgb = Image.fromarray(photo("chelsea")[:150, :200])
    cases = {
        "baseline": _jpeg(rgb, quality=90),
        "grey": _jpeg(rgb.convert("L")),
        "cmyk": _jpeg(rgb.convert("CMYK")),
        "progressive": _jpeg(rgb, progressive=True),
        "progressive-grey": _jpeg(rgb.convert("L"), progressive=True),
        "optimized-444": _jpeg(rgb, optimize=True, subsampling=0),
        "exif-without-orientation": _jpeg(rgb, exif=_exif_no_orientation()),
        "xmp-orientation": _jpeg(rgb, xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'),
        "xmp-element": _jpeg(rgb, xmp=b"<x:xmpmeta><tiff:Orientation>3</tiff:Orientation></x:xmpmeta>"),
        "exif-over-xmp": _jpeg(rgb, exif=_exif(8), xmp=b'<x tiff:Orientation="6"/>'),
        "icc": _jpeg(rgb, icc_profile=b"\x00" * 300),
        "restart-intervals": _jpeg(rgb, restart_marker_blocks=4) if _pillow_has_restart() else _jpeg(rgb),
    }
    for k in range(1, 9):
        cases[f"exif-{k}"] = _jpeg(rgb, exif=_exif(k))
        cases[f"exif-{k}-big-endian"] = _jpeg(rgb, exif=_exif(k, big_endian=True))
        cases[f"exif-{k}-progressive"] = _jpeg(rgb, exif=_exif(k), progressive=True)
    return cases


def _exif_no_orientation() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "headbench"
    return exif


def _pillow_has_restart() -> bool:
    try:
        _jpeg(Image.new("RGB", (16, 16)), restart_marker_blocks=1)
        return True
    except TypeError:
        return False


def _pillow_view(data: bytes) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        progressive = bool(img.info.get("progressive") or img.info.get("progression"))
        return img.size, img.mode, progressive, int(img.getexif().get(0x0112, 1) or 1)


@pytest.mark.parametrize("name", sorted(_cases()))
def test_scan_agrees_with_pillow(name):
    data = _cases()[name]
    header = scan_jpeg(data)
    assert header is not None, name
    assert ((header.width, header.height), header.mode, header.progressive, header.orientation) == _pillow_view(data)
    # a memoryview over a larger buffer (how the engine's readers hand bytes over) reads the same
    arena = np.zeros(len(data) + 100, dtype=np.uint8)
    arena[10 : 10 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    assert scan_jpeg(memoryview(arena)[10 : 10 + len(data)]) == header
    assert is_complete(data)


def test_truncated_and_foreign_files():
    data = _cases()["baseline"]
    assert not is_complete(data[: len(data) // 2])  # the header still scans; completeness is checked apart
    assert scan_jpeg(data[:200]) is None  # cut inside the header
    assert scan_jpeg(b"\x89PNG\r\n\x1a\n" + data) is None
    assert scan_jpeg(b"") is None
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    assert scan_jpeg(buffer.getvalue()) is None


def test_what_it_cannot_read_with_certainty_goes_to_pillow():
    data = _cases()["exif-6"]
    # a second EXIF segment (Pillow joins them): refused rather than guessed
    app1 = data.index(b"Exif\x00\x00") - 4
    length = data[app1 + 2] << 8 | data[app1 + 3]
    twice = data[:app1] + data[app1 : app1 + 2 + length] * 2 + data[app1 + 2 + length :]
    assert _pillow_view(twice)[3] == 6 and scan_jpeg(twice) is None
    # junk between segments (Pillow skips it)
    junk = data[:2] + b"\x00" + data[2:]
    assert scan_jpeg(junk) is None
    # 12-bit samples: Pillow cannot read them either
    sof = data.index(b"\xff\xc0")
    twelve = data[: sof + 4] + b"\x0c" + data[sof + 5 :]
    assert scan_jpeg(twelve) is None
