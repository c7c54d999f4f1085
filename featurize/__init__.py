"""Feature extraction: image sources, frozen timm backbones, the batch engine and HDF5 feature stores.

Nothing here imports ``heads``; ``pipelines`` joins the two.
"""

from .backbones import Backbone, create_backbone, list_backbones
from .decode import DECODE_CHOICES
from .device import DEVICE_CHOICES, PRECISION_CHOICES, resolve_device, resolve_precision
from .engine import iter_features
from .errors import FeaturizeError
from .packed import ParquetSource, TarShardSource  # registers tar shards and tables with open_source
from .runtime import RUNTIME_CHOICES, openvino_version
from .sources import Source, open_source
from .store import DTYPES, FeatureStore, StoreError, StoreWriter, read_store, verify_store, verify_store_isolated

__all__ = [
    "DECODE_CHOICES",
    "DEVICE_CHOICES",
    "DTYPES",
    "PRECISION_CHOICES",
    "RUNTIME_CHOICES",
    "Backbone",
    "FeatureStore",
    "FeaturizeError",
    "ParquetSource",
    "Source",
    "StoreError",
    "StoreWriter",
    "TarShardSource",
    "create_backbone",
    "iter_features",
    "list_backbones",
    "open_source",
    "openvino_version",
    "read_store",
    "resolve_device",
    "resolve_precision",
    "verify_store",
    "verify_store_isolated",
]
