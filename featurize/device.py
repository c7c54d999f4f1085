"""Devices and precisions: which device and precision to run on, autocast, and the model placed there.

Below the engines and the runtimes (``engine``, ``stages``, ``runtime`` and ``finetune`` all take these), so
none of them imports another for a helper.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import torch

from .errors import FeaturizeError

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = ["DEVICE_CHOICES", "PRECISION_CHOICES", "AUTOCAST_DTYPES", "resolve_device", "cpu_supports_bf16",
           "resolve_precision", "autocast", "env_switch", "cudnn_benchmark_requested", "prepare_model"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must exist.

    Raises:
        FeaturizeError: the requested device is not available or not known.
    """
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if requested not in DEVICE_CHOICES:
        raise FeaturizeError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise FeaturizeError("--device cuda: no CUDA GPU is available to torch here; use --device auto or cpu")
    if requested == "mps" and not _mps_available():
        raise FeaturizeError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    return torch.device(requested)


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """Turn ``auto`` into the fastest precision that keeps features faithful on `device`.

    CUDA: bf16 where supported, else fp16. CPU: bf16 with AVX512-BF16/AMX, else fp32. MPS: fp16.
    An explicit choice is kept as it is.
    """
    if requested not in PRECISION_CHOICES:
        raise FeaturizeError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str, cache: bool = True):
    """The autocast context for a resolved precision (a no-op for fp32). `cache`: keep the weights' casts
    between calls (off when a CUDA graph is captured: the graph must make its own)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=cache)


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable (``0`` or ``1``; `default` when unset); anything else is refused."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise FeaturizeError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def cudnn_benchmark_requested() -> bool:
    """Whether cuDNN times its kernels at the warm-up (the input size is fixed, so once per run): yes unless
    ``HEADBENCH_CUDNN_BENCHMARK=0``, which takes its heuristics' choice instead -- a shorter start-up, which a
    short run on a fast GPU may prefer (benchmarks/gpu_run.py measures both)."""
    return env_switch("HEADBENCH_CUDNN_BENCHMARK", default=True)


def prepare_model(backbone: "Backbone", device: torch.device, compile: bool = False) -> Callable:
    """Move the model to `device` (channels_last) and return its feature function, compiled when asked."""
    backbone.model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark_requested()
    if not compile:
        return backbone.features
    return torch.compile(backbone.features, dynamic=False)
