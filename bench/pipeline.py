"""`python -m bench.pipeline`: settle's end-to-end trades/s with 1 and 2 shards, and group commit against
one fsync per trade, side by side in one run (same machine, same minute: only the ratios matter).

Group commit vs per-trade fsync is measured twice: on the WAL alone (append+commit of the same records,
fsync on) and on the whole pipeline (``wal.batch_trades_max = 1`` forces one fsync per trade).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import table, write_json
from bench.settlerun import run_settle
from engine.core.messages import Trade
from engine.core.wal import ShardWal


@dataclass
class PipelineRun:
    name: str
    shards: int
    trades: int
    seconds: float
    trades_per_s: float
    verified: bool


def run_pipeline(name: str, trades: int, shards: int, overrides: dict[str, Any] | None = None,
                 store: str = "embedded", rate: int = 0, verify: bool = True, symbols: int = 16) -> PipelineRun:
    """Start engine and simulator on free ports, publish ``trades``, time until the store holds them all."""
    run = run_settle(name, trades=trades, shards=shards, store=store, publisher="sim", rate=rate,
                     symbols=symbols, overrides=overrides, verify=verify)
    return PipelineRun(name, shards, trades, run.seconds, run.trades_per_s, bool(run.verified))


def _trades(n: int, symbols: int = 10) -> list[Trade]:
    out = []
    seqs = [0] * symbols
    for i in range(n):
        s = i % symbols
        seqs[s] += 1
        out.append(Trade(output_sequence=i + 1, symbol=f"S{s:02d}-USDT", seq=seqs[s], trade_id=i + 1,
                         price=50_000_000_000, price_scale=6, qty=1_000_000, qty_scale=8, buyer=1, seller=2,
                         buy_order_id=1, sell_order_id=2, taker_side="buy", buyer_fee=10, seller_fee=10, ts_ns=1))
    return out


def wal_rate(trades: list[Trade], batch: int) -> float:
    with tempfile.TemporaryDirectory(prefix="settle-bench-wal-", dir=os.environ.get("SETTLE_BENCH_DIR")) as d:
        wal = ShardWal(Path(d) / "shard-0", segment_bytes_max=64 << 20, shard=0)
        wal.recover()
        started = time.perf_counter()
        for i, trade in enumerate(trades, start=1):
            wal.append(trade)
            if i % batch == 0:
                wal.commit()
        wal.commit()
        seconds = time.perf_counter() - started
        wal.close()
    return len(trades) / seconds


def wal_alone(records: int) -> dict[int, float]:
    """Records/s of the WAL alone (fsync on): a commit per record, and group commits of 4096."""
    trades = _trades(records)
    return {1: wal_rate(trades[: min(records, 2_000)], 1), 4096: wal_rate(trades, 4096)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__)
    parser.add_argument("--trades", type=int, default=200_000, help="trades per pipeline run")
    parser.add_argument("--quick", action="store_true", help="small runs (smoke test)")
    args = parser.parse_args(argv)
    trades = 5_000 if args.quick else args.trades
    per_trade_trades = 1_000 if args.quick else 5_000

    rates = wal_alone(20_000 if not args.quick else 2_000)
    wal_rows = [{"wal": f"batch {batch}", "records_per_s": rate} for batch, rate in rates.items()]
    wal_ratio = rates[4096] / rates[1]

    runs = [
        run_pipeline("1-shard", trades, 1),
        run_pipeline("2-shards", trades, 2),
        run_pipeline("2-shards-fsync-per-trade", per_trade_trades, 2, {"wal.batch_trades_max": 1}),
    ]
    rows = [{"run": r.name, "shards": r.shards, "trades": r.trades, "seconds": r.seconds,
             "trades_per_s": r.trades_per_s, "verified": r.verified} for r in runs]
    pipeline_ratio = runs[1].trades_per_s / runs[2].trades_per_s
    print("WAL alone (10 symbols, fsync on):")
    print(table(wal_rows, ["wal", "records_per_s"]))
    print(f"group commit / one fsync per trade (WAL alone): {wal_ratio:,.1f}x\n")
    print("Whole pipeline (simulator flat out -> router -> shards -> WAL -> embedded store):")
    print(table(rows, ["run", "shards", "trades", "seconds", "trades_per_s", "verified"]))
    print(f"group commit / one fsync per trade (pipeline, 2 shards): {pipeline_ratio:,.1f}x")
    path = write_json("pipeline", {"wal": wal_rows, "wal_group_commit_ratio": wal_ratio, "pipeline": rows,
                                   "pipeline_group_commit_ratio": pipeline_ratio})
    print(f"wrote {path}")
    return 0 if all(r.verified for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
