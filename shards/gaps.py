"""Gap filling: ask the ME's replay endpoint for every sequence range a shard is missing.

A gap opens when a trade arrives past ``accepted + 1`` or a heartbeat says the ME has published past
``accepted``. Intake wakes the filler at once (:meth:`GapFiller.wake`; there is no grace period: the ME's
stream reaches a shard in order, through one router queue or one Kafka partition, so a skipped sequence
was lost, not late). The filler sends a :class:`ReplayRequest` for one range that covers every hole of
the symbol within ``REQUEST_TRADES_MAX`` sequences (:meth:`~shards.state.SymbolState.replay_range`), one
request per symbol in flight, the next one as soon as the last ends: on a lossy link each request takes
all the holes that opened meanwhile. It checks every reply (right symbol, contiguous from the first
sequence asked, each trade sound) and hands the trades to the owner's ``deliver``, which wakes intake,
where they join the live path: duplicates between replayed and live trades are dropped there. Requests
time out and are retried with backoff; an unreachable ME never stops the shard: the gap stays open,
visible in status and metrics. Until the replay connection is first up (``CONNECT_GRACE_S``) a request
waits for it quietly instead of counting the ME as unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import Counter

from engine.core import security
from engine.core.child import wait_event
from engine.core.config import Config
from engine.core.messages import (
    ReplayChunk,
    ReplayEnd,
    ReplayFailed,
    ReplayRequest,
    Trade,
    check_trade,
    encoder,
    replay_reply_decoder,
)
from engine.core.retry import Backoff
from shards.state import Sequencer

REQUEST_TRADES_MAX: Final = 10_000
REPLY_TIMEOUT_S: Final = 3.0
CONNECT_GRACE_S: Final = 3.0  # a replay connection not up by then is reported unreachable
BACKOFF_S_MIN: Final = 0.1
BACKOFF_S_MAX: Final = 5.0
TICK_S: Final = 0.05  # timeouts, backoffs and reconnects; requests go out on wake() at once

log = logging.getLogger("settle.gaps")


class ReplayMetrics(Protocol):
    """What the filler counts in: the shard's metrics, or the Kafka bridge's."""

    @property
    def replay_requests(self) -> Any: ...
    @property
    def replayed(self) -> Any: ...
    @property
    def replay_rejected(self) -> Counter: ...


@dataclass(slots=True)
class _Request:
    request_id: int
    symbol: str
    next_seq: int  # the sequence the next replayed trade must carry
    to_seq: int
    deadline: float


@dataclass(slots=True)
class _Backoff:
    waits: Backoff = field(default_factory=lambda: Backoff(BACKOFF_S_MIN, BACKOFF_S_MAX))
    not_before: float = 0.0


class GapFiller:
    def __init__(self, config: Config, shard: int | str, sequencer: Sequencer, m: ReplayMetrics,
                 deliver: Callable[[list[Trade]], None]) -> None:
        self._config = config
        self._shard = shard
        self._seq = sequencer
        self._m = m
        self._deliver = deliver
        self._keys = security.load_keyring(config, "shard")  # CURVE client of the ME's replay on tcp://
        self._watch: security.ClientWatch | None = None
        self._requests: dict[int, _Request] = {}
        self._by_symbol: dict[str, int] = {}
        self._delivered: dict[str, tuple[int, int]] = {}  # symbol -> (last seq delivered, forget after; ns)
        self._backoff: dict[str, _Backoff] = {}
        self._next_id = 1
        self._sock: zmq.asyncio.Socket | None = None
        self._wakeup = asyncio.Event()
        self._connecting_until = 0.0
        self.tail_wanted: set[str] = set(sequencer.symbols)  # at start-up: whatever the ME has past us

    async def run(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sock = self._sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # do not queue requests for an ME that is not connected
        sock.setsockopt(zmq.RCVHWM, 0)
        self._watch = self._keys.client(sock, self._config.me.replay, "me", f"shard-{self._shard}->me-replay")
        sock.connect(self._config.me.replay)
        self._connecting_until = time.monotonic() + CONNECT_GRACE_S
        receiver = asyncio.create_task(self._receive(sock))
        try:
            while True:
                self._wakeup.clear()
                if self._watch is not None:
                    self._watch.reconnect_if_due()
                await self._send_due(sock)
                self._expire()
                await wait_event(self._wakeup, TICK_S)
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def in_flight(self, symbol: str) -> bool:
        return symbol in self._by_symbol

    def wake(self) -> None:
        """A gap may have opened: send what is due now rather than at the next tick."""
        self._wakeup.set()

    # ---------------------------------------------------------------- requests

    def _wanted(self, now_ns: int) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        for st in self._seq.symbols.values():
            if st.symbol in self._by_symbol:
                continue
            wanted = st.replay_range(REQUEST_TRADES_MAX)
            if wanted is not None:
                first, last = wanted
                first = self._past_delivered(st.symbol, first, now_ns)
                if first <= last:
                    out.append((st.symbol, first, last))
            elif st.symbol in self.tail_wanted:
                first = self._past_delivered(st.symbol, st.accepted + 1, now_ns)
                out.append((st.symbol, first, first + REQUEST_TRADES_MAX - 1))
        return out

    def _past_delivered(self, symbol: str, first: int, now_ns: int) -> int:
        """``first``, or past what was delivered for ``symbol`` and not accepted yet: the shard accepts
        replayed trades between its group commits, and asking again for them would fetch them twice. A
        mark older than ``REPLY_TIMEOUT_S`` is forgotten, so a delivery the shard never took is asked again."""
        mark = self._delivered.get(symbol)
        if mark is None:
            return first
        seq, until_ns = mark
        if seq < first or now_ns > until_ns:
            del self._delivered[symbol]
            return first
        return seq + 1

    async def _send_due(self, sock: zmq.asyncio.Socket) -> None:
        now = time.monotonic()
        for symbol, first, last in self._wanted(time.monotonic_ns()):
            backoff = self._backoff.get(symbol)
            if backoff is not None and now < backoff.not_before:
                continue
            request_id = self._next_id
            self._next_id += 1
            frame = encoder.encode(ReplayRequest(request_id=request_id, symbol=symbol, from_seq=first, to_seq=last))
            try:
                await sock.send(frame, zmq.NOBLOCK)  # awaited: an Again surfaces here, not in a lost Future
            except zmq.Again:
                if now < self._connecting_until:
                    return  # the connection is still being made: ask again at the next tick
                self._fail(symbol, "unreachable")
                continue
            self._requests[request_id] = _Request(request_id, symbol, first, last, now + REPLY_TIMEOUT_S)
            self._by_symbol[symbol] = request_id
            self._m.replay_requests.inc()

    def _expire(self) -> None:
        now = time.monotonic()
        for request in [r for r in self._requests.values() if r.deadline < now]:
            self._finish(request)
            self._fail(request.symbol, "timeout")

    def _finish(self, request: _Request) -> None:
        self._requests.pop(request.request_id, None)
        if self._by_symbol.get(request.symbol) == request.request_id:
            del self._by_symbol[request.symbol]

    def _fail(self, symbol: str, reason: str) -> None:
        self._m.replay_rejected.labels(str(self._shard), reason).inc()
        backoff = self._backoff.setdefault(symbol, _Backoff())
        wait_s = backoff.waits.next_s()
        backoff.not_before = time.monotonic() + wait_s
        log.warning("shard %s: replay for %s failed (%s); retrying in %.1fs", self._shard, symbol, reason,
                    wait_s)

    # ---------------------------------------------------------------- replies

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        decoder = replay_reply_decoder()
        while True:
            frame = await sock.recv()
            try:
                reply = decoder.decode(frame)
            except msgspec.DecodeError as e:
                self._m.replay_rejected.labels(str(self._shard), "malformed").inc()
                log.warning("shard %s: malformed replay reply dropped: %s", self._shard, e)
                continue
            request = self._requests.get(reply.request_id)
            if request is None:
                self._m.replay_rejected.labels(str(self._shard), "stale").inc()
                continue
            if reply.symbol != request.symbol:
                self._finish(request)
                self._fail(request.symbol, "wrong_symbol")
                continue
            match reply:
                case ReplayChunk(trades=trades):
                    problem = self._check_chunk(request, trades)
                    if problem is not None:
                        self._finish(request)
                        self._fail(request.symbol, problem)
                        continue
                    if trades:
                        request.next_seq = trades[-1].seq + 1
                        request.deadline = time.monotonic() + REPLY_TIMEOUT_S
                        self._m.replayed.inc(len(trades))
                        self._delivered[request.symbol] = (trades[-1].seq,
                                                           time.monotonic_ns() + int(REPLY_TIMEOUT_S * 1e9))
                        self._deliver(trades)
                case ReplayEnd(last_seq=last_seq):
                    self._finish(request)
                    if last_seq != request.next_seq - 1:
                        self._fail(request.symbol, "hole")
                        continue
                    self._backoff.pop(request.symbol, None)
                    if last_seq < request.to_seq:
                        self.tail_wanted.discard(request.symbol)  # the ME has nothing further
                    self._wakeup.set()  # holes that opened meanwhile: the next request goes out now
                case ReplayFailed(code=code, message=message):
                    self._finish(request)
                    if code == "unknown_symbol":
                        self.tail_wanted.discard(request.symbol)
                    log.error("shard %s: the ME refused a replay of %s: %s (%s)", self._shard, request.symbol,
                              message, code)
                    self._fail(request.symbol, code)

    @staticmethod
    def _check_chunk(request: _Request, trades: list[Trade]) -> str | None:
        expected = request.next_seq
        for trade in trades:
            if trade.symbol != request.symbol:
                return "wrong_symbol"
            if trade.seq != expected:
                return "hole"
            if check_trade(trade) is not None:
                return "malformed"
            expected += 1
        if expected - 1 > request.to_seq:
            return "hole"
        return None
