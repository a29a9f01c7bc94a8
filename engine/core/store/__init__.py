"""Settlement stores: the embedded SQLite store and the ScyllaDB/Cassandra store share one contract."""

from __future__ import annotations

import importlib

from engine.core.config import StoreConfig
from engine.core.store.base import Batch, Position, PositionKey, Store

__all__ = ["Batch", "Position", "PositionKey", "Store", "open_store"]


async def open_store(config: StoreConfig, *, create_schema: bool | None = None, shard: int | None = None) -> Store:
    """The store the configuration names, connected and ready. ``shard`` is the shard that will write through
    it: on the embedded store it writes a file of its own (``engine.core.store.embedded``)."""
    if config.factory:  # benchmarks only (engine.core.config refuses it otherwise): named, never imported here
        module, _, name = config.factory.partition(":")
        opened: Store = await getattr(importlib.import_module(module), name).open()
        return opened
    if config.kind == "embedded":
        from engine.core.store.embedded import EmbeddedStore

        return await EmbeddedStore.open(config.path, shard=shard)
    from engine.core.store.cassandra import CassandraStore

    create = config.cassandra.create_schema if create_schema is None else create_schema
    return await CassandraStore.open(config.cassandra, create_schema=create)
