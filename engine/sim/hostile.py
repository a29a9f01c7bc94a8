"""Hostile and malformed frames, for proving that bad input is quarantined and never blocks good input.

Each generator returns a frame no correct router may forward. The simulator mixes them into its PUB
stream (``settle sim --hostile-every N``); they are never written to the ME's log.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

import msgspec

_enc = msgspec.msgpack.Encoder()

VALID_TRADE: Final[dict[str, Any]] = {
    "kind": "trade", "output_sequence": 1, "symbol": "BTC-USDT", "seq": 1, "trade_id": 1,
    "price": 50_000_000_000, "price_scale": 6, "qty": 1_000_000, "qty_scale": 8, "buyer": 1, "seller": 2,
    "buy_order_id": 1, "sell_order_id": 2, "taker_side": "buy", "buyer_fee": 0, "seller_fee": 0, "ts_ns": 1,
}


def _trade(rng: random.Random, **over: Any) -> bytes:
    fields = dict(VALID_TRADE, seq=rng.randint(1, 10**6))
    fields.update(over)
    return _enc.encode(fields)


GENERATORS: Final[dict[str, Callable[[random.Random], bytes]]] = {
    "random_bytes": lambda rng: bytes([0xC1]) + rng.randbytes(rng.randint(0, 200)),  # 0xC1: never valid msgpack
    "empty": lambda rng: b"",
    "not_a_map": lambda rng: _enc.encode([1, 2, 3]),
    "unknown_kind": lambda rng: _trade(rng, kind="order_cancel"),
    "no_kind": lambda rng: _enc.encode({k: v for k, v in VALID_TRADE.items() if k != "kind"}),
    "negative_qty": lambda rng: _trade(rng, qty=-rng.randint(1, 10**9)),
    "overflowing_price": lambda rng: _trade(rng, price=2**64 - 1),
    "wrong_type": lambda rng: _trade(rng, price="50000.00"),
    "float_amount": lambda rng: _trade(rng, qty=0.5),
    "bad_symbol": lambda rng: _trade(rng, symbol="btc/usdt"),
    "missing_field": lambda rng: _enc.encode({k: v for k, v in VALID_TRADE.items() if k != "buyer"}),
    "fee_above_notional": lambda rng: _trade(rng, seller_fee=10**15),
    "huge_frame": lambda rng: _trade(rng, symbol="X" * (200 * 1024)),
    "bad_heartbeat": lambda rng: _enc.encode({"kind": "heartbeat", "symbol": "BTC-USDT", "seq": -1, "ts_ns": 0}),
}
KINDS: Final = sorted(GENERATORS)


def frame(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(KINDS)
    return kind, GENERATORS[kind](rng)
