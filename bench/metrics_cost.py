"""`python -m bench.metrics_cost`: what the Prometheus metrics cost on the hot path, as end-to-end trades/s
of the whole pipeline with metrics on and off, side by side in one run.

- **on**: ``metrics.enabled = true`` (the default), and every process is scraped every ``--scrape-interval``
  seconds while the trades flow (1 s by default: 15 times harsher than the shipped scrape config).
- **off**: ``metrics.enabled = false``: nothing is served, and the metric families are no-ops (nothing is
  counted or observed; see ``engine.core.metrics.new_registry``).

Runs alternate on, off, on, off, ... so drift on the machine hits both alike; the table shows every run
and the median per mode. The simulator publishes flat out; the clock runs from the first settled trade
to the last (the store's watermarks, polled every 50 ms). Beside trades/s, each run reports the CPU time
the engine's processes (router and shards, from /proc) spent per trade over the same span: on a shared
machine wall-clock throughput swings with the neighbours, CPU per trade much less. Results go to
bench-results/metrics_cost.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import table, write_json
from engine.verify.testbed import System


def _scraper(urls: list[str], interval_s: float, stop: threading.Event, counts: dict[str, int]) -> None:
    while not stop.wait(interval_s):
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    counts["bytes"] += len(response.read())
                counts["scrapes"] += 1
            except OSError:
                counts["failed"] += 1


def engine_cpu_s(system: System) -> float:
    """User+system CPU seconds of the router and every shard so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for slot in system.state()["slots"].values():
        try:
            with open(f"/proc/{slot['pid']}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def run_once(mode: str, trades: int, shards: int, symbols: int, scrape_interval_s: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"settle-bench-metrics-{mode}-"))
    system = System(root, shards=shards, overrides={"metrics.enabled": mode == "on"})
    m = system.config.metrics
    urls = [f"http://127.0.0.1:{p}/metrics"
            for p in (m.supervisor_port, m.router_port, *(m.shard_port_base + i for i in range(shards)))]
    counts = {"scrapes": 0, "failed": 0, "bytes": 0}
    stop = threading.Event()
    scraper = threading.Thread(target=_scraper, args=(urls, scrape_interval_s, stop, counts), daemon=True)
    try:
        system.start_engine()
        if mode == "on":
            scraper.start()
        system.start_sim(trades, rate=0, symbols=symbols, accounts=1000)
        settled, first_at, last_change = 0, 0.0, time.monotonic()
        first_cpu, first_value = 0.0, 0
        while settled < trades:
            time.sleep(0.05)
            now = time.monotonic()
            value = system.settled()
            if value and not first_at:
                first_at, first_cpu, first_value = now, engine_cpu_s(system), value
            if value != settled:
                settled, last_change = value, now
            if now - last_change > 120:
                raise RuntimeError(f"metrics {mode}: stalled at {settled}/{trades}; see {root}/logs")
        seconds = time.monotonic() - first_at
        cpu_us_per_trade = (engine_cpu_s(system) - first_cpu) / max(1, trades - first_value) * 1e6
    finally:
        stop.set()
        if scraper.is_alive():
            scraper.join()
        system.stop()
    verified = system.check().ok
    shutil.rmtree(root, ignore_errors=True)
    if mode == "on" and counts["scrapes"] == 0 and seconds > 2 * scrape_interval_s:
        raise RuntimeError("metrics on: no scrape succeeded; the endpoints did not answer")
    return {"mode": mode, "trades": trades, "seconds": seconds, "trades_per_s": trades / seconds,
            "cpu_us_per_trade": cpu_us_per_trade, "scrapes": counts["scrapes"],
            "scrape_failures": counts["failed"], "verified": verified}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trades", type=int, default=150_000, help="trades per run (default 150000)")
    parser.add_argument("--shards", type=int, default=2, help="shard processes (default 2)")
    parser.add_argument("--symbols", type=int, default=16, help="symbols (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="on/off pairs (default 3)")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes when on")
    parser.add_argument("--quick", action="store_true", help="one small pair (smoke test)")
    args = parser.parse_args(argv)
    trades, rounds = (10_000, 1) if args.quick else (args.trades, args.rounds)

    runs: list[dict[str, Any]] = []
    for i in range(rounds):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            run = run_once(mode, trades, args.shards, args.symbols, args.scrape_interval)
            print(f"  run {len(runs) + 1}: metrics {mode:<3} {run['trades_per_s']:>10,.0f} trades/s "
                  f"{run['cpu_us_per_trade']:>6.1f} CPU us/trade", flush=True)
            runs.append(run)
    modes = ("on", "off")
    medians = {mode: statistics.median(r["trades_per_s"] for r in runs if r["mode"] == mode) for mode in modes}
    cpu = {mode: statistics.median(r["cpu_us_per_trade"] for r in runs if r["mode"] == mode) for mode in modes}
    cost = 1 - medians["on"] / medians["off"]
    cpu_cost = cpu["on"] / cpu["off"] - 1
    print(f"\nWhole pipeline, {args.shards} shards, {trades:,} trades per run, simulator flat out, embedded store:")
    print(table(runs, ["mode", "trades", "seconds", "trades_per_s", "cpu_us_per_trade", "scrapes", "verified"]))
    print()
    print(table([{"metrics": mode, "median_trades_per_s": medians[mode], "median_cpu_us_per_trade": cpu[mode]}
                 for mode in modes], ["metrics", "median_trades_per_s", "median_cpu_us_per_trade"]))
    print(f"metrics cost: {cost * 100:+.1f}% of throughput, {cpu_cost * 100:+.1f}% CPU per trade (on vs off, medians)")
    path = write_json("metrics_cost", {"shards": args.shards, "trades_per_run": trades,
                                       "scrape_interval_s": args.scrape_interval, "runs": runs,
                                       "median_trades_per_s": medians, "median_cpu_us_per_trade": cpu,
                                       "throughput_cost_fraction": cost, "cpu_cost_fraction": cpu_cost})
    print(f"wrote {path}")
    return 0 if all(r["verified"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
