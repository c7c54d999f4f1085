"""Where the backbone runs: torch (every device) or OpenVINO (CPUs), chosen by ``--runtime auto|torch|openvino``.

On CPUs OpenVINO compiles the same module the torch path runs -- normalisation, the pooled pre-logits and every
tapped layer as extra outputs -- into a graph for this CPU (fused kernels, bf16 where the CPU has it). The
converted model is cached per user, keyed by everything that defines it (backbone, weights sha256,
preprocessing, layers, batch, OpenVINO version), and OpenVINO's own cache keeps the compiled blob, so a second
run starts in about a second.

``auto`` picks OpenVINO on a CPU when it is installed and the model converts, else torch (one warning line);
an explicit ``openvino`` fails with one clear error instead. The runtime is part of the store's config: its
numbers differ from torch's in the low bits, so a resume with another runtime is refused, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .backbones import PIXELS, Backbone
from .errors import FeaturizeError

__all__ = ["RUNTIME_CHOICES", "Runtime", "resolve_runtime", "openvino_version", "cache_dir"]

RUNTIME_CHOICES = ("auto", "torch", "openvino")
RUNTIME_ENV = "HEADBENCH_RUNTIME"  # torch or openvino: what auto means on this machine (e.g. to opt out everywhere)
_OV_PRECISION = {"bf16": "bf16", "fp32": "f32"}
INSTALL_HINT = "pip install openvino"


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when it is not installed (read from the package metadata:
    nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return None


def cache_dir() -> Path:
    """Per-user cache of converted models: ``$HEADBENCH_CACHE`` or ``$XDG_CACHE_HOME/headbench`` (default
    ``~/.cache/headbench``), subfolder ``openvino``."""
    base = os.environ.get("HEADBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "headbench"
    return Path(base) / "openvino"


@dataclass
class Runtime:
    """A resolved runtime.

    Attributes:
        name: ``torch`` or ``openvino``.
        precision: the precision it computes in (``fp32``, ``bf16``, ``fp16``), as recorded in the store.
        version: the runtime library's version.
        requests: for OpenVINO, its optimal number of concurrent infer requests (the engine's streams).
        batch_size: the batch the OpenVINO model was compiled for (smaller batches are zero-padded).
        seconds: start-up time by step (``convert``, ``compile``); ``cached`` says whether the converted model
            came from the cache.
        note: what the requested precision became when the runtime cannot compute in it ('' otherwise).
    """

    name: str
    precision: str
    version: str
    requests: int = 1
    batch_size: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    note: str = ""
    _compiled: Any = None
    _outputs: int = 0
    _local: threading.local = field(default_factory=threading.local)

    def describe(self) -> dict[str, Any]:
        """What the store records (attributes; only the name enters the config hash)."""
        out: dict[str, Any] = {"name": self.name, "version": self.version, "precision": self.precision}
        if self.note:
            out["note"] = self.note
        if self.name == "openvino":
            out.update(requests=self.requests, batch_size=self.batch_size, cached=self.cached,
                       startup_seconds={k: round(v, 3) for k, v in self.seconds.items()})
        return out

    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        """OpenVINO: the model's outputs (features, then each tapped layer) for a batch of preprocessed-by-decode
        images (uint8 or float32 NCHW), at most `batch_size` of them; each thread keeps its own infer request."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        n = len(images)
        if n < self.batch_size:  # compiled for one static batch: pad, then drop the padding's outputs
            padded = np.zeros((self.batch_size, *images.shape[1:]), dtype=images.dtype)
            padded[:n] = images
            images = padded
        request.infer({0: np.ascontiguousarray(images)})
        return [np.array(request.get_output_tensor(i).data[:n], dtype=np.float32) for i in range(self._outputs)]


class _Exported(torch.nn.Module):
    """What OpenVINO converts: decode's output (uint8, or float when the transform is complete) -> the same
    normalisation and forward pass as the torch engine -> (features, *tapped layers in the store's order)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model  # registered, so tracing sees its parameters
        self.layer_names = [t["name"] for t in backbone.layers]

    def forward(self, x: torch.Tensor):
        x = self.backbone.normalize(x)
        features = self.backbone.features(x).float()
        taps = self.backbone.take_layers()
        return (features, *[taps[name].float() for name in self.layer_names])


def _cache_key(backbone: Backbone, batch_size: int, dtype: str, version: str) -> str:
    identity = {"backbone": backbone.name, "weights": backbone.weights, "data_config": backbone.data_config,
                "pooling": backbone.pooling, "layers": backbone.layers, "batch_size": batch_size, "dtype": dtype,
                "openvino": version, "torch": torch.__version__.split("+")[0], "timm": _timm_version()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _timm_version() -> str:
    import timm

    return timm.__version__


def _convert(core: Any, backbone: Backbone, batch_size: int, folder: Path) -> tuple[Any, float, bool]:
    """The OpenVINO model for `backbone` at `batch_size`: read from `folder` when cached, else converted and
    saved there (atomically: a finished folder or none). Returns (model, seconds, cached)."""
    import openvino as ov

    started = time.perf_counter()
    xml = folder / "model.xml"
    if xml.is_file():
        return core.read_model(xml), time.perf_counter() - started, True
    channels, height, width = backbone.data_config["input_size"]
    dtype = torch.uint8 if backbone.mean is not None else torch.float32
    example = torch.zeros((batch_size, channels, height, width), dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's notice that jit.trace (used inside) is deprecated
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(_Exported(backbone).eval(), example_input=example,
                                 input=[(ov.PartialShape([batch_size, channels, height, width]),
                                         ov.Type.u8 if dtype == torch.uint8 else ov.Type.f32)])
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        os.replace(tmp, folder)
    except OSError:  # a read-only cache, or another process finished first: the model in memory still works
        shutil.rmtree(tmp, ignore_errors=True)
    return model, time.perf_counter() - started, False


def _openvino(backbone: Backbone, precision: str, batch_size: int) -> Runtime:
    """Convert (or read from the cache) and compile `backbone` for this CPU."""
    import openvino as ov

    from .device import cpu_supports_bf16

    version = openvino_version() or ""
    note = ""
    wanted = precision
    if precision == "auto":
        wanted = "bf16" if cpu_supports_bf16() else "fp32"
    elif precision == "fp16" or (precision == "bf16" and not cpu_supports_bf16()):
        wanted = "fp32"
        note = f"--precision {precision}: this CPU has no native {precision}; OpenVINO computes in fp32"
    dtype = "uint8" if backbone.mean is not None else "float32"
    folder = cache_dir() / _cache_key(backbone, batch_size, dtype, version)
    core = ov.Core()
    model, convert_seconds, cached = _convert(core, backbone, batch_size, folder)
    started = time.perf_counter()
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": _OV_PRECISION[wanted]}
    try:
        (folder / "compiled").mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(folder / "compiled")
    except OSError:
        pass
    compiled = core.compile_model(model, "CPU", config)
    requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    runtime = Runtime("openvino", wanted, version, requests=max(1, requests), batch_size=batch_size,
                      seconds={"convert": convert_seconds, "compile": time.perf_counter() - started}, cached=cached,
                      note=note, _compiled=compiled, _outputs=1 + len(backbone.layers))
    # One inference here, on this thread, before the engine's streams infer at once. Besides warming the model,
    # it runs OpenVINO's one-time set-up of numpy access (pybind11's call_once under the GIL): two streams
    # entering it together for their first batch deadlocked -- both threads waiting in that call_once, seen
    # with py-spy in an extraction that hung.
    started = time.perf_counter()
    runtime.infer(np.zeros((1, *backbone.data_config["input_size"]), dtype=np.dtype(dtype)))
    runtime.seconds["first_inference"] = time.perf_counter() - started
    return runtime


def resolve_runtime(requested: str, backbone: Backbone, device: torch.device, precision: str, batch_size: int,
                    *, warn: Callable[[str], None] | None = None) -> Runtime:
    """The runtime for `backbone` on `device`: ``torch``, ``openvino`` (CPU only) or ``auto``.

    ``auto`` is OpenVINO on a CPU when it is installed and the model converts, else torch (`warn` gets one line
    saying why, when OpenVINO was expected to work); ``$HEADBENCH_RUNTIME`` (torch or openvino) overrides it; the ``pixels`` pseudo-backbone always runs on torch (there
    is nothing to compile). `precision` is the user's (``auto`` resolved per runtime).

    Raises:
        FeaturizeError: an unknown runtime; ``openvino`` on a GPU, on ``pixels``, not installed, or failing to
            convert or compile (naming why).
    """
    from .device import resolve_precision

    if requested not in RUNTIME_CHOICES:
        raise FeaturizeError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {requested!r}")
    if requested == "auto" and os.environ.get(RUNTIME_ENV) in ("torch", "openvino"):
        requested = os.environ[RUNTIME_ENV]
    torch_runtime = Runtime("torch", "fp32" if backbone.name == PIXELS else resolve_precision(precision, device),
                            torch.__version__.split("+")[0])
    if requested == "torch":
        return torch_runtime
    if device.type != "cpu" or backbone.name == PIXELS:
        if requested == "openvino":
            what = "the pixels pseudo-backbone has no model to compile" if backbone.name == PIXELS else \
                f"OpenVINO runs on the CPU here, and --device resolved to {device.type}"
            raise FeaturizeError(f"--runtime openvino: {what}; use --runtime torch (or auto)")
        return torch_runtime
    if openvino_version() is None:
        if requested == "openvino":
            raise FeaturizeError(f"--runtime openvino: OpenVINO is not installed; {INSTALL_HINT} (or use "
                                 "--runtime torch)")
        if warn:
            warn(f"OpenVINO is not installed, so the model runs on torch (slower on CPUs); {INSTALL_HINT}")
        return torch_runtime
    try:
        return _openvino(backbone, precision, batch_size)
    except Exception as e:  # conversion or compilation of an unusual model
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if requested == "openvino":
            raise FeaturizeError(f"--runtime openvino: {backbone.name} did not convert ({reason}); use --runtime "
                                 "torch") from None
        if warn:
            warn(f"{backbone.name} did not convert to OpenVINO ({reason}); running it on torch")
        return torch_runtime
