"""The Kafka mode on three brokers (KRaft, each node broker and controller), the topic with replication
factor 3 and ``min.insync.replicas`` 2, as production runs it: SIGKILL the broker that leads the
partitions mid-stream; the others take over, the bridge and the shards follow the new leaders, and
every trade is settled once (checker exact). The cluster's start-up time and memory, the trades and the
time until settlement moved again are printed for the record (``-s``)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from engine.verify.kafka_testbed import KafkaSystem
from engine.verify.servers import KafkaCluster, ServerError
from tests.conftest import server_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hosts")]


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    cluster = KafkaCluster(("127.0.0.1", "127.0.0.2", "127.0.0.3"))
    try:
        cluster.start(tmp_path_factory.mktemp("kafka3"))
    except (ServerError, OSError) as e:
        server_unavailable("a 3-node Kafka cluster", e)
    print(f"\n3 Kafka brokers ready in {cluster.started_in_s:.1f} s, "
          f"resident memory {cluster.rss_bytes() / 2**20:.0f} MiB together")
    try:
        yield cluster
    finally:
        cluster.stop()


def leaders(bootstrap: str, topic: str) -> Counter[int]:
    """How many of TOPIC's partitions each broker leads, by node id."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "log_level": 0, "logger": logging.getLogger("quiet")}
    admin = AdminClient(conf)
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    assert meta.error is None, meta.error
    return Counter(p.leader for p in meta.partitions.values())


def wait_progress(system: KafkaSystem, beyond: int, timeout_s: float) -> float:
    """Until the store holds more than BEYOND trades; returns when that was seen (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while system.settled() <= beyond:
        assert time.monotonic() < deadline, f"nothing settled past {beyond} for {timeout_s} s\n{system.logs()}"
        time.sleep(0.05)
    return time.monotonic()


def test_sigkill_of_the_partition_leaders_broker_mid_stream(tmp_path: Path, brokers: KafkaCluster) -> None:
    trades = 40_000
    system = KafkaSystem(tmp_path, brokers.bootstrap, shard_slots=2, partitions=8,
                         overrides={"me.heartbeat_interval_ms": 200, "kafka.replication_factor": 3,
                                    "kafka.min_insync_replicas": 2})
    try:
        system.start_bridge()
        system.start_shard(0)
        system.start_shard(1)
        topic = system.kafka.topic
        replicas = AdminClient({"bootstrap.servers": brokers.bootstrap}).list_topics(topic, timeout=10).topics[topic]
        assert all(len(p.replicas) == 3 for p in replicas.partitions.values())
        system.start_sim(trades, rate=8_000)
        system.wait_settled(8_000, at_least=True)
        victim, led = leaders(brokers.bootstrap, topic).most_common(1)[0]
        at_kill = system.settled()
        killed = time.monotonic()
        brokers.node(victim).kill9()
        survivors = ",".join(n.bootstrap for n in brokers.nodes if n is not brokers.node(victim))
        deadline = time.monotonic() + 60
        while victim in leaders(survivors, topic):  # until the partitions it led have new leaders
            assert time.monotonic() < deadline, f"broker {victim} still leads partitions 60 s after its death"
            time.sleep(0.1)
        elected = time.monotonic()
        moved = wait_progress(system, system.settled() + 1_000, timeout_s=120)
        system.wait_settled(timeout_s=180)
        done = time.monotonic()
        report = system.check()
        assert report.ok, report.format() + "\n" + system.logs()
        assert report.published == report.settled == trades
        print(f"\nbroker {victim} (leader of {led} of 8 partitions) SIGKILLed with {at_kill} settled: new leaders "
              f"{elected - killed:.1f} s later, 1,000 more settled {moved - killed:.1f} s after the kill, all "
              f"{trades} {done - killed:.1f} s after it; lost 0, doubled 0")
    finally:
        system.stop()
        for node in brokers.nodes:
            if not node.is_running():
                node.start(node.data_dir, port=node.port, extra=node._restart_args())
