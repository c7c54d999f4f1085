"""The extraction engine: decode in DataLoader workers, run the frozen backbone in batches, yield features.

It knows nothing about stores: it takes a source, a backbone and the sample indices to do, and yields
:class:`FeatureBatch` objects in index order. Per-sample decode failures travel with the batch as error
strings; the backbone only sees the samples that decoded.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone
from .errors import FeaturizeError
from .sources import Source

__all__ = [
    "DEVICE_CHOICES",
    "PRECISION_CHOICES",
    "FeatureBatch",
    "resolve_device",
    "resolve_precision",
    "cpu_supports_bf16",
    "default_batch_size",
    "default_workers",
    "iter_features",
]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FeatureBatch:
    """Features for some samples, in index order.

    Attributes:
        indices: sample indices, shape [B].
        features: float32 [B, D]; rows of failed samples are NaN.
        errors: one string per sample, empty when it succeeded.
    """

    indices: np.ndarray
    features: np.ndarray
    errors: list[str]


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


def default_batch_size(device: torch.device) -> int:
    return 128 if device.type in ("cuda", "mps") else 32


def default_workers() -> int:
    """Decode workers: half the cores (the other half runs the model on CPU), at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class _DecodeDataset(Dataset):
    """Decode + transform one sample; a failure becomes an error string, never another sample."""

    def __init__(self, source: Source, transform, input_size: Sequence[int]):
        self.source = source
        self.transform = transform
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(self.source.load(index)), ""
        except Exception as e:  # every decode/transform failure is recorded for this row alone
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return index, torch.zeros(self.input_size), f"{type(e).__name__}: {message}".rstrip(": ")


def _collate(items):
    indices = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    return indices, torch.stack([x for _, x, _ in items]), [e for _, _, e in items]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def iter_features(
    source: Source,
    backbone: Backbone,
    indices: Sequence[int],
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
) -> Iterator[FeatureBatch]:
    """Yield features for `indices` (in that order) in batches.

    Args:
        source: where samples come from.
        backbone: the frozen model and its transform.
        indices: sample indices to do.
        device: where the model runs (moved there, channels_last).
        precision: resolved precision, ``fp32``, ``bf16`` or ``fp16`` (autocast).
        batch_size: samples per forward pass.
        workers: decode worker processes (0 decodes in this process).
    """
    if batch_size < 1:
        raise FeaturizeError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise FeaturizeError(f"--workers must be 0 or more, got {workers}")
    backbone.model.to(device, memory_format=torch.channels_last)
    dataset = _DecodeDataset(source, backbone.transform, backbone.data_config["input_size"])
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(indices),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    dim = backbone.num_features
    with torch.inference_mode():
        for batch_indices, images, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            features = np.full((len(errors), dim), np.nan, dtype=np.float32)
            if ok.any():
                x = images[ok].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with _autocast(device, precision):
                    out = backbone.features(x)
                features[ok.numpy()] = out.float().cpu().numpy()
            yield FeatureBatch(batch_indices.numpy(), features, list(errors))
