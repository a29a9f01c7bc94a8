"""Sustained capacity: the highest publish rate settle holds for minutes with the lag flat.

A burst figure (``settle bench``'s throughput scenarios) says how fast a backlog drains; an exchange
needs the rate it can take all day. At each rate the simulator publishes live, with wall-clock stamps,
for ``minutes``; the shards' lag histograms are read every minute, and the rate **holds** when the p99
of the last minute is no higher than the second minute's (the first holds start-up), within
``P99_SLACK``, and no backlog (published but not settled) grows over the run. The slack is the
histogram's resolution: a p99 read inside a 25 ms wide bucket moves by a tenth between two minutes of
the same load (measured: 67, 67, 73, 60, 73 ms over five minutes of 8,000 trades/s). The sustained
capacity is the highest rate that holds; latency targets are taken as fractions of it.

    python -m bench.sustained --rates 4000,6000,8000 --minutes 5 [--store cassandra --cassandra-port P]

writes ``bench-results/sustained.json`` with every minute's p50/p99 and backlog per rate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, clean_json, quantile, table
from bench.latency import histograms, window
from bench.settlerun import Bench, CassandraTarget

MINUTE_S = 60.0
P99_SLACK = 1.10


def run_rate(rate: float, *, minutes: int, store: str, cassandra: CassandraTarget | None,
             minute_s: float = MINUTE_S, work_dir: Path | None = None) -> dict[str, Any]:
    """Publish at ``rate`` for ``minutes``; the lag's p50/p99 and the backlog of every minute."""
    trades = int(rate * minutes * minute_s)
    with Bench(f"sustained-{rate:.0f}", shards=2, store=store, cassandra=cassandra, work_dir=work_dir) as bench:
        bench.start()
        progress = bench.progress
        assert progress is not None
        bench.start_publisher("sim", trades, rate=rate)
        started = time.monotonic()
        before = histograms(bench)
        rows: list[dict[str, Any]] = []
        for minute in range(1, minutes + 1):
            time.sleep(max(0.0, started + minute * minute_s - time.monotonic()))  # the sampling period
            now = histograms(bench)
            buckets = window(now, before)["lag"][0]
            before = now
            published = min(trades, int(rate * (time.monotonic() - started)))
            rows.append({"rate": rate, "minute": minute, "settled": int(max(buckets.values(), default=0)),
                         "p50_ms": quantile(0.50, buckets) * 1e3, "p99_ms": quantile(0.99, buckets) * 1e3,
                         "backlog": max(0, published - progress.settled)})
            print(table([rows[-1]], ["rate", "minute", "settled", "p50_ms", "p99_ms", "backlog"]), flush=True)
        progress.wait_for(trades)
        verified = bench.verify().ok
    second, last = rows[min(1, len(rows) - 1)], rows[-1]
    backlog_flat = last["backlog"] <= max(second["backlog"], rate * 0.5)  # at most half a second behind
    holds = last["p99_ms"] <= second["p99_ms"] * P99_SLACK and backlog_flat and verified
    return {"rate": rate, "minutes": minutes, "store": store, "holds": holds, "verified": verified,
            "second_minute_p99_ms": second["p99_ms"], "last_minute_p99_ms": last["p99_ms"],
            "last_backlog": last["backlog"], "per_minute": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sustained", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", required=True, help="trades/s to try, comma-separated, lowest first")
    p.add_argument("--minutes", type=int, default=5, help="publishing time at each rate (at least 2)")
    p.add_argument("--store", choices=["embedded", "cassandra"], default="embedded")
    p.add_argument("--cassandra-port", type=int, default=0, help="the Cassandra on 127.0.0.1:PORT (--store cassandra)")
    p.add_argument("--out", default=str(RESULTS / "sustained.json"))
    args = p.parse_args(argv)
    if args.minutes < 2:
        p.error("--minutes must be at least 2: the second minute is the reference")
    target = CassandraTarget("127.0.0.1", args.cassandra_port) if args.store == "cassandra" else None
    runs = [run_rate(float(r), minutes=args.minutes, store=args.store, cassandra=target)
            for r in args.rates.split(",")]
    held = [r["rate"] for r in runs if r["holds"]]
    result = {"store": args.store, "minutes": args.minutes, "sustained_trades_per_s": max(held, default=None),
              "runs": runs}
    print(table(runs, ["rate", "holds", "second_minute_p99_ms", "last_minute_p99_ms", "last_backlog", "verified"]))
    print(f"sustained capacity ({args.store}, {args.minutes} min): "
          f"{result['sustained_trades_per_s'] or 'none of the rates tried'} trades/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(clean_json(result), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["verified"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
