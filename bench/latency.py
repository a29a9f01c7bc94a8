"""Latency: ME execution time to store commit, per trade, at a fraction of the maximum rate.

``settle sim --rate R --timestamps wall`` stamps each trade with the wall clock when it is made (just
before it is logged and published); each shard observes ``now - ts_ns`` into ``settle_lag_seconds``
when the store acknowledged the batch holding the trade (same box, same clock). The shards' histograms
are read from their ``/metrics`` once the run is warm (10% of its trades settled) and again when every
trade is settled; the difference holds the trades in between. Quantiles are interpolated inside the
bucket like Prometheus' ``histogram_quantile`` (buckets: ``engine.metrics.LATENCY_BUCKETS_S``); the share at
or under 25 ms is exact (25 ms is a bound). ``settle_stage_seconds`` splits each trade's lag by stage
(ME to intake, the group commit's wait and fdatasync, the wait for the store, position reads, the store
write); its means add up to the lag's mean, and each rate prints them. ``engine_cpu_us_per_trade`` is the
CPU the supervisor, the router and the shards used over the same window (``/proc``), per settled trade;
``cores`` says where the machine's cores went in that window (the shards, the router, the simulator, and
everything else: the store's server when it runs on the same box, the benchmark itself), because below
capacity a trade's time is mostly waits for a core once they are busy.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from bench.common import (
    cpu_seconds,
    fraction_at_most,
    histogram_buckets,
    histogram_sum,
    machine_busy_s,
    quantile,
    scrape,
    subtract,
)
from bench.settlerun import Bench, CassandraTarget
from engine.core import metrics

LAG_METRIC = "settle_lag_seconds"
STAGE_METRIC = "settle_stage_seconds"
STAGES = tuple(metrics.STAGES)  # in the order a trade passes them
WARM_FRACTION = 0.1

Histogram = tuple[dict[float, float], float]  # cumulative buckets, sum


def lag_buckets(bench: Bench, metric: str = LAG_METRIC) -> dict[float, float]:
    """``metric``'s histogram buckets summed over the bench's shards."""
    return histograms(bench, metric)["lag"][0]


def histograms(bench: Bench, lag_metric: str = LAG_METRIC) -> dict[str, Histogram]:
    """The lag histogram and each stage's, summed over the bench's shards."""
    out: dict[str, Histogram] = {}
    for url in bench.shard_metrics_urls():
        text = scrape(url)
        wanted = [("lag", lag_metric, "")] + [(stage, STAGE_METRIC, f'stage="{stage}"') for stage in STAGES]
        for key, metric, where in wanted:
            buckets, total = out.get(key, ({}, 0.0))
            for le, count in histogram_buckets(text, metric, where).items():
                buckets[le] = buckets.get(le, 0.0) + count
            out[key] = (buckets, total + histogram_sum(text, metric, where))
    return out


def window(after: dict[str, Histogram], before: dict[str, Histogram]) -> dict[str, Histogram]:
    return {key: (subtract(buckets, before[key][0]), total - before[key][1]) for key, (buckets, total) in after.items()}


def summarize(buckets: dict[float, float]) -> dict[str, Any]:
    return {
        "count": int(max(buckets.values(), default=0)),
        "p50_ms": quantile(0.50, buckets) * 1e3,
        "p99_ms": quantile(0.99, buckets) * 1e3,
        "p999_ms": quantile(0.999, buckets) * 1e3,
        "share_le_25ms": fraction_at_most(0.025, buckets),
        "buckets": [[le, count] for le, count in sorted(buckets.items())],
    }


def stage_rows(name: str, hists: dict[str, Histogram]) -> list[dict[str, Any]]:
    """Per stage: mean, p50 and p99 over the window; the means add up to the lag's mean."""
    rows = []
    for key in ("lag", *STAGES):
        buckets, total = hists[key]
        count = max(buckets.values(), default=0.0)
        rows.append({"name": name, "stage": key, "count": int(count),
                     "mean_ms": total / count * 1e3 if count else math.nan,
                     "p50_ms": quantile(0.50, buckets) * 1e3, "p99_ms": quantile(0.99, buckets) * 1e3})
    return rows


def _cpu_by_part(bench: Bench) -> dict[str, float]:
    """CPU seconds so far of the shards, the router (with the supervisor), the simulator, and the machine."""
    out = {"shards": 0.0, "router": 0.0, "simulator": 0.0, "machine": machine_busy_s()}
    for slot, pid in bench.engine_pids().items():
        out["shards" if slot.startswith("shard") else "router"] += cpu_seconds(pid)
    sim = bench.system.sim
    if sim is not None and sim.poll() is None:
        out["simulator"] = cpu_seconds(sim.pid)
    return out


def cores_busy(after: dict[str, float], before: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores busy on average over ``seconds`` between two :func:`_cpu_by_part` readings, by part; ``other``
    is the machine's less the parts (the store's server on the same box, the benchmark, the rest)."""
    cores = {part: (after[part] - before[part]) / seconds for part in after}
    cores["other"] = max(0.0, cores["machine"] - cores["shards"] - cores["router"] - cores["simulator"])
    return cores


def run_latency(name: str, *, rate: float, seconds: float, shards: int = 0, store: str = "embedded",
                cassandra: CassandraTarget | None = None, symbols: int = 16, accounts: int = 1000,
                work_dir: Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish ``rate * seconds`` trades at ``rate`` with wall-clock stamps; the lag distribution and where
    its time went, stage by stage."""
    trades = max(1000, int(rate * seconds))
    with Bench(name, shards=shards, store=store, cassandra=cassandra, work_dir=work_dir,
               overrides=overrides) as bench:
        bench.start()
        progress = bench.progress
        assert progress is not None
        bench.start_publisher("sim", trades, rate=rate, symbols=symbols, accounts=accounts)
        warm_at = int(trades * WARM_FRACTION)
        progress.wait_for(warm_at)
        before = histograms(bench)
        started, settled_before, cpu_before = time.monotonic(), progress.settled, bench.engine_cpu_s()
        parts_before = _cpu_by_part(bench)
        progress.wait_for(trades)
        parts_after = _cpu_by_part(bench)
        settled = progress.settled - settled_before
        elapsed = max(time.monotonic() - started, 1e-9)
        achieved = settled / elapsed
        cpu_us = (bench.engine_cpu_s() - cpu_before) / max(settled, 1) * 1e6
        hists = window(histograms(bench), before)
        verified = bench.verify().ok if store != "null" else None
    return {"name": name, "store": store, "shards": bench.shards, "rate": rate, "trades": trades,
            "settled_per_s": achieved, "engine_cpu_us_per_trade": cpu_us, "verified": verified,
            "cores": cores_busy(parts_after, parts_before, elapsed),
            **summarize(hists["lag"][0]),
            "stages": stage_rows(name, hists)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from bench.common import RESULTS, clean_json, table

    p = argparse.ArgumentParser(prog="python -m bench.latency",
                                description="ME-to-store latency of settle (2 shards) at fixed publish rates.")
    p.add_argument("--rates", default="5000,10000,20000,30000,40000", help="trades/s, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="publishing time at each rate")
    p.add_argument("--store", choices=["embedded", "cassandra"], default="embedded")
    p.add_argument("--cassandra-port", type=int, default=0, help="the Cassandra on 127.0.0.1:PORT (--store cassandra)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a configuration setting of the engine, e.g. wal.fsync_wait_us_max=500 (repeatable)")
    p.add_argument("--out", default=str(RESULTS / "latency.json"))
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {}
    for setting in args.set:
        key, sep, value = setting.partition("=")
        if not sep:
            p.error(f"--set {setting!r}: expected KEY=VALUE")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    target = CassandraTarget("127.0.0.1", args.cassandra_port) if args.store == "cassandra" else None
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        rows.append(run_latency(f"latency-{rate:.0f}", rate=rate, seconds=args.seconds, store=args.store,
                                cassandra=target, overrides=overrides))
        print(table([rows[-1]], ["name", "rate", "settled_per_s", "engine_cpu_us_per_trade", "count", "p50_ms",
                                 "p99_ms", "p999_ms", "share_le_25ms", "verified"]), flush=True)
        print(table(rows[-1]["stages"], ["name", "stage", "count", "mean_ms", "p50_ms", "p99_ms"]), flush=True)
        cores = rows[-1]["cores"]
        print(f"{rows[-1]['name']}: cores busy {cores['machine']:.2f} of {os.cpu_count()}: shards "
              f"{cores['shards']:.2f}, router {cores['router']:.2f}, simulator {cores['simulator']:.2f}, "
              f"other processes {cores['other']:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(clean_json(rows), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
