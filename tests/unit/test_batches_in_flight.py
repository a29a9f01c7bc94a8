"""Several store batches in flight: their writes finish in any order, the watermarks never pass a trade
that is not in the store, and every trade ends up settled once.

The shard runs in-process; its store is an in-memory one whose writes take a random while, so later
batches often land before earlier ones. Every time a watermark moves, the store checks that it holds the
ledger row of every sequence up to it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from engine.core import config as configmod
from engine.core.store.base import Batch
from shards import shard as shardmod
from tests.factories import routed, trade
from tests.inprocess import running_shard, wait_until
from tests.memorystore import MemoryStore


class OutOfOrderStore(MemoryStore):
    """Writes sleep 0-15 ms first, so batches sent together finish in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = 0
        self.most_writing = 0
        self.violations: list[str] = []
        self.random = random.Random(7)

    async def advance_watermarks(self, watermarks: dict[str, int]) -> None:
        for symbol, seq in watermarks.items():
            missing = set(range(1, seq + 1)) - set(self.ledger_rows[symbol])
            if missing:
                self.violations.append(f"{symbol} watermark {seq} passes unsettled {sorted(missing)[:5]}")
        await super().advance_watermarks(watermarks)

    async def write(self, batch: Batch) -> None:
        self.writing += 1
        self.most_writing = max(self.most_writing, self.writing)
        try:
            await asyncio.sleep(self.random.uniform(0, 0.015))
        finally:
            self.writing -= 1
        await super().write(batch)


def test_watermarks_never_pass_an_unsettled_trade_with_batches_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = OutOfOrderStore()

    async def open_store(_: object, **__: object) -> OutOfOrderStore:
        return store

    monkeypatch.setattr(shardmod, "open_store", open_store)
    monkeypatch.setattr(shardmod, "STORE_BATCH_TRADES_MAX", 40)  # many small batches
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1", "metrics.enabled=false",
                                   "wal.batch_trades_max=16", "store.cassandra.batches_in_flight_max=4"])
    total, symbols = 4000, ("BTC-USDT", "ETH-USDT", "SOL-USDT", "ETH-BTC")
    with running_shard(config, tmp_path, batches_in_flight=4) as (_, push):
        for i in range(total):
            symbol = symbols[i % len(symbols)]
            push.send(routed(trade(symbol, seq=i // len(symbols) + 1, output_sequence=i + 1)))
        settled = wait_until(lambda: store.marks == dict.fromkeys(symbols, total // len(symbols)))
    assert settled, store.marks
    assert store.violations == []
    assert store.most_writing > 1, "the batches were never in flight together"
    settled_per_symbol = {symbol: len(seqs) for symbol, seqs in store.ledger_rows.items()}
    assert settled_per_symbol == dict.fromkeys(symbols, total // len(symbols))
