"""The store contract (tests/contract.py) on the embedded SQLite store, plus what is SQLite's own."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from engine.core.errors import StoreUnavailable
from engine.core.store import embedded
from engine.core.store.base import Batch, Store
from engine.core.store.embedded import EmbeddedStore
from tests import contract


@pytest.mark.parametrize("check", contract.CHECKS, ids=contract.check_id)
def test_contract(check: contract.Check, tmp_path: Path) -> None:
    async def open_store(name: str) -> Store:
        return await EmbeddedStore.open(str(tmp_path / f"{name}.db"))

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


def test_store_objects_share_one_file(tmp_path: Path) -> None:
    """Shard processes of a box write the same file at once, each its own symbols."""
    path = str(tmp_path / "settle.db")
    symbols = ["BTC-USDT", "ETH-USDT", "ETH-BTC"]

    async def main() -> None:
        stores = [await EmbeddedStore.open(path) for _ in symbols]
        try:
            trades = {symbol: contract.stream([symbol], 200, seed=i) for i, symbol in enumerate(symbols)}

            async def shard(store: Store, symbol: str) -> None:
                for start in range(0, 200, 20):
                    await contract.settle(store, trades[symbol][start : start + 20])

            await asyncio.gather(
                *(shard(store, symbol) for store, symbol in zip(stores, symbols, strict=True))
            )
            assert await stores[0].watermarks() == dict.fromkeys(symbols, 200)
            everything = [t for symbol in symbols for t in trades[symbol]]
            assert await contract.balances_of(stores[1], range(7)) == contract.expected_balances(everything)
        finally:
            for store in stores:
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
