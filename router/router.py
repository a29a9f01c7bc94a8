"""The router: one SUB socket to the ME, one PUSH socket per shard, nothing else.

Every frame is decoded and checked once here. A sound trade or heartbeat is forwarded, as the very bytes
the ME sent, to the shard that owns its symbol (:func:`engine.core.placement.shard_for`). Anything else is
quarantined with its reason and counted; it never stops the frames behind it. When a shard's socket is
full (the shard is restarting or slow) its messages wait in a bounded queue; past the bound they are
dropped and counted, and the shard's gap detection brings them back from the ME's log. One shard's
trouble never stops the others.
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
from engine.core import security
from engine.core.child import Lifeline, child_main
from engine.core.config import Config
from engine.core.messages import Heartbeat, StreamMessage, check_trade, stream_decoder
from engine.core.placement import shard_for
from engine.core.quarantine import Quarantine

FRAME_BYTES_MAX: Final = 64 * 1024
DRAIN_BATCH: Final = 4096
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
    if not isinstance(msg, Heartbeat):
        reason = check_trade(msg)
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
            push.setsockopt(zmq.SNDHWM, 100_000)
            push.setsockopt(zmq.LINGER, 2000)
            self._watch(self.keys.client(push, config.shard_endpoint(shard), "shard", f"router->shard-{shard}"))
            push.connect(config.shard_endpoint(shard))
            self.pushes.append(push)
        self.queues: list[deque[bytes]] = [deque() for _ in range(self.shards)]
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
            self.send(self.shard_of(msg.symbol), frame)

    def send(self, shard: int, frame: bytes) -> None:
        queue = self.queues[shard]
        if not queue:
            try:
                self.pushes[shard].send(frame, zmq.NOBLOCK, copy=False)
                self._forwarded[shard].inc()
                return
            except zmq.Again:
                pass
        if len(queue) >= self.config.router.shard_queue_max:
            self._dropped[shard].inc()
            return
        queue.append(frame)

    def flush_queues(self) -> None:
        for shard, queue in enumerate(self.queues):
            push = self.pushes[shard]
            sent = 0
            while queue:
                try:
                    push.send(queue[0], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                queue.popleft()
                sent += 1
            if sent:
                self._forwarded[shard].inc(sent)
            self._depth[shard].set(len(queue))

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
                count = 0
                for _ in range(DRAIN_BATCH):
                    try:
                        frame = sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    count += 1
                    self.route(frame, decoder)
                received.inc(count)
            if busy or any(self.queues):
                self.flush_queues()
            now = time.monotonic()
            if now >= next_beat:
                self.lifeline.beat()
                for watch in self.watches:
                    watch.reconnect_if_due()
                for shard, queue in enumerate(self.queues):
                    self._depth[shard].set(len(queue))
                next_beat = now + BEAT_INTERVAL_S
        self.drain()

    def drain(self) -> None:
        """On stop: stop intake, hand what is queued to the shards (bounded wait), close."""
        self.sub.close(0)
        drain_timeout_s = self.config.supervisor.drain_timeout_s
        log.info("router: stopping: intake closed, handing %d queued frames to the shards (for up to %.0fs)",
                 sum(len(queue) for queue in self.queues), drain_timeout_s)
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
