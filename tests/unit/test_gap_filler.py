"""The gap filler's requests: what it asks the ME for, driven without sockets."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from engine.core.config import Config
from engine.core.messages import ReplayChunk, ReplayEnd, encoder
from shards.gaps import GAP_GRACE_NS, REPLY_TIMEOUT_S, GapFiller
from shards.state import Sequencer
from tests.factories import trade as make_trade


class _Metrics:
    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.replay_requests = Counter("requests", "", registry=registry)
        self.replayed = Counter("replayed", "", registry=registry)
        self.replay_rejected = Counter("rejected", "", ["shard", "reason"], registry=registry)


class _Replies:
    """A socket stand-in whose ``recv`` hands out the queued frames, then blocks."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = deque(frames)

    async def recv(self) -> bytes:
        if self.frames:
            return self.frames.popleft()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _filler() -> tuple[GapFiller, Sequencer, list[list[Any]]]:
    seq = Sequencer(held_max=1000)
    delivered: list[list[Any]] = []
    return GapFiller(Config(), 0, seq, _Metrics(), delivered.append), seq, delivered


def _receive(filler: GapFiller, frames: list[bytes]) -> None:
    async def main() -> None:
        task = asyncio.create_task(filler._receive(_Replies(frames)))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())


def _ask(filler: GapFiller, symbol: str, first: int, last: int) -> int:
    """Record a request as ``_send_due`` does after sending it; its id."""
    from shards.gaps import _Request

    request_id = filler._next_id
    filler._next_id += 1
    filler._requests[request_id] = _Request(request_id, symbol, first, last, float("inf"))
    filler._by_symbol[symbol] = request_id
    return request_id


def test_delivered_but_not_yet_accepted_trades_are_not_asked_for_again() -> None:
    filler, seq, delivered = _filler()
    st = seq.state("BTC-USDT")
    st.me_latest = 25  # a heartbeat said so: gap 1..25
    now = time.monotonic_ns()
    st.gap_since_ns = now - GAP_GRACE_NS
    assert filler._wanted(now) == [("BTC-USDT", 1, 25)]

    request_id = _ask(filler, "BTC-USDT", 1, 10)
    chunk = [make_trade(symbol="BTC-USDT", seq=n) for n in range(1, 11)]
    _receive(filler, [encoder.encode(ReplayChunk(request_id, "BTC-USDT", chunk)),
                      encoder.encode(ReplayEnd(request_id, "BTC-USDT", 10))])
    assert [len(d) for d in delivered] == [10]
    assert st.accepted == 0  # the shard has not taken them in yet
    assert filler._wanted(now) == [("BTC-USDT", 11, 25)]  # not 1..25 again

    # a delivery the shard never took is asked for again once the mark is stale
    later = now + int(REPLY_TIMEOUT_S * 1e9) + int(1e9)
    assert filler._wanted(later) == [("BTC-USDT", 1, 25)]


def test_once_accepted_the_gap_itself_decides() -> None:
    filler, seq, _ = _filler()
    st = seq.state("ETH-USDT")
    st.me_latest = 30
    st.gap_since_ns = 1
    request_id = _ask(filler, "ETH-USDT", 1, 30)
    chunk = [make_trade(symbol="ETH-USDT", seq=n) for n in range(1, 21)]
    _receive(filler, [encoder.encode(ReplayChunk(request_id, "ETH-USDT", chunk)),
                      encoder.encode(ReplayEnd(request_id, "ETH-USDT", 20))])
    for trade in chunk:
        seq.offer(trade, 5)
    assert st.accepted == 20
    assert filler._wanted(GAP_GRACE_NS + 2) == [("ETH-USDT", 21, 30)]
