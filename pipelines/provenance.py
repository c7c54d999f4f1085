"""Provenance helpers shared by the pipelines."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__all__ = ["library_versions"]

_LIBRARIES = ("headbench", "torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn", "skops")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape features and heads."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
