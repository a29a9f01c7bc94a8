"""The store contract (tests/contract.py) on the embedded SQLite store, plus what is SQLite's own."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from engine.core.errors import StoreUnavailable
from engine.core.store import embedded
from engine.core.store.base import Batch, Store
from engine.core.store.embedded import EmbeddedStore
from tests import contract


@pytest.mark.parametrize("shard", [None, 3], ids=["the-named-file", "a-shards-own-file"])
@pytest.mark.parametrize("check", contract.CHECKS, ids=contract.check_id)
def test_contract(check: contract.Check, shard: int | None, tmp_path: Path) -> None:
    async def open_store(name: str) -> Store:
        return await EmbeddedStore.open(str(tmp_path / f"{name}.db"), shard=shard)

    asyncio.run(check(open_store))


def test_durability_settings(tmp_path: Path) -> None:
    async def main() -> None:
        store = await EmbeddedStore.open(str(tmp_path / "sub" / "dir" / "settle.db"))
        try:
            assert "open" in repr(store)
            await store.write(Batch([contract.trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1}))
        finally:
            await store.close()
        assert "closed" in repr(store)

    asyncio.run(main())
    conn = sqlite3.connect(tmp_path / "sub" / "dir" / "settle.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # persistent in the file
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"ledger", "positions", "watermarks"}
    finally:
        conn.close()


def test_a_locked_database_is_unavailable_after_the_busy_timeout(tmp_path: Path) -> None:
    """Writes run in the loop's thread: a lock held elsewhere holds the loop for the busy timeout, then the
    write fails as retriable (the shard backs off, its loop free) and succeeds once the lock is gone."""
    path = tmp_path / "settle.db"

    async def main() -> None:
        store = await EmbeddedStore.open(str(path), busy_timeout_ms=400)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            batch = Batch([contract.trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1})
            started = time.monotonic()
            with pytest.raises(
                StoreUnavailable, match=r"settle\.db: database is locked; retry later"
            ) as info:
                await store.write(batch)
            assert info.value.retriable
            assert time.monotonic() - started >= 0.4  # it waited the whole busy timeout for the lock
            blocker.execute("ROLLBACK")
            await store.write(batch)  # the lock is gone: the retry succeeds
            assert await store.watermarks() == {"BTC-USDT": 1}
        finally:
            blocker.close()
            await store.close()

    asyncio.run(main())


def test_sqlite_runs_in_the_callers_thread(tmp_path: Path) -> None:
    """No handoff to a worker thread: binding rows needs the GIL, which the shard's loop holds."""

    async def main() -> None:
        store = await EmbeddedStore.open(str(tmp_path / "settle.db"))
        seen: set[str] = set()

        def record(_: sqlite3.Connection) -> None:
            seen.add(threading.current_thread().name)

        try:
            await asyncio.gather(*(store._run(record) for _ in range(20)))
        finally:
            await store.close()
        assert seen == {threading.current_thread().name}

    asyncio.run(main())


def test_each_shard_writes_a_file_of_its_own_and_readers_see_them_all(tmp_path: Path) -> None:
    """Shard processes of a box write at once, each its own symbols into its own file; a reader without a
    shard (the CLI, the checker) sees every file, and so does each shard."""
    path = str(tmp_path / "settle.db")
    symbols = ["BTC-USDT", "ETH-USDT", "ETH-BTC"]

    async def main() -> None:
        stores = [await EmbeddedStore.open(path, shard=shard) for shard in range(len(symbols))]
        reader = await EmbeddedStore.open(path)
        try:
            trades = {symbol: contract.stream([symbol], 200, seed=i) for i, symbol in enumerate(symbols)}

            async def shard(store: Store, symbol: str) -> None:
                for start in range(0, 200, 20):
                    await contract.settle(store, trades[symbol][start : start + 20])

            await asyncio.gather(
                *(shard(store, symbol) for store, symbol in zip(stores, symbols, strict=True))
            )
            everything = [t for symbol in symbols for t in trades[symbol]]
            for store in (reader, stores[1]):
                assert await store.watermarks() == dict.fromkeys(symbols, 200)
                assert await contract.balances_of(store, range(7)) == contract.expected_balances(everything)
                assert await store.ledger_symbols() == sorted(symbols)
        finally:
            for store in [*stores, reader]:
                await store.close()

    asyncio.run(main())
    assert embedded.store_files(path) == [path] + [str(tmp_path / f"settle.shard-{i}.db") for i in range(3)]
    for i, symbol in enumerate(symbols):
        with closing(sqlite3.connect(tmp_path / f"settle.shard-{i}.db")) as conn:
            assert conn.execute("SELECT DISTINCT symbol FROM ledger").fetchall() == [(symbol,)]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (0,)  # the reader wrote nothing


def test_a_shard_never_waits_for_another_shards_write_lock(tmp_path: Path) -> None:
    """One file per shard: a transaction held open in shard 1's file does not hold shard 0's writes."""
    path = str(tmp_path / "settle.db")

    async def main() -> None:
        store = await EmbeddedStore.open(path, shard=0, busy_timeout_ms=5_000)
        other = await EmbeddedStore.open(path, shard=1)
        blocker = sqlite3.connect(embedded.shard_file(path, 1), isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # shard 1 is inside a write
            started = time.monotonic()
            await contract.settle(store, contract.stream(["BTC-USDT"], 10, seed=1))
            assert time.monotonic() - started < 2.5  # not the busy timeout
            assert await store.watermarks() == {"BTC-USDT": 10}
        finally:
            blocker.close()
            await other.close()
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("earlier", [None, 0], ids=["from-the-named-file", "from-another-shards-file"])
def test_a_symbol_that_changed_shards_goes_on_from_its_earlier_rows(earlier: int | None, tmp_path: Path) -> None:
    """After the shard count changed (or a Kafka partition moved, or an upgrade from one shared file), a
    symbol's rows are in two files: its new owner reads the earlier ones and goes on from them, and every
    reader takes each position's newest row, never the sum of both."""
    path = str(tmp_path / "settle.db")
    trades = contract.stream(["BTC-USDT", "ETH-USDT"], 300, seed=5)

    async def main() -> None:
        before = await EmbeddedStore.open(path, shard=earlier)
        try:
            await contract.settle(before, trades[:200])
        finally:
            await before.close()
        after = await EmbeddedStore.open(path, shard=2)
        reader = await EmbeddedStore.open(path)
        try:
            await contract.settle(after, trades[200:])  # a fresh Settler: every position is read from the store
            expected = contract.expected_balances(trades)
            for store in (after, reader):
                assert await contract.balances_of(store, range(7)) == expected
                marks = await store.watermarks()
                assert marks == {s: max(t.seq for t in trades if t.symbol == s) for s in ("BTC-USDT", "ETH-USDT")}
                assert [seq for seq, _ in await store.ledger("BTC-USDT")] == list(range(1, marks["BTC-USDT"] + 1))
                positions = await store.positions()
                assert sum(p.amount for (_, asset, _), p in positions.items() if asset == "USDT") == 0  # conserved
            newest = await reader.positions()
        finally:
            await reader.close()
            await after.close()
        earlier_file = path if earlier is None else embedded.shard_file(path, earlier)
        with closing(sqlite3.connect(earlier_file)) as conn:
            rows = conn.execute("SELECT account, asset, symbol, last_seq FROM positions").fetchall()
        assert any(newest[(a, asset, s)].last_seq > seq for a, asset, s, seq in rows), "no older row was left"
        stale = await EmbeddedStore.open(path, shard=earlier)  # the earlier owner, back: it reads the newest
        try:
            assert await stale.load_positions(list(newest)) == newest
        finally:
            await stale.close()

    asyncio.run(main())


def test_a_file_whose_schema_is_not_committed_yet_is_read_as_empty(tmp_path: Path) -> None:
    """A shard opening its file for the first time has created it before its schema commits."""
    path = str(tmp_path / "settle.db")
    (tmp_path / "settle.shard-5.db").write_bytes(b"")

    async def main() -> None:
        store = await EmbeddedStore.open(path, shard=0)
        try:
            await contract.settle(store, contract.stream(["BTC-USDT"], 5, seed=2))
            assert await store.watermarks() == {"BTC-USDT": 5}
            assert not store._others  # the empty file was not kept: it is opened again when next found
        finally:
            await store.close()

    asyncio.run(main())


def test_a_file_made_after_a_trusted_listing_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard lists the store's directory again only when the directory's mtime moved: a file created later
    (a new shard's, or a Kafka partition's new owner's) is still read, and an unchanged directory is not
    listed again."""
    path = str(tmp_path / "settle.db")
    trades = contract.stream(["BTC-USDT"], 20, seed=3)
    listings: list[str] = []
    store_files = embedded.store_files

    def listing(p: str) -> list[str]:
        listings.append(p)
        return store_files(p)

    monkeypatch.setattr(embedded, "store_files", listing)

    async def main() -> None:
        store = await EmbeddedStore.open(path, shard=0)
        try:
            past = time.time() - 60
            os.utime(tmp_path, (past, past))  # the last change long before the listing: the listing is trusted
            assert await store.load_positions([(1, "BTC", "BTC-USDT")]) == {}
            assert await store.load_positions([(1, "BTC", "BTC-USDT")]) == {}
            assert len(listings) == 1, "an unchanged directory was listed again"
            other = await EmbeddedStore.open(path, shard=1)
            try:
                await contract.settle(other, trades)
                expected = await other.positions()
            finally:
                await other.close()
            assert expected
            assert await store.load_positions(list(expected)) == expected
        finally:
            await store.close()

    asyncio.run(main())


def test_a_large_batch_is_written_on_the_stores_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past INLINE_TRADES_MAX trades a write overlaps the shard's intake; the result is the same."""
    monkeypatch.setattr(embedded, "INLINE_TRADES_MAX", 2)

    async def main() -> None:
        store = await EmbeddedStore.open(str(tmp_path / "settle.db"))
        try:
            trades = contract.stream(["BTC-USDT"], 10, seed=1)
            await contract.settle(store, trades[:2])  # inline
            await contract.settle(store, trades[2:])  # 8 trades: threaded
            assert await store.watermarks() == {"BTC-USDT": 10}
            assert len(await store.ledger("BTC-USDT")) == 10
            assert store._executor._threads, "the large batch never reached the store's thread"
        finally:
            await store.close()

    asyncio.run(main())
