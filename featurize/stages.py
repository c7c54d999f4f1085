"""The staged batch engine: the accelerator's path from encoded images to features, as explicit stages.

::

    read (reader threads, one task per batch)     bytes into one reusable (pinned) buffer per batch,
      │                                           JPEG headers scanned (featurize/jpeg.py), Pillow for the rest
      ▼  bounded
    decode (one thread, its own CUDA stream)      one batched device decode per batch (an injectable
      │                                           JpegDecoder), resize/crop, normalise -- written straight into
      ▼  bounded                                  a preallocated [batch, 3, h, w] channels_last input slot
    compute (ONE persistent thread, own stream)   the warm-up, then every forward, always on full slots (the tail
      │                                           batch is padded; the padding is never written); features cast
      ▼  bounded                                  on the device and copied asynchronously into pinned buffers
    collect (the caller's thread)                 waits for a batch's copy a few batches later, NaN for failed
      │                                           rows, hands FeatureBatch objects over in order
      ▼
    write (the store writer, as for every engine)

Why it looks like this (measured on an H200 by the planners, see docs/benchmarks.md): cuDNN keeps autotuned
plans per thread, so the warm-up and every forward run on one thread and see one batch shape; a serial chain of
read -> sync -> decode -> resample -> forward -> ``.cpu()`` left the GPU idle most of the time, so each step is a
stage that overlaps the others and only the collect stage ever waits on the device; per-image Python (futures,
``Image.open`` for headers, byte copies) under one GIL starved the GPU, so reading is one task per batch and
header parsing a few microseconds.

The stages run on any device: on a CPU (``HEADBENCH_ENGINE=staged``, or the host-overhead harness in
benchmarks/host_overhead.py with a stub decoder and a null model) they drive the same code, so what the host
spends per image is measured without a GPU. :class:`EngineProbe` counts blocking synchronisations per stage
(every wait the engine makes on the device goes through :func:`_wait`) and, when asked, torch calls per stage.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from .decode import (DecodeDataset, collate_decoded, decode_jpegs, device_takes, host_to_device, orient,
                     resize_images, tensor_steps)
from .device import autocast, env_switch, prepare_model
from .errors import FeaturizeError, error_text
from .jpeg import JpegHeader, is_complete, scan_jpeg

if TYPE_CHECKING:
    from .backbones import Backbone
    from .sources import Source

__all__ = ["FeatureBatch", "batched", "EngineProbe", "ReadBatch", "JpegDecoder", "TorchvisionJpegDecoder",
           "open_nvimgcodec", "NvImageCodecDecoder", "JPEG_DECODERS", "jpeg_decoder", "jpeg_decoder_name", "cuda_graphs_requested",
           "BatchReader", "iter_staged"]

_DEPTH = 3  # batches in flight between two stages
_POLL = 0.05  # seconds a stage waits on a queue before looking whether the run was stopped


@dataclass
class FeatureBatch:
    """Features for some samples, in index order.

    Attributes:
        indices: sample indices, shape [B].
        features: float32 [B, D]; rows of failed samples are NaN.
        errors: one string per sample, empty when it succeeded.
        layers: float32 [B, width] per tapped layer (``Backbone.layers``), NaN where failed.
    """

    indices: np.ndarray
    features: np.ndarray
    errors: list[str]
    layers: dict[str, np.ndarray] = field(default_factory=dict)


def batched(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    """`indices` in lists of `size` (the last one shorter)."""
    batch: list[int] = []
    for i in indices:
        batch.append(int(i))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class EngineProbe:
    """What the stages did, for the host-overhead harness and the tests.

    Attributes:
        count_calls: count torch calls per stage (a TorchFunctionMode in each stage thread: slows the run, so
            timings come from a run without it).
        syncs: blocking waits on the device per stage (``read``, ``decode``, ``compute``, ``collect``; and the
            one ``startup`` wait after the warm-up).
        calls: torch calls per stage (when `count_calls`).
        batches: batches that went through the compute stage (the warm-up not counted).
        forward_threads: thread ids the warm-up and the forwards ran on.
        forward_rows: rows of every forward (the warm-up first).
    """

    count_calls: bool = False
    syncs: collections.Counter = field(default_factory=collections.Counter)
    calls: collections.Counter = field(default_factory=collections.Counter)
    batches: int = 0
    forward_threads: set = field(default_factory=set)
    forward_rows: list = field(default_factory=list)


class _CallCounter(torch.overrides.TorchFunctionMode):
    def __init__(self, counter: collections.Counter, stage: str):
        super().__init__()
        self.counter, self.stage = counter, stage

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.counter[self.stage] += 1
        return func(*args, **(kwargs or {}))


def _counting(probe: EngineProbe | None, stage: str):
    if probe is not None and probe.count_calls:
        return _CallCounter(probe.calls, stage)
    return contextlib.nullcontext()


def _wait(event, probe: EngineProbe | None, stage: str) -> None:
    """Block this thread until `event` (a CUDA event) has happened; the one place the engine waits on the
    device, so that every wait is counted. On a CPU there is nothing to wait for, but the wait is counted all
    the same: the harness sees the waits a GPU run would make."""
    if probe is not None:
        probe.syncs[stage] += 1
    if event is not None:
        event.synchronize()


# --------------------------------------------------------------------------------------------------- read stage


class _Pool:
    """Reusable buffers, made on demand up to `limit` (so a run whose stages keep up holds only a few), then
    waited for."""

    def __init__(self, make: Callable[[], object], limit: int, stop: threading.Event):
        self.make, self.limit, self.stop = make, limit, stop
        self._free: queue.Queue = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            make = self._free.empty() and self._made < self.limit
            if make:
                self._made += 1
        return self.make() if make else _get(self._free, self.stop)

    def give(self, item) -> None:
        self._free.put(item)

    def fill(self) -> None:
        """Make every buffer now (a run that counts torch calls per batch counts none of these)."""
        while self._made < self.limit:
            self._made += 1
            self._free.put(self.make())


class _Arena:
    """One batch's encoded bytes, end to end, in one buffer (pinned on CUDA, so the device decoder reads it
    without another copy); grown, never shrunk, when a batch does not fit."""

    def __init__(self, capacity: int, pinned: bool):
        self.pinned = pinned
        self._allocate(capacity)
        self.used = 0
        self.released = None  # the event after which the device no longer reads it
        self.keep: object = None  # what the decoder made from it (device memory) and the device may still read

    def _allocate(self, capacity: int) -> None:
        self.tensor = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pinned)
        self.array = self.tensor.numpy()
        self.view = memoryview(self.array)

    def take(self, size: int) -> memoryview:
        if self.used + size > len(self.array):
            old, used = self.array, self.used
            self._allocate(max(2 * len(old), used + size))
            self.array[:used] = old[:used]
        start = self.used
        self.used += size
        return self.view[start : self.used]


@dataclass
class ReadBatch:
    """One batch after the read stage.

    Attributes:
        indices: the rows' sample indices [n].
        errors: one string per row, empty while it is fine.
        arena: the batch's JPEG bytes (uint8 tensor; pinned on CUDA), or None.
        jpeg_rows: positions (in the batch) of the rows whose bytes the device decodes.
        spans: [len(jpeg_rows), 2] offset and length of each of those rows in `arena`.
        headers: their scanned headers (size, orientation, ...).
        host_rows: positions of rows the Pillow path decoded on the host.
        host_images: those rows' images, uint8 [len(host_rows), 3, h, w] at the model's input size.
    """

    indices: np.ndarray
    errors: list[str]
    arena: _Arena | None = None
    jpeg_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    headers: list[JpegHeader] = field(default_factory=list)
    host_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    host_images: torch.Tensor | None = None


class BatchReader:
    """The read stage's task: one batch's rows read into an arena, headers scanned; what the device decoder
    cannot take (not a JPEG, progressive on CUDA, CMYK, truncated, too large, no encoded bytes) is decoded by
    `pillow` here, on the host.

    Args:
        source: where rows come from (:meth:`~featurize.sources.Source.read_into`).
        accepts: whether the device decoder takes a JPEG with this header.
        pillow: the Pillow path for one row, ``index -> (uint8 image at the model's input size, error)``.
        pinned: arenas in pinned memory (CUDA).
        arenas: how many arenas may exist at once (batches between the read and the decode stage).
        capacity: an arena's first size in bytes.
    """

    def __init__(self, source: "Source", accepts: Callable[[JpegHeader], bool],
                 pillow: Callable[[int], tuple[torch.Tensor, str]], *, pinned: bool, arenas: int, capacity: int,
                 probe: EngineProbe | None = None, stop: threading.Event | None = None):
        self.source, self.accepts, self.pillow, self.pinned, self.capacity = source, accepts, pillow, pinned, capacity
        self.probe = probe
        self._arenas = _Pool(lambda: _Arena(capacity, pinned), arenas, stop or threading.Event())
        if probe is not None and probe.count_calls:
            self._arenas.fill()

    def _arena(self) -> _Arena:
        arena = self._arenas.take()
        if arena.released is not None:
            _wait(arena.released, self.probe, "read")  # long done: the arena went round the whole ring
        arena.used, arena.released, arena.keep = 0, None, None
        return arena

    def release(self, arena: _Arena | None, event=None) -> None:
        """Give an arena back once the device no longer reads it (`event`: after the decode that read it)."""
        if arena is not None:
            arena.released = event
            self._arenas.give(arena)

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor | None:
        """The rows Pillow decoded, as one tensor; pinned on CUDA, so that their copy to the device does not make
        the decode stage wait for its stream (a copy from pageable memory would)."""
        if not images:
            return None
        out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=self.pinned)
        return torch.stack(images, out=out)

    def read(self, indices: Sequence[int]) -> ReadBatch:
        with _counting(self.probe, "read"):
            return self._read(indices)

    def _read(self, indices: Sequence[int]) -> ReadBatch:
        n = len(indices)
        errors = [""] * n
        arena = self._arena()
        jpeg_rows, spans, headers, host_rows, host_images = [], [], [], [], []
        read_into, take, accepts = self.source.read_into, arena.take, self.accepts  # bound once: per-row Python
        for pos, index in enumerate(indices):
            start = arena.used
            try:
                view = read_into(index, take)
            except Exception as e:  # unreadable: recorded for this row, as the Pillow path records it
                arena.used = start
                errors[pos] = error_text(e)
                continue
            header = scan_jpeg(view) if view is not None else None
            if header is not None and is_complete(view) and accepts(header):
                jpeg_rows.append(pos)
                spans.append((start, len(view)))
                headers.append(header)
                continue
            arena.used = start  # the bytes are not needed: Pillow reads the row itself
            image, error = self.pillow(int(index))
            if error:
                errors[pos] = error
            else:
                host_rows.append(pos)
                host_images.append(image)
        batch = ReadBatch(np.asarray(indices, dtype=np.int64), errors, arena if jpeg_rows else None,
                          np.asarray(jpeg_rows, dtype=np.int64), np.asarray(spans, dtype=np.int64).reshape(-1, 2),
                          headers, np.asarray(host_rows, dtype=np.int64), self._stack(host_images))
        if batch.arena is None:
            self.release(arena)
        return batch


# ------------------------------------------------------------------------------------------------- decode stage


class JpegDecoder(Protocol):
    """Decodes a batch's JPEG rows on the device. ``decode(batch, write)`` calls ``write(positions, images)``
    with uint8 [k, 3, h, w] images at the model's input size (on the device) for the rows it decoded, and
    returns the positions of the rows it could not decode (they go to Pillow). Tests and the host-overhead
    harness inject a stub; :class:`TorchvisionJpegDecoder` is the real one."""

    def accepts(self, header: JpegHeader) -> bool: ...

    def decode(self, batch: ReadBatch, write: Callable[[np.ndarray, torch.Tensor], None]) -> list[int]: ...


def _device_steps(backbone: "Backbone") -> list[Callable]:
    """The backbone's resize/crop as tensor steps, which a device decoder needs."""
    steps = tensor_steps(backbone)
    if steps is None:
        raise FeaturizeError(f"{backbone.name}'s preprocessing does not run on tensors; use --decode cpu")
    return steps


def _write_decoded(batch: ReadBatch, images: Iterable[torch.Tensor | None], steps: list[Callable],
                   write: Callable[[np.ndarray, torch.Tensor], None]) -> list[int]:
    """A device decoder's images of the batch's JPEG rows (uint8 [3, H, W], None where it failed): EXIF orientation
    from each row's scanned header, resized and cropped (:func:`~featurize.decode.resize_images`: a group per
    shared size, the other sizes together on padded canvases), written; returns the positions of the rows that
    failed."""
    failed: list[int] = []
    oriented: list[tuple[int, torch.Tensor]] = []
    for pos, header, image in zip(batch.jpeg_rows, batch.headers, images):
        if image is None:
            failed.append(int(pos))
        else:
            oriented.append((int(pos), orient(image, header.orientation)))
    for positions, group in resize_images(oriented, steps):
        write(np.array(positions, dtype=np.int64), group)
    return failed


class TorchvisionJpegDecoder:
    """torchvision's ``decode_jpeg`` (batched nvJPEG on CUDA, libjpeg-turbo on a CPU), EXIF orientation
    applied on the device, images of one size resized and cropped together with the backbone's own steps
    (:class:`~featurize.decode.PillowResample`: Pillow's resampling weights, cached on the device).

    Before each batched call on CUDA the decode stream is synchronised: batched hardware decoding has been
    reported to corrupt unrelated tensors on H100 otherwise (torchvision PR #9606). That wait is the decode
    stage's own, off the compute stage's path."""

    def __init__(self, backbone: "Backbone", device: torch.device, probe: EngineProbe | None = None):
        self.steps, self.device, self.probe = _device_steps(backbone), device, probe
        self.cuda = device.type == "cuda"

    def accepts(self, header: JpegHeader) -> bool:
        return device_takes(header, self.cuda)

    def _sync(self) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        _wait(event, self.probe, "decode")

    def decode(self, batch: ReadBatch, write: Callable[[np.ndarray, torch.Tensor], None]) -> list[int]:
        tensor = batch.arena.tensor
        decoded = decode_jpegs([tensor[o : o + n] for o, n in batch.spans], self.device,
                               self._sync if self.cuda else None)
        return _write_decoded(batch, decoded, self.steps, write)


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a block (what a native library prints there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def open_nvimgcodec(device: torch.device):
    """nvImageCodec set up as the engine decodes with it: (the module, a Decoder -- its own backends on CUDA, its
    libjpeg-turbo one on a CPU, libjpeg's "fancy" chroma upsampling -- and the DecodeParams: sRGB, 8 bits, no
    EXIF rotation, which the engine applies itself). Its native messages are off: per image, and one per
    optional codec library missing (JPEG 2000, TIFF), printed when it is imported.

    Raises:
        FeaturizeError: nvImageCodec is not installed."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        with _quiet_stderr():
            from nvidia import nvimgcodec
    except ImportError:
        raise FeaturizeError("the nvimgcodec JPEG decoder needs nvImageCodec: pip install nvidia-nvimgcodec-cu13 "
                             "nvidia-nvjpeg (or HEADBENCH_JPEG_DECODER=torchvision)") from None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
        decoder = nvimgcodec.Decoder(device_id=device_id, options=":fancy_upsampling=1")
    else:
        decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                     backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)], options=":fancy_upsampling=1")
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                     allow_any_depth=False)
    return nvimgcodec, decoder, params


class NvImageCodecDecoder:
    """NVIDIA's nvImageCodec (``nvidia-nvimgcodec-cu13`` + ``nvidia-nvjpeg``): one batched call per batch, its
    own hardware / CUDA / CPU backends chosen per image (nvJPEG's hardware decoder on A100/H100/H200, progressive
    JPEGs by CUDA or on the CPU within the same call), libjpeg's "fancy" chroma upsampling so that it agrees with
    Pillow, decoded into device memory on the decode stage's stream. On a CPU it uses its libjpeg-turbo backend
    (that is how its plumbing is tested without a GPU). EXIF orientation is applied here, from the scanned
    header, as for torchvision's decoder; CMYK and Adobe-RGB JPEGs still go to Pillow."""

    def __init__(self, backbone: "Backbone", device: torch.device, probe: EngineProbe | None = None):
        # a row it cannot decode goes to Pillow, which records the reason: its own messages are off
        self._codec, self._decoder, self._params = open_nvimgcodec(device)
        self.steps, self.device, self.probe = _device_steps(backbone), device, probe
        self.cuda = device.type == "cuda"
        self._checked = False  # whether a batch has shown where nvImageCodec decodes (see _check_backends)

    def accepts(self, header: JpegHeader) -> bool:
        return device_takes(header, cuda=False)  # progressive too: nvImageCodec picks a backend that takes it

    def _tensor(self, image, header: JpegHeader) -> torch.Tensor | None:
        """uint8 [3, H, W] over the decoded buffer (None when it failed or is not the size the header says)."""
        if image is None or tuple(image.shape) != (header.height, header.width, 3):
            return None
        if self.cuda:  # device memory, no copy, ordered on this stream (an image a CPU backend made is moved)
            return torch.from_dlpack(image).permute(2, 0, 1).to(self.device, non_blocking=True)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)

    def decode(self, batch: ReadBatch, write: Callable[[np.ndarray, torch.Tensor], None]) -> list[int]:
        array = batch.arena.array
        streams = [self._codec.CodeStream(array[o : o + n]) for o, n in batch.spans]
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.cuda else 0
        decoded = self._decoder.decode(streams, params=self._params, cuda_stream=stream)
        if self.cuda and not self._checked:
            self._check_backends(decoded)
        # its buffers live until the arena comes round again, after the event that says this batch was read: their
        # release cannot race the kernels that still read them, whatever order nvImageCodec frees memory in
        batch.arena.keep = decoded
        return _write_decoded(batch, map(self._tensor, decoded, batch.headers), self.steps, write)

    def _check_backends(self, decoded: Sequence) -> None:
        """Warn once when a whole batch came back in host memory on CUDA: nvImageCodec then decodes on the CPU,
        its GPU backends not loaded (libnvjpeg missing or for another CUDA). Some images may go to its CPU
        backend on purpose; a batch of them all does not."""
        images = [image for image in decoded if image is not None]
        if len(images) < 8:
            return
        self._checked = True
        if all(image.buffer_kind == self._codec.ImageBufferKind.STRIDED_HOST for image in images):
            warnings.warn("nvImageCodec decoded a whole batch on the CPU: its GPU backends did not load (is "
                          "nvidia-nvjpeg for this CUDA installed?); HEADBENCH_JPEG_DECODER=torchvision decodes on "
                          "the GPU", stacklevel=2)


JPEG_DECODERS = {"torchvision": TorchvisionJpegDecoder, "nvimgcodec": NvImageCodecDecoder}


def jpeg_decoder_name() -> str:
    """Which JPEG decoder the staged engine uses: ``HEADBENCH_JPEG_DECODER`` (torchvision, the default, or
    nvimgcodec)."""
    name = os.environ.get("HEADBENCH_JPEG_DECODER", "torchvision")
    if name not in JPEG_DECODERS:
        raise FeaturizeError(f"HEADBENCH_JPEG_DECODER must be one of {', '.join(JPEG_DECODERS)}, got {name!r}")
    return name


def jpeg_decoder(backbone: "Backbone", device: torch.device, probe: EngineProbe | None = None) -> JpegDecoder:
    """The staged engine's JPEG decoder (:func:`jpeg_decoder_name`)."""
    return JPEG_DECODERS[jpeg_decoder_name()](backbone, device, probe)


# ------------------------------------------------------------------------------------------------ the pipeline


class _Stopped(Exception):
    pass


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=_POLL)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=_POLL)
        except queue.Empty:
            continue


def _stage(name: str, items: Callable[[], Iterable], work: Callable, out: queue.Queue, stop: threading.Event,
           probe: EngineProbe | None, setup: Callable[[], contextlib.AbstractContextManager] | None = None):
    """A stage's thread: `work` applied to every item of `items()` in order, results into `out`; a failure
    (here or upstream) travels down as one :class:`_Failed` and ends the stage."""

    def loop() -> None:
        try:
            with contextlib.ExitStack() as stack:
                if setup is not None:
                    stack.enter_context(setup())
                stack.enter_context(_counting(probe, name))
                for item in items():
                    if isinstance(item, _Failed):
                        _put(out, item, stop)
                        return
                    _put(out, work(item), stop)
            _put(out, _END, stop)
        except _Stopped:
            pass
        except BaseException as e:  # handed to the consumer, which raises it
            with contextlib.suppress(_Stopped):
                _put(out, _Failed(e), stop)

    return threading.Thread(target=loop, name=f"headbench-{name}", daemon=True)


def _drain(q: queue.Queue, stop: threading.Event) -> Iterator:
    while True:
        item = _get(q, stop)
        if item is _END:
            return
        yield item
        if isinstance(item, _Failed):
            return


def _runs(positions: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of sorted positions: (first position, last + 1, offset into `positions`)."""
    if len(positions) == 0:
        return []
    cuts = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(positions)]])
    return [(int(positions[a]), int(positions[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


def cuda_graphs_requested() -> bool:
    """``HEADBENCH_CUDA_GRAPHS=1``: the staged engine's compute stage replays the model's forward as a CUDA graph
    (off by default until a GPU run shows it pays: benchmarks/gpu_run.py measures both)."""
    return env_switch("HEADBENCH_CUDA_GRAPHS", default=False)


class _GraphedForward:
    """The model's forward on a full batch captured once as a CUDA graph: each batch is copied into the graph's
    static input and the graph replayed, a few launches where the eager forward makes hundreds, so the compute
    thread hardly needs the GIL that the reader threads contend for. The layers the hooks tap are static outputs
    of the graph too. Made by the compute thread after its warm-up, on its stream, before the decode stage starts
    its device work (libraries such as nvJPEG may touch the legacy stream, which a capture forbids)."""

    def __init__(self, model: Callable, backbone: "Backbone", example: torch.Tensor, stream):
        self.input = torch.empty_like(example).copy_(example)
        for _ in range(2):  # lazy initialisation and cuDNN's choices before the capture, as CUDA graphs require
            model(self.input)
            backbone.take_layers()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.output = model(self.input)
            self.layers = backbone.take_layers()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.input.copy_(x)
        self.graph.replay()
        return self.output, dict(self.layers)


@dataclass
class _Slot:
    """A preallocated model input [batch, 3, h, w] (channels_last, the autocast dtype) and the event after
    which the compute stage no longer reads it."""

    tensor: torch.Tensor
    free: object = None


@dataclass
class _HostBuffer:
    features: torch.Tensor  # float32 [batch, D] (pinned on CUDA)
    layers: dict[str, torch.Tensor]


def iter_staged(
    source: "Source",
    backbone: "Backbone",
    indices: Sequence[int],
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
    decode: str,
    jpeg_draft: bool = True,
    compile: bool = False,
    timings: dict[str, float] | None = None,
    decoder: JpegDecoder | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    probe: EngineProbe | None = None,
) -> Iterator[FeatureBatch]:
    """Yield features for `indices` (in that order) through the stages in the module docstring.

    Args:
        decode: ``tensor``: `workers` reader threads and a device decoder (`decoder`, default
            :class:`TorchvisionJpegDecoder`); ``pillow``: `workers` decode processes (a DataLoader) hand over
            decoded images, and the decode stage only copies and normalises them.
        decoder: a :class:`JpegDecoder` to use instead of torchvision's (tests, the host-overhead harness).
        forward: the model's feature function to use instead of the backbone's (the harness's null model).
        probe: receives counts of what the stages did (:class:`EngineProbe`).
        timings: as for :func:`featurize.engine.iter_features`.

    Other arguments as for :func:`featurize.engine.iter_features`.
    """
    from torch.utils.data import DataLoader

    stamps = timings if timings is not None else {}
    cuda = device.type == "cuda"
    dataset = DecodeDataset(source, backbone, jpeg_draft)
    dim = backbone.num_features
    widths = {t["name"]: t["width"] for t in backbone.layers}
    channels, height, width = backbone.data_config["input_size"]
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(_DEPTH)
    decoded_q: queue.Queue = queue.Queue(_DEPTH)
    computed_q: queue.Queue = queue.Queue(_DEPTH)
    # at most every slot a stage may hold, plus one being filled and one being read; made as they are needed
    slots = _Pool(lambda: _Slot(torch.empty(batch_size, channels, height, width, dtype=input_dtype, device=device,
                                            memory_format=torch.channels_last).zero_()), _DEPTH + 2, stop)
    hosts = _Pool(lambda: _HostBuffer(torch.empty(batch_size, dim, pin_memory=cuda),
                                      {name: torch.empty(batch_size, w, pin_memory=cuda) for name, w in widths.items()}),
                  _DEPTH + 2, stop)
    if probe is not None and probe.count_calls:
        slots.fill()
        hosts.fill()
    def on(stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def record(stream):
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    # ---- read: reader threads (tensor decoding) or decode processes (Pillow), a few batches ahead ----------------
    reader = loader = pool = None
    chunks = batched(indices, batch_size)
    if decode == "tensor":
        if decoder is None:
            decoder = jpeg_decoder(backbone, device, probe)
        reader = BatchReader(source, decoder.accepts, dataset.pillow, pinned=cuda, arenas=2 * _DEPTH + workers + 2,
                             capacity=batch_size * 96 * 1024, probe=probe, stop=stop)
        pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="headbench-read")

        def read_items() -> Iterator:
            pending: collections.deque = collections.deque()
            for chunk in chunks:
                pending.append(pool.submit(reader.read, chunk))
                if len(pending) > max(1, workers) + 1:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    elif decode == "pillow":
        if workers:
            loader = iter(DataLoader(dataset, batch_size=batch_size, sampler=list(indices), num_workers=workers,
                                     collate_fn=collate_decoded, pin_memory=cuda, prefetch_factor=4))

        def read_items() -> Iterator:
            items = loader if loader is not None else (collate_decoded([dataset[i] for i in c]) for c in chunks)
            for batch_indices, images, errors in items:
                errors = list(errors)
                ok = np.array([not e for e in errors])
                yield ReadBatch(batch_indices.numpy(), errors, host_rows=np.flatnonzero(ok),
                                host_images=images if ok.all() else images[torch.from_numpy(ok)])
    else:
        raise FeaturizeError(f"decode must be resolved to pillow or tensor, got {decode!r}")

    # CUDA is touched only now: decode processes fork faster from a process that has not loaded its libraries
    mean = std = None
    if backbone.mean is not None:
        mean, std = backbone.mean.to(device).float(), backbone.std.to(device).float()
    decode_stream = torch.cuda.Stream(device) if cuda else None
    compute_stream = torch.cuda.Stream(device) if cuda else None

    # ---- decode: one thread, its own stream; writes the slot ------------------------------------------------------
    def write_rows(slot: torch.Tensor, positions: np.ndarray, images: torch.Tensor) -> None:
        x = images.to(device, non_blocking=True)
        x = x.float() if mean is None else x.float().div_(255.0).sub_(mean).div_(std)
        runs = _runs(positions)
        if len(runs) == 1:
            first, last, _ = runs[0]
            slot[first:last].copy_(x)
        elif runs:  # rows scattered over the slot (a canvas of images of many sizes): one indexed copy, not one each
            slot.index_copy_(0, host_to_device(positions, device, torch.int64), x)

    def decode_one(batch: ReadBatch):
        slot = slots.take()
        if slot.free is not None:
            decode_stream.wait_event(slot.free)  # the device waits, not this thread
        errors = batch.errors
        if len(batch.jpeg_rows):
            failed = decoder.decode(batch, lambda positions, images: write_rows(slot.tensor, positions, images))
            redo = []
            for pos in failed:  # the device refused it: Pillow decides (and names the reason if it fails too)
                image, errors[pos] = dataset.pillow(int(batch.indices[pos]))
                if not errors[pos]:
                    redo.append((pos, image))
            for pos, image in redo:
                write_rows(slot.tensor, np.array([pos]), image[None])
        if batch.host_images is not None:
            write_rows(slot.tensor, batch.host_rows, batch.host_images)
        ready = record(decode_stream)
        if reader is not None:
            reader.release(batch.arena, ready)
        return batch, slot, ready

    @contextlib.contextmanager
    def decode_context():
        while graphs and not ready_model.wait(_POLL):  # no device work beside a CUDA graph's capture
            if stop.is_set():
                raise _Stopped
        with on(decode_stream), torch.inference_mode():  # the slots are inference tensors, written in place
            yield

    # ---- compute: ONE thread, the warm-up included ---------------------------------------------------------------
    model = forward if forward is not None else prepare_model(backbone, device, compile)
    graphs = cuda and forward is None and not compile and cuda_graphs_requested()
    graphed: list[_GraphedForward] = []  # the captured forward, once the warm-up made it
    ready_model = threading.Event()

    def run_model(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if probe is not None:
            probe.forward_threads.add(threading.get_ident())
            probe.forward_rows.append(int(x.shape[0]))
        if graphed:
            return graphed[0](x)
        return model(x), backbone.take_layers()

    @contextlib.contextmanager
    def compute_context():
        with on(compute_stream), torch.inference_mode(), autocast(device, precision, cache=not graphs):
            warm = slots.take()  # one full slot of zeros: cuDNN's plans (and compile's graph) made here
            run_model(warm.tensor)
            if graphs:
                try:
                    graphed.append(_GraphedForward(model, backbone, warm.tensor, compute_stream))
                except Exception as e:  # a model that cannot be captured runs eagerly, as without the request
                    warnings.warn(f"CUDA graph capture of {backbone.name} failed ({error_text(e)}); "
                                  "running it eagerly", stacklevel=2)
            slots.give(warm)
            _wait(record(compute_stream), probe, "startup")  # once, before the first batch: getting ready
            stamps["model_ready"] = time.perf_counter()
            ready_model.set()
            yield

    def compute_one(item):
        batch, slot, ready = item
        if ready is not None:
            compute_stream.wait_event(ready)
        features, layers = run_model(slot.tensor)
        slot.free = record(compute_stream)
        slots.give(slot)
        host = hosts.take()
        host.features.copy_(features.float(), non_blocking=cuda)
        for name, value in layers.items():
            host.layers[name].copy_(value.float(), non_blocking=cuda)
        if probe is not None:
            probe.batches += 1
        return batch, host, record(compute_stream)

    def collect(item) -> FeatureBatch:
        batch, host, done = item
        _wait(done, probe, "collect")
        n = len(batch.indices)
        failed = np.array([bool(e) for e in batch.errors])
        features = host.features[:n].numpy().copy()
        features[failed] = np.nan
        layers = {}
        for name, value in host.layers.items():
            layers[name] = value[:n].numpy().copy()
            layers[name][failed] = np.nan
        hosts.give(host)
        return FeatureBatch(batch.indices, features, batch.errors, layers)

    threads = [
        _stage("read", read_items, lambda batch: batch, read_q, stop, probe),
        _stage("decode", lambda: _drain(read_q, stop), decode_one, decoded_q, stop, probe,
               setup=decode_context),
        _stage("compute", lambda: _drain(decoded_q, stop), compute_one, computed_q, stop, probe,
               setup=compute_context),
    ]
    try:
        for thread in threads:
            thread.start()
        with _counting(probe, "collect"):
            for item in _drain(computed_q, stop):
                if isinstance(item, _Failed):
                    raise item.error
                batch = collect(item)
                stamps.setdefault("first_batch", time.perf_counter())
                stamps["last_batch"] = time.perf_counter()
                yield batch
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if loader is not None and hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()
        if not ready_model.is_set():
            stamps.setdefault("model_ready", time.perf_counter())
        stamps["closed"] = time.perf_counter()
