"""A store write is visible when it returns and durable only after ``Store.sync``: the shard deletes WAL
segments only once the store has made their trades durable, and the embedded store's sync really fsyncs
SQLite's files. Also: reading positions from the embedded store finds each row by its key."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.core import config as configmod
from engine.core.child import Lifeline
from engine.core.errors import StoreUnavailable
from engine.core.store import embedded
from engine.core.store.base import Batch
from engine.core.store.embedded import EmbeddedStore
from engine.core.wal import ShardWal
from shards import shard as shardmod
from tests import contract
from tests.factories import routed, trade
from tests.inprocess import running_shard, wait_until
from tests.memorystore import MemoryStore


class VolatileStore(MemoryStore):
    """What a write makes visible, only ``sync`` makes durable (SQLite with ``synchronous=NORMAL``)."""

    def __init__(self) -> None:
        super().__init__()
        self.durable: dict[str, int] = {}  # the watermarks a power cut would leave
        self.syncs = 0
        self.random = random.Random(3)

    async def sync(self) -> None:
        marks = dict(self.marks)  # what is written when the sync starts
        await asyncio.sleep(self.random.uniform(0, 0.01))
        self.durable.update(marks)
        self.syncs += 1


def test_wal_segments_are_deleted_only_once_the_store_made_their_trades_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VolatileStore()
    violations: list[str] = []
    deleted: list[int] = []
    real_checkpoint = ShardWal.checkpoint

    def checking_checkpoint(wal: ShardWal, watermarks: dict[str, int]) -> int:
        for symbol, seq in watermarks.items():
            if seq > store.durable.get(symbol, 0):
                violations.append(f"{symbol}: segments up to seq {seq} deleted, the store durable up to "
                                  f"{store.durable.get(symbol, 0)}")
        count = real_checkpoint(wal, watermarks)
        deleted.append(count)
        return count

    async def open_store(_: object, **__: object) -> VolatileStore:
        return store

    monkeypatch.setattr(shardmod, "open_store", open_store)
    monkeypatch.setattr(shardmod, "CHECKPOINT_INTERVAL_S", 0.02)
    monkeypatch.setattr(ShardWal, "checkpoint", checking_checkpoint)
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1", "metrics.enabled=false",
                                   "wal.batch_trades_max=16", "wal.segment_bytes_max=4096"])
    total, symbols = 3000, ("BTC-USDT", "ETH-USDT")
    with running_shard(config, tmp_path) as (_, push):
        for i in range(total):
            symbol = symbols[i % len(symbols)]
            push.send(routed(trade(symbol, seq=i // len(symbols) + 1, output_sequence=i + 1)))
        settled = wait_until(lambda: store.marks == dict.fromkeys(symbols, total // len(symbols)))
        assert wait_until(lambda: sum(deleted) > 10), "no WAL segment was ever deleted: the test checks nothing"
    assert settled, store.marks
    assert violations == []
    assert store.syncs > 0


def test_the_embedded_stores_sync_fsyncs_its_wal_and_never_touches_the_database_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "settle.db")
    opened: list[str] = []
    synced: list[str] = []
    real_open, real_fsync = os.open, os.fsync

    def recording_open(name: str, *args: Any, **kwargs: Any) -> int:
        opened.append(str(name))
        return real_open(name, *args, **kwargs)

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    async def main() -> None:
        store = await EmbeddedStore.open(path)
        try:
            await store.write(Batch([contract.trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1}))
            monkeypatch.setattr(os, "open", recording_open)
            monkeypatch.setattr(os, "fsync", recording_fsync)
            await store.sync()
        finally:
            monkeypatch.undo()
            await store.close()

    asyncio.run(main())
    assert synced == [path + "-wal"]  # every commit since the last checkpoint is in SQLite's WAL
    assert path not in opened, "closing a descriptor of the database file drops SQLite's locks on it"


READ_WATERMARKS = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(dict(conn.execute("SELECT symbol, seq FROM watermarks").fetchall()).get("BTC-USDT", 0))
conn.close()
"""


def test_a_sync_keeps_the_stores_locks_so_another_process_never_deletes_its_wal(tmp_path: Path) -> None:
    """Another process (``settle balances``, the checker) that opens and closes the store after a sync must
    still see every later write: with the shard's locks dropped it took SQLite's WAL for unused and
    deleted it, and the shard went on writing into the deleted file."""
    path = str(tmp_path / "settle.db")

    def watermark_seen_by_another_process() -> int:
        out = subprocess.run([sys.executable, "-c", READ_WATERMARKS, path], capture_output=True, text=True,
                             check=True, timeout=30)
        return int(out.stdout)

    async def write(store: EmbeddedStore, seq: int) -> None:
        await store.write(Batch([contract.trade("BTC-USDT", seq, 1, 2)], {}, {"BTC-USDT": seq}))

    async def main() -> None:
        store = await EmbeddedStore.open(path)
        try:
            await write(store, 1)
            await store.sync()
            assert watermark_seen_by_another_process() == 1
            await write(store, 2)
            assert watermark_seen_by_another_process() == 2
            assert Path(path + "-wal").exists()  # noqa: ASYNC240 - a test, checked once
        finally:
            await store.close()

    asyncio.run(main())


def test_reading_positions_finds_each_row_by_its_key() -> None:
    """A read of a batch's positions must not scan the table: that took milliseconds per batch on the
    shard's loop, more as the store grew."""
    conn = embedded._connect(":memory:", 100)
    try:
        plan = conn.execute("EXPLAIN QUERY PLAN " + embedded._select_positions(3), [1, "A", "S"] * 3).fetchall()
    finally:
        conn.close()
    steps = [str(row[-1]) for row in plan]
    assert not any(step.startswith("SCAN") and "positions" in step or step == "SCAN p" for step in steps), steps
    assert any(step.startswith("SEARCH p") for step in steps), steps


class SyncFailingStore(MemoryStore):
    """A store whose ``sync`` fails while ``down`` (a Cassandra sending its due watermarks to a dead node)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failed_syncs = 0

    async def sync(self) -> None:
        if self.down:
            self.failed_syncs += 1
            raise StoreUnavailable("the store is down")


class CountingLifeline(Lifeline):
    def __init__(self) -> None:
        super().__init__(None)
        self.beats = 0

    def beat(self) -> None:
        self.beats += 1


def test_the_heartbeat_goes_on_while_the_stores_sync_keeps_failing(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint retries the store's sync until it works; the supervisor must not take that for a hung
    shard: the heartbeat beats on meanwhile."""
    store = SyncFailingStore()

    async def open_store(_: object, **__: object) -> SyncFailingStore:
        return store

    monkeypatch.setattr(shardmod, "open_store", open_store)
    monkeypatch.setattr(shardmod, "CHECKPOINT_INTERVAL_S", 0.02)
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1", "metrics.enabled=false"])
    with running_shard(config, tmp_path) as (shard, push):
        push.send(routed(trade("BTC-USDT", seq=1, output_sequence=1)))
        assert wait_until(lambda: store.marks == {"BTC-USDT": 1}), store.marks
        lifeline = CountingLifeline()
        shard.lifeline = lifeline
        store.down = True
        assert wait_until(lambda: store.failed_syncs >= 2), "the checkpoint never tried the failing sync"
        beats = lifeline.beats
        assert wait_until(lambda: lifeline.beats >= beats + 10, timeout_s=10), \
            f"{lifeline.beats - beats} beats while the sync kept failing"
        store.down = False
