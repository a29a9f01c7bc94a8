"""Building valid trades for tests, and the router's batches of them."""

from __future__ import annotations

from typing import Any

from engine.core import wire
from engine.core.messages import Heartbeat, Trade, encoder


def trade(symbol: str = "BTC-USDT", seq: int = 1, **over: Any) -> Trade:
    fields: dict[str, Any] = {
        "output_sequence": seq,
        "symbol": symbol,
        "seq": seq,
        "trade_id": seq,
        "price": 50_000_000_000,  # 50,000 USDT (6 decimals)
        "price_scale": 6,
        "qty": 1_000_000,  # 0.01 BTC (8 decimals)
        "qty_scale": 8,
        "buyer": 1,
        "seller": 2,
        "buy_order_id": 10 * seq,
        "sell_order_id": 10 * seq + 1,
        "taker_side": "buy",
        "buyer_fee": 500,
        "seller_fee": 250,
        "ts_ns": 1_700_000_000_000_000_000 + seq,
    }
    fields.update(over)
    return Trade(**fields)


def routed(*messages: Trade | Heartbeat) -> bytes:
    """``messages`` as the router hands them to a shard: one batch of their frames."""
    return wire.encode_batch([encoder.encode(m) for m in messages])
