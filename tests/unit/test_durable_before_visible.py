"""Invariant 5: no store write for a trade happens before its WAL record is fsynced.

The shard runs in-process on the embedded store. ``os.fdatasync`` is wrapped to record which file each
call synced and how long that file was then. A WAL commit counts a symbol's new trades durable only when
the symbol's segment file (``<wal root>/<symbol>/<first seq>.seg``, the last one holding its newest
records) was fdatasynced during that commit with all its bytes: a commit that returned without syncing
one symbol's file leaves that symbol's trades not durable. A store write asserts that every trade it
carries is durable.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from engine.core import config as configmod
from engine.core.store.base import Batch
from engine.core.store.embedded import EmbeddedStore
from engine.core.wal import SEGMENT_SUFFIX, ShardWal
from tests.factories import routed, trade
from tests.inprocess import running_shard, wait_until

SYMBOLS = ("BTC-USDT", "ETH-USDT", "SOL-USDT")


def _newest_segment(wal: ShardWal, symbol: str) -> Path:
    """The segment a commit appends ``symbol``'s records to: names are zero-padded first seqs, so the
    greatest name is the newest segment."""
    return max((wal.root / symbol).glob(f"*{SEGMENT_SUFFIX}"))


def test_every_store_write_follows_the_fsync_of_its_trades(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    durable: dict[str, int] = {}  # symbol -> last seq whose segment bytes a commit fdatasynced
    synced: dict[str, int] = {}  # real path -> its size when fdatasync was called, during the current commit
    synced_lock = threading.Lock()  # a commit syncs several files at once, on the WAL's fsync threads
    unsynced: list[str] = []
    violations: list[str] = []
    written: list[int] = []

    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size  # what fdatasync will make durable: every byte written before the call
        real_fdatasync(fd)
        with synced_lock:
            synced[path] = max(size, synced.get(path, 0))

    real_commit = ShardWal.commit

    def commit(self: ShardWal) -> int:
        with synced_lock:
            synced.clear()  # only a sync made by this commit counts for this commit's records
        result = real_commit(self)
        for symbol in self.symbols():
            last = self.last_seq(symbol)
            if last <= durable.get(symbol, 0):
                continue  # nothing new for this symbol in this commit
            segment = _newest_segment(self, symbol)
            path, size = os.path.realpath(segment), segment.stat().st_size
            with synced_lock:
                synced_size = synced.get(path, -1)
            if synced_size >= size:
                durable[symbol] = last
            else:
                unsynced.append(f"{symbol}#{last}: {segment.name} synced {synced_size} of {size} bytes")
        return result

    real_write = EmbeddedStore.write

    async def write(self: EmbeddedStore, batch: Batch) -> None:
        violations.extend(f"{t.symbol}#{t.seq} written before its fsync (durable {durable.get(t.symbol)})"
                          for t in batch.trades if t.seq > durable.get(t.symbol, 0))
        written.append(len(batch.trades))
        await real_write(self, batch)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    monkeypatch.setattr(ShardWal, "commit", commit)
    monkeypatch.setattr(EmbeddedStore, "write", write)

    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1",
                                   f'store.path="{tmp_path / "s.db"}"', "metrics.enabled=false",
                                   "wal.batch_trades_max=64", "wal.fsync_wait_us_max=500"])
    total = 3000
    with running_shard(config, tmp_path) as (_, push):
        for i in range(1, total + 1):
            symbol = SYMBOLS[i % 3]
            push.send(routed(trade(symbol, seq=(i + 2) // 3, output_sequence=i)))
        assert wait_until(lambda: sum(written) >= total or bool(violations)), f"{sum(written)} of {total} settled"
    assert violations == [], (violations[:5], unsynced[:5])
    assert sum(written) == total
    assert set(durable) == set(SYMBOLS)  # every symbol's trades were seen made durable
    assert len(written) > 1  # many batches, each checked
