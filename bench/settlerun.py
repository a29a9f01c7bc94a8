"""Run the real engine (supervisor, router, shards) against a publisher and time it.

:class:`Bench` is one system under test: a data directory on the WAL disk, the engine on free loopback
ports, a publisher, and a :class:`Progress` thread that reads how many trades are settled every
``POLL_S`` through one long-lived store session (or, for the ``null`` store, the shards' ``/metrics``).

Publishers:

- ``blast`` (:mod:`bench.blaster`): the reference simulator with its trades generated and logged before
  the clock starts, then published flat out; the ME's own cost stays out of the engine's figures (on a
  2-core box the simulator generating trades live takes a whole core).
- ``sim``: ``settle sim`` generating live (``--rate`` for latency runs; ``--timestamps wall``).

Throughput is counted from the first settled trade to the last: ``(total - settled at the first
reading) / (time of the reading that saw all - time of the first reading)``. CPU time of the engine's
processes (supervisor, router, shards; from /proc) over the same run is reported per trade: on a shared
machine wall-clock rates swing with the neighbours, CPU per trade much less.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, metric_sum, scrape
from engine.core.store import open_store
from engine.verify.checker import CheckReport
from engine.verify.demo import spawn, stop
from engine.verify.testbed import System

POLL_S = 0.05
NULL_STORE = "bench.nullstore:NullStore"  # store.factory of the runs with store writes discarded
METRICS_POLL_S = 0.25  # the null store: a shard's /metrics exposition costs it ~1 ms of CPU to render
STALL_S = 120.0
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class CassandraTarget:
    host: str
    port: int

    def overrides(self, keyspace: str) -> dict[str, Any]:
        return {
            "store.cassandra.contact_points": [self.host],
            "store.cassandra.port": self.port,
            "store.cassandra.keyspace": keyspace,
            "store.cassandra.create_schema": True,
        }

    def drop(self, keyspace: str) -> None:
        """Drop a keyspace a run made: left behind, dozens of them slow the server down measurably."""
        drop_keyspaces(self.host, self.port, [keyspace])


def drop_keyspaces(host: str, port: int, keyspaces: list[str]) -> None:
    from cassandra.cluster import Cluster

    cluster = Cluster([host], port=port)
    try:
        session = cluster.connect()
        for keyspace in keyspaces:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    finally:
        cluster.shutdown()


def keyspace_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in name.lower())
    return f"bench_{cleaned}_{uuid.uuid4().hex[:8]}"[:48]


@dataclass
class SettleRun:
    name: str
    store: str
    shards: int
    publisher: str
    trades: int
    seconds: float
    trades_per_s: float
    engine_cpu_s: float
    cpu_us_per_trade: float
    verified: bool | None  # None: not checked (the null store keeps nothing to check)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"run": self.name, "store": self.store, "shards": self.shards, "publisher": self.publisher,
                "trades": self.trades, "seconds": self.seconds, "trades_per_s": self.trades_per_s,
                "cpu_us_per_trade": self.cpu_us_per_trade, "verified": self.verified, **self.extra}


class Progress:
    """Settled trades, read every ``interval_s`` on its own thread; ``samples`` holds (monotonic, settled)."""

    def __init__(self, bench: Bench, interval_s: float = POLL_S) -> None:
        self._bench = bench
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self.watermarks: dict[str, int] = {}  # the latest reading (stores only)
        self.watermarks_at = 0.0  # monotonic time that reading started
        self.error: str | None = None
        self._thread = threading.Thread(target=self._main, name="bench-progress", daemon=True)

    @property
    def settled(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def start(self) -> Progress:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        config = self._bench.system.config
        store = None
        try:
            while not self._stop.is_set():
                try:
                    if config.store.factory == NULL_STORE:
                        value = self._bench.settled_from_metrics()
                    else:
                        if store is None:
                            store = await open_store(config.store, create_schema=False)
                        at = time.monotonic()
                        self.watermarks = await store.watermarks()
                        self.watermarks_at = at
                        value = sum(self.watermarks.values())
                    self.samples.append((time.monotonic(), value))
                    self.error = None
                except Exception as e:  # noqa: BLE001 - a store still starting, a restarting shard: go on
                    self.error = f"{type(e).__name__}: {e}"
                await asyncio.to_thread(self._stop.wait, self._interval_s)
        finally:
            if store is not None:
                await store.close()

    def rate(self, total: int) -> tuple[float, float]:
        """(seconds, trades/s) from the first reading with something settled to the first with ``total``."""
        first = next(((t, v) for t, v in self.samples if v > 0), None)
        last = next(((t, v) for t, v in self.samples if v >= total), None)
        if first is None or last is None:
            return float("nan"), float("nan")
        seconds = last[0] - first[0]
        if seconds <= 0 or first[1] >= total:  # all of it landed between two readings
            return self._interval_s, total / self._interval_s
        return seconds, (total - first[1]) / seconds

    def wait_for(self, total: int, stall_s: float = STALL_S, what: str = "") -> None:
        last_value, last_change = -1, time.monotonic()
        while True:
            value = self.settled
            now = time.monotonic()
            if value >= total:
                return
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change > stall_s:
                raise RuntimeError(f"{what or self._bench.name}: stalled at {value}/{total} settled for "
                                   f"{stall_s:.0f}s ({self.error or 'no error'}); see {self._bench.root}/logs")
            self._bench.check_alive()
            time.sleep(self._interval_s)


class Bench:
    """One system under test. Use as a context manager: everything it started is stopped on exit."""

    def __init__(self, name: str, *, shards: int, store: str = "embedded", overrides: dict[str, Any] | None = None,
                 cassandra: CassandraTarget | None = None, work_dir: Path | None = None, keep: bool = False) -> None:
        self.name = name
        self.store = store
        self.root = Path(tempfile.mkdtemp(prefix=f"settle-bench-{name}-", dir=work_dir))
        merged = dict(overrides or {})
        self.cassandra = cassandra
        if store == "cassandra":
            if cassandra is None:
                raise ValueError(f"{name}: the cassandra store needs a running server (CassandraTarget)")
            merged = {**cassandra.overrides(keyspace_name(name)), **merged}
        if store == "null":  # writes discarded: the engine measured without a store
            merged = {"store.factory": NULL_STORE, "engine.benchmark_unsafe": True, **merged}
        self.system = System(self.root, shards=shards, store="embedded" if store == "null" else store,
                             overrides=merged)
        self.shards = self.system.config.shard_count
        self.publisher: subprocess.Popen[bytes] | None = None
        self.publisher_kind = ""
        self.baseline: subprocess.Popen[bytes] | None = None
        self.progress: Progress | None = None
        self.keep = keep

    # -- processes ------------------------------------------------------------------------------------

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Bench:
        self.system.start_engine(READY_TIMEOUT_S)
        interval = METRICS_POLL_S if self.store == "null" else POLL_S
        self.progress = Progress(self, interval).start()
        return self

    def start_baseline(self, trades: int) -> None:
        """The design note's single process (:mod:`bench.baseline`) instead of settle's engine."""
        argv = [sys.executable, "-m", "bench.baseline", "--config", str(self.system.config_path),
                "--wal", str(self.root / "settlement.wal"), "--trades", str(trades)]
        with open(self.root / "logs" / "baseline.log", "ab") as log, \
                open(self.root / "baseline.out", "wb") as out:
            self.baseline = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log)
        interval = POLL_S
        self.progress = Progress(self, interval).start()

    def baseline_result(self, timeout_s: float = 60.0) -> dict[str, Any]:
        assert self.baseline is not None
        self.baseline.wait(timeout_s)
        text = (self.root / "baseline.out").read_text().strip()
        result: dict[str, Any] = json.loads(text.splitlines()[-1]) if text else {}
        return result

    def engine_pids(self) -> dict[str, int]:
        """Slot name -> pid for the supervisor and its live children (or the baseline process)."""
        pids: dict[str, int] = {}
        if self.baseline is not None:
            if self.baseline.poll() is None:
                pids["baseline"] = self.baseline.pid
            return pids
        if self.system.engine is not None and self.system.engine.poll() is None:
            pids["supervisor"] = self.system.engine.pid
        try:
            slots = self.system.state()["slots"]
        except (OSError, ValueError, KeyError):
            slots = {}
        for slot, info in slots.items():
            if info.get("pid"):
                pids[slot] = int(info["pid"])
        return pids

    def engine_cpu_s(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.engine_pids().values())

    def shard_metrics_urls(self) -> list[str]:
        m = self.system.config.metrics
        return [f"http://{m.host}:{m.shard_port_base + s}/metrics" for s in range(self.shards)]

    def settled_from_metrics(self) -> int:
        return int(sum(metric_sum(scrape(url), "settle_trades_settled_total") for url in self.shard_metrics_urls()))

    def start_publisher(self, kind: str, trades: int, *, rate: float = 0, symbols: int = 16, accounts: int = 1000,
                        seed: int = 1, extra: list[str] | None = None) -> None:
        """``extra``: more ``settle sim`` arguments (the ``sim`` publisher only)."""
        self.publisher_kind = kind
        cfg = self.system.config
        if kind == "sim":
            self.system.start_sim(trades, rate=int(rate), seed=seed, symbols=symbols, accounts=accounts, extra=extra)
            self.publisher = self.system.sim
            return
        assert kind == "blast", kind
        argv = [sys.executable, "-m", "bench.blaster", "--publish", cfg.me.publish, "--replay", cfg.me.replay,
                "--log", str(self.system.log_path), "--trades", str(trades), "--symbols", str(symbols),
                "--accounts", str(accounts), "--seed", str(seed),
                "--heartbeat-ms", str(cfg.me.heartbeat_interval_ms)]
        self.publisher = spawn(argv, self.root / "logs" / "blaster.log")

    def check_alive(self) -> None:
        if self.baseline is not None and self.baseline.poll() not in (None, 0):
            raise RuntimeError(f"{self.name}: the baseline exited with {self.baseline.returncode}; "
                               f"see {self.root}/logs")
        engine = self.system.engine
        if engine is not None and engine.poll() is not None:
            raise RuntimeError(f"{self.name}: the engine exited with {engine.returncode}; see {self.root}/logs")
        if self.publisher is not None and self.publisher.poll() not in (None, 0):
            raise RuntimeError(f"{self.name}: the publisher exited with {self.publisher.returncode}; "
                               f"see {self.root}/logs")

    def verify(self) -> CheckReport:
        return self.system.check()

    def stop_publisher(self) -> None:
        if self.publisher is not None:
            stop(self.publisher, 30.0)
            self.publisher = None
            self.system.sim = None

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.stop_publisher()
        if self.baseline is not None:
            stop(self.baseline, 30.0)
        self.system.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
            if self.store == "cassandra" and self.cassandra is not None:
                self.cassandra.drop(self.system.config.store.cassandra.keyspace)


def run_settle(name: str, *, trades: int, shards: int, store: str = "embedded", publisher: str = "blast",
               rate: float = 0, symbols: int = 16, accounts: int = 1000, overrides: dict[str, Any] | None = None,
               cassandra: CassandraTarget | None = None, verify: bool = True, work_dir: Path | None = None,
               stall_s: float = STALL_S) -> SettleRun:
    """Publish ``trades`` into a fresh engine, wait until the store holds them all, verify with the checker."""
    with Bench(name, shards=shards, store=store, overrides=overrides, cassandra=cassandra,
               work_dir=work_dir) as bench:
        bench.start()
        assert bench.progress is not None
        cpu_before = bench.engine_cpu_s()
        bench.start_publisher(publisher, trades, rate=rate, symbols=symbols, accounts=accounts)
        bench.progress.wait_for(trades, stall_s)
        seconds, per_s = bench.progress.rate(trades)
        cpu = bench.engine_cpu_s() - cpu_before
        bench.stop_publisher()
        bench.progress.close()
        bench.progress = None
        code = bench.system.stop_engine()
        verified: bool | None = None
        if verify and store != "null":
            report = bench.verify()
            verified = report.ok
            if not report.ok:
                print(f"{name}: VERIFICATION FAILED\n{report.format()}", file=sys.stderr)
        if code not in (0, None):
            print(f"{name}: the engine stopped with exit code {code}; see {bench.root}/logs", file=sys.stderr)
        return SettleRun(name, store, bench.shards, publisher, trades, seconds, per_s, cpu,
                         cpu / trades * 1e6, verified)


def run_baseline(name: str, *, trades: int, store: str = "embedded", publisher: str = "blast", symbols: int = 16,
                 accounts: int = 1000, cassandra: CassandraTarget | None = None, verify: bool = True,
                 work_dir: Path | None = None, stall_s: float = STALL_S) -> SettleRun:
    """The design note's design (:mod:`bench.baseline`) on the same store, timed and verified the same way."""
    with Bench(name, shards=1, store=store, cassandra=cassandra, work_dir=work_dir) as bench:
        bench.start_baseline(trades)
        assert bench.progress is not None
        bench.start_publisher(publisher, trades, symbols=symbols, accounts=accounts)
        bench.progress.wait_for(trades, stall_s)
        seconds, per_s = bench.progress.rate(trades)
        own = bench.baseline_result()
        bench.stop_publisher()
        bench.progress.close()
        bench.progress = None
        verified: bool | None = None
        if verify:
            report = bench.verify()
            verified = report.ok
            if not report.ok:
                print(f"{name}: VERIFICATION FAILED\n{report.format()}", file=sys.stderr)
        cpu = float(own.get("cpu_s") or math.nan)  # its own, first trade to last: it has exited by now
        return SettleRun(name, store, 1, publisher, trades, seconds, per_s, cpu, cpu / trades * 1e6, verified,
                         {"own_trades_per_s": own.get("trades_per_s")})
