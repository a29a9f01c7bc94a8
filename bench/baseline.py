"""The design note's own design, as the baseline: ``python -m bench.baseline --config FILE --trades N``.

``reference/seed-design-note.md`` ("Solution 1: Write-Ahead Log in Settlement Service"), faithfully:

- **one process**, one loop: receive a trade from the ME's ZMQ PUB socket (SUB), then
  ``settle_trade_with_wal``, then the next trade;
- ``wal.append``: the WAL entry ``{sequence, symbol, trade, status: "Pending"}`` as one JSON line,
  written and then ``fsync``-ed (``os.fsync``, what Rust's ``File::sync_all`` does) before anything else
  happens -- one fsync per trade;
- ``db.settle_trade_atomically``: one atomic write per trade holding the ledger row, the absolute
  position rows the trade changes and the symbol's watermark: on Cassandra a ``BEGIN BATCH ... APPLY
  BATCH`` LOGGED batch (``BatchType.LOGGED``), executed and awaited before the next trade; on the
  embedded store one SQLite transaction, synced (``EmbeddedStore.sync``);
- ``wal.mark_committed``: the entry's status flips to ``Committed`` in memory (the note never rewrites
  the file; its recovery re-settles every line, which the idempotent writes make harmless).

It writes settle's schema (ledger, ledger buckets, positions as absolute amounts with ``last_seq``,
watermarks, every CQL cell stamped ``USING TIMESTAMP`` with its sequence), so ``engine.verify.checker`` proves
its result the same way as settle's. Positions are folded per trade like settle's settler does (read
from the store on first touch, changed only by a trade whose seq is above the row's ``last_seq``):
the note leaves ``settle_trade_atomically`` unspecified, and absolute, idempotent rows are what make
its recovery (re-settle every WAL line) correct.

JSON is written with msgspec (the fastest JSON encoder Python has; the note uses serde_json), and the
SUB socket's receive queue is unbounded, so the flat-out ME never makes the baseline lose a trade: the
baseline is not weakened anywhere. It prints one JSON line with its own timing when ``--trades`` trades
are settled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import msgspec
import zmq

from engine.core import config as configmod
from engine.core.config import CassandraConfig, Config
from engine.core.messages import Trade, stream_decoder
from engine.core.settlement import deltas
from engine.core.store.base import ZERO, Batch, Position, PositionKey, Store
from engine.core.store.schema import ledger_bucket, ledger_ints

# --------------------------------------------------------------------------------------------- the WAL


class WalEntry(msgspec.Struct, kw_only=True):
    sequence: int
    symbol: str
    trade: Trade
    status: Literal["Pending", "Committed"]


class SettlementWal:
    """The note's ``SettlementWal``: an append-only file of JSON lines and an in-memory map of entries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.entries: dict[int, WalEntry] = {}
        self._encode = msgspec.json.Encoder().encode

    def append(self, trade: Trade) -> None:
        entry = WalEntry(sequence=trade.output_sequence, symbol=trade.symbol, trade=trade, status="Pending")
        line = self._encode(entry) + b"\n"
        written = os.write(self._fd, line)
        while written < len(line):
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)  # CRITICAL: fsync to ensure durability (sync_all)
        self.entries[entry.sequence] = entry

    def mark_committed(self, sequence: int) -> None:
        entry = self.entries.get(sequence)
        if entry is not None:
            entry.status = "Committed"

    def recover(self) -> list[Trade]:
        decoder = msgspec.json.Decoder(WalEntry)
        pending = []
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    entry = decoder.decode(line)
                    if entry.status == "Pending":
                        pending.append(entry.trade)
        return pending

    def close(self) -> None:
        os.close(self._fd)


# ------------------------------------------------------------------------------------- the settlement DB


class Positions:
    """Absolute positions folded one trade at a time (settle's arithmetic, settle's idempotence rule)."""

    def __init__(self, fee_account: int) -> None:
        self.fee_account = fee_account
        self.cache: dict[PositionKey, Position] = {}

    async def fold(self, trade: Trade, store: Store) -> dict[PositionKey, Position]:
        changes = {(account, asset, trade.symbol): change
                   for (account, asset), change in deltas(trade, self.fee_account).items()}
        missing = [key for key in changes if key not in self.cache]
        if missing:
            loaded = await store.load_positions(missing)
            for key in missing:
                self.cache[key] = loaded.get(key, ZERO)
        out = {}
        for key, change in changes.items():
            current = self.cache[key]
            if trade.seq > current.last_seq:
                self.cache[key] = out[key] = Position(current.amount + change, trade.seq)
        return out


class EmbeddedDb:
    """One SQLite transaction per trade, through settle's embedded store (same statements, same pragmas)."""

    def __init__(self, store: Store, fee_account: int) -> None:
        self.store = store
        self.positions = Positions(fee_account)

    async def settle_trade_atomically(self, trade: Trade) -> None:
        changed = await self.positions.fold(trade, self.store)
        await self.store.write(Batch([trade], changed, {trade.symbol: trade.seq}))
        await self.store.sync()  # the design's transaction is durable before the trade is marked committed

    async def close(self) -> None:
        await self.store.close()


class CassandraDb:
    """One LOGGED batch per trade: ledger row (and its bucket row, once), position rows, watermark."""

    def __init__(self, config: CassandraConfig, reader: Store, fee_account: int) -> None:
        from cassandra import ConsistencyLevel
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

        self.reader = reader
        self.positions = Positions(fee_account)
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=config.local_dc or "")),
            consistency_level=ConsistencyLevel.name_to_value[config.consistency],
            request_timeout=config.request_timeout_s,
        )
        self.cluster = Cluster(contact_points=list(config.contact_points), port=config.port, protocol_version=4,
                               execution_profiles={EXEC_PROFILE_DEFAULT: profile})
        self.session = self.cluster.connect()
        ks = config.keyspace
        prepare = self.session.prepare
        self.ledger = prepare(
            f"INSERT INTO {ks}.ledger (symbol, bucket, seq, trade_id, output_sequence, buyer, seller, price, qty, "
            "buyer_fee, seller_fee, ts_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?")
        self.bucket = prepare(f"INSERT INTO {ks}.ledger_buckets (symbol, bucket) VALUES (?, ?) USING TIMESTAMP ?")
        self.position = prepare(f"INSERT INTO {ks}.positions (account, asset, symbol, amount, last_seq) "
                                "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?")
        self.watermark = prepare(f"INSERT INTO {ks}.watermarks (symbol, seq) VALUES (?, ?) USING TIMESTAMP ?")
        self.known_buckets: set[tuple[str, int]] = set()

    async def settle_trade_atomically(self, trade: Trade) -> None:
        from cassandra.query import BatchStatement, BatchType

        changed = await self.positions.fold(trade, self.reader)
        batch = BatchStatement(batch_type=BatchType.LOGGED)
        symbol, seq = trade.symbol, trade.seq
        bucket = ledger_bucket(seq)
        if (symbol, bucket) not in self.known_buckets:
            batch.add(self.bucket, (symbol, bucket, bucket))
        batch.add(self.ledger, (symbol, bucket, *ledger_ints(trade), seq))
        for (account, asset, sym), p in changed.items():
            batch.add(self.position, (account, asset, sym, p.amount, p.last_seq, p.last_seq))
        batch.add(self.watermark, (symbol, seq, seq))
        self.session.execute(batch)  # awaited before the next trade, as in the note
        self.known_buckets.add((symbol, bucket))

    async def close(self) -> None:
        self.cluster.shutdown()
        await self.reader.close()


async def open_db(config: Config) -> EmbeddedDb | CassandraDb:
    from engine.core.store import open_store

    fee = config.engine.fee_account
    if config.store.kind == "embedded":
        return EmbeddedDb(await open_store(config.store), fee)
    assert config.store.kind == "cassandra", config.store.kind
    reader = await open_store(config.store, create_schema=True)
    return CassandraDb(config.store.cassandra, reader, fee)


# ------------------------------------------------------------------------------------------ the service


async def settle_trade_with_wal(db: EmbeddedDb | CassandraDb, wal: SettlementWal, trade: Trade) -> None:
    wal.append(trade)  # 1. write to WAL first (durable)
    await db.settle_trade_atomically(trade)  # 2. write to the store
    wal.mark_committed(trade.output_sequence)  # 3. mark as committed in the WAL


async def serve(config: Config, wal_path: Path, trades: int, stop: list[bool]) -> dict[str, Any]:
    db = await open_db(config)
    wal = SettlementWal(wal_path)
    try:
        pending = wal.recover()
        for trade in pending:  # on start-up: re-settle what the WAL holds
            await settle_trade_with_wal(db, wal, trade)
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)  # unbounded: a flat-out ME never makes the baseline drop a trade
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(config.me.publish)
        decode = stream_decoder().decode
        settled = 0
        first_at = last_at = 0.0
        cpu_at_first = 0.0
        try:
            while settled < trades and not stop[0]:
                if not sub.poll(100):
                    continue
                msg = decode(sub.recv())  # receive_trade_from_zmq()
                if not isinstance(msg, Trade):
                    continue  # heartbeats: the note's design has no use for them
                if not first_at:
                    first_at = time.monotonic()
                    cpu_at_first = time.process_time()
                await settle_trade_with_wal(db, wal, msg)
                settled += 1
                last_at = time.monotonic()
        finally:
            sub.close(0)
            ctx.term()
        seconds = last_at - first_at
        cpu_s = time.process_time() - cpu_at_first
        return {"settled": settled, "recovered": len(pending), "seconds": seconds, "cpu_s": cpu_s,
                "trades_per_s": settled / seconds if seconds > 0 else None,
                "wal_entries_in_memory": len(wal.entries)}
    finally:
        wal.close()
        await db.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a settle config (JSON or TOML): ME endpoint and store")
    p.add_argument("--wal", required=True, help="the WAL file (JSON lines)")
    p.add_argument("--trades", type=int, required=True, help="exit once this many trades are settled")
    args = p.parse_args(argv)
    path = Path(args.config)
    if path.suffix == ".json":
        config = configmod.from_dict(json.loads(path.read_text()), str(path))
    else:
        config = configmod.load(path)
    stop = [False]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    import uvloop

    result = uvloop.run(serve(config, Path(args.wal), args.trades, stop))
    print(json.dumps(result), flush=True)
    print(f"bench.baseline: {result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
