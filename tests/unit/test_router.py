import json
import random
from pathlib import Path

import pytest

from engine.core import config as configmod
from engine.core.messages import encoder
from engine.core.placement import shard_for
from engine.sim import hostile
from router.router import Router
from tests.factories import trade

# The quarantine reason each kind of bad frame must get: a frame that decodes is never "malformed", a sound
# trade with a fee above its notional is "unsound", not "invalid".
REASON = {
    "bad_heartbeat": "invalid", "bad_symbol": "invalid", "empty": "malformed", "fee_above_notional": "unsound",
    "float_amount": "invalid", "huge_frame": "oversize", "missing_field": "invalid", "negative_qty": "invalid",
    "no_kind": "invalid", "not_a_map": "invalid", "overflowing_price": "invalid", "random_bytes": "malformed",
    "unknown_kind": "unknown_kind", "wrong_type": "invalid",
}


@pytest.fixture
def router(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=3"])
    r = Router(config)
    yield r
    r.drain()


def routed(r: Router, shard: int) -> int:
    """Frames for ``shard``: sent, queued behind its full socket, or gathering for its next batch."""
    return int(r.m.forwarded.labels(str(shard))._value.get()) + r.queued[shard] + len(r.pending[shard])


@pytest.mark.parametrize("kind", hostile.KINDS)
def test_every_hostile_frame_is_quarantined_with_its_reason(router: Router, kind: str) -> None:
    frame = hostile.GENERATORS[kind](random.Random(7))
    router.route(frame, __import__("engine.core.messages", fromlist=["x"]).stream_decoder())
    assert sum(routed(router, s) for s in range(3)) == 0
    assert router.quarantine.count == 1
    record = json.loads(router.quarantine.path.read_text().splitlines()[0])
    assert record["reason"] == REASON[kind]
    assert record["detail"]
    assert record["bytes"] == len(frame)


def test_valid_trades_go_to_their_shard_even_between_bad_frames(router: Router) -> None:
    from engine.core.messages import stream_decoder

    decoder = stream_decoder()
    rng = random.Random(1)
    symbols = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "ETH-BTC"]
    for i, symbol in enumerate(symbols, start=1):
        router.route(hostile.frame(rng)[1], decoder)
        router.route(encoder.encode(trade(symbol, seq=i)), decoder)
    expected = [0, 0, 0]
    for symbol in symbols:
        expected[shard_for(symbol, 3)] += 1
    assert [routed(router, s) for s in range(3)] == expected
    assert router.quarantine.count == len(symbols)


def test_every_hostile_kind_has_one_pinned_reason_from_a_bounded_set() -> None:
    assert sorted(REASON) == hostile.KINDS
    assert set(REASON.values()) == {"malformed", "invalid", "unknown_kind", "oversize", "unsound"}
