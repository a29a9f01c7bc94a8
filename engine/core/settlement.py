"""The settlement arithmetic, and folding trades into absolute positions idempotently.

For a trade on ``BASE-QUOTE`` with ``n = price * qty // 10**qty_scale`` (quote minor units, rounded
down), all amounts in minor units:

=============  ======================  ============================
account        BASE                    QUOTE
=============  ======================  ============================
buyer          ``+qty``                ``-(n + buyer_fee)``
seller         ``-qty``                ``+(n - seller_fee)``
fee account    0                       ``+(buyer_fee + seller_fee)``
=============  ======================  ============================

Every column sums to zero, so every asset's total over all accounts is conserved.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable

from engine.core.messages import POW10, SCALE_MAX, Trade, notional, split_symbol
from engine.core.store.base import ZERO, Batch, Position, PositionKey, Store

log = logging.getLogger("settle.settler")


def deltas(trade: Trade, fee_account: int) -> dict[tuple[int, str], int]:
    """(account, asset) -> change in minor units. Entries for the same account are merged."""
    base, quote = split_symbol(trade.symbol)
    value = notional(trade)
    out: defaultdict[tuple[int, str], int] = defaultdict(int)
    out[(trade.buyer, base)] += trade.qty
    out[(trade.buyer, quote)] -= value + trade.buyer_fee
    out[(trade.seller, base)] -= trade.qty
    out[(trade.seller, quote)] += value - trade.seller_fee
    fees = trade.buyer_fee + trade.seller_fee
    if fees:
        out[(fee_account, quote)] += fees
    return dict(out)


def position_keys(trades: Iterable[Trade], fee_account: int) -> set[PositionKey]:
    keys: set[PositionKey] = set()
    for trade in trades:
        for account, asset in deltas(trade, fee_account):
            keys.add((account, asset, trade.symbol))
    return keys


class _Cached:
    """A cached position: its amount and ``last_seq``, updated in place as trades fold, its store key, and the
    last batch that changed it (:meth:`Settler.prepare`)."""

    __slots__ = ("amount", "last_seq", "key", "batch")

    def __init__(self, amount: int, last_seq: int, key: PositionKey) -> None:
        self.amount = amount
        self.last_seq = last_seq
        self.key = key
        self.batch = 0


class _Book:
    """One symbol's cached positions: ``account * 2`` holds the base asset, ``account * 2 + 1`` the quote."""

    __slots__ = ("symbol", "base", "quote", "plain", "positions", "reading")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.base, self.quote = split_symbol(symbol)
        self.plain = self.base != self.quote  # the unrolled arithmetic applies (see Settler._plan)
        self.positions: dict[int, _Cached] = {}  # by int key
        self.reading: dict[int, asyncio.Task[None]] = {}  # int key -> the read ahead that fetches it

    def key(self, ikey: int) -> PositionKey:
        account, quote = divmod(ikey, 2)
        return account, self.quote if quote else self.base, self.symbol

    def ikey(self, account: int, asset: str) -> int:
        return account * 2 + (asset != self.base)


class Settler:
    """Turns batches of trades into store batches of absolute positions.

    The settler holds the positions of its shard's symbols in memory (it is their only writer) and
    reads a position from the store the first time it touches it. A trade changes a position only when
    its sequence is above the position's ``last_seq``: a position already holding that trade (a batch
    that partly reached the store before a crash) is left as it is.

    This is the shard's hot path, so the cache is shaped for it: per symbol, integer keys
    (:class:`_Book`) and :class:`_Cached` entries updated in place, each holding its store key; a batch
    gets one :class:`Position` per key it touched, made once at the end. The arithmetic is :func:`deltas`,
    unrolled for the common case (buyer, seller and fee account all distinct).
    """

    def __init__(self, store: Store, fee_account: int) -> None:
        self._store = store
        self._fee_account = fee_account
        self._books: dict[str, _Book] = {}
        self._batches = 0  # batches prepared
        self._reads_ahead: set[asyncio.Task[None]] = set()

    def _book(self, symbol: str) -> _Book:
        book = self._books.get(symbol)
        if book is None:
            book = self._books[symbol] = _Book(symbol)
        return book

    @property
    def cached_positions(self) -> int:
        return sum(len(book.positions) for book in self._books.values())

    def _plan(self, trade: Trade, book: _Book) -> tuple[int, ...]:
        """``(ikey, change, ikey, change, ...)`` of one trade, entries for the same key merged."""
        buyer, seller, fee, scale = trade.buyer, trade.seller, self._fee_account, trade.qty_scale
        if book.plain and buyer != seller and fee != buyer and fee != seller and 0 <= scale <= SCALE_MAX:
            qty, buyer_fee, seller_fee = trade.qty, trade.buyer_fee, trade.seller_fee
            value = trade.price * qty // POW10[scale]
            b, s = buyer * 2, seller * 2
            fees = buyer_fee + seller_fee
            if fees:
                return b, qty, b + 1, -(value + buyer_fee), s, -qty, s + 1, value - seller_fee, fee * 2 + 1, fees
            return b, qty, b + 1, -value, s, -qty, s + 1, value
        out: list[int] = []
        for (account, asset), change in deltas(trade, fee).items():
            out += (book.ikey(account, asset), change)
        return tuple(out)

    async def prepare(self, trades: list[Trade]) -> Batch:
        """Fold ``trades`` (each symbol's in sequence order) into a store batch.

        The cache moves forward at once: when ``store.write(batch)`` fails, retry that same batch until
        it succeeds; never prepare the same trades again (they would fold to nothing). Nothing is folded
        before every position the batch touches is cached: a failed read leaves the cache as it was.
        """
        books = self._books
        plan = self._plan
        fee = self._fee_account
        fee_quote = fee * 2 + 1
        missing: dict[_Book, set[int]] = {}
        for trade in trades:
            book = books.get(trade.symbol) or self._book(trade.symbol)
            positions = book.positions
            b, s = trade.buyer * 2, trade.seller * 2
            if book.plain and b in positions and b + 1 in positions and s in positions and s + 1 in positions \
                    and fee_quote in positions:
                continue  # the usual case once warm: every key a trade of this book can touch is cached
            for ikey in plan(trade, book)[::2]:
                if ikey not in positions:
                    absent = missing.get(book)
                    if absent is None:
                        absent = missing[book] = set()
                    absent.add(ikey)
        if missing:
            await self._read_missing(missing)
        self._batches += 1
        stamp = self._batches  # marks the positions this batch changed, so each is listed once
        touched: list[_Cached] = []
        watermarks: dict[str, int] = {}
        for trade in trades:
            symbol, seq = trade.symbol, trade.seq
            assert watermarks.get(symbol, 0) < seq, f"{symbol} seq {seq} out of order in a batch"
            watermarks[symbol] = seq
            book = books[symbol]
            positions = book.positions
            changes = iter(plan(trade, book))
            for ikey, change in zip(changes, changes, strict=True):  # (ikey, change) pairs
                current = positions[ikey]
                if seq > current.last_seq:
                    current.amount += change
                    current.last_seq = seq
                    if current.batch != stamp:
                        current.batch = stamp
                        touched.append(current)
        return Batch(trades, {c.key: Position(c.amount, c.last_seq) for c in touched}, watermarks)

    async def _read_missing(self, missing: dict[_Book, set[int]]) -> None:
        """Cache the positions ``missing``: wait for the reads ahead that fetch some of them, read the rest."""
        ahead = {book.reading[ikey] for book, absent in missing.items() for ikey in absent if ikey in book.reading}
        if ahead:
            await asyncio.wait(ahead)
        wanted = {book.key(ikey): (book, ikey)
                  for book, absent in missing.items() for ikey in absent if ikey not in book.positions}
        if wanted:  # not read ahead, or that read failed: this one's errors are prepare's (the caller retries)
            await self._read(wanted)

    async def _read(self, wanted: dict[PositionKey, tuple[_Book, int]]) -> None:
        """Read positions into the cache. Only keys still absent are filled: a key read twice (ahead and by
        prepare) may already hold trades folded since, and the store's row never does."""
        loaded = await self._store.load_positions(list(wanted))
        for key, (book, ikey) in wanted.items():
            if ikey not in book.positions:
                row = loaded.get(key, ZERO)
                book.positions[ikey] = _Cached(row.amount, row.last_seq, key)

    def read_ahead(self, trades: list[Trade]) -> None:
        """Start reading the positions ``trades`` will touch that are neither cached nor being read, and
        return at once: :meth:`prepare` then finds them cached, or waits for this read instead of starting
        its own. A shard calls it as the trades' WAL commit starts, so on a store whose reads wait on the
        network the read overlaps the fdatasync. A read ahead that fails is only logged: prepare reads what
        is still missing, and retries or stops as it always does."""
        wanted: dict[PositionKey, tuple[_Book, int]] = {}
        books = self._books
        for trade in trades:
            book = books.get(trade.symbol) or self._book(trade.symbol)
            positions = book.positions
            b, s = trade.buyer * 2, trade.seller * 2
            if b in positions and b + 1 in positions and s in positions and s + 1 in positions:
                continue  # the usual case once warm (the fee account's key is cached after its first trade)
            reading = book.reading
            for ikey in self._plan(trade, book)[::2]:
                if ikey not in positions and ikey not in reading:
                    wanted[book.key(ikey)] = (book, ikey)
        if not wanted:
            return
        task = asyncio.ensure_future(self._read_quietly(wanted))
        for book, ikey in wanted.values():
            book.reading[ikey] = task
        self._reads_ahead.add(task)
        task.add_done_callback(self._reads_ahead.discard)

    async def _read_quietly(self, wanted: dict[PositionKey, tuple[_Book, int]]) -> None:
        try:
            await self._read(wanted)
        except Exception as e:  # noqa: BLE001 - prepare reads these keys again and handles its own errors
            log.debug("reading %d positions ahead failed (prepare reads them): %s", len(wanted), e)
        finally:
            me = asyncio.current_task()
            for book, ikey in wanted.values():
                if book.reading.get(ikey) is me:
                    del book.reading[ikey]

    def forget(self) -> None:
        """Drop the cache (after the store may have been written by someone else, e.g. offline recover), and
        the reads ahead under way."""
        for task in self._reads_ahead:
            task.cancel()
        self._books.clear()
