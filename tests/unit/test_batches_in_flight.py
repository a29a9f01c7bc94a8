"""Several store batches in flight: their writes finish in any order, the watermarks never pass a trade
that is not in the store, and every trade ends up settled once.

The shard runs in-process; its store is an in-memory one whose writes take a random while, so later
batches often land before earlier ones. Every time a watermark moves, the store checks that it holds the
ledger row of every sequence up to it.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from pathlib import Path

import pytest

from engine.core import config as configmod
from engine.core.store.base import Batch, Position, PositionKey
from shards import shard as shardmod
from tests.factories import routed, trade
from tests.inprocess import running_shard, wait_until


class OutOfOrderStore:
    """Writes sleep 0-15 ms first, so batches sent together finish in any order."""

    def __init__(self) -> None:
        self.ledger: defaultdict[str, set[int]] = defaultdict(set)
        self.rows: dict[PositionKey, Position] = {}
        self.marks: dict[str, int] = {}
        self.writing = 0
        self.most_writing = 0
        self.violations: list[str] = []
        self.random = random.Random(7)

    def _advance(self, watermarks: dict[str, int]) -> None:
        for symbol, seq in watermarks.items():
            missing = set(range(1, seq + 1)) - self.ledger[symbol]
            if missing:
                self.violations.append(f"{symbol} watermark {seq} passes unsettled {sorted(missing)[:5]}")
            self.marks[symbol] = max(seq, self.marks.get(symbol, 0))

    async def write(self, batch: Batch) -> None:
        self.writing += 1
        self.most_writing = max(self.most_writing, self.writing)
        try:
            await asyncio.sleep(self.random.uniform(0, 0.015))
        finally:
            self.writing -= 1
        for t in batch.trades:
            self.ledger[t.symbol].add(t.seq)
        for key, position in batch.positions.items():
            if position.last_seq > self.rows.get(key, Position(0, 0)).last_seq:
                self.rows[key] = position
        self._advance(batch.watermarks)

    async def sync(self) -> None:
        pass

    async def advance_watermarks(self, watermarks: dict[str, int]) -> None:
        self._advance(watermarks)

    async def load_positions(self, keys: list[PositionKey]) -> dict[PositionKey, Position]:
        return {key: self.rows[key] for key in keys if key in self.rows}

    async def watermarks(self) -> dict[str, int]:
        return dict(self.marks)

    async def close(self) -> None:
        pass


def test_watermarks_never_pass_an_unsettled_trade_with_batches_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = OutOfOrderStore()

    async def open_store(_: object) -> OutOfOrderStore:
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
    assert {symbol: len(seqs) for symbol, seqs in store.ledger.items()} == dict.fromkeys(symbols, total // len(symbols))
