"""`python -m bench.kafka_vs_zmq`: the Kafka path against the ZMQ path, side by side in one run.

    ZMQ:   simulator -> router -> 2 shards (WAL group commit) -> embedded store
    Kafka: simulator -> bridge -> topic (real broker, 16 partitions) -> 2 Kafka shards -> embedded store

Each path runs twice on the same machine in the same minutes:

- **throughput**: ``--trades`` published flat out; trades/s from 10 % of them settled to the last;
- **latency**: ``--latency-trades`` at ``--rate`` trades/s (below both paths' capacity), p50/p99 of
  ``settle_lag_seconds`` (ME execution time, ``--timestamps wall``, to store commit, per trade) of the
  trades settled after the first second, merged over the shards' ``/metrics`` histograms and
  interpolated inside the bucket like Prometheus' ``histogram_quantile`` (buckets 0.5, 1, 2, 5, 10, 25,
  50, 100, 250 ms, ...).

Both skip a warm-up (``measure``): start-up costs (an idempotent producer's first id, a consumer group's
first assignment) are not what the figures compare.

Every run is verified with the checker. The broker comes from ``ops/kafka/kafka.sh`` (a temporary data
dir, stopped at the end). Results: a table, and ``bench-results/kafka_vs_zmq.json``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import table, write_json
from engine.verify.checker import CheckReport
from engine.verify.kafka_testbed import KafkaSystem
from engine.verify.servers import KafkaServer
from engine.verify.testbed import System

SHARDS = 2
SYMBOLS = 16
POLL_S = 0.05


def scrape_lag(urls: list[str]) -> dict[float, float]:
    """``le`` -> cumulative count of ``settle_lag_seconds``, summed over the processes."""
    buckets: dict[float, float] = {}
    pattern = re.compile(r'^settle_lag_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$')
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                match = pattern.match(line)
                if match:
                    le = float(match.group(1))
                    buckets[le] = buckets.get(le, 0.0) + float(match.group(2))
    return buckets


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' ``histogram_quantile``: linear inside the bucket the rank falls in."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if not total:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


def measure(settled: Callable[[], int], urls: list[str], warmup: int, total: int,
            stalled_s: float = 120.0) -> tuple[float, dict[float, float]]:
    """Seconds from ``warmup`` trades settled to all ``total`` (the store polled every 50 ms), and the
    lag histogram of the trades settled in between (a scrape at ``warmup`` subtracted from the last one).

    The warm-up keeps start-up out of both figures: the first produce of an idempotent producer waits
    for its producer id, a new consumer group for its first assignment and offsets.
    """
    value, last_change = 0, time.monotonic()
    started_at = 0.0
    before: dict[float, float] = {}
    while value < total:
        time.sleep(POLL_S)
        now = time.monotonic()
        current = settled()
        if current != value:
            value, last_change = current, now
        if not started_at and value >= warmup:
            started_at, before = now, scrape_lag(urls)
        if now - last_change > stalled_s:
            raise RuntimeError(f"stalled at {value}/{total}")
    seconds = time.monotonic() - started_at
    after = scrape_lag(urls)
    return seconds, {le: count - before.get(le, 0.0) for le, count in after.items()}


def run_zmq(trades: int, rate: int, warmup: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="settle-bench-zmq-"))
    system = System(root, shards=SHARDS)
    try:
        system.start_engine()
        system.start_sim(trades, rate=rate, symbols=SYMBOLS)
        ports = [system.config.metrics.shard_port_base + i for i in range(SHARDS)]
        seconds, buckets = measure(system.settled, [f"http://127.0.0.1:{p}/metrics" for p in ports], warmup,
                                   trades)
    finally:
        system.stop()
    report = system.check()
    shutil.rmtree(root, ignore_errors=True)
    return _row("zmq", trades, warmup, rate, seconds, buckets, report)


def run_kafka(server: KafkaServer, trades: int, rate: int, warmup: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="settle-bench-kafka-"))
    ks = KafkaSystem(root, server.bootstrap, shard_slots=SHARDS, partitions=16)
    try:
        ks.start_bridge()
        for slot in range(SHARDS):
            ks.start_shard(slot)
        ks.wait_assigned()  # the group is stable before the first trade (the ZMQ path waits for readiness too)
        ks.start_sim(trades, rate=rate, symbols=SYMBOLS)
        ports = [ks.config.metrics.shard_port_base + i for i in range(SHARDS)]
        seconds, buckets = measure(ks.settled, [f"http://127.0.0.1:{p}/metrics" for p in ports], warmup, trades)
    finally:
        ks.stop()
    report = ks.check()
    shutil.rmtree(root, ignore_errors=True)
    return _row("kafka", trades, warmup, rate, seconds, buckets, report)


def _row(path: str, trades: int, warmup: int, rate: int, seconds: float, buckets: dict[float, float],
         report: CheckReport) -> dict[str, Any]:
    return {
        "path": path,
        "run": "throughput" if rate == 0 else f"latency @ {rate:,}/s",
        "trades": trades,
        "measured": trades - warmup,
        "seconds": seconds,
        "trades_per_s": (trades - warmup) / max(seconds, 1e-9),
        "p50_ms": quantile(0.50, buckets) * 1000,
        "p99_ms": quantile(0.99, buckets) * 1000,
        "verified": report.ok and report.settled == trades,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_vs_zmq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trades", type=int, default=100_000, help="trades of the throughput runs")
    parser.add_argument("--latency-trades", type=int, default=30_000, help="trades of the latency runs")
    parser.add_argument("--rate", type=int, default=5_000, help="trades/s of the latency runs")
    parser.add_argument("--quick", action="store_true", help="small runs (smoke test)")
    args = parser.parse_args(argv)
    trades, latency_trades = (5_000, 3_000) if args.quick else (args.trades, args.latency_trades)

    broker_dir = Path(tempfile.mkdtemp(prefix="settle-bench-broker-"))
    server = KafkaServer()
    server.start(broker_dir)
    rows = []
    try:
        warmup, latency_warmup = trades // 10, min(args.rate, latency_trades // 5)  # about 1 s of the latency run
        rows.append(run_zmq(trades, 0, warmup))
        rows.append(run_kafka(server, trades, 0, warmup))
        rows.append(run_zmq(latency_trades, args.rate, latency_warmup))
        rows.append(run_kafka(server, latency_trades, args.rate, latency_warmup))
    finally:
        server.stop()
        shutil.rmtree(broker_dir, ignore_errors=True)
    columns = ["path", "run", "trades", "measured", "seconds", "trades_per_s", "p50_ms", "p99_ms", "verified"]
    print(f"{SHARDS} shards, {SYMBOLS} symbols, embedded store; broker started in {server.started_in_s} s")
    print(table(rows, columns))
    zmq_tp, kafka_tp = rows[0]["trades_per_s"], rows[1]["trades_per_s"]
    print(f"kafka / zmq throughput: {kafka_tp / zmq_tp:.2f}x; "
          f"p99 at {args.rate:,}/s: zmq {rows[2]['p99_ms']:.1f} ms, kafka {rows[3]['p99_ms']:.1f} ms")
    path = write_json("kafka_vs_zmq", {"shards": SHARDS, "symbols": SYMBOLS, "broker_start_s": server.started_in_s,
                                       "runs": rows})
    print(f"wrote {path}")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
