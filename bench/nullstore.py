"""A benchmark-only store that discards every write: ``store.factory = "bench.nullstore:NullStore"`` (with
``engine.benchmark_unsafe = true``; settle refuses it otherwise).

It measures the engine with store writes taken out: router, shard intake, WAL group commit with fsync,
and the settler's folding all run as usual; ``write`` returns at once. It holds nothing, so a shard
restarted on it re-settles its whole WAL, and the checker has nothing to check. Progress is read from
the shards' ``settle_trades_settled_total`` instead of the store's watermarks.

Never configure it outside a benchmark: nothing written to it survives anything.
"""

from __future__ import annotations

from engine.core.store.base import Batch, Position, PositionKey


class NullStore:
    """The :class:`~engine.core.store.base.Store` protocol, with every write discarded."""

    read_ahead = False

    def __init__(self) -> None:
        self.batches = 0
        self.trades = 0

    @classmethod
    async def open(cls) -> NullStore:
        return cls()

    def __repr__(self) -> str:
        return f"NullStore({self.trades} trades discarded)"

    async def write(self, batch: Batch) -> None:
        self.batches += 1
        self.trades += len(batch.trades)

    async def sync(self) -> None:
        pass

    async def advance_watermarks(self, watermarks: dict[str, int]) -> None:
        pass

    async def load_positions(self, keys: list[PositionKey]) -> dict[PositionKey, Position]:
        return {}

    async def watermarks(self) -> dict[str, int]:
        return {}

    async def balances(self, account: int) -> dict[str, int]:
        return {}

    async def positions(self) -> dict[PositionKey, Position]:
        return {}

    async def ledger(self, symbol: str) -> list[tuple[int, int]]:
        return []

    async def ledger_symbols(self) -> list[str]:
        return []

    async def close(self) -> None:
        return None
