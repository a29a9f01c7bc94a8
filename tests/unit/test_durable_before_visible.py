"""Invariant 5: no store write for a trade happens before its WAL record is fsynced.

The shard runs in-process on the embedded store. The WAL's commit and the store's write are wrapped:
a commit records, once fdatasync has returned, which sequences are durable; a store write asserts that
every trade it carries is among them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.core import config as configmod
from engine.core.messages import encoder
from engine.core.store.embedded import EmbeddedStore
from engine.core.wal import ShardWal
from tests.factories import trade
from tests.inprocess import running_shard, wait_until


def test_every_store_write_follows_the_fsync_of_its_trades(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    durable: dict[str, int] = {}
    fsyncs = {"calls": 0}
    violations: list[str] = []
    written: list[int] = []

    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        fsyncs["calls"] += 1
        real_fdatasync(fd)

    real_commit = ShardWal.commit

    def commit(self: ShardWal) -> int:
        result = real_commit(self)
        for symbol in self.symbols():
            durable[symbol] = self.last_seq(symbol)  # fdatasync has returned for all of these
        return result

    real_write = EmbeddedStore.write

    async def write(self: EmbeddedStore, batch) -> None:  # type: ignore[no-untyped-def]
        for t in batch.trades:
            if t.seq > durable.get(t.symbol, 0):
                violations.append(f"{t.symbol}#{t.seq} written before its fsync (durable {durable.get(t.symbol)})")
        written.append(len(batch.trades))
        await real_write(self, batch)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    monkeypatch.setattr(ShardWal, "commit", commit)
    monkeypatch.setattr(EmbeddedStore, "write", write)

    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1",
                                   f'store.path="{tmp_path / "s.db"}"', "metrics.enabled=false",
                                   "wal.batch_trades_max=64", "wal.fsync_wait_us_max=500"])
    total = 3000
    with running_shard(config, tmp_path) as (_, push):
        for i in range(1, total + 1):
            symbol = ("BTC-USDT", "ETH-USDT", "SOL-USDT")[i % 3]
            push.send(encoder.encode(trade(symbol, seq=(i + 2) // 3, output_sequence=i)))
        wait_until(lambda: sum(written) >= total)
    assert sum(written) == total
    assert violations == []
    assert fsyncs["calls"] > 0
    assert len(written) > 1  # many batches, each checked
