"""Feature extraction: image sources, frozen timm backbones, the batch engine and HDF5 feature stores.

Nothing here imports ``heads``; ``pipelines`` joins the two.
"""

from .backbones import Backbone, create_backbone, list_backbones
from .engine import iter_features, resolve_device, resolve_precision
from .errors import FeaturizeError
from .packed import ParquetSource, TarShardSource  # registers tar shards and tables with open_source
from .sources import Source, open_source
from .store import FeatureStore, StoreError, StoreWriter, read_store

__all__ = [
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
    "read_store",
    "resolve_device",
    "resolve_precision",
]
