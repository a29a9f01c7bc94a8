"""``settle chaos --cluster``: the Kafka mode as operators run it on several hosts, under the faults of a
cluster, then the checker.

What runs, all on this machine (root: network namespaces, :mod:`engine.verify.netns`):

- a LAN of namespaces; on the machine's addresses on it a 3-node Cassandra cluster with logins and TLS
  (``ops/cassandra/cluster.sh``; settle writes with NetworkTopologyStrategy RF 3 and ``LOCAL_QUORUM``), three
  Kafka brokers (KRaft; the topic with replication factor 3, ``min.insync.replicas`` 2) and the ME simulator;
- the bridge on the machine, and two settle hosts, namespaces "a" and "b", each running one Kafka shard;
  both shards are one consumer group.

Faults (``chaos_faults.CLUSTER_KINDS``, drawn from the printed seed like those of ``settle chaos``):
``cassandra_node_kill`` SIGKILLs one Cassandra node and starts it again after a while;
``broker_kill`` SIGKILLs the broker that leads most of the topic's partitions when it strikes and starts it
again; ``host_partition`` drops every packet between one settle host and the brokers (the host still reaches
Cassandra and keeps writing what it had fetched: those writes are fenced by sequence) and reconnects it.
One node, one broker, one host at a time: RF 3 and ``min.insync.replicas`` 2 survive one replica down.

Then it lets everything settle and checks from the ME's log and the store alone that every trade was
settled exactly once with exact balances; no settle process may die (none is killed here). Exit code 0
only when all of that holds. The figures: the servers' start-up, per fault kind the longest time the
store's settled count stood still while trades were waiting (a stall that began while such a fault was
under way), lost and doubled trades.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engine.core.errors import EXIT_OK, EXIT_VERIFY_FAILED
from engine.kafka import config as kafka_config
from engine.verify import chaos_faults as cf
from engine.verify import netns
from engine.verify.chaos_run import ChaosRun
from engine.verify.checker import CheckReport
from engine.verify.demo import free_port
from engine.verify.kafka_testbed import KafkaSystem
from engine.verify.servers import CassandraCluster, CassandraServer, KafkaCluster, KafkaServer, ServerError
from engine.verify.testbed import ProgressWatch

EXIT_NO_CLUSTER: Final = 4  # the cluster cannot be set up here: not root, no ip/iptables, a server did not start
TICK_S: Final = 0.2
PARTITIONS: Final = 8
READY_TIMEOUT_S: Final = 120.0
CASSANDRA_ADDRESSES: Final = (2, 3, 4)  # host_address(n) of the LAN
BROKER_ADDRESSES: Final = (5, 6, 7)
ME_ADDRESS: Final = 8


class ClusterUnavailable(RuntimeError):
    """The cluster (namespaces, Cassandra nodes, brokers) could not be set up here; the message says why."""


class _Restart:
    """A server started again in the background (a Cassandra node takes 20-40 s), so the schedule goes on."""

    def __init__(self, what: str, start: Callable[[], object]) -> None:
        self.what = what
        self.began = time.monotonic()
        self.error: BaseException | None = None
        self.took_s = 0.0
        self._thread = threading.Thread(target=self._main, args=(start,), name=f"restart {what}", daemon=True)
        self._thread.start()

    def _main(self, start: Callable[[], object]) -> None:
        try:
            start()
        except BaseException as e:  # noqa: BLE001 - reported by the runner, which fails the run
            self.error = e
        self.took_s = time.monotonic() - self.began

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()


@dataclass(slots=True)
class Episode:
    """One fault from its start until its resource is whole again (restarted and answering, reconnected)."""

    kind: str
    start_s: float
    whole_s: float | None = None


class ClusterChaos(ChaosRun):
    poll_s = TICK_S

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        super().__init__(args, seed, tuple(args.kinds.split(",")) if args.kinds else cf.CLUSTER_KINDS, 2)
        self.restarts: dict[str, _Restart] = {}  # "node-K" / "broker-K" -> its restart in progress
        self.down: dict[str, float] = {}  # "node-K" / "broker-K" -> when it was killed
        self.partitioned: dict[str, netns.Host] = {}  # "host-a" -> the host cut off from the brokers
        self.episodes: list[Episode] = []
        self.under_way: dict[str, Episode] = {}  # "node-K" / "broker-K" / "host-a" -> its fault's episode
        self.samples: list[tuple[float, int]] = []  # (run seconds, settled)
        self.figures: dict[str, Any] = {}  # the servers' start-up
        self.dead: set[str] = set()  # settle processes seen exited
        self._lan: netns.Lan | None = None
        self._cassandra: CassandraCluster | None = None
        self._brokers: KafkaCluster | None = None
        self._system: KafkaSystem | None = None
        self.hosts: dict[str, netns.Host] = {}

    @property
    def system(self) -> KafkaSystem:
        assert self._system is not None
        return self._system

    @property
    def cassandra(self) -> CassandraCluster:
        assert self._cassandra is not None
        return self._cassandra

    @property
    def brokers(self) -> KafkaCluster:
        assert self._brokers is not None
        return self._brokers

    # ---------------------------------------------------------------- the run

    def run(self) -> int:
        args = self.args
        print(f"settle chaos --cluster: seed {self.seed}\nsoak {self.soak_s:.0f}s at {self.rate:,.0f} trades/s, "
              f"{self.total} trades; 2 settle hosts (Kafka mode), 3 brokers, 3 Cassandra nodes (RF 3, LOCAL_QUORUM, "
              f"logins, TLS); {len(self.schedule)} faults:")
        for fault in self.schedule:
            print(f"  +{fault.at_s:7.1f}s  {fault.describe()}")
        if args.plan_only:
            return EXIT_OK
        if (why := netns.missing()) is not None:
            print(f"settle chaos --cluster: cannot run here: the settle hosts are network namespaces and {why}",
                  file=sys.stderr)
            return EXIT_NO_CLUSTER
        root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="settle-chaos-cluster-"))
        root.mkdir(parents=True, exist_ok=True)
        print(f"data in {root}", flush=True)
        code = EXIT_VERIFY_FAILED
        try:
            with contextlib.ExitStack() as stack:  # every process and server stopped, the LAN gone, also on failure
                self._set_up(root, stack)
                code = self._soak_and_check()
        except ClusterUnavailable as e:
            print(f"settle chaos --cluster: cannot run here: {e}", file=sys.stderr)
            return EXIT_NO_CLUSTER
        except BaseException as e:
            self.fail(f"the chaos run stopped early: {type(e).__name__}: {e}")
            self._print_failure(root, self._replay_command())
            raise
        if self.failures:
            code = EXIT_VERIFY_FAILED
            self._print_failure(root, self._replay_command())
        elif not args.data_dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return code

    def _set_up(self, root: Path, stack: contextlib.ExitStack) -> None:
        lan = self._lan = stack.enter_context(netns.Lan())
        cassandra = self._cassandra = CassandraCluster()
        brokers = self._brokers = KafkaCluster([lan.host_address(n) for n in BROKER_ADDRESSES])
        stack.callback(brokers.stop)
        stack.callback(cassandra.stop)
        self.log("starting 3 Cassandra nodes (ops/cassandra/cluster.sh) and 3 Kafka brokers (ops/kafka/kafka.sh)")
        errors: list[str] = []

        def start(what: str, go: Callable[[], object]) -> None:
            try:
                go()
            except (ServerError, OSError) as e:
                errors.append(f"{what} did not start: {e}")

        started = time.monotonic()
        threads = [threading.Thread(target=start, args=("the Cassandra cluster", lambda: cassandra.start(
                       root / "cassandra", addresses=[lan.host_address(n) for n in CASSANDRA_ADDRESSES]))),
                   threading.Thread(target=start, args=("the Kafka brokers", lambda: brokers.start(root / "kafka")))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise ClusterUnavailable("; ".join(errors))
        self.figures["servers_ready_s"] = round(time.monotonic() - started, 1)
        self.figures["cassandra_rss_mib"] = cassandra.rss_mib
        self.figures["brokers_rss_mib"] = round(brokers.rss_bytes() / 2**20)
        self.log(f"servers ready in {self.figures['servers_ready_s']} s (both at once): Cassandra "
                 f"{cassandra.started_in_s} s, {cassandra.rss_mib} MiB resident; brokers {brokers.started_in_s:.1f} s, "
                 f"{self.figures['brokers_rss_mib']} MiB")
        self.hosts = {f"host-{name}": lan.add_host(name) for name in cf.CLUSTER_HOSTS}
        for host in self.hosts.values():
            for node in brokers.nodes:
                lan.wait_reachable(host, node.host, node.port)
            for address in cassandra.client["contact_points"]:  # type: ignore[attr-defined]
                lan.wait_reachable(host, str(address), int(str(cassandra.client["port"])))
        self._system = self._make_system(root, lan)
        stack.callback(self.system.stop)  # before the servers and the LAN (LIFO)
        self._progress = stack.enter_context(ProgressWatch(self.system, interval_s=0.5))

    def _make_system(self, root: Path, lan: netns.Lan) -> KafkaSystem:
        """The Kafka-mode system on the cluster, with the ME on the LAN and one config per host (each shard's
        metrics on its host's address)."""
        overrides: dict[str, Any] = {
            **self.cassandra.store_overrides(), "store.cassandra.keyspace": f"chaos_{uuid.uuid4().hex[:12]}",
            "store.cassandra.request_timeout_s": 5.0, "me.heartbeat_interval_ms": 200,
            "kafka.replication_factor": 3, "kafka.min_insync_replicas": 2,
        }
        system = KafkaSystem(root / "settle", self.brokers.bootstrap, shard_slots=2, partitions=PARTITIONS,
                             store="cassandra", overrides=overrides)
        me = lan.host_address(ME_ADDRESS)
        system.raw["me"]["publish"] = f"tcp://{me}:{free_port()}"
        system.raw["me"]["replay"] = f"tcp://{me}:{free_port()}"
        system.config_path.write_text(json.dumps(system.raw, indent=2))
        system.config, system.kafka = kafka_config.split(system.raw, "chaos")
        for name, host in self.hosts.items():
            raw = copy.deepcopy(system.raw)
            raw["metrics"]["host"] = host.address
            (system.root / f"config-{name}.json").write_text(json.dumps(raw, indent=2))
        return system

    def _soak_and_check(self) -> int:
        system = self.system
        self.log("starting the bridge, a shard on host a and one on host b (one consumer group)")
        system.start_bridge()
        for slot, (name, host) in enumerate(self.hosts.items()):
            system.start_shard(slot, prefix=host.command([]), config_path=system.root / f"config-{name}.json")
        system.wait_assigned(timeout_s=READY_TIMEOUT_S, hosts={f"shard-{slot}": host.address
                                                               for slot, host in enumerate(self.hosts.values())})
        self.t0 = time.monotonic()  # fault offsets count from here
        system.start_sim(self.total, rate=int(self.rate), seed=self.seed % 2**63, symbols=self.args.symbols,
                         accounts=self.args.accounts)
        self.log(f"soak started: the ME publishes {self.total} trades at {self.rate:,.0f}/s")
        self._inject()
        self.log("all faults injected and healed; waiting until every trade is settled")
        settled = self._wait_settled()
        for name in sorted(system.children):
            if not system.running(name) and name not in self.dead:
                self.fail(f"{name} exited with code {system.children[name].proc.poll()}; see "
                          f"{system.root}/logs/{name}.log")
        self.log("stopping the bridge, the shards and the ME")
        system.stop()
        report = system.check()
        for line in report.format().splitlines():
            self.log(f"checker: {line}")
        if not report.ok:
            self.fail("the checker found settlement errors (above)")
        if report.published != self.total:
            self.fail(f"the ME log holds {report.published} trades, not {self.total}")
        self.failures += [f"no {kind} fault was injected" for kind in self.kinds if not self.executed[kind]]
        self._report(report, settled)
        return EXIT_OK if not self.failures else EXIT_VERIFY_FAILED

    # ---------------------------------------------------------------- the schedule

    def _inject(self) -> None:
        """Starts and heals in time order; a start waits while its resource is not whole again (a node or
        broker still restarting, a host still cut off), heals never wait."""
        pending: list[tuple[float, int, str, cf.Fault]] = [(f.at_s, i, "start", f) for i, f in enumerate(self.schedule)]
        while pending or any(not r.done for r in self.restarts.values()):
            pending.sort(key=lambda e: (e[0], e[1], e[2] == "start"))
            blocked: set[str] = set()
            for event in list(pending):
                due, order, phase, fault = event
                if due > self.now():
                    break
                if phase == "start" and (fault.kind in blocked or not self._can_start(fault)):
                    blocked.add(fault.kind)
                    continue
                pending.remove(event)
                late = f" ({self.now() - due:.1f}s late)" if self.now() - due > 1.0 else ""
                if phase == "heal":
                    self.log(f"heal {fault.kind} {fault.target}: {self._heal(fault)}{late}")
                    continue
                self.executed[fault.kind] += 1
                action: Callable[[cf.Fault], str] = getattr(self, f"_do_{fault.kind}")
                self.log(f"{fault.kind} {fault.target}: {action(fault)}{late}")
                pending.append((self.now() + fault.duration_s, order, "heal", fault))
            self._tick()
            time.sleep(TICK_S)

    def _can_start(self, fault: cf.Fault) -> bool:
        if fault.kind == cf.HOST_PARTITION:
            return not self.partitioned
        prefix = "node-" if fault.kind == cf.CASSANDRA_NODE_KILL else "broker-"
        return not any(key.startswith(prefix) for key in (*self.down, *self.restarts))

    def _do_cassandra_node_kill(self, fault: cf.Fault) -> str:
        node = self.cassandra.node(int(fault.target.split("-")[1]))
        pid = node.kill9()
        self.down[fault.target] = self.now()
        self._begin(fault.kind, fault.target)
        return f"SIGKILL JVM pid {pid} ({node.data_dir.name}); the other two keep LOCAL_QUORUM; restarted in " \
               f"{fault.duration_s:.1f}s"

    def _do_broker_kill(self, fault: cf.Fault) -> str:
        leaders = self.brokers.partition_leaders(self.system.kafka.topic)
        victim, led = leaders.most_common(1)[0]
        pid = self.brokers.node(victim).kill9()
        self.down[f"broker-{victim}"] = self.now()
        self._begin(fault.kind, f"broker-{victim}")
        return f"broker {victim} (leads {led} of {PARTITIONS} partitions) SIGKILLed, JVM pid {pid}; restarted in " \
               f"{fault.duration_s:.1f}s"

    def _do_host_partition(self, fault: cf.Fault) -> str:
        host = self.hosts[fault.target]
        host.block(node.host for node in self.brokers.nodes)
        self.partitioned[fault.target] = host
        self._begin(fault.kind, fault.target)
        return f"every packet between {host.name} ({host.address}) and the 3 brokers dropped for " \
               f"{fault.duration_s:.1f}s; it still reaches Cassandra"

    def _heal(self, fault: cf.Fault) -> str:
        if fault.kind == cf.HOST_PARTITION:
            owned = self._owned_by_the_other(fault.target)
            self.partitioned.pop(fault.target).unblock()
            self.under_way.pop(fault.target).whole_s = self.now()
            return f"reconnected to the brokers; the other host owned {owned} of {PARTITIONS} partitions just before"
        server: CassandraServer | KafkaServer
        if fault.kind == cf.CASSANDRA_NODE_KILL:
            key, server = fault.target, self.cassandra.node(int(fault.target.split("-")[1]))
        else:
            key = next(k for k in self.down if k.startswith("broker-"))
            server = self.brokers.node(int(key.split("-")[1]))
        self.restarts[key] = _Restart(key, server.start_again)
        return f"starting {key} again"

    def _owned_by_the_other(self, cut_off: str) -> str:
        """The partitions the host that was not cut off owns, from its shard's metrics (what a takeover shows)."""
        slot, host = next((slot, host) for slot, (name, host) in enumerate(self.hosts.items()) if name != cut_off)
        try:
            text = self.system.metrics(f"shard-{slot}", host.address)
        except OSError as e:
            return f"? (its metrics did not answer: {e})"
        owned = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith(("settle_kafka_assigned_partitions{", "settle_kafka_assigned_partitions ")))
        return f"{owned:.0f}"

    # ---------------------------------------------------------------- watching

    def _tick(self) -> None:
        for key, restart in list(self.restarts.items()):
            if not restart.done:
                continue
            del self.restarts[key]
            down_s = self.now() - self.down.pop(key)
            self.under_way.pop(key).whole_s = self.now()
            if restart.error is not None:
                self.fail(f"{key} did not start again: {restart.error}")
            else:
                self.log(f"{key} up again: its start took {restart.took_s:.1f}s, {down_s:.1f}s after the kill")
        for name, child in self.system.children.items():
            if child.proc.poll() is not None and name not in self.dead:
                self.dead.add(name)
                self.fail(f"{name} exited with code {child.proc.returncode} (nothing killed it); see "
                          f"{self.system.root}/logs/{name}.log")
        assert self._progress is not None
        self.samples.append((self.now(), self._progress.settled))
        if self.now() >= self.next_progress:
            self.next_progress = self.now() + 10.0
            error = f", store: {self._progress.error[:100]}" if self._progress.error else ""
            self.log(f"progress: settled {self._progress.settled} of {self.total}{error}")


    def _begin(self, kind: str, key: str) -> None:
        self.under_way[key] = episode = Episode(kind, self.now())
        self.episodes.append(episode)

    def _stalls(self) -> list[tuple[float, float]]:
        """(began, ended) of each time the store's settled count stood still with trades still to settle."""
        stalls, since, last = [], 0.0, -1
        for at, settled in self.samples:
            if settled != last or settled >= self.total:
                if at > since and last >= 0 and last < self.total:
                    stalls.append((since, at))
                since, last = at, settled
        return stalls

    def longest_stalls(self) -> dict[str, float]:
        """Per fault kind, the longest stall that began while a fault of that kind was under way (from its
        start until its node or broker answered again, or its host was reconnected). A stall that began
        under two faults counts for both."""
        stalls = self._stalls()
        longest: dict[str, float] = {}
        for episode in self.episodes:
            end = episode.whole_s if episode.whole_s is not None else float("inf")
            inside = [ended - began for began, ended in stalls if episode.start_s <= began <= end]
            longest[episode.kind] = round(max([longest.get(episode.kind, 0.0), *inside]), 1)
        return longest

    # ---------------------------------------------------------------- the verdict

    def _report(self, report: CheckReport, settled: int) -> None:
        stalls = self.longest_stalls()
        summary = {
            "seed": self.seed, "passed": not self.failures, "cluster": True, "minutes": self.args.minutes,
            "duration_s": round(self.now(), 1), "faults": dict(sorted(self.executed.items())),
            "faults_total": self.executed.total(), "trades_published": report.published,
            "trades_settled": report.settled, "watermark_sum": settled, "lost": report.missing_count,
            "duplicated": report.unexpected_count, "balance_mismatches": report.balance_mismatch_count,
            "order_errors": report.order_error_count, "assets_not_conserved": len(report.conservation),
            "longest_stall_s": stalls, **self.figures,
            "failures": self.failures,
        }  # fmt: skip
        (self.system.root / "chaos-report.json").write_text(json.dumps(summary, indent=2))
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.executed.items()))
        stalled = ", ".join(f"{kind} {s:.1f}s" for kind, s in sorted(stalls.items()))
        print(f"\nsettle chaos --cluster: {'PASSED' if not self.failures else 'FAILED'}, seed {self.seed}, "
              f"{self.now():.0f}s of soak and settling\n  faults injected: {self.executed.total()} ({faults})\n"
              f"  longest stall of settlement per fault kind: {stalled or 'none'}\n"
              f"  trades checked: {report.published}: lost {report.missing_count}, duplicated "
              f"{report.unexpected_count}, balance mismatches {report.balance_mismatch_count}, order errors "
              f"{report.order_error_count}, assets conserved {report.assets - len(report.conservation)}/"
              f"{report.assets}", flush=True)

    def _replay_command(self) -> str:
        a = self.args
        return (f"settle chaos --cluster --seed {self.seed} --minutes {a.minutes:g} --trades {a.trades} "
                f"--rate {a.rate:g}{f' --kinds {a.kinds}' if a.kinds else ''}")



def usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with ``args`` for ``--cluster``, or None."""
    unknown = sorted(set(args.kinds.split(",")) - set(cf.CLUSTER_KINDS)) if args.kinds else []
    if unknown:
        return f"--cluster runs the fault kinds {', '.join(cf.CLUSTER_KINDS)}; not {', '.join(unknown)}"
    if args.shards != 2 or args.cassandra_dir or args.store != "cassandra":
        return ("--cluster runs one shard on each of its two hosts and its own 3-node Cassandra: --shards, "
                "--store and --cassandra-dir are not for it")
    return None

