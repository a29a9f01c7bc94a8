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

from collections import defaultdict
from collections.abc import Iterable

from engine.messages import Trade, notional, split_symbol
from engine.store.base import ZERO, Batch, Position, PositionKey, Store


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


class Settler:
    """Turns batches of trades into store batches of absolute positions.

    The settler holds the positions of its shard's symbols in memory (it is their only writer) and
    reads a position from the store the first time it touches it. A trade changes a position only when
    its sequence is above the position's ``last_seq``: a position already holding that trade (a batch
    that partly reached the store before a crash) is left as it is.
    """

    def __init__(self, store: Store, fee_account: int) -> None:
        self._store = store
        self._fee_account = fee_account
        self._positions: dict[PositionKey, Position] = {}

    @property
    def cached_positions(self) -> int:
        return len(self._positions)

    async def prepare(self, trades: list[Trade]) -> Batch:
        """Fold ``trades`` (each symbol's in sequence order) into a store batch.

        The cache moves forward at once: when ``store.write(batch)`` fails, retry that same batch until
        it succeeds; never prepare the same trades again (they would fold to nothing).
        """
        missing = [key for key in position_keys(trades, self._fee_account) if key not in self._positions]
        if missing:
            loaded = await self._store.load_positions(missing)
            for key in missing:
                self._positions[key] = loaded.get(key, ZERO)
        positions = self._positions
        touched: dict[PositionKey, Position] = {}
        watermarks: dict[str, int] = {}
        for trade in trades:
            symbol, seq = trade.symbol, trade.seq
            assert watermarks.get(symbol, 0) < seq, f"{symbol} seq {seq} out of order in a batch"
            watermarks[symbol] = seq
            for (account, asset), change in deltas(trade, self._fee_account).items():
                key = (account, asset, symbol)
                current = positions[key]
                if seq > current.last_seq:
                    positions[key] = touched[key] = Position(current.amount + change, seq)
        return Batch(trades, touched, watermarks)

    def forget(self) -> None:
        """Drop the cache (after the store may have been written by someone else, e.g. offline recover)."""
        self._positions.clear()
