"""Provenance helpers shared by the pipelines."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

__all__ = ["library_versions", "package_versions"]

_LIBRARIES = ("headbench", "torch", "torchvision", "timm", "h5py", "numpy", "pillow", "scikit-learn", "skops")


def package_versions(names) -> dict[str, str]:
    """The installed version of each distribution in `names` (``not installed`` where it is not)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape features and heads."""
    return {"python": platform.python_version(), **package_versions(_LIBRARIES)}
