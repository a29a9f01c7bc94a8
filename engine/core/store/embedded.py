"""The embedded store: SQLite files on one box, one written by each shard process (stdlib only).

Every file of a store is named after ``store.path`` (``var/settle.db``): a shard writes its own
(``var/settle.shard-3.db``, :func:`shard_file`), and reads every file of the store (:func:`store_files`),
taking for each position the row with the largest ``last_seq``, for each watermark the largest. A symbol
has one writer at a time, so its rows are in the file of the shard that owns it, and in the file of an
earlier owner after the shard count changed or a Kafka partition moved; the rules of
:mod:`engine.core.store.base` pick the newest either way. A file per shard means no shard waits for
another's write lock (SQLite has one writer per file: with one shared file 15% of writes slept 1-5 ms in
its busy handler, on the shard's loop) and a shard's page cache survives between its transactions
(another writer's commit drops it). Tools and tests that open the store without a shard write ``path``
itself, which every reader includes.

SQLite calls run in the caller's thread, the event loop's: a batch of a few hundred trades takes a few
milliseconds, and handing it to a worker thread cost far more, because binding the rows needs the GIL
that the shard's loop holds (measured: store writes 4x slower, p50 latency 4x higher at 20k trades/s).
Only a large batch (more than ``INLINE_TRADES_MAX`` trades: a shard catching up, or flat out) goes to the
store's own thread, where writing it overlaps the shard's intake (about 10% more trades/s flat out). A
write waits at most ``busy_timeout_ms`` for the write lock (held by a tool writing the same file), then
fails as unavailable and the shard retries it with backoff. SQLite's automatic checkpoint (at 1,000 pages
of WAL, in the commit that passes them) sets the tail of a trade's latency on this store; moving it, or
changing its size, trades the p50 against the p99 (``docs/performance.md``).

A batch is one transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``) in WAL journal mode with
``synchronous=NORMAL``: once :meth:`EmbeddedStore.write` returns the batch is visible to every reader,
and a power cut can only take the last commits whole, never part of one (SQLite checksums its WAL
frames). With ``FULL`` every commit also waited for an fsync on the shard's loop, the largest share of a
trade's latency; the trades are already durable in the shard's WAL, so a commit need not be. They become
durable at :meth:`EmbeddedStore.sync` (an fsync of SQLite's WAL file, off the loop), which the shard
calls before it deletes WAL segments the store holds.

Idempotence follows the contract in :mod:`engine.core.store.base`: ledger rows are ``INSERT OR IGNORE``,
a position is replaced only by a write carrying a larger ``last_seq``, a watermark only moves up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from engine.core.errors import ClosedError, StoreRejected, StoreUnavailable
from engine.core.store.base import Batch, Position, PositionKey
from engine.core.store.schema import check_batch, check_watermarks, ledger_row, sum_by_asset

T = TypeVar("T")

BUSY_TIMEOUT_MS: Final = 2_000  # a tool writing the same file holds its write lock for a few ms
INLINE_TRADES_MAX: Final = 2_000  # larger batches are written on the store's thread
_KEYS_PER_SELECT: Final = 300  # 3 parameters each; under SQLite's oldest 999-parameter limit
# A file system stamps a directory's mtime from a coarse clock (a few ms a tick): a file created in the tick of
# a listing may leave the mtime as the listing saw it. A listing is trusted only while the directory's mtime
# stays what it was and was this much older than the listing.
_LISTING_SETTLED_NS: Final = 1_000_000_000

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS ledger (
        symbol TEXT NOT NULL, seq INTEGER NOT NULL, trade_id INTEGER NOT NULL,
        output_sequence INTEGER NOT NULL, buyer INTEGER NOT NULL, seller INTEGER NOT NULL,
        price INTEGER NOT NULL, qty INTEGER NOT NULL, buyer_fee INTEGER NOT NULL,
        seller_fee INTEGER NOT NULL, ts_ns INTEGER NOT NULL,
        PRIMARY KEY (symbol, seq)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS positions (
        account INTEGER NOT NULL, asset TEXT NOT NULL, symbol TEXT NOT NULL,
        amount INTEGER NOT NULL, last_seq INTEGER NOT NULL,
        PRIMARY KEY (account, asset, symbol))""",
    """CREATE TABLE IF NOT EXISTS watermarks (symbol TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL)""",
)

_INSERT_LEDGER: Final = (
    "INSERT OR IGNORE INTO ledger (symbol, seq, trade_id, output_sequence, buyer, seller, price, qty, "
    "buyer_fee, seller_fee, ts_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_POSITION: Final = (
    "INSERT INTO positions (account, asset, symbol, amount, last_seq) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (account, asset, symbol) DO UPDATE SET amount = excluded.amount, "
    "last_seq = excluded.last_seq WHERE excluded.last_seq > positions.last_seq"
)
_UPSERT_WATERMARK: Final = (
    "INSERT INTO watermarks (symbol, seq) VALUES (?, ?) "
    "ON CONFLICT (symbol) DO UPDATE SET seq = max(seq, excluded.seq)"
)


@functools.cache
def _select_positions(keys: int) -> str:
    """The rows of ``keys`` keys, each found through the primary key. (``WHERE (account, asset, symbol) IN
    (VALUES ...)`` scanned the whole table on every read: milliseconds per batch, growing with the store.)"""
    values = ", ".join(["(?, ?, ?)"] * keys)
    return (
        f"WITH wanted(account, asset, symbol) AS (VALUES {values}) "
        "SELECT p.account, p.asset, p.symbol, p.amount, p.last_seq FROM wanted CROSS JOIN positions AS p "
        "ON p.account = wanted.account AND p.asset = wanted.asset AND p.symbol = wanted.symbol"
    )


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; write() opens its own.
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and str(mode).lower() != "wal":
            raise StoreUnavailable(
                f"embedded store {path}: could not switch to WAL journal mode (got {mode})"
            )
        conn.execute("PRAGMA synchronous = NORMAL")  # durable at sync(); see above
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _transaction(body: Callable[[sqlite3.Connection], object]) -> Callable[[sqlite3.Connection], None]:
    """``body`` inside ``BEGIN IMMEDIATE`` .. ``COMMIT`` (rolled back when it raises)."""

    def run(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            body(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    return run


def shard_file(path: str, shard: int) -> str:
    """The file shard ``shard`` writes, named after the store's: ``var/settle.db`` -> ``var/settle.shard-3.db``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.shard-{shard}{p.suffix}"))


def store_files(path: str) -> list[str]:
    """Every file of the store named ``path`` that exists: ``path`` itself, then each shard's, by shard.
    (Copy all of them to copy the store.)"""
    if path == ":memory:":
        return []
    p = Path(path)
    pattern = re.compile(rf"{re.escape(p.stem)}\.shard-(\d+){re.escape(p.suffix)}")
    try:
        names = os.listdir(p.parent)
    except FileNotFoundError:
        return []
    shards = sorted((int(m.group(1)), name) for name in names if (m := pattern.fullmatch(name)))
    return ([path] if p.exists() else []) + [str(p.parent / name) for _, name in shards]


def _open_reader(path: str, busy_timeout_ms: int) -> sqlite3.Connection | None:
    """A connection that only reads the store file ``path``; None while the file's schema is not committed
    yet (its writer is opening it, so it holds no rows)."""
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except BaseException:
        conn.close()
        raise
    if not {"ledger", "positions", "watermarks"} <= tables:
        conn.close()
        return None
    return conn


def _newest(rows: Iterable[tuple[int, str, str, int, int]]) -> dict[PositionKey, Position]:
    """Each key's row with the largest ``last_seq`` (a symbol's earlier owner may have left an older one)."""
    out: dict[PositionKey, Position] = {}
    for account, asset, symbol, amount, last_seq in rows:
        key = (account, asset, symbol)
        held = out.get(key)
        if held is None or held.last_seq < last_seq:
            out[key] = Position(amount, last_seq)
    return out


class EmbeddedStore:
    """The :class:`~engine.core.store.base.Store` on SQLite. Open with :meth:`open`."""

    read_ahead = False  # a read is the shard's own CPU

    def __init__(self, path: str, own_path: str, conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        self._path = path  # names the store: its other files are found from this name
        self._own_path = own_path  # the file this process writes: ``path``, or its shard's
        self._conn: sqlite3.Connection | None = conn
        self._others: dict[str, sqlite3.Connection] = {}  # the store's other files, opened as they are found
        self._directory = os.path.dirname(os.path.abspath(path))
        self._listed_mtime_ns: int | None = None  # the directory's mtime when a listing found every file it has
        self._busy_timeout_ms = busy_timeout_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-sqlite")

    @classmethod
    async def open(cls, path: str, *, shard: int | None = None,
                   busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> EmbeddedStore:
        """Open the store named ``path``, creating the file this process writes when missing: shard
        ``shard``'s own (:func:`shard_file`), or ``path`` itself without one."""
        own = path if shard is None or path == ":memory:" else shard_file(path, shard)
        try:
            conn = _connect(own, busy_timeout_ms)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"embedded store {own}: cannot open: {e}") from e
        return cls(path, own, conn, busy_timeout_ms)

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"EmbeddedStore({self._own_path!r}, {state})"

    def _other_files(self) -> list[sqlite3.Connection]:
        """Connections to every other file of the store, opening the ones that appeared since the last call.

        The directory is listed again only when its mtime moved (a file was created or removed in it): a shard
        reads positions for nearly every batch below capacity, and a listing cost more than the read."""
        if self._path == ":memory:":
            return []
        try:
            mtime_ns = os.stat(self._directory).st_mtime_ns
        except FileNotFoundError:
            mtime_ns = None
        if mtime_ns is None or mtime_ns != self._listed_mtime_ns:
            listed_ns = time.time_ns()
            complete = True
            for path in store_files(self._path):
                if path != self._own_path and path not in self._others:
                    conn = _open_reader(path, self._busy_timeout_ms)
                    if conn is None:
                        complete = False  # its schema is not committed yet, which leaves the mtime alone
                    else:
                        self._others[path] = conn
            settled = mtime_ns is not None and listed_ns - mtime_ns > _LISTING_SETTLED_NS
            self._listed_mtime_ns = mtime_ns if complete and settled else None
        return list(self._others.values())

    def _everywhere(self, fn: Callable[[sqlite3.Connection], Iterable[T]]) -> Callable[[sqlite3.Connection], list[T]]:
        """``fn``'s rows from every file of the store, this process's own first."""

        def read(conn: sqlite3.Connection) -> list[T]:
            rows = list(fn(conn))
            for other in self._other_files():
                rows.extend(fn(other))
            return rows

        return read

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, threaded: bool = False) -> T:
        """Run ``fn(conn)`` (on the store's thread when ``threaded``), translating SQLite errors into store
        errors."""
        conn = self._conn
        if conn is None:
            raise ClosedError(f"embedded store {self._own_path} is closed")
        try:
            if threaded:
                return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)
            return fn(conn)
        except sqlite3.OperationalError as e:
            # "database is locked" after the busy timeout, disk I/O errors, a full disk: all may pass.
            raise StoreUnavailable(f"embedded store {self._own_path}: {e}; retry later") from e
        except (sqlite3.IntegrityError, sqlite3.DataError, OverflowError) as e:
            raise StoreRejected(f"embedded store {self._own_path}: refused a value: {e}") from e
        except sqlite3.Error as e:
            raise StoreUnavailable(f"embedded store {self._own_path}: {e}") from e

    async def write(self, batch: Batch) -> None:
        ledger = list(map(ledger_row, batch.trades))
        positions = [(a, asset, s, p.amount, p.last_seq) for (a, asset, s), p in batch.positions.items()]
        watermarks = list(batch.watermarks.items())

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(_INSERT_LEDGER, ledger)
            conn.executemany(_UPSERT_POSITION, positions)
            conn.executemany(_UPSERT_WATERMARK, watermarks)

        check_watermarks(batch)
        try:
            await self._run(_transaction(write), threaded=len(ledger) > INLINE_TRADES_MAX)
        except StoreRejected:
            # SQLite refuses an integer beyond 64 bits as it binds it, and the transaction rolls back; the
            # values are checked only then, to name the one that does not fit (a check of every value before
            # every write cost about 0.4 us of CPU a trade).
            check_batch(batch)
            raise

    async def sync(self) -> None:
        path = self._own_path  # the only file this process writes
        if path == ":memory:":
            return

        def fsync_wal(conn: sqlite3.Connection) -> None:
            # fsync flushes a file's dirty pages whichever descriptor wrote them. SQLite's WAL file holds
            # every commit since the last complete checkpoint, which synced the database file itself
            # (synchronous=NORMAL) before the WAL could start over. Never open the database file here:
            # closing any descriptor of it drops this process's POSIX locks on it, and another process
            # closing its connection would then take the WAL for unused and delete it from under us.
            try:
                fd = os.open(path + "-wal", os.O_RDONLY)
            except FileNotFoundError:
                return  # no WAL file: every commit is in the database file, synced by its checkpoint
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        try:
            await self._run(fsync_wal, threaded=True)
        except OSError as e:
            raise StoreUnavailable(f"embedded store {path}: fsync failed: {e}") from e

    async def advance_watermarks(self, watermarks: dict[str, int]) -> None:
        marks = list(watermarks.items())
        await self._run(_transaction(lambda conn: conn.executemany(_UPSERT_WATERMARK, marks)))

    async def load_positions(self, keys: list[PositionKey]) -> dict[PositionKey, Position]:
        wanted = list(dict.fromkeys(keys))

        def load(conn: sqlite3.Connection) -> list[tuple[int, str, str, int, int]]:
            rows: list[tuple[int, str, str, int, int]] = []
            for start in range(0, len(wanted), _KEYS_PER_SELECT):
                chunk = wanted[start : start + _KEYS_PER_SELECT]
                rows.extend(conn.execute(_select_positions(len(chunk)), [part for key in chunk for part in key]))
            return rows

        return _newest(await self._run(self._everywhere(load)))

    async def watermarks(self) -> dict[str, int]:
        rows = await self._run(self._everywhere(lambda conn: conn.execute("SELECT symbol, seq FROM watermarks")))
        out: dict[str, int] = {}
        for symbol, seq in rows:
            out[symbol] = max(seq, out.get(symbol, seq))
        return dict(sorted(out.items()))

    async def balances(self, account: int) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> Iterable[tuple[int, str, str, int, int]]:
            return conn.execute(
                "SELECT account, asset, symbol, amount, last_seq FROM positions WHERE account = ?", (account,)
            )

        positions = _newest(await self._run(self._everywhere(read)))
        # Summed in Python: exact for any number of symbols (SQLite's SUM stops at int64).
        return sum_by_asset((asset, p.amount) for (_, asset, _), p in positions.items())

    async def positions(self) -> dict[PositionKey, Position]:
        def read(conn: sqlite3.Connection) -> Iterable[tuple[int, str, str, int, int]]:
            return conn.execute("SELECT account, asset, symbol, amount, last_seq FROM positions")

        return _newest(await self._run(self._everywhere(read)))

    async def ledger(self, symbol: str) -> list[tuple[int, int]]:
        def read(conn: sqlite3.Connection) -> Iterable[tuple[int, int]]:
            return conn.execute("SELECT seq, trade_id FROM ledger WHERE symbol = ?", (symbol,))

        # A row in two files (written again by a symbol's later owner) is the same row: keep one.
        return sorted(set(await self._run(self._everywhere(read))))

    async def ledger_symbols(self) -> list[str]:
        def read(conn: sqlite3.Connection) -> Iterable[tuple[str]]:
            return conn.execute("SELECT symbol FROM watermarks UNION SELECT DISTINCT symbol FROM ledger")

        return sorted({symbol for (symbol,) in await self._run(self._everywhere(read))})

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(StoreUnavailable):  # the shard's WAL still holds what is not durable
                await self.sync()
        conn, self._conn = self._conn, None
        self._executor.shutdown(wait=True)  # a threaded write still running finishes first
        if conn is not None:
            conn.close()
        others, self._others = list(self._others.values()), {}
        for other in others:
            other.close()
