"""How fast the stores take settlement batches, against the raw driver writing the same rows.

    ops/cassandra/cassandra.sh start var/bench-cassandra      # prints the CQL port
    python -m bench.store_write --port PORT [--trades 40000] [--symbols 8] [--accounts 10000]

The trades come from the reference simulator's generator (:class:`engine.sim.mesim.TradeGenerator`), folded
into batches of ``--batch`` trades by the :class:`~engine.core.settlement.Settler` exactly as a shard does.
Each mode runs on a fresh keyspace:

- ``settle``: settle's whole settle stage, as one shard runs it: for each batch ``Settler.prepare`` (reading
  positions from the store the first time it touches them) then ``CassandraStore.write`` (single-partition
  UNLOGGED batches, concurrently, then the watermarks), batch after batch. Timed: all of it.
- ``settle write only``: the same batches prepared beforehand; only ``CassandraStore.write`` is timed.
- ``settle logged``: ``logged_batches = true``, a LOGGED batch per few trades (the design note's way).
- ``raw rows c=N``: the same ledger and position rows as single-row statements through the driver's
  ``execute_concurrent`` (its own thread, no asyncio, no logic) with N requests in flight, statements
  bound before the clock starts. The best N is the driver's ceiling for these rows.
- ``raw batches c=N``: the exact single-partition batches the store sends, the same way.

The raw ceiling is the best of the raw modes: the driver's best way of writing these rows.
- ``embedded``: the SQLite store (write only), for scale.

A "row" is a ledger row or a position row (watermark and bucket rows are not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cassandra.concurrent import execute_concurrent

from bench.settlerun import drop_keyspaces
from engine.core.config import CassandraConfig
from engine.core.messages import Trade
from engine.core.settlement import Settler
from engine.core.store.base import Batch, Store
from engine.core.store.cassandra import CassandraStore
from engine.core.store.embedded import EmbeddedStore
from engine.core.store.schema import ledger_bucket, ledger_ints
from engine.sim.mesim import FEE_ACCOUNT, TradeGenerator, sim_config

CONCURRENCIES = (32, 128, 512)
RAW_ATTEMPTS = 5


def workload(trades: int, symbols: int, accounts: int, seed: int = 7) -> list[Trade]:
    """``trades`` trades as the simulator makes them (deterministic for the seed)."""
    generator = TradeGenerator(sim_config(symbols=symbols, accounts=accounts, seed=seed))
    return [generator.next()[0] for _ in range(trades)]


async def prepared_batches(trades: list[Trade], batch_trades: int) -> list[Batch]:
    """The batches a shard would write, folded against an empty store."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = await EmbeddedStore.open(str(Path(tmp) / "scratch.db"))
        try:
            settler = Settler(scratch, FEE_ACCOUNT)
            return [await settler.prepare(trades[i : i + batch_trades]) for i in range(0, len(trades), batch_trades)]
        finally:
            await scratch.close()


def rows_of(batches: list[Batch]) -> int:
    return sum(len(b.trades) + len(b.positions) for b in batches)


async def time_store(store: Store, batches: list[Batch]) -> float:
    started = time.perf_counter()
    for batch in batches:
        await store.write(batch)
    return time.perf_counter() - started


async def bench_settle(config: CassandraConfig, trades: list[Trade], batch_trades: int) -> float:
    """Prepare (with the store's reads) and write, batch after batch: a shard's settle stage."""
    store = await CassandraStore.open(config, create_schema=True)
    try:
        settler = Settler(store, FEE_ACCOUNT)
        started = time.perf_counter()
        for i in range(0, len(trades), batch_trades):
            await store.write(await settler.prepare(trades[i : i + batch_trades]))
        return time.perf_counter() - started
    finally:
        await store.close()


async def bench_cassandra(config: CassandraConfig, batches: list[Batch]) -> float:
    store = await CassandraStore.open(config, create_schema=True)
    try:
        return await time_store(store, batches)
    finally:
        await store.close()


async def bench_raw(config: CassandraConfig, batches: list[Batch], concurrency: int, *, grouped: bool) -> float:
    """The driver alone on the same rows: single-row statements, or (``grouped``) exactly the
    batches the store sends (watermarks included); statements are built before the clock starts."""
    store = await CassandraStore.open(config, create_schema=True)
    try:
        session, st = store._session, store._st
        statements: list[tuple[Any, Any]] = []
        for batch in batches:
            if grouped:
                statements.extend((statement, None) for statement in store._write_requests(batch, batch.watermarks))
                continue
            for t in batch.trades:
                bucket = ledger_bucket(t.seq)
                statements.append((st.ledger, (t.symbol, bucket, *ledger_ints(t), t.seq)))
            for (account, asset, symbol), p in batch.positions.items():
                statements.append((st.position, (account, asset, symbol, p.amount, p.last_seq, p.last_seq)))

        def run() -> float:
            started = time.perf_counter()
            todo = statements
            for _ in range(RAW_ATTEMPTS):  # every statement is idempotent: re-send what timed out
                results = execute_concurrent(session, todo, concurrency=concurrency, raise_on_first_error=False)
                todo = [item for item, (ok, _) in zip(todo, results, strict=True) if not ok]
                if not todo:
                    return time.perf_counter() - started
            raise RuntimeError(f"raw driver: {len(todo)} statements still failing after {RAW_ATTEMPTS} attempts")

        return await asyncio.to_thread(run)
    finally:
        await store.close()


async def compare(host: str, port: int, *, trades: int = 40_000, symbols: int = 16, accounts: int = 1000,
                  batch: int = 4096, in_flight: int = 256, concurrencies: tuple[int, ...] = CONCURRENCIES,
                  embedded: bool = True, logged: bool = True) -> dict[str, Any]:
    """Every mode once on the same trades; rows/s and trades/s per mode, the raw ceiling and the ratios."""
    stream = workload(trades, symbols, accounts)
    batches = await prepared_batches(stream, batch)
    rows = rows_of(batches)
    results: list[dict[str, Any]] = []

    def report(mode: str, seconds: float) -> None:
        results.append({"mode": mode, "seconds": seconds, "rows_per_s": rows / seconds,
                        "trades_per_s": len(stream) / seconds})

    if embedded:
        with tempfile.TemporaryDirectory() as tmp:
            store = await EmbeddedStore.open(str(Path(tmp) / "bench.db"))
            try:
                report("embedded write only", await time_store(store, batches))
            finally:
                await store.close()

    made: list[str] = []  # dropped at the end: left behind, they slow the server down

    def config(**overrides: Any) -> CassandraConfig:
        made.append(f"bench_{uuid.uuid4().hex[:12]}")
        return CassandraConfig(contact_points=[host], port=port, keyspace=made[-1], requests_in_flight_max=in_flight,
                               **overrides)

    try:
        # Warm-up, not reported: a freshly started JVM compiles its write path during the first tens of
        # thousands of requests, and whichever mode ran first would pay for it.
        await bench_raw(config(), batches, in_flight, grouped=True)
        await bench_cassandra(config(), batches)
        report("settle", await bench_settle(config(), stream, batch))
        report("settle write only", await bench_cassandra(config(), batches))
        raw: list[tuple[float, str]] = []
        mode = f"raw batches c={in_flight}"
        seconds = await bench_raw(config(), batches, in_flight, grouped=True)
        report(mode, seconds)
        raw.append((rows / seconds, mode))
        if logged:
            report("settle logged", await bench_cassandra(config(logged_batches=True), batches))
        for concurrency in concurrencies:
            mode = f"raw rows c={concurrency}"
            seconds = await bench_raw(config(), batches, concurrency, grouped=False)
            report(mode, seconds)
            raw.append((rows / seconds, mode))
    finally:
        await asyncio.to_thread(drop_keyspaces, host, port, made)
    ceiling, best = max(raw)  # the driver's best way of writing these rows, whichever it is
    by_mode = {r["mode"]: r for r in results}
    out: dict[str, Any] = {
        "trades": len(stream), "batches": len(batches), "batch_trades": batch, "rows": rows,
        "rows_per_trade": rows / len(stream), "symbols": symbols, "accounts": accounts,
        "modes": results, "raw_ceiling_rows_per_s": ceiling, "raw_best_mode": best,
        "raw_ceiling_trades_per_s": ceiling / (rows / len(stream)),
        "settle_vs_raw": by_mode["settle"]["rows_per_s"] / ceiling,
        "settle_write_only_vs_raw": by_mode["settle write only"]["rows_per_s"] / ceiling,
    }
    if logged:
        out["logged_vs_default"] = by_mode["settle logged"]["rows_per_s"] / by_mode["settle write only"]["rows_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_write", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="CQL port")
    parser.add_argument("--trades", type=int, default=40_000)
    parser.add_argument("--symbols", type=int, default=16)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4096, help="trades per store batch (wal.batch_trades_max)")
    parser.add_argument("--in-flight", type=int, default=256, help="store.cassandra.requests_in_flight_max")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    coro = compare(args.host, args.port, trades=args.trades, symbols=args.symbols, accounts=args.accounts,
                   batch=args.batch, in_flight=args.in_flight)
    if args.no_uvloop:
        result = asyncio.run(coro)
    else:
        import uvloop

        result = uvloop.run(coro)
    print(f"{result['trades']} trades in {result['batches']} batches of <= {result['batch_trades']}: "
          f"{result['rows']} rows ({result['rows_per_trade']:.2f} per trade)")
    for r in result["modes"]:
        print(f"{r['mode']:<24} {r['seconds']:7.2f} s  {r['rows_per_s']:>9,.0f} rows/s  "
              f"{r['trades_per_s']:>9,.0f} trades/s")
    print(f"settle / raw ceiling: {result['settle_vs_raw']:.2f} "
          f"(write only {result['settle_write_only_vs_raw']:.2f}); "
          f"LOGGED / default: {result.get('logged_vs_default', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
