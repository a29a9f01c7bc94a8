"""How fast the stores take settlement batches: rows/s of ``Store.write``, per mode.

    ops/cassandra/cassandra.sh start var/bench-cassandra      # prints the CQL port
    python -m bench.store_write --port PORT [--trades 40000] [--symbols 8] [--accounts 10000]

Modes (each on a fresh keyspace, the same trades, batches of ``--batch`` trades prepared by the
:class:`~engine.settlement.Settler`; only ``write`` is timed):

- ``cassandra``: the default write path -- single-partition UNLOGGED batches, concurrently, then
  the watermarks.
- ``cassandra-logged``: ``logged_batches = true``, a LOGGED batch per few trades (the design note's way).
- ``raw-driver rows``: the same ledger and position rows as single-row statements through the driver's
  ``execute_concurrent`` (its own thread, no asyncio, no logic), statements bound beforehand.
- ``raw-driver batches``: the exact single-partition batches the store sends, the same way: what the
  default path would reach with zero overhead of its own.
- ``embedded``: the SQLite store, for scale (``--sqlite PATH``; a temporary file by default).

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

from engine.config import CassandraConfig
from engine.messages import Trade
from engine.settlement import Settler
from engine.store.base import Batch, Store
from engine.store.cassandra import CassandraStore
from engine.store.embedded import EmbeddedStore
from engine.store.schema import ledger_bucket, ledger_ints
from tests import contract


def workload(trades: int, symbols: int, accounts: int) -> list[list[Trade]]:
    names = [f"S{i}-USDT" for i in range(symbols)]
    return [contract.stream(names, trades // symbols, accounts=accounts, seed=7)]


async def prepared_batches(trades: list[Trade], batch_trades: int) -> list[Batch]:
    """The batches a shard would write, folded against an empty store."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = await EmbeddedStore.open(str(Path(tmp) / "scratch.db"))
        try:
            settler = Settler(scratch, contract.FEE)
            return [
                await settler.prepare(trades[i : i + batch_trades])
                for i in range(0, len(trades), batch_trades)
            ]
        finally:
            await scratch.close()


def rows_of(batches: list[Batch]) -> int:
    return sum(len(b.trades) + len(b.positions) for b in batches)


async def time_store(store: Store, batches: list[Batch]) -> float:
    started = time.perf_counter()
    for batch in batches:
        await store.write(batch)
    return time.perf_counter() - started


async def bench_cassandra(config: CassandraConfig, batches: list[Batch]) -> float:
    store = await CassandraStore.open(config, create_schema=True)
    try:
        return await time_store(store, batches)
    finally:
        await store.close()


async def bench_raw(
    config: CassandraConfig, batches: list[Batch], concurrency: int, *, grouped: bool
) -> float:
    """The driver alone on the same rows: single-row statements, or (``grouped``) exactly the
    single-partition batches the store sends; statements are built before the clock starts."""
    store = await CassandraStore.open(config, create_schema=True)
    try:
        session, st = store._session, store._st
        statements: list[tuple[Any, Any]] = []
        for batch in batches:
            if grouped:
                statements.extend((statement, None) for statement in store._partition_batches(batch))
                continue
            for t in batch.trades:
                bucket = ledger_bucket(t.seq)
                statements.append((st.ledger, (t.symbol, bucket, *ledger_ints(t), t.seq)))
            for (account, asset, symbol), p in batch.positions.items():
                statements.append((st.position, (account, asset, symbol, p.amount, p.last_seq, p.last_seq)))

        def run() -> float:
            started = time.perf_counter()
            results = execute_concurrent(
                session, statements, concurrency=concurrency, raise_on_first_error=True
            )
            assert all(ok for ok, _ in results)
            return time.perf_counter() - started

        return await asyncio.to_thread(run)
    finally:
        await store.close()


async def main(args: argparse.Namespace) -> None:
    trades = workload(args.trades, args.symbols, args.accounts)[0]
    batches = await prepared_batches(trades, args.batch)
    rows = rows_of(batches)
    print(
        f"{len(trades)} trades in {len(batches)} batches of <= {args.batch}: {rows} rows "
        f"({sum(len(b.positions) for b in batches)} position rows), "
        f"{args.accounts} accounts, {args.symbols} symbols"
    )

    def report(name: str, seconds: float) -> None:
        print(
            f"{name:<28} {seconds:7.2f} s  {rows / seconds:>9,.0f} rows/s  "
            f"{len(trades) / seconds:>9,.0f} trades/s"
        )

    with tempfile.TemporaryDirectory() as tmp:
        store = await EmbeddedStore.open(args.sqlite or str(Path(tmp) / "bench.db"))
        try:
            report("embedded", await time_store(store, batches))
        finally:
            await store.close()

    def config(**overrides: object) -> CassandraConfig:
        return CassandraConfig(
            contact_points=[args.host],
            port=args.port,
            keyspace=f"bench_{uuid.uuid4().hex[:12]}",
            requests_in_flight_max=args.in_flight,
            **overrides,  # type: ignore[arg-type]
        )

    for _ in range(args.repeat):
        report("cassandra", await bench_cassandra(config(), batches))
        report("cassandra-logged", await bench_cassandra(config(logged_batches=True), batches))
        raw = await bench_raw(config(), batches, args.in_flight, grouped=False)
        report(f"raw-driver rows c={args.in_flight}", raw)
        raw = await bench_raw(config(), batches, args.in_flight, grouped=True)
        report(f"raw-driver batches c={args.in_flight}", raw)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="CQL port")
    parser.add_argument("--trades", type=int, default=40_000)
    parser.add_argument("--symbols", type=int, default=8)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument(
        "--batch", type=int, default=4096, help="trades per store batch (wal.batch_trades_max)"
    )
    parser.add_argument("--in-flight", type=int, default=256, help="store.cassandra.requests_in_flight_max")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--sqlite", help="embedded store file (default: a temporary one)")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if args.no_uvloop:
        asyncio.run(main(args))
    else:
        import uvloop

        uvloop.run(main(args))
