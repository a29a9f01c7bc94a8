"""The invariant checker: proves from the ME's log and the store alone that settlement was exact.

It trusts none of the engine's code: the settlement arithmetic is re-derived here from its documented
definition (``engine/core/settlement.py``'s docstring), and the only inputs are the ME log (read with
:func:`engine.sim.melog.read_all`) and what the store answers through the Store protocol.

For a trade on ``BASE-QUOTE`` with ``n = price * qty // 10**qty_scale``:

    buyer   +qty BASE   -(n + buyer_fee) QUOTE
    seller  -qty BASE   +(n - seller_fee) QUOTE
    fee account          +(buyer_fee + seller_fee) QUOTE   (only when the fees are not zero)

Checks, each reported separately:

- every logged trade has a ledger row with its ``trade_id`` (``missing``; with
  ``expect_complete=False`` only those up to the symbol's watermark), and no ledger row is unknown
  to the log or has another ``trade_id`` (``unexpected``);
- every account's balance of every asset (the sum of its position rows) is what the log implies
  (``balance_mismatches``); with ``expect_complete=False``, what the trades up to each position row's
  ``last_seq`` imply, so a store caught mid-way is checked too;
- every asset sums to zero over all accounts, fee account included (``conservation``);
- every watermark equals the symbol's latest logged seq, never passes it (``watermark_errors``);
- every position row's ``last_seq`` is a trade of that symbol touching that (account, asset), is not
  past the watermark, and (complete) is the last such trade (``order_errors``): a row that names a
  trade which never touched it was applied out of order or from nowhere.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from engine.core.store.base import Position, PositionKey, Store
from engine.sim.melog import read_all

LIST_MAX: Final = 100  # examples kept per kind of finding; the counts cover all of them

Balances = dict[tuple[int, str], int]
Missing = tuple[str, int]  # (symbol, seq)
Unexpected = tuple[str, int, str]  # (symbol, seq, why)
Mismatch = tuple[int, str, int, int]  # (account, asset, expected, actual)
OrderError = tuple[str, int, str, int, str]  # (symbol, account, asset, last_seq, why)
T = TypeVar("T")


def _changes(trade_symbol: str, price: int, qty: int, qty_scale: int, buyer: int, seller: int,
             buyer_fee: int, seller_fee: int, fee_account: int) -> list[tuple[int, str, int]]:  # fmt: skip
    """``(account, asset, change)`` of one trade, straight from the table above."""
    base, _, quote = trade_symbol.partition("-")
    n = price * qty // 10**qty_scale
    changes = [
        (buyer, base, qty),
        (buyer, quote, -(n + buyer_fee)),
        (seller, base, -qty),
        (seller, quote, n - seller_fee),
    ]
    if buyer_fee + seller_fee:
        changes.append((fee_account, quote, buyer_fee + seller_fee))
    return changes


def expected_balances(log_path: str, fee_account: int = 0) -> Balances:
    """``(account, asset) -> amount`` after every trade in the log (zero balances included)."""
    balances: defaultdict[tuple[int, str], int] = defaultdict(int)
    for t in read_all(log_path):
        for account, asset, change in _changes(
            t.symbol, t.price, t.qty, t.qty_scale, t.buyer, t.seller, t.buyer_fee, t.seller_fee, fee_account
        ):
            balances[(account, asset)] += change
    return dict(balances)


@dataclass(slots=True)
class _Found(Generic[T]):
    """A capped list of examples and the count of all of them."""

    items: list[T] = field(default_factory=list)
    count: int = 0

    def add(self, item: T) -> None:
        self.count += 1
        if len(self.items) < LIST_MAX:
            self.items.append(item)


@dataclass(frozen=True, slots=True)
class CheckReport:
    published: int  # trades in the ME log
    settled: int  # of them, with a ledger row carrying their trade_id
    pending: int  # partial check: logged trades past their symbol's watermark without a ledger row
    missing: list[Missing]  # trades that must be settled but have no matching ledger row (first 100)
    missing_count: int
    unexpected: list[Unexpected]  # ledger rows the log does not explain
    unexpected_count: int
    balance_mismatches: list[Mismatch]
    balance_mismatch_count: int
    conservation: dict[str, int]  # asset -> nonzero sum over all accounts
    assets: int  # assets seen in the log or the store
    watermark_errors: list[tuple[str, int, int]]  # (symbol, watermark, ME latest seq)
    order_errors: list[OrderError]
    order_error_count: int
    expect_complete: bool

    @property
    def ok(self) -> bool:
        return not (
            self.missing_count
            or self.unexpected_count
            or self.balance_mismatch_count
            or self.conservation
            or self.watermark_errors
            or self.order_error_count
        )

    def format(self) -> str:
        conserved = self.assets - len(self.conservation)
        lines = [
            f"{'OK' if self.ok else 'FAILED'}: published {self.published}, settled {self.settled}, "
            f"missing {self.missing_count}, unexpected {self.unexpected_count}, "
            f"balance mismatches {self.balance_mismatch_count}, assets conserved: {conserved}/{self.assets}, "
            f"watermark errors {len(self.watermark_errors)}, order errors {self.order_error_count}"
            + ("" if self.expect_complete else f", pending {self.pending} (partial check)")
        ]
        for symbol, seq in self.missing[:10]:
            lines.append(f"  missing: {symbol} seq {seq} is in the ME log but not settled")
        for symbol, seq, why in self.unexpected[:10]:
            lines.append(f"  unexpected: {symbol} seq {seq}: {why}")
        for account, asset, expected, actual in self.balance_mismatches[:10]:
            lines.append(
                f"  balance: account {account} {asset} is {actual}, "
                f"expected {expected} ({actual - expected:+d})"
            )
        for asset, total in sorted(self.conservation.items()):
            lines.append(f"  conservation: {asset} sums to {total} over all accounts, not 0")
        for symbol, watermark, latest in self.watermark_errors[:10]:
            lines.append(f"  watermark: {symbol} is at {watermark}, the ME's latest seq is {latest}")
        for symbol, account, asset, last_seq, why in self.order_errors[:10]:
            lines.append(f"  order: position ({account}, {asset}, {symbol}) last_seq {last_seq}: {why}")
        return "\n".join(lines)


@dataclass(slots=True)
class _LogPass:
    published: int = 0
    latest: dict[str, int] = field(default_factory=dict)
    totals: defaultdict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    at_last_seq: defaultdict[PositionKey, int] = field(default_factory=lambda: defaultdict(int))
    last_touch: dict[PositionKey, int] = field(default_factory=dict)  # key -> last seq that touched it
    named_touch: set[PositionKey] = field(default_factory=set)  # rows whose last_seq touched them
    assets: set[str] = field(default_factory=set)
    settled: int = 0
    pending: int = 0
    missing: _Found[Missing] = field(default_factory=_Found)
    unexpected: _Found[Unexpected] = field(default_factory=_Found)


def _pass_over_log(
    log_path: str,
    fee_account: int,
    positions: dict[PositionKey, Position],
    ledger: dict[str, list[tuple[int, int]]],
    settled_up_to: dict[str, int] | None,
) -> _LogPass:
    """One streaming pass over the log: balances, per-row folds, and the ledger merged by seq.

    ``settled_up_to``: symbol -> the seq up to which every trade must have a ledger row (None: all).
    """
    out = _LogPass()
    cursors: dict[str, int] = defaultdict(int)  # symbol -> index of the next unmatched ledger row
    for t in read_all(log_path):
        out.published += 1
        symbol, seq = t.symbol, t.seq
        out.latest[symbol] = seq
        # The ledger, merged with the log (both in seq order per symbol).
        rows = ledger.get(symbol, ())
        i = cursors[symbol]
        while i < len(rows) and rows[i][0] < seq:
            out.unexpected.add((symbol, rows[i][0], "a second ledger row for this seq, or one out of order"))
            i += 1
        if i < len(rows) and rows[i][0] == seq:
            if rows[i][1] == t.trade_id:
                out.settled += 1
            else:
                why = f"ledger trade_id {rows[i][1]}, the log's is {t.trade_id}"
                out.unexpected.add((symbol, seq, why))
                out.missing.add((symbol, seq))
            i += 1
        elif settled_up_to is None or seq <= settled_up_to.get(symbol, 0):
            out.missing.add((symbol, seq))
        else:
            out.pending += 1
        cursors[symbol] = i
        # Balances.
        for account, asset, change in _changes(
            symbol, t.price, t.qty, t.qty_scale, t.buyer, t.seller, t.buyer_fee, t.seller_fee, fee_account
        ):
            out.assets.add(asset)
            out.totals[(account, asset)] += change
            key = (account, asset, symbol)
            out.last_touch[key] = seq
            row = positions.get(key)
            if row is not None and seq <= row.last_seq:
                out.at_last_seq[key] += change
                if seq == row.last_seq:
                    out.named_touch.add(key)
    for symbol, rows in ledger.items():
        latest = out.latest.get(symbol, 0)
        for seq, _ in rows[cursors.get(symbol, 0) :]:
            why = "past the ME's latest seq" if seq > latest else "ledger row the log does not reach in order"
            out.unexpected.add((symbol, seq, why))
    return out


async def check(
    log_path: str, store: Store, fee_account: int = 0, *, expect_complete: bool = True
) -> CheckReport:
    """Audit ``store`` against the ME log at ``log_path``. ``expect_complete``: every logged trade must
    be settled and every watermark at the ME's latest seq; without it, a store caught mid-way passes
    when everything it holds is exact."""
    positions = await store.positions()
    watermarks = await store.watermarks()
    ledger = {symbol: await store.ledger(symbol) for symbol in await store.ledger_symbols()}
    settled_up_to = None if expect_complete else watermarks
    log = await asyncio.to_thread(_pass_over_log, log_path, fee_account, positions, ledger, settled_up_to)

    actual: defaultdict[tuple[int, str], int] = defaultdict(int)
    partial: defaultdict[tuple[int, str], int] = defaultdict(int)  # what each row's last_seq implies
    conservation: defaultdict[str, int] = defaultdict(int)
    assets = set(log.assets)
    for (account, asset, symbol), row in positions.items():
        actual[(account, asset)] += row.amount
        partial[(account, asset)] += log.at_last_seq.get((account, asset, symbol), 0)
        conservation[asset] += row.amount
        assets.add(asset)
    expected = log.totals if expect_complete else partial

    mismatches: _Found[Mismatch] = _Found()
    for account, asset in sorted(set(expected) | set(actual)):
        want, have = expected.get((account, asset), 0), actual.get((account, asset), 0)
        if want != have:
            mismatches.add((account, asset, want, have))

    watermark_errors: list[tuple[str, int, int]] = []
    for symbol in sorted(set(watermarks) | (set(log.latest) if expect_complete else set())):
        watermark, latest = watermarks.get(symbol, 0), log.latest.get(symbol, 0)
        if watermark > latest or (expect_complete and watermark != latest):
            watermark_errors.append((symbol, watermark, latest))

    order: _Found[OrderError] = _Found()
    for key, row in sorted(positions.items()):
        account, asset, symbol = key
        bound = watermarks.get(symbol, 0) if expect_complete else log.latest.get(symbol, 0)
        if row.last_seq > bound:
            what = "watermark" if expect_complete else "ME's latest seq"
            order.add((symbol, account, asset, row.last_seq, f"past the {what} {bound}"))
        elif key not in log.named_touch:
            order.add((symbol, account, asset, row.last_seq, "no trade of that seq touches this position"))
        elif expect_complete and row.last_seq != log.last_touch[key]:
            why = f"the last trade touching it is seq {log.last_touch[key]}"
            order.add((symbol, account, asset, row.last_seq, why))

    return CheckReport(
        published=log.published,
        settled=log.settled,
        pending=log.pending,
        missing=log.missing.items,
        missing_count=log.missing.count,
        unexpected=log.unexpected.items,
        unexpected_count=log.unexpected.count,
        balance_mismatches=mismatches.items,
        balance_mismatch_count=mismatches.count,
        conservation={asset: total for asset, total in sorted(conservation.items()) if total},
        assets=len(assets),
        watermark_errors=watermark_errors,
        order_errors=order.items,
        order_error_count=order.count,
        expect_complete=expect_complete,
    )
