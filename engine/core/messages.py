"""The wire protocol: every message on a socket or in a WAL is one of these Structs.

Frames are MessagePack maps; the ``kind`` key tags the union. Each socket decodes with exactly one
Decoder bound to the union it may carry (see ``docs/protocol.md``).
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

AMOUNT_MAX: Final = 2**62  # exclusive bound on every amount, price, quantity and fee
SCALE_MAX: Final = 18
SYMBOL_PATTERN: Final = r"^[A-Z0-9]{1,15}-[A-Z0-9]{1,15}\Z"  # \Z: `$` would accept a trailing newline

Seq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
SeqOrZero = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Positive = Annotated[int, msgspec.Meta(gt=0, lt=AMOUNT_MAX)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, lt=AMOUNT_MAX)]
Scale = Annotated[int, msgspec.Meta(ge=0, le=SCALE_MAX)]
# Decoding bounds a symbol's length only: :func:`check_symbol` matches SYMBOL_PATTERN once per distinct
# symbol instead of once per frame (the regex was two thirds of a frame's decoding time).
Symbol = Annotated[str, msgspec.Meta(min_length=3, max_length=31)]
Side = Literal["buy", "sell"]


# Trades and heartbeats hold ints and strings only, so they can never be part of a reference cycle: gc=False
# keeps the hundreds of thousands a busy process holds out of the cyclic collector's counts and passes.
class Trade(msgspec.Struct, tag="trade", tag_field="kind", frozen=True, forbid_unknown_fields=True,
            gc=False):
    """One execution. ``seq`` is contiguous per symbol from 1; ``output_sequence`` is the ME's global order."""

    output_sequence: Seq
    symbol: Symbol
    seq: Seq
    trade_id: Id
    price: Positive  # quote minor units per one whole base unit (10**qty_scale base minor units)
    price_scale: Scale  # decimals of the quote asset
    qty: Positive  # base minor units
    qty_scale: Scale  # decimals of the base asset
    buyer: Id
    seller: Id
    buy_order_id: Id
    sell_order_id: Id
    taker_side: Side
    buyer_fee: NonNegative  # quote minor units, paid by the buyer on top of the notional
    seller_fee: NonNegative  # quote minor units, withheld from the seller's proceeds
    ts_ns: Id  # ME execution time, ns since the Unix epoch


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="kind", frozen=True, forbid_unknown_fields=True,
                gc=False):
    """The ME's latest published ``seq`` for one symbol (0 before its first trade)."""

    symbol: Symbol
    seq: SeqOrZero
    ts_ns: Id


class ReplayRequest(msgspec.Struct, tag="replay_req", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """Ask the ME for ``symbol`` trades ``from_seq..to_seq`` inclusive; ``to_seq == 0`` means up to the latest."""

    request_id: Id
    symbol: Symbol
    from_seq: Seq
    to_seq: SeqOrZero


class ReplayChunk(msgspec.Struct, tag="replay_chunk", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    request_id: Id
    symbol: Symbol
    trades: list[Trade]


class ReplayEnd(msgspec.Struct, tag="replay_end", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    """Closes a replay: ``last_seq`` is the last trade sent (``from_seq - 1`` when none were)."""

    request_id: Id
    symbol: Symbol
    last_seq: SeqOrZero


ReplayErrorCode = Literal["not_retained", "unknown_symbol", "bad_request"]


class ReplayFailed(msgspec.Struct, tag="replay_error", tag_field="kind", frozen=True, forbid_unknown_fields=True):
    request_id: Id
    symbol: str
    code: ReplayErrorCode
    message: str


StreamMessage = Trade | Heartbeat
ReplayReply = ReplayChunk | ReplayEnd | ReplayFailed

encoder: Final = msgspec.msgpack.Encoder()


def stream_decoder() -> msgspec.msgpack.Decoder[StreamMessage]:
    """For the ME PUB stream and the router-to-shard hop."""
    return msgspec.msgpack.Decoder(StreamMessage)


def trade_decoder() -> msgspec.msgpack.Decoder[Trade]:
    """For WAL records and the ME's own log."""
    return msgspec.msgpack.Decoder(Trade)


def replay_request_decoder() -> msgspec.msgpack.Decoder[ReplayRequest]:
    return msgspec.msgpack.Decoder(ReplayRequest)


def replay_reply_decoder() -> msgspec.msgpack.Decoder[ReplayReply]:
    return msgspec.msgpack.Decoder(ReplayReply)


def split_symbol(symbol: str) -> tuple[str, str]:
    """``"BTC-USDT"`` -> ``("BTC", "USDT")``: base asset, quote asset."""
    base, _, quote = symbol.partition("-")
    return base, quote


POW10: Final = tuple(10**scale for scale in range(SCALE_MAX + 1))  # 10**scale for every valid scale, made once


def notional(trade: Trade) -> int:
    """Quote minor units that change hands: ``price * qty // 10**qty_scale`` (rounded down)."""
    value: int = trade.price * trade.qty // 10**trade.qty_scale
    return value


_SYMBOL_RE: Final = re.compile(SYMBOL_PATTERN)
_SOUND_SYMBOLS_MAX: Final = 100_000  # remembered sound symbols; beyond, each is checked again
_sound_symbols: set[str] = set()
_two_asset_symbols: set[str] = set()  # symbols seen with a base asset other than the quote (check_trade_fields)


def check_symbol(symbol: str) -> str | None:
    """Whether ``symbol`` matches SYMBOL_PATTERN; the reason when it does not, else None."""
    if symbol in _sound_symbols:
        return None
    if _SYMBOL_RE.match(symbol) is None:
        return f"symbol {symbol!r} does not match {SYMBOL_PATTERN}"
    if len(_sound_symbols) < _SOUND_SYMBOLS_MAX:
        _sound_symbols.add(symbol)
    return None


def check_trade(trade: Trade) -> str | None:
    """Every check of a decoded trade that its decoder does not make: the symbol's pattern
    (:func:`check_symbol`) and the cross-field rules (:func:`check_trade_fields`). A reason, or None."""
    return check_symbol(trade.symbol) or check_trade_fields(trade)


def check_trade_fields(trade: Trade) -> str | None:
    """Cross-field checks msgspec cannot express. Returns a reason, or None when the trade is sound.
    Every trade of the ME passes here: the symbol's assets are compared once per symbol, and the notional is
    :func:`notional` written out, with ``10**qty_scale`` looked up."""
    symbol = trade.symbol
    if symbol not in _two_asset_symbols:
        base, _, quote = symbol.partition("-")
        if base == quote:
            return f"symbol {symbol!r} has the same base and quote asset"
        if len(_two_asset_symbols) < _SOUND_SYMBOLS_MAX:
            _two_asset_symbols.add(symbol)
    scale = trade.qty_scale
    value = trade.price * trade.qty // (POW10[scale] if 0 <= scale <= SCALE_MAX else 10**scale)
    if value <= 0:
        return f"notional rounds to {value}: price {trade.price} x qty {trade.qty} / 10^{trade.qty_scale}"
    if value + trade.buyer_fee >= AMOUNT_MAX:
        return f"notional {value} plus buyer fee {trade.buyer_fee} overflows the amount bound 2^62"
    if trade.seller_fee > value:
        return f"seller fee {trade.seller_fee} exceeds the notional {value}"
    return None
