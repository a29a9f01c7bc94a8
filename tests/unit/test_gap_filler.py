"""The gap filler's requests: what it asks the ME for, driven without sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter

from engine.core.config import Config, MEConfig
from engine.core.messages import ReplayChunk, ReplayEnd, ReplayRequest, encoder
from shards.gaps import REPLY_TIMEOUT_S, TICK_S, GapFiller
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
    st.gap_since_ns = now
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
    assert filler._wanted(2) == [("ETH-USDT", 21, 30)]


def test_one_request_covers_several_holes() -> None:
    filler, seq, _ = _filler()
    for n in (1, 3, 5, 6, 9):  # holes at 2, 4, 7-8
        seq.offer(make_trade(symbol="BTC-USDT", seq=n), 1)
    assert filler._wanted(2) == [("BTC-USDT", 2, 8)]  # one range to the last hole: 3, 5, 6 come again
    seq.heartbeat("BTC-USDT", 12, 3)  # the ME is at 12: 10-12 are missing too
    assert filler._wanted(4) == [("BTC-USDT", 2, 12)]
    _ask(filler, "BTC-USDT", 2, 12)
    assert filler._wanted(5) == []  # one request per symbol in flight


def test_a_range_is_capped_at_the_request_size() -> None:
    seq = Sequencer(held_max=100_000)
    for n in (1, *range(3, 30_000, 2)):  # a hole at every even sequence
        seq.offer(make_trade(symbol="BTC-USDT", seq=n), 1)
    assert seq.state("BTC-USDT").replay_range(10_000) == (2, 10_000)  # 10,001 is held: not asked for


def test_a_replay_delivery_wakes_an_idle_intake() -> None:
    """Intake waiting on its socket returns when the gap filler delivers trades, with no live frame."""
    from engine.core import config as configmod
    from shards.shard import Shard, _Readable

    shard = Shard(configmod.load(None, ["metrics.enabled=false"]), 0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind("inproc://intake")

    async def main() -> bool:
        shard._input = _Readable(sock)
        try:
            waiting = asyncio.create_task(shard._wait_for_input(600_000))  # ten minutes, unless woken
            for _ in range(5):
                await asyncio.sleep(0)
            assert not waiting.done()
            shard._deliver_replay([make_trade(seq=1)])
            return await asyncio.wait_for(waiting, 30)
        finally:
            shard._input.close()

    try:
        assert asyncio.run(main()) is False  # woken by the delivery, no frame on the socket
        assert len(shard._replayed) == 1
    finally:
        sock.close(0)
        ctx.term()


def test_intake_wakes_for_a_message_and_not_for_nothing() -> None:
    """The socket's descriptor wakes a waiting intake for a message; with none, the wait lasts its timeout."""
    from shards.shard import _Readable

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://readable")
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://readable")

    async def main() -> tuple[bool, float, bool]:
        readable = _Readable(pull)
        try:
            started = time.monotonic()
            idle = await readable.wait(0.2)
            idle_s = time.monotonic() - started
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, push.send, b"x")
            woken = await asyncio.wait_for(readable.wait(600), 30)  # ten minutes, unless the message wakes it
            return idle, idle_s, woken
        finally:
            readable.close()

    try:
        idle, idle_s, woken = asyncio.run(main())
        assert idle is False
        assert idle_s >= 0.19
        assert woken is True
        assert pull.recv(zmq.NOBLOCK) == b"x"
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_a_request_waits_for_the_replay_connection_instead_of_reporting_the_me_unreachable() -> None:
    """At start-up the filler's first request goes out before its connection is up: it waits for it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config(me=MEConfig(replay=f"tcp://127.0.0.1:{port}"))
    seq = Sequencer(held_max=1000)
    seq.heartbeat("BTC-USDT", 2, 1)  # trades 1-2 are missing
    delivered: list[list[Any]] = []
    metrics = _Metrics()
    ctx = zmq.asyncio.Context.instance()

    async def main() -> None:
        arrived = asyncio.Event()

        def deliver(trades: list[Any]) -> None:
            delivered.append(trades)
            arrived.set()

        filler = GapFiller(config, 0, seq, metrics, deliver)
        running = asyncio.create_task(filler.run())
        me = ctx.socket(zmq.ROUTER)
        try:
            for _ in range(3):  # a few ticks with nobody listening: the ME starts late
                await asyncio.sleep(TICK_S)
            me.bind(f"tcp://127.0.0.1:{port}")
            envelope, frame = await asyncio.wait_for(me.recv_multipart(), 30)
            request = msgspec.msgpack.decode(frame, type=ReplayRequest)
            assert (request.from_seq, request.to_seq) == (1, 2)
            trades = [make_trade(symbol="BTC-USDT", seq=n) for n in (1, 2)]
            await me.send_multipart([envelope, encoder.encode(ReplayChunk(request.request_id, "BTC-USDT", trades))])
            await me.send_multipart([envelope, encoder.encode(ReplayEnd(request.request_id, "BTC-USDT", 2))])
            await asyncio.wait_for(arrived.wait(), 30)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            filler.close()
            me.close(0)

    asyncio.run(main())
    assert [t.seq for t in delivered[0]] == [1, 2]
    assert metrics.replay_rejected.labels("0", "unreachable")._value.get() == 0
