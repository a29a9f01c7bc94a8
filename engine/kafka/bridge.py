"""``settle bridge``: the ME's ZMQ stream into the Kafka topic, per symbol in sequence order, without holes.

The bridge subscribes to the ME's PUB socket like the router, checks every frame the way the router does
(bad input is quarantined, never forwarded), and produces each trade with the idempotent producer
(``acks=all``) to partition ``shard_for(symbol, kafka.partitions)``, keyed by symbol.

**No holes.** A trade is produced only when it is its symbol's next sequence: the bridge keeps a
:class:`~shards.state.Sequencer` of what the topic holds, holds trades past a gap and fills the gap with
a replay from the ME (:class:`~shards.gaps.GapFiller`, the shards' own code). The producer retries a
trade forever (``message.timeout.ms = 0``) and keeps per-partition order; a failure that could leave a
hole (``enable.gapless.guarantee``) is fatal: the bridge exits and its restart starts over as below.

**Restart.** At start the bridge derives, per symbol, a sequence ``start`` that the topic is known to
hold (every trade ``<= start`` is in it, in order): the larger of the store's watermark (the shards
settled only what they read from the topic, or an earlier ZMQ-mode run had it) and the highest
sequence in the last ``kafka.bridge_tail_scan_max`` messages of the symbol's partition. Both are lower
bounds of what the topic holds, so producing again from ``start + 1`` can duplicate trades (the shards
drop them by watermark) but never skip one. It then asks the ME to replay every known symbol from
``start + 1``: whatever the ME published while the bridge was down comes back that way.

**Topic heartbeats.** When an ME heartbeat says a symbol's latest sequence is ``n`` and the bridge has
already produced ``n``, it produces the heartbeat too. Everything up to ``n`` precedes it in the
partition, so a shard that reads it with a lower watermark has found a real hole (a broker that lost
acknowledged data) and asks the ME itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import msgspec
import zmq
import zmq.asyncio
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from prometheus_client import CollectorRegistry

from engine.core import metrics as metricsmod
from engine.core import security
from engine.core.child import Lifeline, child_main
from engine.core.config import Config
from engine.core.errors import ConfigError, SettleError
from engine.core.messages import Heartbeat, Trade, encoder, stream_decoder
from engine.core.quarantine import Quarantine
from engine.core.retry import Backoff, retry
from engine.core.store import open_store
from engine.kafka.config import KafkaConfig
from router.router import validate
from shards.gaps import GapFiller
from shards.state import Sequencer

DRAIN_BATCH: Final = 4096
BEAT_INTERVAL_S: Final = 1.0
RETRY_BACKOFF_S_MIN: Final = 0.1
RETRY_BACKOFF_S_MAX: Final = 2.0
ADMIN_TIMEOUT_S: Final = 10.0
SCAN_TIMEOUT_S: Final = 120.0

T = TypeVar("T")

log = logging.getLogger("settle.bridge")


class BridgeFailed(SettleError):
    """The producer hit an error that could leave a hole in the topic; restart the bridge."""


BRIDGE_ID: Final = "bridge"  # the label and log name GapFiller uses for the bridge


class BridgeMetrics:
    """``settle_bridge_*`` plus the replay families GapFiller counts in (label ``shard="bridge"``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        f = metricsmod.Families(registry)
        s = str(BRIDGE_ID)
        self.received = f.counter("settle_bridge_received_total", "Messages received from the ME")
        self.produced = f.counter("settle_bridge_produced_total", "Messages handed to the producer, by kind",
                                  ["kind"])
        self.produced_trades = self.produced.labels("trade")
        self.produced_heartbeats = self.produced.labels("heartbeat")
        self.delivered = f.counter("settle_bridge_delivered_total", "Messages the broker acknowledged")
        self.duplicates = f.counter("settle_bridge_duplicate_total", "Trades at or below what the topic holds")
        self.unacked = f.gauge("settle_bridge_unacked_messages", "Produced, not yet acknowledged by the broker")
        self.producer_full = f.counter("settle_bridge_producer_full_total",
                                       "Times the producer queue was full and intake waited")
        self.kafka_errors = f.counter("settle_bridge_kafka_errors_total", "Client errors, by name", ["error"])
        self.topic_seq = f.gauge("settle_bridge_topic_seq", "Highest sequence produced to the topic, per symbol",
                                 ["symbol"])
        self.me_latest = f.gauge("settle_me_latest_seq",
                                 "The ME's latest sequence per symbol, from heartbeats and trades",
                                 ["shard", "symbol"])
        self.gaps_open = f.gauge("settle_gaps_open", "Symbols with a sequence gap open", ["shard"]).labels(s)
        self.gap_held = f.gauge("settle_gap_held_trades", "Trades held behind open gaps", ["shard"]).labels(s)
        self.replay_requests = f.counter("settle_replay_requests_total", "Replay requests sent to the ME",
                                         ["shard"]).labels(s)
        self.replayed = f.counter("settle_replayed_trades_total", "Trades received by replay", ["shard"]).labels(s)
        self.replay_rejected = f.counter("settle_replay_rejected_total", "Replay replies rejected, by reason",
                                         ["shard", "reason"])
        for reason in metricsmod.REPLAY_REJECT_REASONS:
            self.replay_rejected.labels(s, reason)
        self.quarantined = f.counter("settle_quarantined_total", "Messages quarantined, by reason",
                                     ["process", "reason"])
        for reason in metricsmod.ROUTER_QUARANTINE_REASONS:
            self.quarantined.labels("bridge", reason)
        self.ready = f.gauge("settle_bridge_ready", "1 once the start points are known and trades flow")


# ------------------------------------------------------------------------------------------ the topic


def ensure_topic(kafka: KafkaConfig, admin: AdminClient) -> None:
    """Create the topic when missing (``kafka.create_topic``); refuse one with another partition count."""
    md = admin.list_topics(timeout=ADMIN_TIMEOUT_S)
    topic = md.topics.get(kafka.topic)
    if topic is None or topic.error is not None:
        if not kafka.create_topic:
            raise ConfigError(f"kafka.topic {kafka.topic!r} does not exist at {kafka.bootstrap_servers} and "
                              "kafka.create_topic is false; create it with kafka.partitions partitions")
        new = NewTopic(kafka.topic, num_partitions=kafka.partitions, replication_factor=kafka.replication_factor,
                       config={"min.insync.replicas": str(kafka.min_insync_replicas)})
        future = admin.create_topics([new], operation_timeout=ADMIN_TIMEOUT_S)[kafka.topic]
        try:
            future.result(timeout=ADMIN_TIMEOUT_S * 2)
            log.info("bridge: created topic %s with %d partitions", kafka.topic, kafka.partitions)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        # A topic just created can show no partitions (or an error) until its leaders are elected.
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while True:
            md = admin.list_topics(topic=kafka.topic, timeout=ADMIN_TIMEOUT_S)
            topic = md.topics[kafka.topic]
            if (topic.error is None and topic.partitions) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    count = len(topic.partitions)
    if count != kafka.partitions:
        raise ConfigError(f"kafka.partitions is {kafka.partitions} but topic {kafka.topic!r} has {count} "
                          "partitions; the placement shard_for(symbol, partitions) would move symbols. "
                          "Set kafka.partitions to the topic's count, or use a new topic")


def scan_tail(kafka: KafkaConfig, client_id: str) -> dict[str, int]:
    """Per symbol, the highest trade sequence among the last ``bridge_tail_scan_max`` messages of each partition."""
    settings = {**kafka.client_settings(client_id), "group.id": f"{kafka.group_id}.bridge-scan",
                "enable.auto.commit": False, "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
                **kafka.client_options}
    consumer = Consumer(settings)
    tails: dict[str, int] = {}
    try:
        starts: list[TopicPartition] = []
        ends: dict[int, int] = {}
        for partition in range(kafka.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(kafka.topic, partition),
                                                       timeout=ADMIN_TIMEOUT_S)
            if high > low:
                starts.append(TopicPartition(kafka.topic, partition, max(low, high - kafka.bridge_tail_scan_max)))
                ends[partition] = high
        if not starts:
            return tails
        consumer.assign(starts)
        decoder = stream_decoder()
        deadline = time.monotonic() + SCAN_TIMEOUT_S
        while ends:
            if time.monotonic() > deadline:
                raise BridgeFailed(f"reading the tail of topic {kafka.topic} took over {SCAN_TIMEOUT_S:.0f}s; "
                                   f"partitions left: {sorted(ends)}")
            for msg in consumer.consume(10_000, timeout=0.5):
                if msg.error() is not None:
                    continue
                p, offset = msg.partition(), msg.offset()
                assert p is not None
                assert offset is not None
                value = msg.value()
                if value is not None:
                    with contextlib.suppress(msgspec.DecodeError):
                        decoded = decoder.decode(value)
                        if isinstance(decoded, Trade) and decoded.seq > tails.get(decoded.symbol, 0):
                            tails[decoded.symbol] = decoded.seq
                if p in ends and offset >= ends[p] - 1:
                    del ends[p]
    finally:
        consumer.close()
    return tails


# ------------------------------------------------------------------------------------------ the bridge


class Bridge:
    def __init__(self, config: Config, kafka: KafkaConfig, lifeline: Lifeline | None = None) -> None:
        self.config = config
        self.kafka = kafka
        self.lifeline = lifeline or Lifeline(None)
        self.registry = metricsmod.new_registry(config.metrics.enabled)
        self.m = BridgeMetrics(self.registry)
        self.sequencer = Sequencer(config.wal.gap_buffer_max)
        self.producer: Producer | None = None
        self.gaps: GapFiller | None = None
        self.start_points: dict[str, int] = {}
        self._replayed: deque[list[Trade]] = deque()
        self._stopping = asyncio.Event()
        self._failure: str | None = None
        self._latest_logged: dict[str, float] = {}

    # ---------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Check the topic, find what it holds per symbol, open the producer."""
        kafka = self.kafka
        admin = AdminClient(kafka.client_settings("settle-bridge-admin"))
        loop = asyncio.get_running_loop()
        await self._retry("check the topic", lambda: loop.run_in_executor(None, ensure_topic, kafka, admin))
        watermarks = await self._retry("read the store's watermarks", self._store_watermarks)
        tails = await self._retry("read the topic's tail",
                                  lambda: loop.run_in_executor(None, scan_tail, kafka, "settle-bridge-scan"))
        for symbol in set(watermarks) | set(tails):
            start = max(watermarks.get(symbol, 0), tails.get(symbol, 0))
            st = self.sequencer.state(symbol)
            st.accepted = st.settled = start
            self.start_points[symbol] = start
            self.m.topic_seq.labels(symbol).set(start)
        self.producer = Producer({**kafka.producer_settings("settle-bridge"), "error_cb": self._on_error})
        log.info("bridge: topic %s (%d partitions) holds %d symbols; resuming each after max(store watermark, "
                 "topic tail); %d trades in the topic past the store", kafka.topic, kafka.partitions,
                 len(self.start_points), sum(max(0, tails.get(s, 0) - watermarks.get(s, 0)) for s in tails))

    async def _store_watermarks(self) -> dict[str, int]:
        store = await open_store(self.config.store)
        try:
            return await store.watermarks()
        finally:
            await store.close()

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Retriable errors (store or broker not there yet) back off; a config error propagates."""

        def is_retriable(error: Exception) -> bool:
            if isinstance(error, SettleError):
                return error.retriable and not isinstance(error, ConfigError)
            return isinstance(error, KafkaException)

        def on_retry(error: Exception, wait_s: float) -> None:
            log.warning("bridge: %s failed, retrying in %.1fs: %s", what, wait_s, error)
            if self._stopping.is_set():
                raise SettleError(f"bridge: stopped while trying to {what}") from error

        return await retry(op, Backoff(RETRY_BACKOFF_S_MIN, RETRY_BACKOFF_S_MAX), on_retry, is_retriable)

    # ---------------------------------------------------------------- run

    async def run(self) -> None:
        await self.start()
        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.config.router.rcvhwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        # The bridge plays the router's part towards the ME: its keypair, its place in the ME's allow-list.
        watch = security.load_keyring(self.config, "router").client(sub, self.config.me.publish, "me", "bridge->me")
        sub.connect(self.config.me.publish)
        # Created after the start points: it asks the ME for everything past them (its tail_wanted).
        self.gaps = GapFiller(self.config, BRIDGE_ID, self.sequencer, self.m,
                              self._replayed.append)
        self.m.ready.set(1)
        self.lifeline.ready()
        tasks = [
            asyncio.create_task(self._intake(sub), name="intake"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self.gaps.run(), name="gaps"),
        ]
        if watch is not None:
            tasks.append(asyncio.create_task(watch.run(), name="curve-watch"))
        try:
            await self._stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sub.close(0)
            if watch is not None:
                watch.close()
            self.gaps.close()
            await self._flush()
        if self._failure is not None:
            raise BridgeFailed(self._failure)

    def stop(self) -> None:
        self._stopping.set()

    async def _flush(self) -> None:
        producer = self.producer
        if producer is None:
            return
        timeout = self.config.supervisor.drain_timeout_s
        left = await asyncio.get_running_loop().run_in_executor(None, producer.flush, timeout)
        if left:
            log.warning("bridge: %d messages not acknowledged at exit; the next start produces them again", left)

    async def _intake(self, sub: zmq.asyncio.Socket) -> None:
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
        decoder = stream_decoder()
        quarantine = Quarantine(self.config.quarantine_path, "bridge", self.m.quarantined)
        producer = self.producer
        assert producer is not None
        try:
            while not self._stopping.is_set():
                producer.poll(0)
                while self._replayed:
                    for trade in self._replayed.popleft():
                        await self._offer(trade)
                if not await sub.poll(timeout=20):
                    continue
                count = 0
                for _ in range(DRAIN_BATCH):
                    try:
                        frame = raw.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    count += 1
                    msg = validate(frame, decoder, quarantine)
                    if isinstance(msg, Trade):
                        await self._offer(msg)
                    elif isinstance(msg, Heartbeat):
                        await self._on_heartbeat(msg)
                self.m.received.inc(count)
        finally:
            quarantine.close()

    async def _offer(self, trade: Trade) -> None:
        ready = self.sequencer.offer(trade, time.monotonic_ns())
        if ready is None:
            self.m.duplicates.inc()
            return
        for t in ready:
            await self._produce(t.symbol, encoder.encode(t))
            self.m.produced_trades.inc()
        if ready:
            self.m.topic_seq.labels(trade.symbol).set(ready[-1].seq)

    async def _on_heartbeat(self, hb: Heartbeat) -> None:
        self.sequencer.heartbeat(hb.symbol, hb.seq, time.monotonic_ns())
        self.m.me_latest.labels(str(BRIDGE_ID), hb.symbol).set(hb.seq)
        st = self.sequencer.symbols[hb.symbol]
        if hb.seq and st.accepted >= hb.seq:
            await self._produce(hb.symbol, encoder.encode(hb))
            self.m.produced_heartbeats.inc()

    async def _produce(self, symbol: str, value: bytes) -> None:
        """Hand one message to the producer; when its queue is full, serve acknowledgements and wait."""
        producer = self.producer
        assert producer is not None
        partition = self.kafka.partition_of(symbol)
        while True:
            try:
                producer.produce(self.kafka.topic, value=value, key=symbol.encode(), partition=partition,
                                 on_delivery=self._on_delivery)
                return
            except BufferError:
                self.m.producer_full.inc()
                producer.poll(0)
                await asyncio.sleep(0.005)

    def _on_delivery(self, error: KafkaError | None, msg: Message) -> None:
        if error is None:
            self.m.delivered.inc()
            return
        self.m.kafka_errors.labels(error.name()).inc()
        self._fail(f"delivery to {msg.topic()} [{msg.partition()}] failed: {error.str()}")

    def _on_error(self, error: KafkaError) -> None:
        self.m.kafka_errors.labels(error.name()).inc()
        if error.fatal():
            self._fail(f"fatal producer error: {error.str()}")
            return
        now = time.monotonic()
        if now - self._latest_logged.get(error.name(), 0.0) > 5.0:  # a broker outage: once per 5 s
            self._latest_logged[error.name()] = now
            log.warning("bridge: kafka: %s (retrying)", error.str())

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
            log.error("bridge: %s; stopping: the next start produces again from the topic's tail", reason)
        self._stopping.set()

    async def _housekeeping(self) -> None:
        producer = self.producer
        assert producer is not None
        while True:
            await asyncio.sleep(BEAT_INTERVAL_S)
            producer.poll(0)
            self.lifeline.beat()
            self.m.unacked.set(len(producer))
            self.m.gaps_open.set(len(self.sequencer.open_gaps()))
            self.m.gap_held.set(self.sequencer.held_total)
            for symbol, st in self.sequencer.symbols.items():
                self.m.topic_seq.labels(symbol).set(st.accepted)


def main(argv: list[str] | None = None) -> int:
    def start(config: Config, args: argparse.Namespace, lifeline: Lifeline) -> Bridge:
        log.info("bridge: ME %s -> kafka %s topic %s", config.me.publish, config.kafka.bootstrap_servers,
                 config.kafka.topic)
        return Bridge(config, config.kafka, lifeline)

    return child_main(argv, "settle bridge: the ME's ZMQ stream into the Kafka topic", "bridge", start,
                      lambda config, args: config.kafka.bridge_metrics_port)

if __name__ == "__main__":
    raise SystemExit(main())
