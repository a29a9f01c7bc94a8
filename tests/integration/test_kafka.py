"""The Kafka mode with a real broker and real processes: ME simulator -> bridge -> topic -> Kafka shards.

Each test ends with every trade settled exactly once and every balance equal to the one computed from
the ME's own log (``engine.verify.checker``), after a fault: a consumer shard SIGKILLed mid-stream (once
anywhere, once holding a batch the store has not taken), a shard added and then two removed (three
rebalances), the bridge SIGKILLed, the broker SIGKILLed and restarted.

One broker serves the session (``xdist_group("kafka")`` keeps these tests on one worker); each test has
its own topic and consumer group. In CI (``CI`` set) a broker that fails to start fails the run;
locally the tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.core.store.embedded import store_files
from engine.verify.kafka_testbed import KafkaSystem
from tests.conftest import server_unavailable
from tests.servers.kafka import KafkaServer, KafkaServerError

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("kafka")]


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    """A real Kafka 4.x broker (KRaft, one node) on free loopback ports, for the whole session."""
    server = KafkaServer()
    try:
        server.start(tmp_path_factory.mktemp("kafka"))
    except (KafkaServerError, OSError) as e:
        server_unavailable("Kafka", e)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_system(tmp_path: Path, kafka: KafkaServer) -> Iterator[Callable[..., KafkaSystem]]:
    """Builds the test's system (its own topic and group on the session broker); stops it at the end."""
    made: list[KafkaSystem] = []

    def make(**overrides: Any) -> KafkaSystem:
        ks = KafkaSystem(tmp_path, kafka.bootstrap, shard_slots=3, partitions=8,
                         overrides={"me.heartbeat_interval_ms": 200, **overrides})
        made.append(ks)
        return ks

    try:
        yield make
    finally:
        for ks in made:
            ks.stop()


@pytest.fixture
def system(make_system: Callable[..., KafkaSystem]) -> KafkaSystem:
    return make_system()


def assert_exact(ks: KafkaSystem) -> None:
    report = ks.check()
    assert report.ok, report.format() + "\n" + ks.logs()
    assert report.published == ks.sim_trades
    assert report.settled == ks.sim_trades


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def wait_metric(ks: KafkaSystem, process: str, name: str, at_least: float, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    value = 0.0
    while time.monotonic() < deadline:
        value = metric(ks.metrics(process), name)
        if value >= at_least:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{process}: {name} stayed at {value} (< {at_least}) for {timeout_s}s\n{ks.logs()}")


def test_sigkill_a_consumer_shard_mid_stream(system: KafkaSystem) -> None:
    system.start_bridge()
    system.start_shard(0)
    system.start_shard(1)
    system.start_sim(40_000, rate=8_000)
    system.wait_settled(5_000, at_least=True)
    system.kill("shard-0")  # no commit, no leave: its partitions move after the session timeout
    system.wait_settled(10_000, at_least=True)
    system.start_shard(0)  # respawned into the same slot, as the supervisor does
    system.wait_settled()
    assert_exact(system)


def test_sigkill_a_shard_holding_a_batch_the_store_has_not_taken(make_system: Callable[..., KafkaSystem]) -> None:
    """Offsets are committed only after the store has the trades: a shard killed with a consumed batch
    in hand loses nothing. The ME's replay is turned off, so nothing else could bring the batch back."""
    system = make_system(**{"kafka.gap_replay": False})
    system.start_bridge()
    system.start_shard(0)
    system.start_shard(1)
    system.start_sim(80_000, rate=8_000)
    system.wait_settled(5_000, at_least=True)
    # shard-0 must be consuming when the store stops taking writes: a member still joining the group holds no
    # batch, and its join cannot complete while shard-1 waits on the store with its partitions in hand.
    wait_metric(system, "shard-0", "settle_trades_settled_total", 1)
    with contextlib.ExitStack() as stack:
        for path in store_files(system.config.store.path):  # every shard writes a file of its own
            db = stack.enter_context(contextlib.closing(sqlite3.connect(path, timeout=30, isolation_level=None)))
            db.execute("BEGIN EXCLUSIVE")  # the store stops taking writes
        wait_metric(system, "shard-0", "settle_store_inflight_batches", 1)  # a batch waits for the store
        system.kill("shard-0")
    system.start_shard(0)
    system.wait_settled()
    assert_exact(system)


def test_a_shard_joins_and_shards_leave_mid_stream(system: KafkaSystem) -> None:
    """Partitions move to a new member and back: a shard that gets a partition back must not settle
    from what it knew before (its positions are stale: another member settled the symbols meanwhile)."""
    system.start_bridge()
    system.start_shard(0)
    system.start_shard(1)
    total = 60_000
    system.start_sim(total, rate=6_000)
    system.wait_settled(5_000, at_least=True)
    system.start_shard(2)  # joins: the eight partitions are spread over three members
    wait_metric(system, "shard-2", "settle_kafka_assigned_partitions", 1)
    wait_metric(system, "shard-2", "settle_trades_settled_total", 1_000)
    system.kill("shard-2", signal.SIGTERM)  # leaves cleanly: its partitions go back to their first owners
    # Never more than the stream holds: the simulator may be nearly done by now.
    system.wait_settled(min(system.settled() + 5_000, total), at_least=True)
    system.kill("shard-0", signal.SIGTERM)  # and shard-1 takes every partition
    system.wait_settled()
    assert_exact(system)


def test_sigkill_the_bridge_mid_stream(system: KafkaSystem) -> None:
    system.start_bridge()
    system.start_shard(0)
    system.start_shard(1)
    system.start_sim(40_000, rate=8_000)
    system.wait_settled(5_000, at_least=True)
    system.kill("bridge")  # trades published meanwhile reach nobody; unacknowledged ones are lost
    time.sleep(1.0)  # the ME publishes on without a subscriber
    system.start_bridge()  # resumes after max(store watermark, topic tail) and asks the ME for the rest
    wait_metric(system, "bridge", "settle_replay_requests_total", 1)
    system.wait_settled()
    assert_exact(system)


def test_broker_sigkill_and_restart_mid_stream(system: KafkaSystem, kafka: KafkaServer) -> None:
    system.start_bridge()
    system.start_shard(0)
    system.start_shard(1)
    system.start_sim(40_000, rate=8_000)
    system.wait_settled(5_000, at_least=True)
    kafka.restart(hard=True)  # SIGKILL, then the same data dir and ports
    system.wait_settled(timeout_s=100.0)
    assert_exact(system)


def test_settle_run_source_kafka_supervises_the_bridge_and_the_consumer_shards(
        make_system: Callable[..., KafkaSystem]) -> None:
    import json

    from engine.verify.demo import start_engine, stop, wait_engine_ready

    ks = make_system()
    engine = start_engine(ks.config_path, ks.root)  # `settle run` with engine.source = "kafka"
    try:
        wait_engine_ready(engine, ks.root, 180)
        slots = json.loads((ks.root / "run" / "supervisor.json").read_text())["slots"]
        assert sorted(slots) == ["bridge", "shard-0", "shard-1", "shard-2"]
        ks.start_sim(20_000, rate=5_000)
        ks.wait_settled(timeout_s=180)
    finally:
        assert stop(engine, 90) == 0
    assert_exact(ks)
