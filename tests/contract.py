"""The store contract as executable checks, run on every store (embedded and Cassandra).

Each check is a coroutine function taking an :class:`OpenStore`: ``await open_store(name)`` opens a
store object on the database called ``name``. The same name reaches the same database again (as a
second shard process or a restarted one would); a new name is a new, empty database. A test file
parametrizes over :data:`CHECKS` and supplies the factory for its store.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from engine.core.errors import ClosedError, StoreRejected
from engine.core.messages import Trade, check_trade
from engine.core.settlement import Settler
from engine.core.store.base import Batch, Position, PositionKey, Store

OpenStore = Callable[[str], Awaitable[Store]]
FEE = 0  # the fee account
SYMBOLS = ("BTC-USDT", "ETH-USDT", "ETH-BTC")
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# ------------------------------------------------------------------------------------------------ trades

_next_id = iter(range(1, 10**12))


def trade(
    symbol: str,
    seq: int,
    buyer: int,
    seller: int,
    *,
    price: int = 3_000_000,  # 30 000.00 quote per whole base unit (quote scale 2)
    qty: int = 1_000_000,  # 0.01 base (base scale 8)
    buyer_fee: int = 30,
    seller_fee: int = 20,
    trade_id: int | None = None,
) -> Trade:
    """A valid trade (see :func:`engine.core.messages.check_trade`); every other field gets a sane value."""
    ident = next(_next_id) if trade_id is None else trade_id
    made = Trade(
        output_sequence=ident,
        symbol=symbol,
        seq=seq,
        trade_id=ident,
        price=price,
        price_scale=2,
        qty=qty,
        qty_scale=8,
        buyer=buyer,
        seller=seller,
        buy_order_id=ident * 2,
        sell_order_id=ident * 2 + 1,
        taker_side="buy" if ident % 2 else "sell",
        buyer_fee=buyer_fee,
        seller_fee=seller_fee,
        ts_ns=1_700_000_000_000_000_000 + ident,
    )
    reason = check_trade(made)
    assert reason is None, reason
    return made


def stream(
    symbols: Iterable[str], count: int, *, accounts: int = 6, seed: int = 1, first_seq: int = 1
) -> list[Trade]:
    """``count`` trades per symbol, seqs ``first_seq..`` per symbol, interleaved across symbols."""
    rng = random.Random(seed)
    out: list[Trade] = []
    for i in range(count):
        for symbol in symbols:
            price = rng.randrange(1_000, 5_000_000)
            qty = rng.randrange(100_000, 50_000_000)
            value = price * qty // 10**8
            out.append(
                trade(
                    symbol,
                    first_seq + i,
                    rng.randrange(1, accounts + 1),
                    rng.randrange(1, accounts + 1),
                    price=price,
                    qty=qty,
                    buyer_fee=rng.randrange(0, value // 100 + 1),
                    seller_fee=rng.randrange(0, value // 100 + 1),
                )
            )
    return out


def expected_balances(trades: Iterable[Trade], fee_account: int = FEE) -> dict[int, dict[str, int]]:
    """Account -> asset -> amount, computed straight from the trades (independently of the settler)."""
    out: defaultdict[int, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t in trades:
        base, quote = t.symbol.split("-")
        value = t.price * t.qty // 10**t.qty_scale
        out[t.buyer][base] += t.qty
        out[t.buyer][quote] -= value + t.buyer_fee
        out[t.seller][base] -= t.qty
        out[t.seller][quote] += value - t.seller_fee
        out[fee_account][quote] += t.buyer_fee + t.seller_fee
    return {account: _nonzero(assets) for account, assets in out.items() if _nonzero(assets)}


def _nonzero(amounts: dict[str, int]) -> dict[str, int]:
    return {asset: amount for asset, amount in amounts.items() if amount}


# ------------------------------------------------------------------------------------------ store state


@dataclass(frozen=True)
class State:
    positions: dict[PositionKey, Position]
    watermarks: dict[str, int]
    ledgers: dict[str, list[tuple[int, int]]]


async def snapshot(store: Store) -> State:
    symbols = await store.ledger_symbols()
    assert symbols == sorted(set(symbols)), f"ledger_symbols() not sorted and distinct: {symbols}"
    return State(
        positions=await store.positions(),
        watermarks=await store.watermarks(),
        ledgers={symbol: await store.ledger(symbol) for symbol in symbols},
    )


async def balances_of(store: Store, accounts: Iterable[int]) -> dict[int, dict[str, int]]:
    out = {account: _nonzero(await store.balances(account)) for account in accounts}
    return {account: amounts for account, amounts in out.items() if amounts}


async def settle(store: Store, trades: list[Trade], settler: Settler | None = None) -> Batch:
    settler = settler or Settler(store, FEE)
    batch = await settler.prepare(trades)
    await store.write(batch)
    return batch


@asynccontextmanager
async def opened(open_store: OpenStore) -> AsyncIterator[Callable[[str], Awaitable[Store]]]:
    """``async with opened(f) as open_:`` -- every store opened through ``open_`` is closed at the end."""
    stores: list[Store] = []

    async def open_(name: str) -> Store:
        store = await open_store(name)
        stores.append(store)
        return store

    try:
        yield open_
    finally:
        for store in stores:
            await store.close()


def subset(batch: Batch, trades: int, positions: int) -> Batch:
    """What reached the store when a write died part-way: some rows, no watermark."""
    return Batch(batch.trades[:trades], dict(list(batch.positions.items())[:positions]), {})


# ------------------------------------------------------------------------------------------------ checks


async def check_replay_is_idempotent(open_store: OpenStore) -> None:
    trades = stream(SYMBOLS, 30, seed=11)
    async with opened(open_store) as open_:
        store = await open_("main")
        batch = await settle(store, trades)
        once = await snapshot(store)
        assert once.watermarks == dict.fromkeys(SYMBOLS, 30)
        assert {s: [seq for seq, _ in rows] for s, rows in once.ledgers.items()} == {
            symbol: list(range(1, 31)) for symbol in SYMBOLS
        }
        assert await balances_of(store, range(7)) == expected_balances(trades)

        await store.write(batch)  # the same batch again: a retry after a lost acknowledgement
        assert await snapshot(store) == once

        # A restarted shard re-reads the trades from its WAL and settles them again.
        again = await open_("main")
        replayed = await settle(again, trades)
        assert replayed.positions == {}, "a replayed trade must fold to nothing"
        assert await snapshot(again) == once
        assert await balances_of(again, range(7)) == expected_balances(trades)


async def check_crash_mid_batch_then_resettle(open_store: OpenStore) -> None:
    first = stream(SYMBOLS, 10, seed=21)
    second = stream(SYMBOLS, 25, seed=22, first_seq=11)
    async with opened(open_store) as open_:
        reference = await open_("reference")
        await settle(reference, first)
        await settle(reference, second)
        want = await snapshot(reference)

        batch_size = len(second)
        for name, rows, positions in (
            ("crash_a", 0, 1),
            ("crash_b", batch_size // 2, 7),
            ("crash_c", 5, 10**6),
        ):
            store = await open_(name)
            settler = Settler(store, FEE)
            await settle(store, first, settler)
            batch = await settler.prepare(second)
            assert len(batch.positions) > 7
            await store.write(subset(batch, max(rows, 1), positions))  # the shard died here
            partial = await snapshot(store)
            assert partial.watermarks == dict.fromkeys(SYMBOLS, 10), "a watermark ran ahead"

            restarted = await open_(name)  # a fresh process: empty cache, same database
            await settle(restarted, second)
            assert await snapshot(restarted) == want, f"{name}: state differs from settling once"
            assert await balances_of(restarted, range(7)) == expected_balances(first + second)


async def check_stale_replay_changes_nothing(open_store: OpenStore) -> None:
    first = stream(SYMBOLS, 20, seed=31)
    second = stream(SYMBOLS, 20, seed=32, first_seq=21)
    async with opened(open_store) as open_:
        store = await open_("main")
        settler = Settler(store, FEE)
        old = await settle(store, first, settler)
        await settle(store, second, settler)
        newest = await snapshot(store)

        await store.write(old)  # a late retry of an older batch
        assert await snapshot(store) == newest

        # Older rows carrying different amounts lose to newer ones too. (Equal last_seq with a different
        # amount is outside the contract: one symbol's fold is deterministic, so it never happens.)
        forged = {
            key: Position(pos.amount + 1_000, pos.last_seq)
            for key, pos in old.positions.items()
            if pos.last_seq < newest.positions[key].last_seq
        }
        assert len(forged) > 5
        await store.write(Batch(old.trades, forged, old.watermarks))
        assert await snapshot(store) == newest
        assert await balances_of(store, range(7)) == expected_balances(first + second)


async def check_watermarks_never_go_backwards(open_store: OpenStore) -> None:
    async with opened(open_store) as open_:
        store = await open_("main")
        await store.write(Batch([trade("BTC-USDT", 50, 1, 2)], {}, {"BTC-USDT": 50}))
        await store.write(Batch([trade("ETH-USDT", 3, 1, 2)], {}, {"ETH-USDT": 3}))
        await store.write(Batch([trade("BTC-USDT", 10, 1, 2)], {}, {"BTC-USDT": 10}))
        assert await store.watermarks() == {"BTC-USDT": 50, "ETH-USDT": 3}
        await store.write(Batch([trade("BTC-USDT", 51, 1, 2)], {}, {"BTC-USDT": 51}))
        assert await store.watermarks() == {"BTC-USDT": 51, "ETH-USDT": 3}
        other = await open_("main")
        assert await other.watermarks() == {"BTC-USDT": 51, "ETH-USDT": 3}


async def check_balances_sum_over_symbols(open_store: OpenStore) -> None:
    trades = [
        trade("BTC-USDT", 1, 7, 8, price=3_000_000, qty=10_000_000, buyer_fee=300, seller_fee=200),
        trade("ETH-USDT", 1, 7, 9, price=200_000, qty=100_000_000, buyer_fee=20, seller_fee=10),
        trade("ETH-BTC", 1, 9, 7, price=5_000_000, qty=50_000_000, buyer_fee=0, seller_fee=0),
        trade("BTC-USDT", 2, 8, 7, price=3_100_000, qty=2_000_000, buyer_fee=0, seller_fee=62),
    ]
    async with opened(open_store) as open_:
        store = await open_("main")
        await settle(store, trades[:2])
        await settle(store, trades[2:])
        # By hand: account 7 bought 0.1 BTC for 3000.00 USDT (+3.00 fee), bought 1 ETH for 2000.00
        # USDT (+0.20 fee), sold 0.5 ETH for 0.025 BTC, sold 0.02 BTC for 620.00 USDT (-0.62 fee).
        assert _nonzero(await store.balances(7)) == {
            "BTC": 10_000_000 + 2_500_000 - 2_000_000,
            "ETH": 100_000_000 - 50_000_000,
            "USDT": -(300_000 + 300) - (200_000 + 20) + (62_000 - 62),
        }
        assert _nonzero(await store.balances(FEE)) == {"USDT": 300 + 200 + 20 + 10 + 62}
        assert await balances_of(store, range(10)) == expected_balances(trades)
        assert await store.balances(12345) == {}
        positions = await store.positions()
        assert {key for key in positions if key[0] == 7} == {
            (7, "BTC", "BTC-USDT"),
            (7, "USDT", "BTC-USDT"),
            (7, "ETH", "ETH-USDT"),
            (7, "USDT", "ETH-USDT"),
            (7, "ETH", "ETH-BTC"),
            (7, "BTC", "ETH-BTC"),
        }


async def check_conservation(open_store: OpenStore) -> None:
    trades = stream(SYMBOLS, 60, accounts=12, seed=41)
    async with opened(open_store) as open_:
        store = await open_("main")
        settler = Settler(store, FEE)
        for start in range(0, len(trades), 37):
            await settle(store, trades[start : start + 37], settler)
        totals: defaultdict[str, int] = defaultdict(int)
        for (_, asset, _), position in (await store.positions()).items():
            totals[asset] += position.amount
        assert dict(totals) == {"BTC": 0, "ETH": 0, "USDT": 0}
        per_account: defaultdict[str, int] = defaultdict(int)
        for account in range(13):
            for asset, amount in (await store.balances(account)).items():
                per_account[asset] += amount
        assert dict(per_account) == {"BTC": 0, "ETH": 0, "USDT": 0}
        assert await balances_of(store, range(13)) == expected_balances(trades)


async def check_out_of_range_values_rejected(open_store: OpenStore) -> None:
    async with opened(open_store) as open_:
        store = await open_("main")
        await settle(store, stream(["BTC-USDT"], 5, seed=51))
        before = await snapshot(store)
        t = trade("BTC-USDT", 6, 1, 2)
        for amount in (2**63, -(2**63) - 1, 2**70):
            bad = Batch([t], {(1, "BTC", "BTC-USDT"): Position(amount, 6)}, {"BTC-USDT": 6})
            with pytest.raises(StoreRejected, match=r"account 1, asset BTC, symbol BTC-USDT.*amount.*64-bit"):
                await store.write(bad)
        huge = msgspec.structs.replace(t, price=2**63)  # bypasses msgspec's bounds, as a bug could
        with pytest.raises(StoreRejected, match=r"BTC-USDT seq 6: price = 9223372036854775808.*64-bit"):
            await store.write(Batch([huge], {}, {"BTC-USDT": 6}))
        assert await snapshot(store) == before, "a rejected batch must leave no trace"

        # The bounds themselves are representable and read back exactly.
        edges = {
            (1, "XMIN", "ETH-BTC"): Position(INT64_MIN, 1),
            (1, "XMAX", "ETH-BTC"): Position(INT64_MAX, 1),
        }
        await store.write(Batch([trade("ETH-BTC", 1, 1, 2)], edges, {"ETH-BTC": 1}))
        assert await store.load_positions(list(edges)) == edges
        assert (await store.balances(1))["XMAX"] == INT64_MAX


async def check_load_positions_returns_what_was_written(open_store: OpenStore) -> None:
    trades = stream(SYMBOLS, 15, accounts=8, seed=61)
    async with opened(open_store) as open_:
        store = await open_("main")
        assert await store.load_positions([]) == {}
        assert await store.load_positions([(1, "BTC", "BTC-USDT")]) == {}
        batch = await settle(store, trades)
        written = batch.positions
        assert written == await store.positions()
        absent = [(1, "DOGE", "BTC-USDT"), (99, "BTC", "BTC-USDT"), (1, "BTC", "XRP-USDT")]
        keys = list(written) + absent
        random.Random(62).shuffle(keys)
        assert await store.load_positions(keys) == written
        some = list(written)[:3]
        assert await store.load_positions(some + some) == {key: written[key] for key in some}
        other = await open_("main")
        assert await other.load_positions(list(written)) == written

        # One account holding many assets (more than a CQL IN list may name) and many symbols.
        wide = {(5000, f"A{i}", symbol): Position(i - 60, 3) for i in range(130) for symbol in SYMBOLS}
        await store.write(Batch([trade("BTC-USDT", 3, 1, 2)], wide, {}))
        asked = [key for key in wide if key[1] != "A7"] + [(5000, "A7", "XRP-USDT")]
        assert await other.load_positions(asked) == {key: wide[key] for key in asked if key in wide}
        assert _nonzero(await other.balances(5000)) == {f"A{i}": (i - 60) * 3 for i in range(130) if i != 60}


async def check_load_positions_of_many_accounts(open_store: OpenStore) -> None:
    """A read of hundreds of accounts (a shard's first batches) finds each asked position, whatever requests the
    store splits it into, and nothing it was not asked for; accounts asking for different assets mixed."""
    rng = random.Random(71)
    rows = {(account, asset, symbol): Position(rng.randrange(-10**9, 10**9), rng.randrange(1, 10**6))
            for account in range(1, 301) for asset in (f"C{account % 7}", "USDT", "BTC") for symbol in SYMBOLS[:2]}
    async with opened(open_store) as open_:
        store = await open_("main")
        await store.write(Batch([trade("BTC-USDT", 1, 1, 2)], rows, {}))
        asked = [key for key in rows if rng.random() < 0.7]
        asked += [(account, "ZZZ", SYMBOLS[0]) for account in range(1, 301, 3)]  # absent assets
        asked += [(account, "USDT", SYMBOLS[0]) for account in range(1000, 1200)]  # absent accounts
        rng.shuffle(asked)
        reader = await open_("main")
        assert await reader.load_positions(list(rows)) == rows
        assert await reader.load_positions(asked) == {key: rows[key] for key in asked if key in rows}


async def check_ledger_lists_seqs_in_order(open_store: OpenStore) -> None:
    # Sequences spanning several 100 000-seq ledger buckets (the CQL store partitions by them),
    # written newest batch first.
    seqs = [1, 2, 99_999, 100_000, 100_001, 250_000, 1_000_000_000_001]
    trades = [trade("BTC-USDT", seq, 1, 2, trade_id=seq * 10) for seq in seqs]
    async with opened(open_store) as open_:
        store = await open_("main")
        await store.write(Batch(trades[4:], {}, {"BTC-USDT": seqs[-1]}))
        await store.write(Batch(trades[:4], {}, {"BTC-USDT": seqs[3]}))
        await store.write(Batch([trade("ETH-USDT", 1, 1, 2, trade_id=77)], {}, {}))  # no watermark yet
        await store.write(Batch([trade("ETH-BTC", 4, 1, 2, trade_id=78)], {}, {"ETH-BTC": 4}))
        assert await store.ledger("BTC-USDT") == [(seq, seq * 10) for seq in seqs]
        assert await store.ledger("ETH-USDT") == [(1, 77)]
        assert await store.ledger("XRP-USDT") == []
        assert await store.ledger_symbols() == sorted(SYMBOLS)
        assert await store.watermarks() == {"BTC-USDT": seqs[-1], "ETH-BTC": 4}
        other = await open_("main")
        assert await other.ledger("BTC-USDT") == [(seq, seq * 10) for seq in seqs]


async def check_close_is_idempotent(open_store: OpenStore) -> None:
    store = await open_store("main")
    await store.write(Batch([trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1}))
    await store.close()
    await store.close()
    with pytest.raises(ClosedError):
        await store.write(Batch([trade("BTC-USDT", 2, 1, 2)], {}, {"BTC-USDT": 2}))
    with pytest.raises(ClosedError):
        await store.watermarks()
    async with opened(open_store) as open_:
        assert await (await open_("main")).watermarks() == {"BTC-USDT": 1}


async def check_a_write_is_visible_before_sync(open_store: OpenStore) -> None:
    """Readers see a write as soon as it returns; ``sync`` (durability) is not needed for that."""
    async with opened(open_store) as open_:
        store, reader = await open_("main"), await open_("main")
        batch = await settle(store, stream(SYMBOLS, 5, accounts=4, seed=71))
        assert await reader.load_positions(list(batch.positions)) == batch.positions
        await store.sync()  # the batch's watermarks may wait for it (or for the next write)
        assert await reader.watermarks() == batch.watermarks
        await store.sync()  # nothing new: still fine
        assert await reader.watermarks() == batch.watermarks


async def check_watermarks_reach_readers_with_the_next_write_or_sync(open_store: OpenStore) -> None:
    """A write's watermarks may wait for the next write or ``sync``, never longer; then every reader sees
    them, and a watermark never covers a batch still being written."""
    async with opened(open_store) as open_:
        store, reader = await open_("main"), await open_("main")
        await store.write(Batch([trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1}))
        await store.write(Batch([trade("BTC-USDT", 2, 1, 2), trade("ETH-USDT", 7, 1, 2)], {},
                                {"BTC-USDT": 2, "ETH-USDT": 7}))
        assert (await reader.watermarks()).get("BTC-USDT", 0) >= 1
        await store.advance_watermarks({"BTC-USDT": 3})  # a batch written without its watermarks
        await store.sync()
        assert await reader.watermarks() == {"BTC-USDT": 3, "ETH-USDT": 7}


Check = Callable[[OpenStore], Coroutine[Any, Any, None]]

CHECKS: list[Check] = [
    check_replay_is_idempotent,
    check_crash_mid_batch_then_resettle,
    check_stale_replay_changes_nothing,
    check_watermarks_never_go_backwards,
    check_balances_sum_over_symbols,
    check_conservation,
    check_out_of_range_values_rejected,
    check_load_positions_returns_what_was_written,
    check_load_positions_of_many_accounts,
    check_ledger_lists_seqs_in_order,
    check_close_is_idempotent,
    check_a_write_is_visible_before_sync,
    check_watermarks_reach_readers_with_the_next_write_or_sync,
]


def check_id(check: Callable[..., object]) -> str:
    return getattr(check, "__name__", repr(check)).removeprefix("check_")
