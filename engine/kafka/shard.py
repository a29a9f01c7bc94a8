"""A shard of the Kafka mode: one member of the consumer group that settles the topic's partitions.

    python -m engine.kafka.shard --config-json FILE --shard N [--ready-fd F]

One loop, strictly in turn: **consume** up to ``kafka.consume_batch_max`` messages (waiting at most
``kafka.consume_wait_ms``), **sequence** them (per symbol: a duplicate at or below the store's watermark
is dropped, the next one is ready, one past a hole is held), **settle** the ready trades through the
same :class:`~engine.core.settlement.Settler` and idempotent store path as the ZMQ shards, and only then
**commit** each partition's offset: the offset of its first message not yet settled (or one past its
last message). A crash anywhere re-reads from the last commit; what the store already holds is dropped
by watermark, so every trade is settled once in effect.

No local WAL: the topic is the durable log, replicated by the brokers, and an offset is committed only
after the store acknowledged every trade before it. Everything a WAL would give back after a crash, the
topic gives back from the committed offset (see docs/kafka.md).

Rebalances (classic, eager protocol): the rebalance callbacks run inside ``consume``, which this loop
calls only between batches, so there is never a batch in flight when one comes. On revocation the shard
commits what it settled and lets go: it forgets the partitions' sequence state, their held trades and
its cache of positions (the next owner writes them). On assignment it reloads the watermarks from the
store. A message that arrives for a partition the shard no longer owns is ignored.

A hole in the topic (a broker lost acknowledged data; the bridge itself never leaves one) is seen when
a trade comes past ``watermark + 1`` or a topic heartbeat from the bridge names a sequence the shard has
not seen. The trades behind it are held, the hole shows in ``settle_gaps_open``, and the shard asks the
ME to replay the missing range (:class:`~shards.gaps.GapFiller`; ``kafka.gap_replay``). The partition's
committed offset stays below the hole until it is filled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import msgspec
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry

from engine.core import metrics as metricsmod
from engine.core.child import Lifeline, child_main
from engine.core.config import Config
from engine.core.messages import Heartbeat, Trade, check_trade, stream_decoder
from engine.core.quarantine import Quarantine
from engine.core.settlement import Settler
from engine.core.store import Store, open_store
from engine.kafka.config import KafkaConfig
from shards.gaps import GapFiller
from shards.settling import SettleStage
from shards.state import Sequencer

STORE_BATCH_TRADES_MAX: Final = 20_000
HOUSEKEEPING_INTERVAL_S: Final = 1.0
CLOSE_TIMEOUT_S: Final = 10.0

log = logging.getLogger("settle.kafka_shard")


class KafkaShardMetrics:
    """What the Kafka mode adds to :class:`~engine.core.metrics.ShardMetrics` (which it also serves)."""

    def __init__(self, registry: CollectorRegistry, shard: int) -> None:
        f = metricsmod.Families(registry)
        s = str(shard)
        self.assigned = f.gauge("settle_kafka_assigned_partitions", "Topic partitions this shard owns",
                                ["shard"]).labels(s)
        self.rebalances = f.counter("settle_kafka_rebalances_total", "Partition assignments and revocations",
                                    ["shard", "kind"])
        for kind in ("assign", "revoke", "lost"):
            self.rebalances.labels(s, kind)
        self.commits = f.counter("settle_kafka_commits_total", "Offset commits sent", ["shard"]).labels(s)
        self.commit_errors = f.counter("settle_kafka_commit_errors_total",
                                       "Offset commits that failed (the next one covers them)",
                                       ["shard"]).labels(s)
        self.consume_errors = f.counter("settle_kafka_consume_errors_total", "Consumer errors, by name",
                                        ["shard", "error"])
        self.ignored = f.counter("settle_kafka_ignored_messages_total",
                                 "Messages of partitions no longer owned (fetched before a revocation)",
                                 ["shard"]).labels(s)


class KafkaShard(SettleStage):
    def __init__(self, config: Config, kafka: KafkaConfig, shard: int, lifeline: Lifeline | None = None) -> None:
        self.config = config
        self.kafka = kafka
        self.shard = shard
        self.lifeline = lifeline or Lifeline(None)
        self.registry = metricsmod.new_registry(config.metrics.enabled)
        self.m = metricsmod.ShardMetrics(self.registry, shard, lag_budget_s=config.metrics.lag_budget_ms / 1000)
        self.km = KafkaShardMetrics(self.registry, shard)
        self.sequencer = Sequencer(config.wal.gap_buffer_max)
        self.store: Store | None = None
        self.settler: Settler | None = None
        self.consumer: Consumer | None = None
        self.gaps: GapFiller | None = None
        self.assigned: set[int] = set()
        # Offsets, per owned partition. Every message below ``_committable(p)`` is settled (or a duplicate).
        self._next: dict[int, int] = {}  # one past the last message handled
        self._pending: dict[int, dict[int, tuple[str, int]]] = {}  # offset -> (symbol, seq) not yet settled
        self._committed: dict[int, int] = {}
        self._commit_failed = False
        # Filled by the rebalance callbacks, which run on the consume thread inside consume()/close().
        self._events: list[tuple[str, list[int]]] = []
        self._replayed: deque[list[Trade]] = deque()  # from the ME (a hole in the topic)
        self._stopping = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle-kafka")
        self._quarantine: Quarantine | None = None
        self._shard_label = str(shard)
        self._logged: dict[str, float] = {}

    # ---------------------------------------------------------------- start-up

    async def start(self) -> None:
        self.store = await self._retry("connect to the store", lambda: open_store(self.config.store, shard=self.shard))
        self.settler = Settler(self.store, self.config.engine.fee_account)
        settings = {**self.kafka.consumer_settings(f"settle-shard-{self.shard}"), "error_cb": self._on_error,
                    "on_commit": self._on_commit}
        self.consumer = Consumer(settings)
        self.consumer.subscribe([self.kafka.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self._quarantine = Quarantine(self.config.quarantine_path, f"shard-{self.shard}", self.m.quarantined)

    async def run(self) -> None:
        await self.start()
        self.gaps = GapFiller(self.config, self.shard, self.sequencer, self.m, self._replayed.append)
        self.gaps.tail_wanted.clear()  # the topic brings what the ME published; ask only for holes
        self.m.ready.set(1)
        self.lifeline.ready()
        tasks = [asyncio.create_task(self._housekeeping(), name="housekeeping")]
        if self.kafka.gap_replay:
            tasks.append(asyncio.create_task(self.gaps.run(), name="gaps"))
        try:
            await self._loop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    def stop(self) -> None:
        self._stopping.set()

    # ---------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        loop = asyncio.get_running_loop()
        batch_max = self.kafka.consume_batch_max
        wait_s = self.kafka.consume_wait_ms / 1000
        decoder = stream_decoder()
        while not self._stopping.is_set():
            messages = await loop.run_in_executor(self._pool, consumer.consume, batch_max, wait_s)
            if self._events:
                await self._apply_rebalances()
            ready: list[Trade] = []
            for msg in messages:
                self._handle(msg, decoder, ready)
            while self._replayed:
                for trade in self._replayed.popleft():
                    if self.kafka.partition_of(trade.symbol) in self.assigned:
                        self._offer(trade, ready)
            if ready:
                for i in range(0, len(ready), STORE_BATCH_TRADES_MAX):
                    await self._settle(ready[i:i + STORE_BATCH_TRADES_MAX])
                # The offsets committed next let the topic forget these trades: they must be durable first.
                assert self.store is not None
                await self._retry("make the store durable", self.store.sync)
                self._release_pending()
            if messages or ready:
                self._commit(asynchronous=True)

    def _handle(self, msg: Message, decoder: msgspec.msgpack.Decoder[Trade | Heartbeat], ready: list[Trade]) -> None:
        error = msg.error()
        if error is not None:
            self._on_error(error)
            return
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None
        assert offset is not None
        if partition not in self.assigned:
            self.km.ignored.inc()
            return
        self._next[partition] = offset + 1
        value = msg.value() or b""
        try:
            decoded = decoder.decode(value)
        except msgspec.DecodeError as e:
            assert self._quarantine is not None
            self._quarantine.put("malformed", f"partition {partition} offset {offset}: {e}", value)
            return
        match decoded:
            case Heartbeat(symbol=symbol, seq=seq):
                self.sequencer.heartbeat(symbol, seq, time.monotonic_ns())
                self.m.me_latest.labels(self._shard_label, symbol).set(seq)
            case Trade():
                reason = check_trade(decoded)
                if reason is not None:
                    assert self._quarantine is not None
                    self._quarantine.put("unsound", f"partition {partition} offset {offset}: {reason}", value)
                    return
                self.m.received.inc()
                if not self._offer(decoded, ready):
                    self._pending.setdefault(partition, {})[offset] = (decoded.symbol, decoded.seq)

    def _offer(self, trade: Trade, ready: list[Trade]) -> bool:
        """Sequence one trade. False when it waits behind a hole (held, or dropped and replayed later)."""
        out = self.sequencer.offer(trade, time.monotonic_ns())
        if out is None:
            self.m.duplicates.inc()
            return True
        self.m.stage["intake"].observe_since(time.time_ns(), [t.ts_ns for t in out])
        ready.extend(out)
        return bool(out)

    def _release_pending(self) -> None:
        """Held trades that are now settled no longer hold their partition's commit back."""
        for pending in self._pending.values():
            for offset in [o for o, (symbol, seq) in pending.items() if seq <= self.sequencer.state(symbol).settled]:
                del pending[offset]

    # ---------------------------------------------------------------- settle

    async def _settle(self, trades: list[Trade]) -> None:
        """Store the batch (retrying until the store has it), then advance the watermarks."""
        batch = await self._prepare_batch(trades)
        await self._store_batch(trades, batch)

    # ---------------------------------------------------------------- offsets

    def _committable(self, partition: int) -> int | None:
        pending = self._pending.get(partition)
        if pending:
            return min(pending)
        return self._next.get(partition)

    def _offsets_to_commit(self, partitions: set[int]) -> list[TopicPartition]:
        out = []
        for p in sorted(partitions):
            offset = self._committable(p)
            if offset is not None and (self._commit_failed or offset != self._committed.get(p)):
                out.append(TopicPartition(self.kafka.topic, p, offset))
        return out

    def _commit(self, *, asynchronous: bool, partitions: set[int] | None = None) -> None:
        """Commit what is settled. Called only while no batch is between consume and settled."""
        consumer = self.consumer
        assert consumer is not None
        offsets = self._offsets_to_commit(self.assigned if partitions is None else partitions)
        if not offsets:
            return
        self._commit_failed = False
        try:
            if asynchronous:
                consumer.commit(offsets=offsets, asynchronous=True)
            else:
                failed = [tp for tp in consumer.commit(offsets=offsets, asynchronous=False) if tp.error]
                if failed:
                    raise KafkaException(failed[0].error)
        except KafkaException as e:
            self._commit_failed = True
            self.km.commit_errors.inc()
            log.warning("shard %d: offset commit failed (redelivery covers it): %s", self.shard, e)
            return
        self.km.commits.inc()
        for tp in offsets:
            self._committed[tp.partition] = tp.offset

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None:
            self._commit_failed = True
            self.km.commit_errors.inc()
            log.warning("shard %d: offset commit failed (the next one covers it): %s", self.shard, error.str())

    # ---------------------------------------------------------------- rebalances

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._events.append(("assign", [tp.partition for tp in partitions]))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let go: commit what is settled (nothing is in flight inside consume()), then forget it."""
        owned = {tp.partition for tp in partitions} & self.assigned
        self._commit(asynchronous=False, partitions=owned)
        self._events.append(("revoke", [tp.partition for tp in partitions]))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Out of the group (session expired): no commit is possible; the next owner re-reads."""
        self._events.append(("lost", [tp.partition for tp in partitions]))

    async def _apply_rebalances(self) -> None:
        events, self._events = self._events, []
        changed: set[int] = set()
        for kind, partitions in events:
            self.km.rebalances.labels(self._shard_label, kind).inc()
            changed |= set(partitions)
            if kind == "assign":
                self.assigned |= set(partitions)
            else:
                self._let_go(set(partitions))
            log.info("shard %d: %s partitions %s; owns %s", self.shard, kind, partitions, sorted(self.assigned))
        # Another shard may have settled these partitions' symbols meanwhile: forget what this process knew
        # of them (sequence state, held trades, cached positions) and start again from the store.
        assert self.settler is not None
        assert self.store is not None
        self.settler.forget()
        partition_of = self.kafka.partition_of
        stale = [s for s in self.sequencer.symbols
                 if partition_of(s) in changed or partition_of(s) not in self.assigned]
        for symbol in stale:
            self._drop_symbol(symbol)
        reload = changed & self.assigned
        if reload:
            store = self.store
            watermarks: dict[str, int] = await self._retry("read watermarks", store.watermarks)
            for symbol, seq in watermarks.items():
                if partition_of(symbol) in reload:
                    st = self.sequencer.state(symbol)
                    st.settled = st.accepted = seq
        self.km.assigned.set(len(self.assigned))

    def _let_go(self, partitions: set[int]) -> None:
        self.assigned -= partitions
        for p in partitions:
            self._next.pop(p, None)
            self._pending.pop(p, None)
            self._committed.pop(p, None)

    def _drop_symbol(self, symbol: str) -> None:
        st = self.sequencer.symbols.pop(symbol)
        self.sequencer.held_total -= len(st.held)
        if self.kafka.partition_of(symbol) not in self.assigned:
            for family in (self.m.watermark, self.m.me_latest):
                try:
                    family.remove(self._shard_label, symbol)
                except KeyError:
                    pass

    # ---------------------------------------------------------------- errors, housekeeping, close

    def _on_error(self, error: KafkaError) -> None:
        """Client errors (a broker away, a topic not created yet) are retried by the client; logged once per 5 s."""
        self.km.consume_errors.labels(self._shard_label, error.name()).inc()
        if error.fatal():
            log.error("shard %d: fatal consumer error: %s", self.shard, error.str())
            self._stopping.set()
            return
        now = time.monotonic()
        if now - self._logged.get(error.name(), 0.0) > 5.0:
            self._logged[error.name()] = now
            log.warning("shard %d: kafka: %s", self.shard, error.str())

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            self.lifeline.beat()
            now = time.monotonic_ns()
            for symbol, st in self.sequencer.symbols.items():
                self.m.watermark.labels(self._shard_label, symbol).set(st.settled)
            gaps = self.sequencer.open_gaps()
            self.m.gaps_open.set(len(gaps))
            self.m.gap_held.set(self.sequencer.held_total)
            oldest = min((st.gap_since_ns for st in gaps if st.gap_since_ns), default=0)
            self.m.gap_oldest.set((now - oldest) / 1e9 if oldest else 0)

    async def close(self) -> None:
        """Commit what is settled, leave the group (the others take the partitions at once), close.

        Bounded: with the broker away librdkafka's commit and close can wait for ever, so they run on a
        daemon thread and the shard exits after ``CLOSE_TIMEOUT_S`` regardless (the next owner re-reads
        from the last commit; nothing is lost).
        """
        if self.consumer is not None:
            consumer = self.consumer
            self.consumer = None

            def leave() -> None:
                self.consumer = consumer
                try:
                    self._commit(asynchronous=False)
                    consumer.close()
                finally:
                    self.consumer = None

            if not await _on_daemon_thread(leave, CLOSE_TIMEOUT_S):
                log.warning("shard %d: leaving the group took over %.0fs (broker away?); exiting without it",
                            self.shard, CLOSE_TIMEOUT_S)
        if self.gaps is not None:
            self.gaps.close()
        if self._quarantine is not None:
            self._quarantine.close()
        if self.store is not None:
            await self.store.close()
        self._pool.shutdown(wait=False)


async def _on_daemon_thread(fn: Callable[[], None], timeout_s: float) -> bool:
    """Run ``fn`` on a daemon thread (one that cannot hold the process at exit); False on timeout."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish(error: Exception | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def target() -> None:
        error: Exception | None = None
        try:
            fn()
        except Exception as e:  # handed to the awaiting coroutine
            error = e
        try:
            loop.call_soon_threadsafe(finish, error)
        except RuntimeError:  # the loop is gone: the shard exited without waiting
            pass

    threading.Thread(target=target, name="settle-kafka-close", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        return False
    except KafkaException as e:
        log.warning("closing the consumer: %s", e)
    return True


def main(argv: list[str] | None = None) -> int:
    def start(config: Config, args: argparse.Namespace, lifeline: Lifeline) -> KafkaShard:
        return KafkaShard(config, config.kafka, args.shard, lifeline)

    return child_main(argv, "settle Kafka-mode shard process (a consumer-group member)", "shard", start,
                      lambda config, args: config.metrics.shard_port_base + args.shard, shard=True)

if __name__ == "__main__":
    raise SystemExit(main())
