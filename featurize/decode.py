"""Tensor decoding: JPEG bytes decoded by torchvision -- batched nvJPEG on CUDA, libjpeg-turbo on a CPU -- then
resized and center-cropped as tensors on the model's device, with Pillow's own resampling weights
(:class:`PillowResample`), so that the features are those of the Pillow path.

On a GPU the Pillow path is bound by CPU decoding (15 decode processes feed about a quarter of what an H100
runs). There the CPU only reads bytes and scans headers, and the GPU decodes whole batches: the staged engine
(:mod:`featurize.stages`) does that with :func:`decode_jpegs` and :func:`transform_by_size`; :class:`TensorDecoder`
is the same path row by row on a CPU. What the tensor path cannot take goes to the Pillow decoder, row by row:

* anything but a baseline RGB/greyscale JPEG (PNG, WebP, CMYK, and on CUDA progressive JPEGs, which nvJPEG's
  hardware path refuses), sources without encoded bytes (builtins), truncated files (no end-of-image marker:
  libjpeg would pad them with grey; Pillow refuses them, and the row is recorded with its reason);
* a batch that fails on the device is decoded again image by image, and an image that still fails goes to
  Pillow, so one bad file never costs its neighbours their features.

EXIF orientation is read from the header and applied to the tensor (torchvision applies it only on CPU).
Before each decode on CUDA the caller's stream is synchronised: batched hardware decoding has been reported to
corrupt unrelated tensors on H100 otherwise (torchvision PR #9606).
"""

from __future__ import annotations

import collections
import math
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import FeaturizeError, error_text
from .jpeg import JpegHeader, is_complete, scan_jpeg

if TYPE_CHECKING:
    from .backbones import Backbone
    from .sources import Source

__all__ = ["DECODE_CHOICES", "resolve_decode", "tensor_steps", "PillowResample", "device_takes", "orient",
           "decode_jpegs", "transform_by_size", "resize_images", "host_to_device", "Prepared", "TensorDecoder",
           "draft_size", "DecodeDataset", "collate_decoded"]

DECODE_CHOICES = ("auto", "cpu", "gpu", "tensor")
_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def tensor_steps(backbone: "Backbone") -> list[Callable] | None:
    """The backbone's per-image transform as steps that run on uint8 tensors, or None when it has a step that
    only runs on Pillow images. The engine's fused resize + crop (:class:`~featurize.backbones.ResizeCenterCrop`)
    becomes a :class:`PillowResample` of the same region, the other resize / crop steps torchvision's."""
    from torchvision import transforms as T

    from .backbones import ResizeCenterCrop, ToUint8Tensor

    if backbone.mean is None:  # the transform was not split: it ends in float tensors, not uint8 ones
        return None
    steps: list[Callable] = []
    for step in getattr(backbone.image_transform, "transforms", []):
        if isinstance(step, ResizeCenterCrop) and step.resample in _FILTERS:
            steps.append(PillowResample(step))
        elif isinstance(step, ResizeCenterCrop):
            steps += [step.resize, step.crop]
        elif type(step) in (T.Resize, T.CenterCrop):
            steps.append(step)
        elif not isinstance(step, ToUint8Tensor):
            return None
    return steps


# Pillow's resampling filters (support, kernel), as its Resample.c defines them. A kernel takes numpy arrays
# (the host's weights, in the CPU path's exact float64 operations) or, with xp=torch, tensors (a whole batch's
# weights computed on its device: :func:`_window_weights`).
def _box(x, xp=np):
    return xp.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _triangle(x, xp=np):
    return xp.clip(1.0 - xp.abs(x), 0.0, None)


def _hamming(x, xp=np):
    x = xp.abs(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        px = x * np.pi
        value = xp.sin(px) / px * (0.54 + 0.46 * xp.cos(px))
    return xp.where(x == 0, 1.0, xp.where(x >= 1.0, 0.0, value))


def _bicubic(x, xp=np, a=-0.5):
    x = xp.abs(x)
    return xp.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    xp.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _sinc(x, xp=np):
    with np.errstate(invalid="ignore", divide="ignore"):
        return xp.where(x == 0, 1.0, xp.sin(np.pi * x) / (np.pi * x))


def _lanczos(x, xp=np):
    return xp.where((x >= -3.0) & (x < 3.0), _sinc(x, xp) * _sinc(x / 3.0, xp), 0.0)


_FILTERS = {Image.Resampling.BOX: (0.5, _box), Image.Resampling.BILINEAR: (1.0, _triangle),
            Image.Resampling.HAMMING: (1.0, _hamming), Image.Resampling.BICUBIC: (2.0, _bicubic),
            Image.Resampling.LANCZOS: (3.0, _lanczos)}
_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2


def _bands(in_sizes: np.ndarray, starts: np.ndarray, stops: np.ndarray, out_size: int,
           resample: int) -> tuple[np.ndarray, np.ndarray, int]:
    """For n axes at once (numpy, on the host): the band of input pixels their weights reach, first and stop
    ([n] int64 each), and a bound on the taps of any output pixel's window. The same float operations as
    :func:`_window_weights` on the first and last output pixel, so the band is where it puts the weights (it
    may keep a column whose weights all round to 0)."""
    support = _FILTERS[resample][0]
    scale = (stops.astype(np.float32) - starts.astype(np.float32)).astype(np.float64) / out_size
    support = support * np.maximum(scale, 1.0)
    first = np.maximum(np.trunc(starts + 0.5 * scale - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(starts + (out_size - 0.5) * scale + support + 0.5), in_sizes).astype(np.int64)
    return first, stop, int(2 * support.max(initial=0.0)) + 2


def _window_weights(axes: torch.Tensor, out_size: int, resample: int, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights Pillow's resample gives the input pixels of each axis's box for each output pixel, quantised to
    its 8-bit fixed point (``precompute_coeffs`` + ``normalize_coeffs_8bpc``), for n axes at once and computed
    where `axes` lives (a GPU: a batch of images of many sizes costs a few dozen launches and no host work per
    size). `axes`: float64 [n, 4], each row an axis's input length, its box start and stop (float32 values, as
    Pillow passes them) and the first pixel of its band (:func:`_bands`); `taps` bounds any window. Returns
    each output pixel's window: weights (float64 [n, out_size, taps], zeros past the window's end) and their
    pixels' places in the band (int64, same shape).

    The same float operations in the same order as Pillow's C loop: each pixel's window, its kernel values,
    their sum left to right (a running sum: trailing zeros leave it as it is), the division and the rounding to
    fixed point; so on a CPU the same values. On a GPU the window sums (a parallel scan) and sin/cos may differ
    in the last bit, which can move a weight by one step of the 22-bit fixed point, far below the rounding of
    the float32 products that use it."""
    support, kernel = _FILTERS[resample]
    in_size, start, stop, first = axes.unbind(1)
    scale = ((stop.float() - start.float()).double() / out_size)[:, None]  # Pillow: (double)(in1 - in0), floats
    filterscale = scale.clamp(min=1.0)
    support = support * filterscale
    ss = (1.0 / filterscale)[..., None]
    center = start[:, None] + (torch.arange(out_size, dtype=torch.float64, device=axes.device) + 0.5) * scale
    lo = torch.trunc(center - support + 0.5).clamp_(min=0)  # C's (int) truncates toward zero
    hi = torch.minimum(torch.trunc(center + support + 0.5), in_size[:, None])
    index = lo[..., None] + torch.arange(taps, dtype=torch.float64, device=axes.device)
    w = torch.where(index < hi[..., None], kernel((index - center[..., None] + 0.5) * ss, torch), 0.0).double()
    total = torch.cumsum(w, -1)[..., -1:]
    w = torch.where(total != 0.0, w / total, w)
    one = float(1 << _PRECISION_BITS)
    w = torch.where(w < 0, torch.trunc(-0.5 + w * one), torch.trunc(0.5 + w * one)) / one
    return w, (index - first[:, None, None]).long()


def _in_band(windows: tuple[torch.Tensor, torch.Tensor], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Windows of :func:`_window_weights` (or a slice of them) as weights over a band `width` pixels wide:
    [n, out_size, width], zeros outside each output pixel's window."""
    w, index = windows
    dense = torch.zeros(*w.shape[:2], width + w.shape[2], dtype=dtype, device=w.device)
    return dense.scatter_(2, index, w.to(dtype))[..., :width]


def _resample_axes(boxes: list[tuple], out_w: int, out_h: int, resample: int):
    """The host's part of resampling images of given sizes: `boxes` holds (w, h, left, top, right, bottom) per
    image. Returns the rows (float64 [n, 8]: each axis's length, box as Pillow's single-precision floats and
    band start; see :func:`_window_weights`) and the bands, x0, x1, y0, y1 ([n] int64) and taps_x, taps_y."""
    axes = np.array(boxes, dtype=np.float64)
    axes[:, 2:] = axes[:, 2:].astype(np.float32)  # Pillow passes the box to C as single-precision floats
    x0, x1, taps_x = _bands(axes[:, 0], axes[:, 2], axes[:, 4], out_w, resample)
    y0, y1, taps_y = _bands(axes[:, 1], axes[:, 3], axes[:, 5], out_h, resample)
    rows = np.stack([axes[:, 0], axes[:, 2], axes[:, 4], x0, axes[:, 1], axes[:, 3], axes[:, 5], y0], axis=1)
    return rows, (x0, x1, y0, y1), (taps_x, taps_y)


def _device_windows(rows: np.ndarray, taps: tuple[int, int], out_w: int, out_h: int, resample: int,
                    device: torch.device):
    """:func:`_window_weights` of both axes of the images of `rows` (:func:`_resample_axes`), from one copy to
    `device`; both axes in one call for a square crop. Returns (windows_x, windows_y)."""
    on_device = host_to_device(rows, device, torch.float64)
    if out_w == out_h:
        n = len(rows)
        both = _window_weights(torch.cat([on_device[:, :4], on_device[:, 4:]]), out_w, resample, max(taps))
        return (both[0][:n], both[1][:n]), (both[0][n:], both[1][n:])
    return (_window_weights(on_device[:, :4], out_w, resample, taps[0]),
            _window_weights(on_device[:, 4:], out_h, resample, taps[1]))


def _horizontal_first(w: int, h: int, out_w: int, out_h: int) -> bool:
    """Pillow's order of the passes: horizontal first, except (from Pillow 13) when the height shrinks by more
    than twice as many pixels as the width does."""
    if _PILLOW_MAJOR < 13:
        return True
    return not (h - out_h > 0 and h - out_h > (w - out_w) * 2)


_PILLOW_MAJOR = int(Image.__version__.split(".")[0])


def host_to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A host array as a tensor on `device`; to CUDA through pinned memory and without waiting (the pinned copy
    is freed only once the stream has read it: torch's pinned-memory allocator records the copy)."""
    tensor = torch.from_numpy(array).to(dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class PillowResample:
    """Pillow's ``resize(size, resample, box)`` of 8-bit images, as two matrix products on tensors: the same
    quantised weights, the same order of the two passes, each rounded and clipped to 8 bits as Pillow does. So
    the tensor path resizes and crops (one region, like :class:`~featurize.backbones.ResizeCenterCrop`) what
    the Pillow path does: on a CPU, in float64, the same bytes; on a GPU, in float32, within a grey level on
    rare pixels.

    Works on uint8 [3, H, W] or [N, 3, H, W] (images of one size). The weights of the last `cache_size` input
    sizes stay on the device: a batch of a size seen before copies nothing from the host, and a new size's
    weights are computed there (:func:`_window_weights`) from its box, copied through pinned memory without
    waiting (a copy from pageable memory would make the host wait for everything queued on the stream)."""

    def __init__(self, fused, cache_size: int = 128):
        self.fused = fused  # a ResizeCenterCrop: its region and output size, its filter
        self.cache_size = cache_size
        self._plans: collections.OrderedDict = collections.OrderedDict()  # (w, h, device, dtype) -> plan
        self._lock = threading.Lock()  # the stream engine's threads may share the steps

    def _plan(self, w: int, h: int, device: torch.device, dtype: torch.dtype):
        """(wx, wy, columns, rows, horizontal first) for an input size, or None when the crop needs padding."""
        key = (w, h, device, dtype)
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        box = self.fused.box(w, h)
        plan = None
        if box is not None:
            resample, out_w, out_h = int(self.fused.resample), self.fused.crop_w, self.fused.crop_h
            rows, (x0, x1, y0, y1), taps = _resample_axes([(w, h, *box)], out_w, out_h, resample)
            windows_x, windows_y = _device_windows(rows, taps, out_w, out_h, resample, device)
            wx = _in_band(windows_x, int(x1[0] - x0[0]), dtype)[0].T  # [band, out_w]
            wy = _in_band(windows_y, int(y1[0] - y0[0]), dtype)[0]
            columns, rows = slice(int(x0[0]), int(x1[0])), slice(int(y0[0]), int(y1[0]))
            plan = (wx, wy, columns, rows, _horizontal_first(w, h, out_w, out_h))
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.cache_size:
                self._plans.popitem(last=False)
        return plan

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        dtype = torch.float64 if images.device.type == "cpu" else torch.float32
        plan = self._plan(int(w), int(h), images.device, dtype)
        if plan is None:  # the crop would need padding: torchvision's resize and crop, as Pillow's path does
            return self.fused.crop(self.fused.resize(images))
        # one product per pass with its weights (only over the band of input pixels they reach), rounded to 8 bits
        # after each pass, in Pillow's order of the passes
        wx, wy, columns, rows, horizontal_first = plan
        x = images[..., rows, columns].to(dtype)
        if horizontal_first:
            x = wy @ torch.floor(x @ wx + 0.5).clamp_(0, 255)
        else:
            x = torch.floor(wy @ x + 0.5).clamp_(0, 255) @ wx
        return torch.floor(x + 0.5).clamp_(0, 255).to(torch.uint8)

    def padded(self, images: list[tuple[int, torch.Tensor]], budget: int = 1 << 27):
        """Yield (positions, uint8 [k, 3, h, w]) for images of different sizes -- (position, uint8 [3, H, W])
        pairs on one device -- resized together: each image's band of pixels in a zero-padded canvas, its
        weights computed for the whole canvas at once on the device (:func:`_window_weights`), two batched
        products. So a batch of photographs of many sizes costs one copy per image and a few dozen launches
        in all, and no host work per new size; the same sums, so the same bytes on a CPU (float64 holds them
        exactly), and on a GPU what each image alone gives within float32 rounding. Canvases are at most
        `budget` elements (images sorted by size, so each canvas wastes little); images whose crop needs
        padding are resized alone."""
        if not images:
            return
        device = images[0][1].device
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        out_w, out_h, resample = self.fused.crop_w, self.fused.crop_h, int(self.fused.resample)
        kept, boxes = [], []
        for position, image in images:
            h, w = int(image.shape[-2]), int(image.shape[-1])
            box = self.fused.box(w, h)
            if box is None:
                yield [position], self(image[None])
            else:
                kept.append((position, image))
                boxes.append((w, h, *box))
        if not kept:
            return
        rows, (x0, x1, y0, y1), taps = _resample_axes(boxes, out_w, out_h, resample)
        widths, heights = x1 - x0, y1 - y0
        horizontal = [_horizontal_first(w, h, out_w, out_h) for w, h, *_ in boxes]
        # images in canvas order (Pillow's order of the passes, then largest first, so each canvas wastes
        # little); the weights of all of them from one copy to the device, so a canvas takes a slice
        order = sorted(range(len(kept)), key=lambda j: (not horizontal[j], -int(heights[j] * widths[j])))
        windows_x, windows_y = _device_windows(rows[order], taps, out_w, out_h, resample, device)
        start = 0
        while start < len(order):  # the next canvas: as many images as fit in the budget, at least one
            height = width = 0
            stop = start
            while stop < len(order) and horizontal[order[stop]] == horizontal[order[start]]:
                h, w = max(height, int(heights[order[stop]])), max(width, int(widths[order[stop]]))
                if stop > start and (stop - start + 1) * 3 * h * w > budget:
                    break
                height, width, stop = h, w, stop + 1
            chunk = order[start:stop]
            wxs = _in_band((windows_x[0][start:stop], windows_x[1][start:stop]), width, dtype).transpose(1, 2)[:, None]
            wys = _in_band((windows_y[0][start:stop], windows_y[1][start:stop]), height, dtype)[:, None]
            start = stop
            canvas = torch.zeros(len(chunk), 3, height, width, dtype=dtype, device=device)
            for k, j in enumerate(chunk):
                canvas[k, :, : heights[j], : widths[j]].copy_(kept[j][1][:, y0[j] : y1[j], x0[j] : x1[j]])
            if horizontal[chunk[0]]:
                x = wys @ torch.floor(canvas @ wxs + 0.5).clamp_(0, 255)
            else:
                x = torch.floor(wys @ canvas + 0.5).clamp_(0, 255) @ wxs
            yield [kept[j][0] for j in chunk], torch.floor(x + 0.5).clamp_(0, 255).to(torch.uint8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fused!r})"


def resolve_decode(requested: str, device: torch.device, backbone: "Backbone") -> str:
    """``pillow`` or ``tensor`` for ``--decode auto|cpu|gpu|tensor``.

    ``auto``: tensor decoding on CUDA (nvJPEG), Pillow elsewhere (on a CPU Pillow's draft mode and fused resize
    are faster); ``cpu``: Pillow; ``gpu``: nvJPEG, which needs CUDA; ``tensor``: torchvision's decoder on the
    model's device, whatever it is (on a CPU: libjpeg-turbo through torchvision).

    Raises:
        FeaturizeError: an unknown choice, ``gpu`` without CUDA, or tensor decoding asked for a model whose
            preprocessing does not run on tensors.
    """
    if requested not in DECODE_CHOICES:
        raise FeaturizeError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {requested!r}")
    if requested == "cpu":
        return "pillow"
    if requested == "gpu" and device.type != "cuda":
        raise FeaturizeError(f"--decode gpu needs a CUDA device (the model runs on {device.type}); use --decode cpu, "
                             "or tensor for torchvision's decoder on this device")
    if tensor_steps(backbone) is None:
        if requested == "auto":
            return "pillow"
        raise FeaturizeError(f"--decode {requested}: {backbone.name}'s preprocessing has steps that only run on "
                             "Pillow images; use --decode cpu")
    if requested == "auto":
        return "tensor" if device.type == "cuda" else "pillow"
    return "tensor"


def device_takes(header: JpegHeader, cuda: bool) -> bool:
    """Whether torchvision's decoder takes a JPEG with this header: 8-bit RGB or greyscale (CMYK goes to
    Pillow), YCbCr-coded (an Adobe RGB-without-transform file goes to Pillow), at most Pillow's pixel limit,
    baseline or extended Huffman coding -- and progressive on a CPU (nvJPEG's hardware path refuses it)."""
    if header.mode not in ("RGB", "L") or header.width * header.height > _MAX_PIXELS:
        return False
    if header.adobe_transform == 0 and header.mode == "RGB":
        return False
    return header.sof in ((0xC0, 0xC1) if cuda else (0xC0, 0xC1, 0xC2))


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation 2-8 applied as Pillow's ``exif_transpose`` does (CHW tensor)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


@dataclass
class Prepared:
    """One row on its way through the tensor path: its JPEG bytes for the device decoder, or an image the
    Pillow decoder already made (uint8 [3, H, W], CPU), or the reason it failed."""

    index: int
    data: torch.Tensor | None = None
    orientation: int = 1
    image: torch.Tensor | None = None
    error: str = ""


def decode_jpegs(datas: list[torch.Tensor], device: torch.device,
                 before_call: Callable[[], None] | None = None) -> list[torch.Tensor | None]:
    """JPEG bytes (uint8 CPU tensors) decoded by torchvision on `device` into uint8 [3, H, W] RGB images: one
    batched call (nvJPEG's batched decode on CUDA), and when one bad image fails it, each image again on its own;
    None for an image that still fails. `before_call` runs before every call (on CUDA: the synchronisation that
    batched hardware decoding needs, torchvision PR #9606)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    where = device if device.type == "cuda" else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        if len(datas) > 1:
            if before_call is not None:
                before_call()
            try:
                return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=where))
            except RuntimeError:
                pass  # one bad image fails the whole call: decode them one by one
        out: list[torch.Tensor | None] = []
        for data in datas:
            if before_call is not None:
                before_call()
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=where))
            except RuntimeError:
                out.append(None)
        return out


def transform_by_size(images: list[tuple[int, torch.Tensor]], steps: list[Callable]):
    """Yield (positions, transformed images [k, 3, h, w]) for `images` -- (position, uint8 [3, H, W]) pairs --
    grouped by size: images of one size are resized and cropped together, one call per size, not one each."""
    groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for position, image in images:
        groups.setdefault(tuple(image.shape), []).append((position, image))
    for group in groups.values():
        batch = torch.stack([image for _, image in group]) if len(group) > 1 else group[0][1][None]
        for step in steps:
            batch = step(batch)
        yield [position for position, _ in group], batch


def resize_images(images: list[tuple[int, torch.Tensor]], steps: list[Callable], group_size: int = 4,
                  padded: bool | None = None):
    """Like :func:`transform_by_size`, for a GPU decoder's batch: sizes shared by at least `group_size` images
    are resized a group at a time; with the engine's fused resize + crop (one :class:`PillowResample`) the rest,
    images of sizes few others share, are resized together on padded canvases (:meth:`PillowResample.padded`),
    so that a batch of photographs of many sizes costs one copy per image and a few dozen launches in all, however
    many of its sizes are new. `padded` (default: on CUDA) -- on a CPU a call launches nothing, and the padding
    would only add work and memory, so there every size is its own group."""
    if padded is None:
        padded = bool(images) and images[0][1].device.type == "cuda"
    if not padded or len(steps) != 1 or not isinstance(steps[0], PillowResample):
        yield from transform_by_size(images, steps)
        return
    sizes: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for position, image in images:
        sizes.setdefault(tuple(image.shape), []).append((position, image))
    shared = [item for group in sizes.values() if len(group) >= group_size for item in group]
    alone = [item for group in sizes.values() if len(group) < group_size for item in group]
    yield from transform_by_size(shared, steps)
    yield from steps[0].padded(alone)


class TensorDecoder:
    """Reads rows' bytes, decodes JPEGs with torchvision on `device`, and transforms them as tensors.

    Args:
        source: where the rows come from (:meth:`Source.read_bytes`).
        backbone: gives the resize/crop steps (:func:`tensor_steps`) and the input size.
        device: where decoding and resizing run (CUDA: nvJPEG, batched; CPU: libjpeg-turbo).
        pillow: the Pillow path for one row, ``index -> (uint8 image, error)``, for what this path cannot take.
    """

    def __init__(self, source: "Source", backbone: "Backbone", device: torch.device,
                 pillow: Callable[[int], tuple[torch.Tensor, str]]):
        steps = tensor_steps(backbone)
        if steps is None:
            raise FeaturizeError(f"{backbone.name}'s preprocessing does not run on tensors; use --decode cpu")
        self.source, self.steps, self.device, self.pillow = source, steps, device, pillow
        self.cuda = device.type == "cuda"
        self.blank = torch.zeros(tuple(backbone.data_config["input_size"]), dtype=torch.uint8)

    # -- on the CPU, in reader threads -------------------------------------------------------------------------

    def _takes(self, data) -> int | None:
        """The EXIF orientation when the device decoder can take `data` (a complete baseline RGB/grey JPEG of
        an allowed size: :func:`device_takes`), else None."""
        header = scan_jpeg(data)
        if header is None or not is_complete(data) or not device_takes(header, self.cuda):
            return None
        return header.orientation

    def prepare(self, index: int) -> Prepared:
        """Read row `index`; keep its bytes for the device, or decode it with Pillow when the device cannot."""
        try:
            data = self.source.read_bytes(index)
        except Exception as e:  # unreadable: recorded for this row, as the Pillow path records it
            return Prepared(index, error=error_text(e))
        orientation = self._takes(data) if data is not None else None
        if orientation is None:
            image, error = self.pillow(index)
            return Prepared(index, image=None if error else image, error=error)
        return Prepared(index, data=torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation=orientation)

    # -- on the device, in the stream --------------------------------------------------------------------------

    def _sync(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop decoded uint8 images ([3, H, W], or [N, 3, H, W] of one size) as the backbone's
        transform does."""
        for step in self.steps:
            image = step(image)
        return image

    def finish(self, prepared: list[Prepared]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Decode a batch's JPEG bytes on the device and assemble it: (indices, uint8 images [B, 3, h, w] on the
        device, one error string per row, empty when it succeeded)."""
        images: list[torch.Tensor | None] = [p.image for p in prepared]
        errors = [p.error for p in prepared]
        todo = [i for i, p in enumerate(prepared) if p.data is not None]
        if todo:
            decoded = decode_jpegs([prepared[i].data for i in todo], self.device, self._sync if self.cuda else None)
            oriented = []
            for i, image in zip(todo, decoded):
                if image is None:  # the device refused it: Pillow decides (and names the reason if it fails too)
                    fallback, errors[i] = self.pillow(prepared[i].index)
                    images[i] = None if errors[i] else fallback
                else:
                    oriented.append((i, orient(image.to(self.device), prepared[i].orientation)))
            for positions, resized in transform_by_size(oriented, self.steps):
                for i, image in zip(positions, resized):
                    images[i] = image
        blank = self.blank.to(self.device)
        batch = torch.stack([blank if image is None else image.to(self.device, non_blocking=True) for image in images])
        return torch.tensor([p.index for p in prepared], dtype=torch.int64), batch, errors

    def decode_one(self, index: int) -> tuple[torch.Tensor, str]:
        """One row, start to end (the CPU path: each stream or decode worker decodes its own rows)."""
        _, images, errors = self.finish([self.prepare(index)])
        return images[0], errors[0]


def draft_size(data_config: dict) -> tuple[int, int]:
    """The smallest (w, h) a JPEG may be draft-decoded to: twice the model's resize size (input / crop_pct).

    Drafting only files at least twice *this* large, and keeping a 2x margin above the resize target, keeps
    features within cosine ~0.9992 of a full decode (measured on 1-4 MP photos) while camera-sized JPEGs
    decode at 1/4 or 1/8 scale.
    """
    side = 2 * math.ceil(max(data_config["input_size"][1:]) / float(data_config.get("crop_pct") or 1.0))
    return side, side


class DecodeDataset(Dataset):
    """Decode + per-image transform of one sample; a failure becomes an error string, never another sample.

    ``decode="tensor"`` decodes JPEGs with torchvision on the CPU (:class:`TensorDecoder`),
    everything else with Pillow, as the CUDA path does on the GPU."""

    def __init__(self, source: "Source", backbone: "Backbone", jpeg_draft: bool, decode: str = "pillow"):
        self.source = source
        self.transform = backbone.image_transform
        self.draft = draft_size(backbone.data_config) if jpeg_draft else None
        self.blank = torch.zeros(
            tuple(backbone.data_config["input_size"]), dtype=torch.float32 if backbone.mean is None else torch.uint8
        )
        self.tensor = TensorDecoder(source, backbone, torch.device("cpu"), self.pillow) if decode == "tensor" else None

    def __len__(self) -> int:
        return len(self.source)

    def pillow(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return self.transform(self.source.load(index, self.draft)), ""
        except Exception as e:  # every decode/transform failure is recorded for this row alone
            return self.blank, error_text(e)

    def __getitem__(self, index: int):
        image, error = self.tensor.decode_one(index) if self.tensor is not None else self.pillow(index)
        return index, image, error


def collate_decoded(items):
    """A batch of :class:`DecodeDataset` items: (indices [B], images [B, ...], error strings)."""
    indices = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    return indices, torch.stack([x for _, x, _ in items]), [e for _, _, e in items]
