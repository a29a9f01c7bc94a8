"""Pins the wire protocol and the CLI surface: changing either must be a decision, not an accident."""

import re
from pathlib import Path

import msgspec
import pytest

from engine.cli import build_parser
from engine.core import messages
from engine.core.messages import Heartbeat, ReplayEnd, ReplayRequest, Trade, encoder

DOC = Path("docs/protocol.md").read_text()


def doc_frames() -> list[bytes]:
    blocks = re.findall(r"```\n([0-9a-f ]+(?:\n[0-9a-f ]+)*)\n```", DOC)
    return [bytes.fromhex(block.replace("\n", " ")) for block in blocks]


def test_the_documented_bytes_decode_to_the_documented_messages() -> None:
    trade_bytes, heartbeat, request, end = doc_frames()
    t = messages.stream_decoder().decode(trade_bytes)
    assert isinstance(t, Trade)
    assert (t.output_sequence, t.symbol, t.seq, t.trade_id, t.price, t.qty, t.buyer, t.seller) == (
        1042, "BTC-USDT", 17, 90001, 50_000_000_000, 1_000_000, 1001, 2002)
    assert messages.notional(t) == 500_000_000
    assert encoder.encode(t) == trade_bytes
    assert messages.stream_decoder().decode(heartbeat) == Heartbeat(symbol="BTC-USDT", seq=17,
                                                                    ts_ns=1764072000500000000)
    assert messages.replay_request_decoder().decode(request) == ReplayRequest(
        request_id=7, symbol="BTC-USDT", from_seq=12, to_seq=16)
    assert messages.replay_reply_decoder().decode(end) == ReplayEnd(request_id=7, symbol="BTC-USDT", last_seq=16)


FIELDS = {
    Trade: ("output_sequence", "symbol", "seq", "trade_id", "price", "price_scale", "qty", "qty_scale", "buyer",
            "seller", "buy_order_id", "sell_order_id", "taker_side", "buyer_fee", "seller_fee", "ts_ns"),
    Heartbeat: ("symbol", "seq", "ts_ns"),
    ReplayRequest: ("request_id", "symbol", "from_seq", "to_seq"),
    messages.ReplayChunk: ("request_id", "symbol", "trades"),
    ReplayEnd: ("request_id", "symbol", "last_seq"),
    messages.ReplayFailed: ("request_id", "symbol", "code", "message"),
}


@pytest.mark.parametrize("struct", list(FIELDS), ids=lambda s: s.__name__)
def test_message_fields_are_pinned(struct: msgspec.StructMeta) -> None:
    assert struct.__struct_fields__ == FIELDS[struct]


def test_kinds_are_pinned() -> None:
    kinds = {s.__name__: s.__struct_config__.tag for s in FIELDS}
    assert kinds == {"Trade": "trade", "Heartbeat": "heartbeat", "ReplayRequest": "replay_req",
                     "ReplayChunk": "replay_chunk", "ReplayEnd": "replay_end", "ReplayFailed": "replay_error"}


def test_unknown_fields_and_floats_are_refused() -> None:
    trade_bytes = doc_frames()[0]
    raw = msgspec.msgpack.decode(trade_bytes)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        messages.stream_decoder().decode(encoder.encode({**raw, "extra": 1}))
    with pytest.raises(msgspec.ValidationError, match="Expected `int`"):
        messages.stream_decoder().decode(encoder.encode({**raw, "qty": 0.5}))


def _surface() -> dict[str, list[str]]:
    parser = build_parser()
    out: dict[str, list[str]] = {}
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        flags = sorted(o for a in p._actions for o in a.option_strings if o.startswith("--"))
        out[name] = flags
    return out


def test_cli_surface_is_pinned() -> None:
    surface = _surface()
    assert sorted(surface) == sorted(CLI)
    for command, flags in CLI.items():
        assert surface[command] == sorted(flags), command


CLI = {
    "run": ["--config", "--set", "--log-dir", "--source", "--help"],
    "demo": ["--trades", "--shards", "--rate", "--symbols", "--accounts", "--seed", "--data-dir", "--store",
             "--config", "--set", "--timeout", "--help"],
    "sim": [],
    "keys": [],
    "chaos": [],
    "bridge": [],
    "bench": [],
    "recover": ["--config", "--set", "--shard", "--from-store", "--repair-corruption", "--help"],
    "status": ["--config", "--set", "--json", "--help"],
    "top": ["--config", "--set", "--once", "--interval", "--help"],
    "balances": ["--config", "--set", "--json", "--help"],
    "db": ["--help"],
    "check": ["--config", "--set", "--log", "--partial", "--help"],
}
