"""What the stores hold: the value bounds both enforce, and the CQL schema with its migration.

Both stores keep every integer in a signed 64-bit column (SQLite INTEGER, CQL ``bigint``). A batch holding a
value outside that range is rejected whole and leaves the store untouched: the stores find out as they
serialise its values (SQLite inside the write's transaction, which rolls back; the CQL store before it sends
anything), then :func:`check_batch` names the value in the :class:`StoreRejected`. Checking every value before
every write cost about 0.4 us of CPU a trade.

The CQL tables (``docs/storage.md`` explains the choices)::

    ledger          PRIMARY KEY ((symbol, bucket), seq)   bucket = seq // LEDGER_BUCKET_SEQS
    ledger_buckets  PRIMARY KEY ((symbol), bucket)        every bucket holding ledger rows
    positions       PRIMARY KEY ((account), asset, symbol)
    watermarks      PRIMARY KEY (symbol)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import TYPE_CHECKING, Final

from engine.core.errors import ConfigError, StoreRejected
from engine.core.store.base import Batch

if TYPE_CHECKING:
    from engine.core.config import CassandraConfig
    from engine.core.messages import Trade

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
LEDGER_BUCKET_SEQS: Final = 100_000  # ledger rows per (symbol, bucket) partition

LEDGER_INT_COLUMNS: Final = (
    "seq",
    "trade_id",
    "output_sequence",
    "buyer",
    "seller",
    "price",
    "qty",
    "buyer_fee",
    "seller_fee",
    "ts_ns",
)  # the ledger's columns after ``symbol`` (and the CQL ``bucket``), in this order everywhere


def ledger_bucket(seq: int) -> int:
    return seq // LEDGER_BUCKET_SEQS


# A trade's ledger values in LEDGER_INT_COLUMNS order; and its ledger row, ``symbol`` first. Both are read in one
# call of C code (operator.attrgetter), a ledger row per trade being a store's hot path.
ledger_ints: Final[Callable[[Trade], tuple[int, ...]]] = attrgetter(*LEDGER_INT_COLUMNS)
ledger_row: Final[Callable[[Trade], tuple[str | int, ...]]] = attrgetter("symbol", *LEDGER_INT_COLUMNS)


def sum_by_asset(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Asset -> exact sum of ``(asset, amount)`` rows (Python ints: no overflow across symbols)."""
    totals: defaultdict[str, int] = defaultdict(int)
    for asset, amount in rows:
        totals[asset] += amount
    return dict(totals)


def _fits(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX


def check_batch(batch: Batch) -> None:
    """Raise :class:`StoreRejected` naming the first value that does not fit a signed 64-bit column."""
    for trade in batch.trades:
        values = ledger_ints(trade)
        if min(values) < INT64_MIN or max(values) > INT64_MAX:
            name, value = next(
                (n, v) for n, v in zip(LEDGER_INT_COLUMNS, values, strict=True) if not _fits(v)
            )
            raise StoreRejected(
                f"ledger row {trade.symbol} seq {trade.seq}: {name} = {value} does not fit the store's "
                f"signed 64-bit range [-2**63, 2**63); the batch was not written"
            )
    low, high = INT64_MIN, INT64_MAX
    for (account, asset, symbol), position in batch.positions.items():
        if low <= account <= high and low <= position.amount <= high and low <= position.last_seq <= high:
            continue  # a few positions per trade: the usual case without a call or a tuple
        for name, value in (
            ("account", account),
            ("amount", position.amount),
            ("last_seq", position.last_seq),
        ):
            if not _fits(value):
                raise StoreRejected(
                    f"position (account {account}, asset {asset}, symbol {symbol}) after seq "
                    f"{position.last_seq}: {name} = {value} does not fit the store's signed 64-bit range "
                    f"[-2**63, 2**63); the batch was not written"
                )
    check_watermarks(batch)


def check_watermarks(batch: Batch) -> None:
    """Raise :class:`StoreRejected` for a watermark outside ``[0, 2**63)``; a few per batch, checked before
    every write (a store would take a negative one; a value beyond 64 bits it refuses as it binds it)."""
    for symbol, seq in batch.watermarks.items():
        if not 0 <= seq <= INT64_MAX:
            raise StoreRejected(
                f"watermark {symbol}: seq = {seq} is outside [0, 2**63); the batch was not written"
            )


# ------------------------------------------------------------------------------------------- CQL schema


def replication_map(config: CassandraConfig) -> dict[str, str | int]:
    replication = config.replication
    if replication.strategy == "SimpleStrategy":
        return {"class": "SimpleStrategy", "replication_factor": replication.replication_factor}
    if not replication.datacenters:
        raise ConfigError(
            "store.cassandra.replication.datacenters is empty; NetworkTopologyStrategy needs a map of "
            "data centre to replica count, e.g. {dc1 = 3}"
        )
    return {"class": "NetworkTopologyStrategy", **dict(sorted(replication.datacenters.items()))}


def _cql_literal(value: str | int) -> str:
    return str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


def cql_statements(config: CassandraConfig) -> list[str]:
    """The idempotent statements that create the keyspace and its tables, in order."""
    ks = config.keyspace
    replication = ", ".join(
        f"{_cql_literal(k)}: {_cql_literal(v)}" for k, v in replication_map(config).items()
    )
    return [
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{{replication}}}",
        f"CREATE TABLE IF NOT EXISTS {ks}.ledger ("
        "symbol text, bucket bigint, seq bigint, trade_id bigint, output_sequence bigint, "
        "buyer bigint, seller bigint, price bigint, qty bigint, buyer_fee bigint, seller_fee bigint, "
        "ts_ns bigint, PRIMARY KEY ((symbol, bucket), seq)) WITH CLUSTERING ORDER BY (seq ASC)",
        f"CREATE TABLE IF NOT EXISTS {ks}.ledger_buckets ("
        "symbol text, bucket bigint, PRIMARY KEY ((symbol), bucket)) WITH CLUSTERING ORDER BY (bucket ASC)",
        f"CREATE TABLE IF NOT EXISTS {ks}.positions ("
        "account bigint, asset text, symbol text, amount bigint, last_seq bigint, "
        "PRIMARY KEY ((account), asset, symbol))",
        f"CREATE TABLE IF NOT EXISTS {ks}.watermarks (symbol text PRIMARY KEY, seq bigint)",
    ]
