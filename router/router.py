"""The router: one SUB socket to the ME, one PUSH socket per shard, nothing else.

Every frame is decoded and checked once, here. A sound trade or heartbeat goes, as the very bytes the ME
sent, to the shard that owns its symbol (:func:`engine.core.placement.shard_for`), many frames to one
ZeroMQ message (:mod:`engine.core.wire`): a shard's frames are sent when ``BATCH_FRAMES_MAX`` have
gathered, when the ME's socket has nothing more to read, or ``FLUSH_AFTER_S`` after the first of them,
whichever comes first; a lone trade never waits for company. Anything unsound is quarantined with its
reason and counted; it never stops the frames behind it. When a shard's socket is full (the shard is
restarting or slow) its batches wait in a queue bounded in frames; past the bound they are dropped and
counted, and the shard's gap detection brings them back from the ME's log. One shard's trouble never
stops the others.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from typing import Final

import msgspec
import zmq

from engine.core import metrics as metricsmod
from engine.core import security, wire
from engine.core.child import Lifeline, child_main
from engine.core.config import Config
from engine.core.messages import Heartbeat, StreamMessage, check_symbol, check_trade_fields, stream_decoder
from engine.core.placement import shard_for
from engine.core.quarantine import Quarantine

FRAME_BYTES_MAX: Final = 64 * 1024
DRAIN_BATCH: Final = 4096
BATCH_FRAMES_MAX: Final = 1024
# Well under the shards' group-commit window (wal.fsync_wait_us_max, 1 ms by default): a trade waits here
# at most this long for others bound to the same shard while the ME's socket keeps the router busy.
FLUSH_AFTER_S: Final = 0.0002
FLUSH_CHECK_FRAMES: Final = 64  # how often a busy drain looks at the clock
BEAT_INTERVAL_S: Final = 1.0

log = logging.getLogger("settle.router")


def classify(error: msgspec.DecodeError) -> str:
    """A short, fixed label for the metric; the full message goes to the quarantine file."""
    text = str(error)
    if isinstance(error, msgspec.ValidationError):
        return "unknown_kind" if "`$.kind`" in text else "invalid"
    return "malformed"


def validate(frame: bytes, decoder: msgspec.msgpack.Decoder[StreamMessage],
             quarantine: Quarantine) -> StreamMessage | None:
    """Every check a frame from the ME gets (router and Kafka bridge): the message, or None once quarantined."""
    if len(frame) > FRAME_BYTES_MAX:
        quarantine.put("oversize", f"frame of {len(frame)} bytes exceeds {FRAME_BYTES_MAX}", frame)
        return None
    try:
        msg = decoder.decode(frame)
    except msgspec.DecodeError as e:
        quarantine.put(classify(e), str(e), frame)
        return None
    reason = check_symbol(msg.symbol)
    if reason is not None:
        quarantine.put("invalid", reason, frame)
        return None
    if not isinstance(msg, Heartbeat):
        reason = check_trade_fields(msg)
        if reason is not None:
            quarantine.put("unsound", reason, frame)
            return None
    return msg


class Router:
    def __init__(self, config: Config, lifeline: Lifeline | None = None) -> None:
        self.config = config
        self.shards = config.shard_count
        self.lifeline = lifeline or Lifeline(None)
        self.registry = metricsmod.new_registry(config.metrics.enabled)
        self.m = metricsmod.RouterMetrics(self.registry)
        self.keys = security.load_keyring(config, "router")  # CURVE on tcp:// when security.curve; else no-ops
        self.watches: list[security.ClientWatch] = []  # bring a CURVE connection back after a fatal handshake
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, config.router.rcvhwm)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.pushes: list[zmq.Socket[bytes]] = []
        for shard in range(self.shards):
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, wire.HWM_MESSAGES)
            push.setsockopt(zmq.LINGER, 2000)
            self._watch(self.keys.client(push, config.shard_endpoint(shard), "shard", f"router->shard-{shard}"))
            push.connect(config.shard_endpoint(shard))
            self.pushes.append(push)
        self.pending: list[list[bytes]] = [[] for _ in range(self.shards)]  # frames not yet in a batch
        self.pending_since = 0.0  # monotonic time the oldest pending frame arrived; 0.0 when none is
        self.queues: list[deque[tuple[bytes, int]]] = [deque() for _ in range(self.shards)]  # (batch, frames)
        self.queued = [0] * self.shards  # frames in each queue
        self.quarantine = Quarantine(config.quarantine_path, "router", self.m.quarantined)
        self._placement: dict[str, int] = {}
        self._forwarded = [self.m.forwarded.labels(str(s)) for s in range(self.shards)]
        self._dropped = [self.m.dropped.labels(str(s)) for s in range(self.shards)]
        self._depth = [self.m.queue_depth.labels(str(s)) for s in range(self.shards)]
        self.stopping = False

    def _watch(self, watch: security.ClientWatch | None) -> None:
        if watch is not None:
            self.watches.append(watch)

    def shard_of(self, symbol: str) -> int:
        shard = self._placement.get(symbol)
        if shard is None:
            shard = self._placement[symbol] = shard_for(symbol, self.shards)
        return shard

    def route(self, frame: bytes, decoder: msgspec.msgpack.Decoder[StreamMessage]) -> None:
        msg = validate(frame, decoder, self.quarantine)
        if msg is not None:
            shard = self._placement.get(msg.symbol)  # shard_of's cache, read here: this runs per frame
            if shard is None:
                shard = self.shard_of(msg.symbol)
            pending = self.pending[shard]
            if not self.pending_since:
                self.pending_since = time.monotonic()
            pending.append(frame)
            if len(pending) >= BATCH_FRAMES_MAX:
                self.flush(shard)

    def flush(self, shard: int) -> None:
        """Send ``shard`` the frames gathered for it, as one batch."""
        frames = self.pending[shard]
        if frames:
            self.pending[shard] = []
            self.send(shard, wire.encode_batch(frames), len(frames))

    def flush_all(self) -> None:
        for shard in range(self.shards):
            self.flush(shard)
        self.pending_since = 0.0

    def send(self, shard: int, batch: bytes, frames: int) -> None:
        queue = self.queues[shard]
        if not queue:
            try:
                self.pushes[shard].send(batch, zmq.NOBLOCK, copy=False)
                self._forwarded[shard].inc(frames)
                return
            except zmq.Again:
                pass
        if self.queued[shard] + frames > self.config.router.shard_queue_max:
            self._dropped[shard].inc(frames)
            return
        queue.append((batch, frames))
        self.queued[shard] += frames

    def flush_queues(self) -> None:
        for shard, queue in enumerate(self.queues):
            push = self.pushes[shard]
            sent = 0
            while queue:
                batch, frames = queue[0]
                try:
                    push.send(batch, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                queue.popleft()
                sent += frames
            if sent:
                self._forwarded[shard].inc(sent)
                self.queued[shard] -= sent
            self._depth[shard].set(self.queued[shard])

    def receive(self, sub: zmq.Socket[bytes], decoder: msgspec.msgpack.Decoder[StreamMessage]) -> int:
        """Route what the ME's socket holds (up to ``DRAIN_BATCH`` frames), then send every shard its batch.
        While frames keep coming, a batch goes out once ``FLUSH_AFTER_S`` have passed since its first frame."""
        count = 0
        for _ in range(DRAIN_BATCH):
            try:
                frame = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            count += 1
            self.route(frame, decoder)
            if not count % FLUSH_CHECK_FRAMES and self.pending_since \
                    and time.monotonic() - self.pending_since >= FLUSH_AFTER_S:
                self.flush_all()
        self.flush_all()
        return count

    def run(self) -> None:
        self._watch(self.keys.client(self.sub, self.config.me.publish, "me", "router->me"))
        self.sub.connect(self.config.me.publish)
        self.lifeline.ready()
        decoder = stream_decoder()
        sub = self.sub
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        next_beat = time.monotonic()
        received = self.m.received
        while not self.stopping:
            busy = any(self.queues)
            if poller.poll(10 if busy else 100):
                received.inc(self.receive(sub, decoder))
            if busy or any(self.queues):
                self.flush_queues()
            now = time.monotonic()
            if now >= next_beat:
                self.lifeline.beat()
                for watch in self.watches:
                    watch.reconnect_if_due()
                for shard in range(self.shards):
                    self._depth[shard].set(self.queued[shard])
                next_beat = now + BEAT_INTERVAL_S
        self.drain()

    def drain(self) -> None:
        """On stop: stop intake, hand what is queued to the shards (bounded wait), close."""
        self.sub.close(0)
        self.flush_all()
        drain_timeout_s = self.config.supervisor.drain_timeout_s
        log.info("router: stopping: intake closed, handing %d queued frames to the shards (for up to %.0fs)",
                 sum(self.queued), drain_timeout_s)
        deadline = time.monotonic() + drain_timeout_s
        while any(self.queues) and time.monotonic() < deadline:
            self.flush_queues()
            time.sleep(0.01)
        for push in self.pushes:
            push.close(linger=2000)
        self.quarantine.close()
        for watch in self.watches:
            watch.close()
        self.ctx.term()

    def stop(self) -> None:
        """Begin the orderly stop (the first SIGTERM): ``run`` leaves its loop and drains."""
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    def start(config: Config, args: argparse.Namespace, lifeline: Lifeline) -> Router:
        router = Router(config, lifeline)  # a missing or bad key file is a ConfigError: the supervisor halts
        log.info("router: %d shards, ME %s", router.shards, config.me.publish)
        return router

    return child_main(argv, "settle router process (started by the supervisor)", "router", start,
                      lambda config, args: config.metrics.router_port)
