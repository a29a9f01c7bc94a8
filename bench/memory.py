"""Memory over a long run: the resident set (VmRSS) of every process, sampled every few seconds.

The simulator publishes ``trades`` at a steady ``rate`` (below the engine's capacity: a flat-out
publisher would fill the sockets' queues and measure them instead), and every ``interval_s`` the bench
reads ``/proc/PID/status`` of the supervisor, the router and each shard. Growth per process compares
the mean RSS over the last tenth of the run with the mean over the second tenth (the first tenth is
warm-up: imports done, caches filling); the headline is the largest growth of the engine's processes.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import rss_bytes
from bench.settlerun import Bench, CassandraTarget


def _window_mean(samples: list[tuple[float, int]], start: float, end: float) -> float | None:
    """Mean RSS of the samples from fraction ``start`` to ``end`` of the series (at least one sample)."""
    if not samples:
        return None
    first = min(int(len(samples) * start), len(samples) - 1)
    last = max(first + 1, int(len(samples) * end))
    return statistics.fmean(rss for _, rss in samples[first:last])


def run_memory(*, trades: int, rate: float, interval_s: float, shards: int = 0, store: str = "embedded",
               cassandra: CassandraTarget | None = None, symbols: int = 16, accounts: int = 1000,
               work_dir: Path | None = None) -> dict[str, Any]:
    series: dict[str, list[tuple[float, int]]] = {}
    stop = threading.Event()
    with Bench("memory", shards=shards, store=store, cassandra=cassandra, work_dir=work_dir) as bench:
        bench.start()
        progress = bench.progress
        assert progress is not None

        def sample() -> None:
            while not stop.wait(interval_s):
                now = time.monotonic()
                for slot, pid in bench.engine_pids().items():
                    rss = rss_bytes(pid)
                    if rss is not None:
                        series.setdefault(slot, []).append((now, rss))
                if bench.publisher is not None:
                    rss = rss_bytes(bench.publisher.pid)
                    if rss is not None:
                        series.setdefault("simulator", []).append((now, rss))

        sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
        started = time.monotonic()
        bench.start_publisher("sim", trades, rate=rate, symbols=symbols, accounts=accounts)
        sampler.start()
        try:
            progress.wait_for(trades)
        finally:
            stop.set()
            sampler.join()
        finished = time.monotonic()
        seconds, per_s = progress.rate(trades)
        verified = bench.verify().ok
    processes = {}
    for slot, samples in sorted(series.items()):
        early = _window_mean(samples, 0.1, 0.2)
        late = _window_mean(samples, 0.9, 1.0)
        growth = (late - early) / early if early and late else None
        processes[slot] = {
            "rss_mib_start": samples[0][1] / 2**20, "rss_mib_max": max(r for _, r in samples) / 2**20,
            "rss_mib_early": early / 2**20 if early else None, "rss_mib_late": late / 2**20 if late else None,
            "growth": growth,
            "series": [[round(t - started, 2), round(r / 2**20, 2)] for t, r in samples],
        }
    engine = [p["growth"] for slot, p in processes.items() if slot != "simulator" and p["growth"] is not None]
    return {"store": store, "trades": trades, "rate": rate, "seconds": finished - started,
            "settled_per_s": per_s, "verified": verified, "interval_s": interval_s,
            "max_growth": max(engine) if engine else None, "processes": processes}
