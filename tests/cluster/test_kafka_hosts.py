"""Settle on two hosts: network namespaces on a LAN of their own (``engine.verify.netns``), each running a
Kafka-mode shard; three brokers (replication factor 3, ``min.insync.replicas`` 2) on the machine's
addresses on that LAN; the ME simulator and the bridge on the machine. Both shards are one consumer
group. The store is the embedded one on the disk the namespaces share (namespaces share the file
system): the store's own rules are what fence a stale writer, whichever store it is.

- Partition: host a loses the brokers (every packet between them dropped) mid-stream while it still
  reaches the store. The group gives a's partitions to b once a's session expires; a does not know yet
  and keeps settling what it had fetched. Those late writes are harmless by construction: every row
  is written with the symbol's sequence (positions hold absolute amounts with ``last_seq``; a row is
  replaced only by a larger sequence, the watermark only moves up), so a write computed from older
  sequences than the row holds is ignored, and one computed from the same sequences is identical.
  When a comes back it rejoins; at the end the checker finds every trade once and every balance exact.
- A whole host dies (every process in it SIGKILLed): b takes over a's partitions, checker exact.

Figures (``-s``): trades, how long until b owned every partition, how much a settled after it lost
them, lost 0 / doubled 0.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.kafka import config as kafka_config
from engine.verify import netns
from engine.verify.kafka_testbed import KafkaSystem
from engine.verify.servers import KafkaCluster, ServerError
from tests.cluster.conftest import require_netns
from tests.conftest import server_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hosts")]

PARTITIONS = 8


class Setting:
    def __init__(self, lan: netns.Lan, brokers: KafkaCluster) -> None:
        self.lan = lan
        self.brokers = brokers
        self.broker_addresses = [node.host for node in brokers.nodes]
        self.me_address = lan.host_address(5)
        self.a = lan.add_host("a")
        self.b = lan.add_host("b")


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setting]:
    require_netns()
    with netns.Lan() as lan:
        brokers = KafkaCluster([lan.host_address(n) for n in (2, 3, 4)])
        try:
            brokers.start(tmp_path_factory.mktemp("kafka-lan"))
        except (ServerError, OSError) as e:
            server_unavailable("a 3-node Kafka cluster on a test LAN", e)
        try:
            made = Setting(lan, brokers)
            for host in (made.a, made.b):
                for node in brokers.nodes:
                    lan.wait_reachable(host, node.host, node.port)
            yield made
        finally:
            brokers.stop()


def free_port(address: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


def make_system(root: Path, setting: Setting) -> tuple[KafkaSystem, dict[str, Path]]:
    """The system with the ME on the LAN, and one config per host (its metrics on its own address)."""
    system = KafkaSystem(root, setting.brokers.bootstrap, shard_slots=2, partitions=PARTITIONS,
                         overrides={"me.heartbeat_interval_ms": 200, "kafka.replication_factor": 3,
                                    "kafka.min_insync_replicas": 2})
    system.raw["me"]["publish"] = f"tcp://{setting.me_address}:{free_port(setting.me_address)}"
    system.raw["me"]["replay"] = f"tcp://{setting.me_address}:{free_port(setting.me_address)}"
    system.config_path.write_text(json.dumps(system.raw, indent=2))
    system.config, system.kafka = kafka_config.split(system.raw, "test")
    configs = {}
    for host in (setting.a, setting.b):
        raw = copy.deepcopy(system.raw)
        raw["metrics"]["host"] = host.address
        configs[host.name] = root / f"config-{host.name}.json"
        configs[host.name].write_text(json.dumps(raw, indent=2))
    return system, configs


def shard_metric(system: KafkaSystem, host: netns.Host, slot: int, name: str) -> float:
    port = system.config.metrics.shard_port_base + slot
    with urllib.request.urlopen(f"http://{host.address}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def wait_owned(system: KafkaSystem, host: netns.Host, slot: int, partitions: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while shard_metric(system, host, slot, "settle_kafka_assigned_partitions") != partitions:
        assert time.monotonic() < deadline, f"shard {slot} on {host} does not own {partitions} partitions " \
                                            f"after {timeout_s} s\n{system.logs()}"
        time.sleep(0.1)
    return time.monotonic()


def start_two_hosts(system: KafkaSystem, setting: Setting, configs: dict[str, Path]) -> None:
    system.start_bridge()
    system.start_shard(0, prefix=setting.a.command([]), config_path=configs["a"])
    system.start_shard(1, prefix=setting.b.command([]), config_path=configs["b"])
    deadline = time.monotonic() + 60
    while True:
        owned = (shard_metric(system, setting.a, 0, "settle_kafka_assigned_partitions"),
                 shard_metric(system, setting.b, 1, "settle_kafka_assigned_partitions"))
        if sum(owned) == PARTITIONS and min(owned) > 0:
            return
        assert time.monotonic() < deadline, f"the two hosts never shared the partitions: {owned}\n{system.logs()}"
        time.sleep(0.1)


def assert_exact(system: KafkaSystem, trades: int) -> None:
    report = system.check()
    assert report.ok, report.format() + "\n" + system.logs()
    assert report.published == report.settled == trades


def test_a_host_partitioned_from_the_brokers_is_fenced_and_rejoins(tmp_path: Path, setting: Setting) -> None:
    trades = 60_000
    system, configs = make_system(tmp_path, setting)
    a, b = setting.a, setting.b
    try:
        start_two_hosts(system, setting, configs)
        a_owned = shard_metric(system, a, 0, "settle_kafka_assigned_partitions")
        system.start_sim(trades, rate=0)  # flat out: a has fetched far ahead of what it settled when cut off
        system.wait_settled(10_000, at_least=True)
        # The worst case: a does not know it lost its partitions. Its shard is frozen (SIGSTOP) with
        # whatever it had fetched or was writing, the brokers are cut off, the group moves on without it;
        # then it thaws, still cut off from the brokers but not from the store, and writes what it held.
        shard_a = system.pid("shard-0")
        a_before = shard_metric(system, a, 0, "settle_trades_settled_total")
        # Frozen inside a store write it holds the write lock of its own store file only: b writes its own.
        os.kill(shard_a, signal.SIGSTOP)
        cut = time.monotonic()
        a.block(setting.broker_addresses)
        took_over = wait_owned(system, b, 1, PARTITIONS, timeout_s=60)
        # b settles on: 2,000 more than at the takeover, or all that is left (flat out, b may have settled
        # most of the run by the time the takeover is seen).
        at_takeover = system.settled()
        beyond = min(at_takeover + 2_000, trades)
        while (settled := system.settled()) < beyond:
            waited = time.monotonic() - took_over
            assert waited < 120, (f"b settled {settled - at_takeover} trades in {waited:.0f} s after the takeover: "
                                  f"{settled} of {trades} settled, {at_takeover} at the takeover\n{system.logs()}")
            time.sleep(0.05)
        os.kill(shard_a, signal.SIGCONT)
        thawed = time.monotonic()
        a_at_thaw = shard_metric(system, a, 0, "settle_trades_settled_total")
        while time.monotonic() - thawed < 3.0:  # a's session expired meanwhile: it finds out within a turn
            time.sleep(0.1)
        a_late = shard_metric(system, a, 0, "settle_trades_settled_total") - a_at_thaw
        a.unblock()
        system.wait_settled(timeout_s=180)
        assert system.running("shard-0"), "host a's shard died after the partition"
        assert system.running("shard-1")
        assert_exact(system, trades)
        print(f"\npartition of host a (frozen) from the brokers ({a_owned:.0f} partitions, {a_before:.0f} settled "
              f"there): b owned all {PARTITIONS} {took_over - cut:.1f} s later; thawed still cut off, a settled "
              f"{a_late:.0f} trades after it had lost its partitions (fenced by sequence); {trades} trades, "
              f"lost 0, doubled 0")
    finally:
        a.unblock()
        system.stop()


def test_a_whole_host_killed_the_other_takes_over(tmp_path: Path, setting: Setting) -> None:
    trades = 40_000
    system, configs = make_system(tmp_path, setting)
    a, b = setting.a, setting.b
    try:
        start_two_hosts(system, setting, configs)
        system.start_sim(trades, rate=6_000)
        system.wait_settled(8_000, at_least=True)
        killed_at = system.settled()
        killed = time.monotonic()
        assert system.pid("shard-0") in a.kill_all()
        system.kill("shard-0")  # already dead: the system forgets it
        took_over = wait_owned(system, b, 1, PARTITIONS, timeout_s=60)
        system.wait_settled(timeout_s=180)
        done = time.monotonic()
        assert_exact(system, trades)
        print(f"\nhost a killed (all its processes SIGKILLed) with {killed_at} settled: b owned all {PARTITIONS} "
              f"partitions {took_over - killed:.1f} s later, all {trades} settled {done - killed:.1f} s after the "
              f"kill; lost 0, doubled 0")
    finally:
        system.stop()
