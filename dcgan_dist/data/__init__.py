"""Data side: public-format readers, the shard writer/manifest, and the distributed streaming loader."""

from .loader import ShardLoader, to_device
from .shards import load_manifest, read_shards

__all__ = ["ShardLoader", "to_device", "load_manifest", "read_shards"]
