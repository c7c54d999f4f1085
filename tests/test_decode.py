"""The tensor decode path (torchvision's decoder, resize and crop as tensors), tested on the CPU: features close
to the Pillow path's on real photographs and PNGs, EXIF orientation, and one bad file costing only its own row."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from featurize.backbones import create_backbone
from featurize.decode import TensorDecoder, resolve_decode
from featurize.engine import DecodeDataset, iter_features
from featurize.errors import FeaturizeError
from featurize.sources import open_source

from conftest import broken_jpegs, photo, write_image

CPU = torch.device("cpu")


def _features(source, backbone, decode, batch_size=4, indices=None):
    indices = range(len(source)) if indices is None else indices
    batches = list(iter_features(source, backbone, indices, device=CPU, precision="fp32", batch_size=batch_size,
                                 workers=0, decode=decode))
    return np.concatenate([b.features for b in batches]), [e for b in batches for e in b.errors]


def _cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0", "packaged")


def test_tensor_decoding_matches_pillow_on_photographs_and_pngs(photo_folder, lite0):
    source = open_source(photo_folder)  # JPEG, PNG, WebP, BMP, TIFF photographs
    pillow, _ = _features(source, lite0, "pillow")
    tensor, errors = _features(source, lite0, "tensor")
    assert not any(errors)
    assert _cosine(pillow, tensor).min() >= 0.999
    # the JPEGs really went through torchvision (the rest through Pillow, which gives the same features exactly)
    dataset = DecodeDataset(source, lite0, jpeg_draft=True, decode="tensor")
    jpegs = [i for i, s in enumerate(source.samples) if s.id.endswith((".jpg", ".jpeg"))]
    assert jpegs and all(dataset.tensor.prepare(i).data is not None for i in jpegs)
    others = [i for i in range(len(source)) if i not in jpegs]
    np.testing.assert_array_equal(pillow[others], tensor[others])
    for i in jpegs:  # decoded by libjpeg-turbo either way, resampled as Pillow resamples: the same bytes
        torch.testing.assert_close(dataset.tensor.decode_one(i)[0], dataset.pillow(i)[0], rtol=0, atol=0)
    np.testing.assert_array_equal(pillow, tensor)


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_as_pillow_does(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "cat" / "rotated.jpg"
    path.parent.mkdir()
    Image.fromarray(photo("chelsea")[:200, :300]).save(path, quality=95, exif=exif)
    backbone = create_backbone("test_resnet", "random")
    dataset = DecodeDataset(open_source(tmp_path), backbone, jpeg_draft=True, decode="tensor")
    assert dataset.tensor.prepare(0).orientation == orientation
    tensor, error = dataset.tensor.decode_one(0)
    pillow, _ = dataset.pillow(0)
    assert not error and tensor.shape == pillow.shape
    assert (tensor.float() - pillow.float()).abs().mean() < 2.0  # same pixels up to resampling and IDCT rounding


def test_one_corrupt_jpeg_costs_only_its_own_row(tmp_path):
    good = [photo("chelsea"), photo("coffee"), photo("astronaut")[:300, :451]]  # the first and last of one size
    for i, array in enumerate(good):
        write_image(tmp_path / "ok" / f"{i}.jpg", array)
        write_image(tmp_path / "mixed" / f"{i}.jpg", array)
    truncated, bogus = broken_jpegs((tmp_path / "ok" / "0.jpg").read_bytes())
    (tmp_path / "mixed" / "0b-truncated.jpg").write_bytes(truncated)
    (tmp_path / "mixed" / "1b-bogus.jpg").write_bytes(bogus)
    backbone = create_backbone("test_resnet", "random")
    clean, _ = _features(open_source(tmp_path / "ok"), backbone, "tensor", batch_size=5)
    mixed_source = open_source(tmp_path / "mixed")
    mixed, errors = _features(mixed_source, backbone, "tensor", batch_size=5)  # one batch holds all five
    ids = [s.id for s in mixed_source.samples]
    assert ids == ["0.jpg", "0b-truncated.jpg", "1.jpg", "1b-bogus.jpg", "2.jpg"]
    assert "truncated" in errors[1] and "broken data stream" in errors[3], errors  # Pillow's reasons, as there
    assert not errors[0] and not errors[2] and not errors[4]
    assert np.isnan(mixed[[1, 3]]).all()
    np.testing.assert_allclose(mixed[[0, 2, 4]], clean, rtol=1e-4, atol=1e-5)

    # the batch as the GPU path assembles it (read ahead, then decoded in one call that fails and is redone
    # image by image), here on the CPU
    dataset = DecodeDataset(mixed_source, backbone, jpeg_draft=True)
    decoder = TensorDecoder(mixed_source, backbone, CPU, dataset.pillow)
    prepared = [decoder.prepare(i) for i in range(5)]
    assert prepared[1].data is None and prepared[3].data is not None  # no end marker: Pillow; bogus: the device
    indices, images, batch_errors = decoder.finish(prepared)
    assert indices.tolist() == [0, 1, 2, 3, 4] and images.shape[0] == 5 and images.dtype == torch.uint8
    assert batch_errors == errors
    for row in (0, 2, 4):  # same-size images resized together give what each gives alone
        torch.testing.assert_close(images[row], decoder.decode_one(row)[0], rtol=0, atol=0)


def test_resolve_decode():
    backbone = create_backbone("test_resnet", "random")
    assert resolve_decode("auto", CPU, backbone) == "pillow"
    assert resolve_decode("cpu", CPU, backbone) == "pillow"
    assert resolve_decode("tensor", CPU, backbone) == "tensor"
    assert resolve_decode("auto", torch.device("cuda"), backbone) == "tensor"
    with pytest.raises(FeaturizeError, match="--decode gpu needs a CUDA device"):
        resolve_decode("gpu", CPU, backbone)


def test_sources_without_bytes_and_non_jpegs_go_to_pillow():
    source = open_source("builtin:digits")
    backbone = create_backbone("test_resnet", "random")
    pillow, _ = _features(source, backbone, "pillow", indices=range(16))
    tensor, errors = _features(source, backbone, "tensor", indices=range(16))
    assert not any(errors)
    np.testing.assert_array_equal(pillow, tensor)
    png = io.BytesIO()
    Image.fromarray(photo("coffee")).save(png, format="PNG")
    assert TensorDecoder(source, backbone, CPU, lambda i: (None, ""))._takes(png.getvalue()) is None


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "box", "hamming"])
def test_pillow_resample_on_tensors_gives_pillows_bytes(interpolation):
    from torchvision import transforms as T

    from featurize.backbones import ResizeCenterCrop
    from featurize.decode import PillowResample

    mode = T.InterpolationMode(interpolation)
    fused = ResizeCenterCrop(T.Resize(256, interpolation=mode), T.CenterCrop(224))
    # landscape, portrait (Pillow 13 resamples those vertically first), a sliver, and upscaled
    for array in (photo("chelsea"), photo("coffee")[:390, :200], photo("coffee")[:40, :400], photo("astronaut")[:90, :140]):
        expected = np.asarray(fused(Image.fromarray(np.ascontiguousarray(array))))
        got = PillowResample(fused)(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected)


# one canvas per order of passes, or one image each; a square crop (both axes' weights in one go) or not
@pytest.mark.parametrize("budget,crop", [(1 << 27, (56, 56)), (3 * 300 * 460, (56, 56)), (1 << 27, (48, 56))])
def test_images_of_many_sizes_resized_together_give_each_ones_bytes(budget, crop):
    """The padded path (every size different) gives, image by image, what resizing each alone gives: landscape,
    portrait (Pillow 13 resamples those vertically first), upscaled, slivers; in one canvas or one each."""
    from torchvision import transforms as T

    from featurize.backbones import ResizeCenterCrop
    from featurize.decode import PillowResample, resize_images

    resample = PillowResample(ResizeCenterCrop(T.Resize(64, interpolation=T.InterpolationMode.BICUBIC),
                                               T.CenterCrop(crop)))
    crops = [photo("chelsea"), photo("coffee")[:390, :200], photo("astronaut")[:90, :140], photo("coffee")[:40, :400],
             photo("rocket")[:300, :451], photo("chelsea")[:250, :250], photo("astronaut")[:201, :303]]
    images = [(10 + i, torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)) for i, a in enumerate(crops)]
    seen = {}
    for positions, out in resample.padded(images, budget=budget):
        assert out.dtype == torch.uint8 and out.shape[1:] == (3, *crop)
        seen.update(zip(positions, out))
    assert sorted(seen) == [10 + i for i in range(len(crops))]
    for position, image in images:
        np.testing.assert_array_equal(seen[position], resample(image[None])[0])
    # shared sizes are still resized a group at a time, the rest padded: the same bytes
    twice = images + [(20 + i, image) for i, (_, image) in enumerate(images[:2])] * 2
    grouped = {p: o for positions, out in resize_images(twice, [resample], group_size=3, padded=True) for p, o in zip(positions, out)}
    for position, image in twice:
        np.testing.assert_array_equal(grouped[position], resample(image[None])[0])


def _one_pixel_at_a_time(in_size, start, stop, out_size, resample):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc as its C loop runs them, one output pixel at a time:
    the reference the vectorised weights must equal."""
    from featurize.decode import _FILTERS, _PRECISION_BITS

    support, kernel = _FILTERS[resample]
    scale = float(np.float32(stop) - np.float32(start)) / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    ss = 1.0 / filterscale
    weights = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = start + (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = kernel((np.arange(lo, hi) - center + 0.5) * ss)
        total = float(np.cumsum(w)[-1]) if len(w) else 0.0
        if total != 0.0:
            w = w / total
        one = float(1 << _PRECISION_BITS)
        weights[xx, lo:hi] = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)) / one
    return weights


def _weights(cases, out_size, resample):
    """The resampling weights of each (in_size, start, stop) axis over all its input pixels, [out_size, in_size],
    computed as the decode stage does: all the axes in one call."""
    from featurize.decode import _bands, _in_band, _window_weights

    in_sizes, starts, stops = (np.array(column, dtype=np.float64) for column in zip(*cases))
    first, stop, taps = _bands(in_sizes, starts, stops, out_size, resample)
    axes = torch.from_numpy(np.stack([in_sizes, starts, stops, first], axis=1))
    band = _in_band(_window_weights(axes, out_size, resample, taps), int((stop - first).max()), torch.float64).numpy()
    for j, (in_size, _, _) in enumerate(cases):
        assert not band[j, :, stop[j] - first[j] :].any()  # zeros past the axis's own band
        weights = np.zeros((out_size, int(in_size)))
        weights[:, first[j] : stop[j]] = band[j, :, : stop[j] - first[j]]
        yield weights


def test_resampling_weights_equal_pillows_pixel_by_pixel_loop():
    """Every filter, shrinking and enlarging, whole images and crop boxes (fractional too), odd sizes; one axis
    at a time and many axes in one call."""
    from featurize.decode import _FILTERS

    rng = np.random.default_rng(0)
    cases = [(500, 0.0, 500.0, 224), (375, 15.5, 359.5, 224), (28, 0.0, 28.0, 224), (7, 1.25, 6.5, 13),
             (4000, 0.0, 4000.0, 256), (1, 0.0, 1.0, 5), (224, 0.0, 224.0, 224)]
    for _ in range(40):
        size = int(rng.integers(2, 900))
        a, b = sorted(rng.uniform(0, size, 2))
        cases.append((size, float(np.float32(a)), float(np.float32(max(b, a + 0.5))), int(rng.integers(1, 400))))
    for resample in _FILTERS:
        for in_size, start, stop, out_size in cases:
            expected = _one_pixel_at_a_time(in_size, start, stop, out_size, int(resample))
            (got,) = _weights([(in_size, start, stop)], out_size, int(resample))
            np.testing.assert_array_equal(got, expected, err_msg=f"{resample!r} {in_size} [{start}, {stop}) -> {out_size}")
        axes = [case[:3] for case in cases[::4]]
        for (in_size, start, stop), got in zip(axes, _weights(axes, 224, int(resample))):
            np.testing.assert_array_equal(got, _one_pixel_at_a_time(in_size, start, stop, 224, int(resample)),
                                          err_msg=f"{resample!r} {in_size} [{start}, {stop}) -> 224, many at once")


def test_pillow_resample_keeps_the_weights_of_recent_sizes():
    """A size seen before reuses its weights (on a GPU: no copy from the host, so no wait); the oldest of more
    sizes than the cache holds is dropped; the bytes are the same either way."""
    from torchvision import transforms as T

    from featurize.backbones import ResizeCenterCrop
    from featurize.decode import PillowResample

    resample = PillowResample(ResizeCenterCrop(T.Resize(64), T.CenterCrop(56)), cache_size=2)
    images = {size: torch.from_numpy(np.ascontiguousarray(photo("chelsea")[: size[0], : size[1]])).permute(2, 0, 1)
              for size in ((300, 451), (200, 300), (120, 90))}
    first = resample(images[(300, 451)])
    plan = resample._plans[(451, 300, CPU, torch.float64)]
    np.testing.assert_array_equal(resample(images[(300, 451)]), first)
    assert resample._plans[(451, 300, CPU, torch.float64)] is plan  # computed once
    resample(images[(200, 300)])
    resample(images[(120, 90)])
    assert list(resample._plans) == [(300, 200, CPU, torch.float64), (90, 120, CPU, torch.float64)]
    np.testing.assert_array_equal(resample(images[(300, 451)]), first)  # made again: the same bytes
