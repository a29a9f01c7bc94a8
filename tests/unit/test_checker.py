"""The invariant checker against an in-memory store settled from a generated ME log.

The store is settled with the engine's own Settler, so the exact case also cross-checks the engine's
arithmetic against the checker's independent one; every other case breaks the store on purpose.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from msgspec.structs import replace

from engine.core.messages import Trade, encoder, split_symbol
from engine.core.settlement import Settler, deltas
from engine.sim.melog import MeLog, read_all
from engine.sim.mesim import TradeGenerator, sim_config
from engine.verify.checker import CheckReport, check, expected_balances
from tests.memorystore import MemoryStore

FEE = 0
TRADES = 3000




@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Trade]]:
    path = str(tmp_path_factory.mktemp("checker") / "me.log")
    generator = TradeGenerator(sim_config(seed=21, symbols=6, accounts=40, skew=0.7))
    with MeLog(path) as melog:
        for _ in range(TRADES):
            trade, _ = generator.next()
            melog.append(encoder.encode(trade), trade)
    return path, list(read_all(path))


def settle(trades: list[Trade], batch_trades: int = 250) -> MemoryStore:
    async def go() -> MemoryStore:
        store = MemoryStore()
        settler = Settler(store, FEE)
        for start in range(0, len(trades), batch_trades):
            await store.write(await settler.prepare(trades[start : start + batch_trades]))
        return store

    return asyncio.run(go())


def run_check(path: str, store: MemoryStore, expect_complete: bool = True) -> CheckReport:
    return asyncio.run(check(path, store, FEE, expect_complete=expect_complete))


def test_exact_settlement_passes(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    report = run_check(path, settle(trades))
    assert report.ok, report.format()
    assert (report.published, report.settled, report.missing_count) == (TRADES, TRADES, 0)
    assert report.conservation == {}
    assert report.assets == len({a for t in trades for a in split_symbol(t.symbol)})
    assert report.format().startswith(f"OK: published {TRADES}, settled {TRADES}, missing 0, unexpected 0")
    assert f"assets conserved: {report.assets}/{report.assets}" in report.format()


def test_expected_balances_agree_with_the_engine_and_sum_to_zero(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    ours: dict[tuple[int, str], int] = defaultdict(int)
    for trade in trades:
        for key, change in deltas(trade, FEE).items():
            ours[key] += change
    theirs = expected_balances(path, FEE)
    assert {k: v for k, v in theirs.items() if v} == {k: v for k, v in ours.items() if v}
    totals: dict[str, int] = defaultdict(int)
    for (_, asset), amount in theirs.items():
        totals[asset] += amount
    assert set(totals.values()) == {0}
    assert theirs[(FEE, "USDT")] > 0


def test_a_trade_missing_from_ledger_and_balances(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    lost = trades[1234]
    report = run_check(path, settle(trades[:1234] + trades[1235:]))
    assert not report.ok
    assert report.missing == [(lost.symbol, lost.seq)]
    assert (report.missing_count, report.settled) == (1, TRADES - 1)
    mismatched = {(account, asset) for account, asset, _, _ in report.balance_mismatches}
    assert (lost.buyer, split_symbol(lost.symbol)[0]) in mismatched
    assert (lost.seller, split_symbol(lost.symbol)[1]) in mismatched
    assert "missing 1" in report.format()


def test_a_trade_applied_twice_is_a_balance_mismatch(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    store = settle(trades)
    twice = trades[42]
    for (account, asset), change in deltas(twice, FEE).items():
        key = (account, asset, twice.symbol)
        store.rows[key] = replace(store.rows[key], amount=store.rows[key].amount + change)
    report = run_check(path, store)
    assert not report.ok
    base, quote = split_symbol(twice.symbol)
    found = {(a, asset): have - want for a, asset, want, have in report.balance_mismatches}
    assert found[(twice.buyer, base)] == twice.qty
    assert found[(twice.seller, base)] == -twice.qty
    assert report.conservation == {}  # doubling conserves: only the balances can tell
    assert report.missing_count == report.unexpected_count == 0


def test_one_minor_unit_off_breaks_balance_and_conservation(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    store = settle(trades)
    key = sorted(store.rows)[7]
    store.rows[key] = replace(store.rows[key], amount=store.rows[key].amount + 1)
    report = run_check(path, store)
    assert not report.ok
    account, asset, _ = key
    assert report.balance_mismatch_count == 1
    ((who, what, want, have),) = report.balance_mismatches
    assert (who, what, have - want) == (account, asset, 1)
    assert report.conservation == {asset: 1}
    assert f"conservation: {asset} sums to 1" in report.format()


def test_money_from_nowhere_breaks_conservation(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    store = settle(trades)
    store.rows[(FEE, "USDT", "BTC-USDT")] = replace(
        store.rows[(FEE, "USDT", "BTC-USDT")], amount=store.rows[(FEE, "USDT", "BTC-USDT")].amount + 500
    )
    report = run_check(path, store)
    assert report.conservation == {"USDT": 500}
    assert (FEE, "USDT") in {(a, asset) for a, asset, _, _ in report.balance_mismatches}


def test_watermark_behind_and_ledger_row_from_nowhere(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    store = settle(trades)
    symbol = trades[0].symbol
    latest = max(t.seq for t in trades if t.symbol == symbol)
    store.marks[symbol] = latest - 1
    store.ledger_rows[symbol][latest + 3] = 999_999
    store.ledger_rows[symbol][5] = 123  # the wrong trade_id
    report = run_check(path, store)
    assert report.watermark_errors == [(symbol, latest - 1, latest)]
    unexpected = {(s, seq) for s, seq, _ in report.unexpected}
    assert unexpected == {(symbol, latest + 3), (symbol, 5)}
    assert (symbol, 5) in report.missing
    # The rows whose last trade is the symbol's latest are now past the watermark: order errors too.
    assert any(why.startswith("past the watermark") for *_, why in report.order_errors)


def test_a_position_naming_a_trade_that_never_touched_it(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    store = settle(trades)
    key, row = next((k, r) for k, r in sorted(store.rows.items()) if k[0] != FEE)
    account, asset, symbol = key
    untouched = next(
        t.seq
        for t in trades
        if t.symbol == symbol and t.seq < row.last_seq and account not in (t.buyer, t.seller)
    )
    store.rows[key] = replace(row, last_seq=untouched)
    report = run_check(path, store)
    assert (
        symbol,
        account,
        asset,
        untouched,
        "no trade of that seq touches this position",
    ) in report.order_errors


def test_partial_settlement_passes_only_as_partial(log: tuple[str, list[Trade]]) -> None:
    path, trades = log
    store = settle(trades[:1800])
    partial = run_check(path, store, expect_complete=False)
    assert partial.ok, partial.format()
    assert partial.pending == TRADES - 1800
    assert partial.missing_count == 0
    complete = run_check(path, store)
    assert not complete.ok
    assert complete.missing_count == TRADES - 1800
    assert len(complete.missing) == 100  # capped list, full count
    # A position ahead of its trades is caught in partial mode too.
    key = sorted(store.rows)[3]
    store.rows[key] = replace(store.rows[key], amount=store.rows[key].amount - 1)
    assert run_check(path, store, expect_complete=False).balance_mismatch_count == 1
