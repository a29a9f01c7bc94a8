"""The Store protocol in a few dicts, with the contract's idempotence rules: a fake for unit tests, which
subclass it to make writes slow, out of order or not durable."""

from __future__ import annotations

from collections import defaultdict

from engine.core.store.base import Batch, Position, PositionKey


class MemoryStore:
    read_ahead = False

    def __init__(self) -> None:
        self.ledger_rows: dict[str, dict[int, int]] = defaultdict(dict)
        self.rows: dict[PositionKey, Position] = {}
        self.marks: dict[str, int] = {}

    async def write(self, batch: Batch) -> None:
        for trade in batch.trades:
            self.ledger_rows[trade.symbol][trade.seq] = trade.trade_id
        for key, position in batch.positions.items():
            if position.last_seq > self.rows.get(key, Position(0, 0)).last_seq:
                self.rows[key] = position
        await self.advance_watermarks(batch.watermarks)

    async def sync(self) -> None:
        pass

    async def advance_watermarks(self, watermarks: dict[str, int]) -> None:
        for symbol, seq in watermarks.items():
            self.marks[symbol] = max(seq, self.marks.get(symbol, 0))

    async def load_positions(self, keys: list[PositionKey]) -> dict[PositionKey, Position]:
        return {key: self.rows[key] for key in keys if key in self.rows}

    async def watermarks(self) -> dict[str, int]:
        return dict(self.marks)

    async def balances(self, account: int) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (holder, asset, _), position in self.rows.items():
            if holder == account:
                out[asset] += position.amount
        return dict(out)

    async def positions(self) -> dict[PositionKey, Position]:
        return dict(self.rows)

    async def ledger(self, symbol: str) -> list[tuple[int, int]]:
        return sorted(self.ledger_rows.get(symbol, {}).items())

    async def ledger_symbols(self) -> list[str]:
        return sorted(set(self.ledger_rows) | set(self.marks))

    async def close(self) -> None:
        pass
