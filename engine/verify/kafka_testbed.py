"""The Kafka mode as real processes on one box: the bridge, N Kafka shards and the ME simulator.

Like :class:`engine.verify.testbed.System`, for integration tests and benchmarks; the broker is not started here
(``tests/servers/kafka.py`` or ``ops/kafka/kafka.sh`` does that) and is named by ``bootstrap``. Every
process is started with the child protocol of the supervised ones (``--config-json``, ``--ready-fd``) and
counts as started once it wrote ``R`` on its lifeline. Until ``settle run --source kafka`` spawns them,
the processes are started here one by one, so a test can kill, restart, add and remove each.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core import config as configmod
from engine.kafka import config as kafka_config
from engine.verify.demo import demo_config, free_port, spawn, stop
from engine.verify.testbed import StoreObserver, check_simulator


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    lifeline: int  # read end of the child's lifeline pipe


class KafkaSystem(StoreObserver):
    def __init__(
        self,
        root: Path,
        bootstrap: str,
        *,
        shard_slots: int = 3,
        partitions: int = 8,
        store: str = "embedded",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        name = uuid.uuid4().hex[:10]
        base: dict[str, Any] = {
            "engine": {"source": "kafka"},
            "kafka": {
                "bootstrap_servers": bootstrap,
                "topic": f"settle.trades.{name}",
                "group_id": f"settle-{name}",
                "partitions": partitions,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 500,
                "bridge_metrics_port": free_port(),
            },
        }
        for dotted, value in (overrides or {}).items():
            configmod.set_dotted(base, dotted, value)
        # demo_config validates what it is given with engine.core.config alone: add the Kafka keys after it.
        kafka_raw = base.pop("kafka")
        source = base["engine"].pop("source")
        self.raw = demo_config(root, shard_slots, store, base)
        self.raw["kafka"] = kafka_raw
        self.raw["engine"]["source"] = source
        self.config, self.kafka = kafka_config.split(self.raw, "test")
        self.config_path = root / "config.json"
        self.config_path.write_text(json.dumps(self.raw, indent=2))
        self.children: dict[str, Child] = {}
        self.sim: subprocess.Popen[bytes] | None = None
        self.sim_trades = 0
        self.log_path = root / "me.log"

    # ---------------------------------------------------------------- processes

    def _start(self, name: str, argv: list[str], timeout_s: float) -> Child:
        if name in self.children:
            raise AssertionError(f"{name} is already running (pid {self.children[name].proc.pid})")
        read_fd, write_fd = os.pipe()
        try:
            with open(self.root / "logs" / f"{name}.log", "ab") as log:
                proc = subprocess.Popen([*argv, "--ready-fd", str(write_fd)], stdin=subprocess.DEVNULL,
                                        stderr=log, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        child = self.children[name] = Child(name, proc, read_fd)
        self._wait_ready(child, timeout_s)
        return child

    def _wait_ready(self, child: Child, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([child.lifeline], [], [], 0.1)
            if ready:
                data = os.read(child.lifeline, 4096)
                if b"R" in data:
                    return
                if not data and child.proc.poll() is not None:
                    break
        raise AssertionError(f"{child.name} was not ready within {timeout_s:.0f}s (exit code {child.proc.poll()}); "
                             f"see {self.root}/logs/{child.name}.log\n{self.logs()}")

    def _argv(self, module: str) -> list[str]:
        return [sys.executable, "-m", module, "--config-json", str(self.config_path)]

    def start_bridge(self, timeout_s: float = 120.0) -> None:
        self._start("bridge", self._argv("engine.kafka.bridge"), timeout_s)

    def start_shard(self, slot: int, timeout_s: float = 60.0, *, prefix: Sequence[str] = (),
                    config_path: Path | None = None) -> None:
        """Start Kafka shard SLOT; PREFIX runs it elsewhere (``ip netns exec NS``: on another host), with
        the config at CONFIG_PATH (that host's addresses) instead of the system's."""
        argv = [sys.executable, "-m", "engine.kafka.shard", "--config-json", str(config_path or self.config_path),
                "--shard", str(slot)]
        self._start(f"shard-{slot}", [*prefix, *argv], timeout_s)

    def pid(self, name: str) -> int:
        return self.children[name].proc.pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; for SIGKILL and SIGTERM wait until the process is gone and forget it (its exit
        is expected; any other child that exits fails :meth:`wait_settled`)."""
        child = self.children[name]
        child.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            child.proc.wait(60)
            os.close(child.lifeline)
            del self.children[name]

    def running(self, name: str) -> bool:
        child = self.children.get(name)
        return child is not None and child.proc.poll() is None

    def start_sim(self, trades: int, *, rate: int = 0, seed: int = 1, symbols: int = 8, accounts: int = 200,
                  extra: list[str] | None = None) -> None:
        self.sim_trades = trades
        argv = [sys.executable, "-m", "engine.cli", "sim", "--publish", self.config.me.publish, "--replay",
                self.config.me.replay, "--log", str(self.log_path), "--trades", str(trades), "--rate", str(rate),
                "--seed", str(seed), "--symbols", str(symbols), "--accounts", str(accounts), "--heartbeat-ms",
                str(self.config.me.heartbeat_interval_ms), "--wait-subscribers", "1", "--timestamps", "wall",
                "--quiet", *(extra or [])]
        self.sim = spawn(argv, self.root / "logs" / "simulator.log")

    def stop(self) -> None:
        """Bridge first (intake), then the shards (each commits and leaves the group), then the simulator."""
        names = sorted(self.children, key=lambda n: n != "bridge")
        for name in names:
            child = self.children[name]
            stop(child.proc, 60.0)
        for child in self.children.values():
            os.close(child.lifeline)
        self.children.clear()
        if self.sim is not None:
            stop(self.sim, 60.0)

    # ---------------------------------------------------------------- observing the store

    def _check_processes(self) -> None:
        for child in self.children.values():
            code = child.proc.poll()
            if code is not None:
                raise AssertionError(f"{child.name} exited with {code}; see {self.root}/logs\n{self.logs()}")
        check_simulator(self.sim, self.root / "logs" / "simulator.log")

    def metrics(self, name: str, host: str | None = None) -> str:
        """The ``/metrics`` text of the bridge or a shard; HOST: the address it serves them on, when it runs
        with another config than the system's (on another host)."""
        import urllib.request

        if name == "bridge":
            port = self.kafka.bridge_metrics_port
        else:
            port = self.config.metrics.shard_port_base + int(name.split("-")[1])
        address = host or self.config.metrics.host
        with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
        return text

    def wait_assigned(self, timeout_s: float = 60.0, hosts: dict[str, str] | None = None) -> None:
        """Until the running shards own every partition between them (the group is stable). HOSTS: shard
        name -> the address it serves its metrics on, for shards on other hosts."""
        deadline = time.monotonic() + timeout_s
        owned = 0.0
        while time.monotonic() < deadline:
            owned = 0.0
            for name in self.children:
                if name.startswith("shard-"):
                    for line in self.metrics(name, (hosts or {}).get(name)).splitlines():
                        if line.startswith("settle_kafka_assigned_partitions{"):
                            owned += float(line.rsplit(" ", 1)[1])
            if owned == self.kafka.partitions:
                return
            time.sleep(0.1)
        raise AssertionError(f"the shards own {owned:.0f} of {self.kafka.partitions} partitions after {timeout_s}s")
