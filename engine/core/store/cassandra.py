"""The ScyllaDB/Cassandra store: one driver session per store object (so, per shard process).

Idempotence without transactions or counters: every write carries ``USING TIMESTAMP`` derived from
the symbol sequence (a position's ``last_seq``, a ledger row's or a watermark's ``seq``). Cells are
last-write-wins by timestamp, so a replay writes the same cells with the same timestamps (no change),
and a stale replay carries smaller timestamps than what the store holds (ignored). Nothing else may
write these tables without such a timestamp: a plain write would stamp wall-clock microseconds and
win over every later sequence-stamped write. ``docs/storage.md`` has the whole argument.

The driver runs its own I/O thread. A read's future is bridged onto the event loop with
``call_soon_threadsafe``; a batch's writes are sent from the driver's thread, each answer sending the
next, and the loop is woken once when all have answered. Requests in flight are bounded per store
operation, and every request is retried with backoff a bounded number of times before
:class:`~engine.core.errors.StoreUnavailable` is raised: a call never hangs on a dead server, and the shard's
own retry loop takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from cassandra import (
    AuthenticationFailed,
    ConsistencyLevel,
    CoordinationFailure,
    OperationTimedOut,
    RequestValidationException,
    Timeout,
    Unauthorized,
    Unavailable,
)
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.connection import ConnectionBusy, ConnectionException
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.protocol import IsBootstrappingErrorMessage, OverloadedErrorMessage
from cassandra.query import BatchStatement, BatchType, BoundStatement, PreparedStatement, Statement, tuple_factory

from engine.core.config import CassandraConfig
from engine.core.errors import ClosedError, ConfigError, StoreRejected, StoreUnavailable
from engine.core.messages import Trade
from engine.core.retry import Backoff
from engine.core.store.base import Batch, Position, PositionKey
from engine.core.store.schema import check_batch, check_watermarks, cql_statements, ledger_bucket, sum_by_asset

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS: Final = 6  # per request at most; then StoreUnavailable
RETRY_TIMEOUTS: Final = 2  # no new attempt after this many request_timeout_s: a call ends within ~3 of them
RETRY_DELAY_S_FIRST: Final = 0.05
# The driver answers or times out every request within request_timeout_s; nothing answered for this many of
# them means a callback was lost (a connection dying mid-request): waiting on would stall the shard for good.
STALL_TIMEOUTS: Final = 3
RETRY_DELAY_S_MAX: Final = 2.0
SCHEMA_TIMEOUT_S_MIN: Final = 30.0
PAGE_ROWS: Final = 5000
IN_VALUES_MAX: Final = 100  # ScyllaDB refuses larger IN lists on clustering keys by default
# A write's rows go in UNLOGGED batches of at most ROWS_PER_BATCH position or watermark rows, a ledger row
# counting as LEDGER_ROW_WEIGHT of them (it is about twice their size): each batch stays under Cassandra's
# 5 KiB batch_size_warn_threshold (ScyllaDB's default threshold is 128 KiB).
ROWS_PER_BATCH: Final = 32
LEDGER_ROW_WEIGHT: Final = 2
# Partitions per UNLOGGED batch, all with the same replicas: one request instead of one each roughly halves
# the server's CPU per row (bench.store_write), and the driver's CPU per request is most of a shard's.
# Cassandra warns above 10 (unlogged_batch_across_partitions_warn_threshold).
PARTITIONS_PER_BATCH: Final = 10
# Watermarks due go out with the next write's rows; with no write this long after them, they go alone, so
# readers of the store (status, audits) see a quiet stream's last batch settled within this bound. At 5 ms,
# below capacity (a write every few ms) most batches' watermarks still went alone: a request more per batch,
# each costing the server and the driver about what a batch of rows does.
MARKS_ALONE_AFTER_S: Final = 0.05
LOGGED_TRADES_PER_BATCH: Final = 4  # logged mode: trades (with the positions they finish) per LOGGED batch

# Errors a later attempt may not see: the server is slow, down, restarting or overloaded. The driver's own
# RetryPolicy has already re-sent these at once where it would (to the next node for Unavailable, overload or a
# broken connection; NoHostAvailable means every node was tried): the retries here only add the jittered wait
# (engine.core.retry), never another immediate re-send.
RETRIABLE: Final = (
    OperationTimedOut,  # the driver gave up waiting (request_timeout_s)
    Timeout,  # ReadTimeout, WriteTimeout: replicas did not answer the coordinator in time
    Unavailable,  # too few replicas alive for the consistency level
    CoordinationFailure,  # ReadFailure, WriteFailure: a replica failed the request
    NoHostAvailable,  # no node could be reached
    ConnectionException,  # a connection broke (e.g. the node was killed mid-request)
    ConnectionBusy,
    OverloadedErrorMessage,
    IsBootstrappingErrorMessage,
)



def _refused(error: BaseException) -> bool:
    """Whether the server refused the request for good (a bad query, a missing table, no permission).

    Cassandra also answers Unauthorized when it could not *read* the role's permissions, e.g. with a
    replica of ``system_auth`` down ("Unable to perform authorization of permissions: Operation failed -
    received 1 responses and 1 failures"): the server says so only in the message, and a later attempt
    succeeds, so that one is not a refusal but an unavailable store."""
    if not isinstance(error, RequestValidationException):
        return False
    return not (isinstance(error, Unauthorized) and "Unable to perform authorization" in str(error))



Row = tuple[Any, ...]  # a row read


@dataclass(frozen=True, slots=True)
class _Statements:
    ledger: PreparedStatement
    ledger_bucket: PreparedStatement
    position: PreparedStatement
    watermark: PreparedStatement
    account_rows: PreparedStatement
    accounts_assets: PreparedStatement
    all_positions: PreparedStatement
    all_watermarks: PreparedStatement
    buckets: PreparedStatement
    bucket_symbols: PreparedStatement
    ledger_rows: PreparedStatement


_CQL: Final = {
    "ledger": "INSERT INTO {ks}.ledger (symbol, bucket, seq, trade_id, output_sequence, buyer, seller, "
    "price, qty, buyer_fee, seller_fee, ts_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
    "ledger_bucket": "INSERT INTO {ks}.ledger_buckets (symbol, bucket) VALUES (?, ?) USING TIMESTAMP ?",
    "position": "INSERT INTO {ks}.positions (account, asset, symbol, amount, last_seq) "
    "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
    "watermark": "INSERT INTO {ks}.watermarks (symbol, seq) VALUES (?, ?) USING TIMESTAMP ?",
    "account_rows": "SELECT asset, symbol, amount, last_seq FROM {ks}.positions WHERE account = ?",
    "accounts_assets": "SELECT account, asset, symbol, amount, last_seq FROM {ks}.positions "
    "WHERE account IN ? AND asset IN ?",
    "all_positions": "SELECT account, asset, symbol, amount, last_seq FROM {ks}.positions",
    "all_watermarks": "SELECT symbol, seq FROM {ks}.watermarks",
    "buckets": "SELECT bucket FROM {ks}.ledger_buckets WHERE symbol = ?",
    "bucket_symbols": "SELECT DISTINCT symbol FROM {ks}.ledger_buckets",
    "ledger_rows": "SELECT seq, trade_id FROM {ks}.ledger WHERE symbol = ? AND bucket = ?",
}


def _password(config: CassandraConfig) -> str:
    """Read at open time, never stored on the store object and never logged."""
    if config.password_file is not None:
        try:
            return Path(config.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ConfigError(
                f"store.cassandra.password_file {config.password_file!r} cannot be read: {e.strerror}"
            ) from None
    if config.password_env is not None:
        value = os.environ.get(config.password_env)
        if value is None:
            raise ConfigError(
                f"store.cassandra.password_env names {config.password_env!r}, "
                "which is not set in the environment"
            )
        return value
    raise ConfigError(
        f"store.cassandra.username is {config.username!r} but neither password_file nor password_env is set"
    )


def _connect(config: CassandraConfig) -> tuple[Cluster, Session]:
    auth = PlainTextAuthProvider(config.username, _password(config)) if config.username is not None else None
    ssl_context = None
    if config.tls_ca_file is not None:
        try:
            ssl_context = ssl.create_default_context(cafile=config.tls_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"store.cassandra.tls_ca_file {config.tls_ca_file!r}: {e}") from None
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=config.local_dc or "")),
        consistency_level=ConsistencyLevel.name_to_value[config.consistency],
        request_timeout=config.request_timeout_s,
        row_factory=tuple_factory,
    )
    cluster = Cluster(
        contact_points=list(config.contact_points),
        port=config.port,
        protocol_version=4,  # what ScyllaDB speaks
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        auth_provider=auth,
        ssl_context=ssl_context,
        # A node that went away is retried every few seconds, not the driver's default of up to 10 min.
        reconnection_policy=ExponentialReconnectionPolicy(base_delay=0.25, max_delay=4.0),
        connect_timeout=min(config.request_timeout_s, 10.0),
        control_connection_timeout=config.request_timeout_s,
        idle_heartbeat_interval=10,
        idle_heartbeat_timeout=10,
    )
    try:
        session = cluster.connect()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster, session


def _create_schema(session: Session, config: CassandraConfig) -> None:
    timeout = max(config.request_timeout_s, SCHEMA_TIMEOUT_S_MIN)
    for statement in cql_statements(config):
        session.execute(statement, timeout=timeout)


def _prepare(session: Session, keyspace: str) -> _Statements:
    prepared = {}
    for name, text in _CQL.items():
        statement = session.prepare(text.format(ks=keyspace))
        statement.is_idempotent = True  # every statement here is: the driver may retry it on another node
        prepared[name] = statement
    return _Statements(**prepared)


def _host_errors(error: NoHostAvailable) -> dict[str, object]:
    """``NoHostAvailable.errors`` maps host -> error, but when the control connection worked and every
    connection pool failed (a node still starting, or overloaded) the driver passes a list of hosts."""
    errors = error.errors
    if isinstance(errors, dict):
        return errors
    return {str(host): "could not open a connection pool" for host in errors or ()}


def _raise_if_refused(where: str, config: CassandraConfig, errors: dict[str, object]) -> None:
    """Every node answered and refused us: a wrong login or a certificate we do not trust. Retrying cannot
    help, so it is a configuration error (the shard exits with EXIT_CONFIG and the supervisor halts instead
    of respawning it); the message names the key to fix and never the password."""
    if not errors:
        return
    reasons = list(errors.values())
    if all(isinstance(r, AuthenticationFailed) for r in reasons):
        source = (f"store.cassandra.password_file ({config.password_file})" if config.password_file is not None
                  else f"store.cassandra.password_env ({config.password_env})")
        raise ConfigError(
            f"{where}: the server refused the login of store.cassandra.username {config.username!r}; "
            f"check the username and the password in {source}"
            if config.username is not None else
            f"{where}: the server requires a login; set store.cassandra.username and "
            "store.cassandra.password_file (or password_env)"
        )
    untrusted = _untrusted_certificate(config) if config.tls_ca_file is not None else None
    if untrusted is not None:
        detail = untrusted.verify_message or str(untrusted)
        raise ConfigError(
            f"{where}: the server's TLS certificate is not trusted ({detail}); "
            f"store.cassandra.tls_ca_file ({config.tls_ca_file}) must hold the CA that signed the nodes' "
            "certificates, and each certificate must name the address settle connects to"
        )


def _untrusted_certificate(config: CassandraConfig) -> ssl.SSLCertVerificationError | None:
    """The driver reports a failed handshake as a plain OSError; shake hands once more ourselves to learn
    by type whether every reachable node showed a certificate our CA does not vouch for."""
    context = ssl.create_default_context(cafile=config.tls_ca_file)
    refusal = None
    for host in config.contact_points:
        try:
            with socket.create_connection((host, config.port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=host):
                return None  # this one is trusted: the failure was something else
        except ssl.SSLCertVerificationError as e:
            refusal = e
        except OSError:
            continue  # down: says nothing about its certificate
    return refusal


def _describe(error: BaseException) -> str:
    if isinstance(error, NoHostAvailable) and error.errors:
        reasons = "; ".join(f"{host}: {reason}" for host, reason in list(_host_errors(error).items())[:3])
        return f"no host available ({reasons})"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


_BIGINT: Final = struct.Struct(">q")  # a bigint value (and an account's partition key) as the protocol carries it

# A row to write: its statement and its values serialised as the protocol carries them. The rows of a write
# are serialised here rather than by the driver's bind, which checks each value's type and looks up its
# column's serialiser: five times the CPU per row, and binding rows was the largest part of a shard's CPU on
# this store. bigint is 8 bytes big-endian, text its UTF-8 bytes (the driver's own encoding, checked against
# bind in the tests); a value out of the 64-bit range raises struct.error, which the write turns into
# check_batch's StoreRejected.
WriteRow = tuple[PreparedStatement, list[bytes]]
WriteRows = list[WriteRow]
PartitionKey = int | str | tuple[str, int]  # an account (positions), a symbol (watermarks), a ledger bucket


def _ledger_row(st: _Statements, trade: Trade, bucket: int) -> WriteRow:
    q = _BIGINT.pack
    return (st.ledger, [trade.symbol.encode(), q(bucket), q(trade.seq), q(trade.trade_id), q(trade.output_sequence),
                        q(trade.buyer), q(trade.seller), q(trade.price), q(trade.qty), q(trade.buyer_fee),
                        q(trade.seller_fee), q(trade.ts_ns), q(trade.seq)])  # the last: the write timestamp


def _position_row(st: _Statements, key: PositionKey, position: Position) -> WriteRow:
    q = _BIGINT.pack
    account, asset, symbol = key
    last_seq = q(position.last_seq)
    return (st.position, [q(account), asset.encode(), symbol.encode(), q(position.amount), last_seq, last_seq])


def _watermark_row(st: _Statements, symbol: str, seq: int) -> WriteRow:
    packed = _BIGINT.pack(seq)
    return (st.watermark, [symbol.encode(), packed, packed])


def _routing_key(key: PartitionKey) -> bytes:
    """A partition key serialised as the driver routes it (a composite key: each part length-prefixed)."""
    if isinstance(key, int):
        return _BIGINT.pack(key)
    if isinstance(key, str):
        return key.encode()
    symbol = key[0].encode()
    return b"".join((struct.pack(">H", len(symbol)), symbol, b"\0", struct.pack(">H", 8), _BIGINT.pack(key[1]),
                     b"\0"))


class _Partition(NamedTuple):
    """A partition's share of a write: its replicas and routing key (the driver's), its rows, and the weight
    of one of its rows against ROWS_PER_BATCH."""

    replicas: tuple[str, ...]
    routing_key: bytes
    rows: WriteRows
    weight: int


def _shared_batches(partitions: Iterable[_Partition]) -> list[Statement]:
    """UNLOGGED batches within ROWS_PER_BATCH and PARTITIONS_PER_BATCH, each holding partitions with the same
    replicas: the coordinator, a replica by the first partition's token, applies them as it would one
    partition's. A large partition's rows go in chunks of their own."""
    out: list[Statement] = []
    # replicas -> the first partition's routing key, the rows, [weight, partitions]
    filling: dict[tuple[str, ...], tuple[bytes, WriteRows, list[int]]] = {}
    for replicas, routing_key, rows, weight in partitions:
        size = len(rows) * weight
        if size > ROWS_PER_BATCH // 2:
            out.extend(_chunks(routing_key, rows, ROWS_PER_BATCH // weight))
            continue
        pending = filling.get(replicas)
        if pending is not None and (pending[2][0] + size > ROWS_PER_BATCH or pending[2][1] == PARTITIONS_PER_BATCH):
            out.extend(_chunks(pending[0], pending[1], len(pending[1])))
            pending = None
        if pending is None:
            pending = filling[replicas] = (routing_key, [], [0, 0])
        pending[1].extend(rows)
        pending[2][0] += size
        pending[2][1] += 1
    for routing_key, rows, _ in filling.values():
        out.extend(_chunks(routing_key, rows, len(rows)))
    return out


def _chunks(routing_key: bytes, rows: WriteRows, size: int) -> Iterable[Statement]:
    """UNLOGGED batches of at most ``size`` rows (a lone row goes as itself), routed by ``routing_key``."""
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        if len(chunk) == 1:
            yield _bound(*chunk[0])
        else:
            yield _batch(BatchType.UNLOGGED, chunk, routing_key)


def _bound(statement: PreparedStatement, values: list[bytes]) -> BoundStatement:
    """``statement`` with ``values`` already serialised (its routing key comes from them, as with bind)."""
    bound = BoundStatement(statement)
    bound.values = bound.raw_values = values
    return bound


def _batch(kind: Any, rows: WriteRows, routing_key: bytes) -> BatchStatement:
    batch = BatchStatement(batch_type=kind)
    # What BatchStatement.add makes of a bound statement, without binding again: its query id and values.
    batch._statements_and_parameters.extend([(True, statement.query_id, values) for statement, values in rows])
    batch.routing_key = routing_key
    batch.keyspace = rows[0][0].column_metadata[0].keyspace_name  # as a bound statement has it
    batch.is_idempotent = True
    return batch


def _forget(response: ResponseFuture) -> None:
    """Break an answered request's reference cycles: it is in its own callbacks' arguments, and the driver's
    request keeps its (cancelled) timeout timer, whose callback is the request's own method."""
    response.clear_callbacks()
    response._timer = None


class _FanOut:
    """Statements sent with a bounded number outstanding, each answer sending the next from the driver's own
    thread (as the driver's ``execute_concurrent`` does), the event loop woken once, when all have answered:
    per request no future, no task and no loop wake-up, which cost more than the request itself (a write
    runs at about twice the rows/s).

    An object, not closures, and no callback holding its own request: closures calling each other and a
    request in its own callback's arguments are reference cycles, which only the cyclic collector frees;
    at dozens of objects per request its collections stalled the shard's loop for 50-350 ms."""

    __slots__ = ("_loop", "_done", "_session", "_queue", "_pages", "_answered_at", "_lock", "_failures",
                 "_remaining", "_credits", "_pumping")

    def __init__(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[list[tuple[Statement, BaseException]]],
                 session: Session, statements: list[Statement], pages: list[tuple[Statement, list[Row], bool]] | None,
                 answered_at: list[float] | None) -> None:
        self._loop, self._done, self._session = loop, done, session
        self._queue = iter(statements)
        self._pages, self._answered_at = pages, answered_at
        self._lock = threading.Lock()
        self._failures: list[tuple[Statement, BaseException]] = []
        self._remaining = len(statements)
        self._credits = 0  # free slots not yet used by a send
        self._pumping = False  # a thread is in pump(): the others only hand it their credit (no recursion when
        # the driver answers inside add_callbacks, as it does at once when no host is up)

    def pump(self, slots: int) -> None:
        with self._lock:
            self._credits += slots
            if self._pumping:
                return
            self._pumping = True
        while True:
            with self._lock:
                statement = next(self._queue, None) if self._credits and not self._done.done() else None
                if statement is None:
                    self._pumping = False
                    return
                self._credits -= 1
            try:
                response = self._session.execute_async(statement)
            except Exception as e:  # noqa: BLE001 - e.g. the session shut down: this statement failed
                self._finish(statement, e)
                continue
            response.add_callbacks(self._answered, errback=self._failed, callback_args=(statement, response),
                                   errback_args=(statement, response))

    def _answered(self, rows: list[Row], statement: Statement, response: ResponseFuture) -> None:
        try:
            if self._pages is not None:
                self._pages.append((statement, rows, response.has_more_pages))  # list.append: atomic
            _forget(response)
        finally:
            self._finish(statement, None)

    def _failed(self, error: BaseException, statement: Statement, response: ResponseFuture) -> None:
        try:
            _forget(response)
        finally:
            self._finish(statement, error)

    def _finish(self, statement: Statement, error: BaseException | None) -> None:
        if self._answered_at is not None:
            self._answered_at[0] = time.monotonic()
        with self._lock:
            if error is not None:
                self._failures.append((statement, error))
            self._remaining -= 1
            last = self._remaining == 0
        if not last:
            self.pump(1)
            return
        try:
            self._loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop is closed: nobody waits for this answer any more
            pass

    def _resolve(self) -> None:
        if not self._done.done():  # not cancelled meanwhile
            self._done.set_result(self._failures)


class CassandraStore:
    """The :class:`~engine.core.store.base.Store` on ScyllaDB/Cassandra. Open with :meth:`open`."""

    read_ahead = True  # a read is a round trip: it overlaps the WAL commit

    def __init__(
        self, config: CassandraConfig, cluster: Cluster, session: Session, statements: _Statements
    ) -> None:
        self._config = config
        self._where = (
            f"cassandra at {', '.join(config.contact_points)}:{config.port} keyspace {config.keyspace}"
        )
        self._cluster = cluster
        self._session: Session | None = session
        self._st = statements
        self._in_flight = asyncio.Semaphore(config.requests_in_flight_max)
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cassandra-send")
        self._known_buckets: set[tuple[str, int]] = set()  # ledger_buckets rows this object has written
        self._routes: dict[PartitionKey, tuple[tuple[str, ...], bytes]] = {}  # partition -> replicas, routing key
        # Watermarks of written batches not sent yet: they go out with the next write (in the same requests
        # as its rows, not one round trip later) or at the next sync. Only ever marks of acknowledged rows.
        self._marks_due: dict[str, int] = {}
        self._marks_timer: asyncio.TimerHandle | None = None  # sends the due watermarks alone (MARKS_ALONE_AFTER_S)
        self._marks_alone: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, config: CassandraConfig, *, create_schema: bool) -> CassandraStore:
        """Connect, create the schema when asked (idempotent), prepare the statements."""
        where = f"cassandra at {', '.join(config.contact_points)}:{config.port}"
        try:
            cluster, session = await asyncio.to_thread(_connect, config)
        except NoHostAvailable as e:
            await asyncio.to_thread(_raise_if_refused, where, config, _host_errors(e))
            raise StoreUnavailable(f"{where}: cannot connect: {_describe(e)}; is the server up?") from e
        except (OperationTimedOut, ConnectionException) as e:
            raise StoreUnavailable(f"{where}: cannot connect: {_describe(e)}; is the server up?") from e
        try:
            if create_schema:
                await asyncio.to_thread(_create_schema, session, config)
            statements = await asyncio.to_thread(_prepare, session, config.keyspace)
        except RequestValidationException as e:
            await asyncio.to_thread(cluster.shutdown)
            if not _refused(e) or (create_schema and "does not exist" in str(e)):
                # A table just created (here, or by another shard at the same moment) may not have reached
                # every node yet: a prepare sent to one of those finds it missing. Another attempt will not.
                raise StoreUnavailable(f"{where}: preparing the store failed: {_describe(e)}") from e
            raise StoreRejected(
                f"{where}: keyspace {config.keyspace!r} or its tables are missing or wrong ({_describe(e)}); "
                "run `settle db migrate` or set store.cassandra.create_schema = true"
            ) from e
        except BaseException as e:
            await asyncio.to_thread(cluster.shutdown)
            if isinstance(e, RETRIABLE):
                raise StoreUnavailable(f"{where}: preparing the store failed: {_describe(e)}") from e
            raise
        log.info(
            "%s: connected (consistency %s, schema %s)",
            where,
            config.consistency,
            "created if missing" if create_schema else "expected",
        )
        return cls(config, cluster, session, statements)

    @property
    def requests_in_flight(self) -> int:
        """Requests holding one of the ``requests_in_flight_max`` slots now (the shard's metrics read it)."""
        return self._config.requests_in_flight_max - self._in_flight._value

    def __repr__(self) -> str:
        state = "closed" if self._session is None else "open"
        return f"CassandraStore({self._where}, {state})"

    # --------------------------------------------------------------------------------------- requests

    async def _request(
        self, statement: Statement, paging_state: bytes | None = None
    ) -> tuple[list[Row], bytes | None]:
        """One request with bounded retries: its rows and the paging state of the next page, if any."""
        backoff = Backoff(RETRY_DELAY_S_FIRST, RETRY_DELAY_S_MAX)
        started = time.monotonic()
        give_up_at = started + RETRY_TIMEOUTS * self._config.request_timeout_s
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            async with self._in_flight:
                try:
                    return await self._once(statement, paging_state)
                except RETRIABLE as e:
                    error: BaseException = e
                except RequestValidationException as e:
                    if _refused(e):
                        raise StoreRejected(f"{self._where}: the server refused a request: {_describe(e)}") from e
                    error = e
                except ClosedError:
                    raise
                except Exception as e:  # an error the driver did not classify: report it, let the shard retry
                    raise StoreUnavailable(f"{self._where}: request failed: {_describe(e)}") from e
            wait_s = backoff.next_s()
            if attempt == RETRY_ATTEMPTS or time.monotonic() + wait_s > give_up_at:
                break
            await asyncio.sleep(wait_s)
        raise StoreUnavailable(
            f"{self._where}: {_describe(error)} "
            f"({attempt} attempts in {time.monotonic() - started:.1f} s); retry later"
        ) from error

    async def _once(self, statement: Statement, paging_state: bytes | None) -> tuple[list[Row], bytes | None]:
        session = self._session
        if session is None:
            raise ClosedError(f"{self._where}: the store is closed")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[list[Row], bytes | None]] = loop.create_future()

        def settle(result: tuple[list[Row], bytes | None] | None, error: BaseException | None) -> None:
            if done.done():  # cancelled while the request was in flight
                return
            if error is not None:
                done.set_exception(error)
            else:
                assert result is not None
                done.set_result(result)

        def wake(result: tuple[list[Row], bytes | None] | None, error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop is closed: nobody waits for this answer any more
                pass

        def on_rows(rows: list[Row], response: ResponseFuture) -> None:  # driver thread
            next_page = response.result().paging_state
            _forget(response)
            wake((rows, next_page), None)

        def on_error(error: BaseException, response: ResponseFuture) -> None:  # driver thread
            _forget(response)
            wake(None, error)

        def send() -> None:  # the store's sender thread: execute_async may wait (see _fan_out)
            response = session.execute_async(statement, paging_state=paging_state)
            response.add_callbacks(on_rows, on_error, callback_args=(response,), errback_args=(response,))

        try:
            sent = loop.run_in_executor(self._sender, send)
        except RuntimeError as e:  # the store is closing: its sender is gone
            raise ClosedError(f"{self._where}: the store is closed") from e
        await sent
        return await self._answered(done, [time.monotonic()], "a request")

    async def _answered(self, fut: asyncio.Future[T], answered_at: list[float], what: str) -> T:
        """``fut``'s result, or StoreUnavailable (the caller retries) once the driver has answered nothing for
        ``STALL_TIMEOUTS`` request timeouts (``answered_at[0]``: when it last answered): waiting on a lost
        callback would stall the shard for good."""
        stall_s = STALL_TIMEOUTS * self._config.request_timeout_s
        while True:
            await asyncio.wait((fut,), timeout=stall_s)
            if fut.done():
                return fut.result()
            if time.monotonic() - answered_at[0] >= stall_s:
                fut.cancel()
                raise StoreUnavailable(f"{self._where}: the driver answered nothing for {stall_s:.1f} s ({what}); "
                                       "retry later")

    async def _rows(self, statement: Statement) -> list[Row]:
        """Every row of a query, page by page (each page retried on its own)."""
        statement.fetch_size = PAGE_ROWS
        rows, paging_state = await self._request(statement)
        while paging_state is not None:
            page, paging_state = await self._request(statement, paging_state)
            rows.extend(page)
        return rows

    async def _all(self, statements: Sequence[Statement], pages: list[tuple[Statement, list[Row], bool]] | None = None
                   ) -> None:
        """Run every statement; the failed ones are sent again with backoff, a bounded number of times. With
        ``pages``, each statement's first page of rows is appended to it with whether more pages follow."""
        pending = list(statements)
        backoff = Backoff(RETRY_DELAY_S_FIRST, RETRY_DELAY_S_MAX)
        started = time.monotonic()
        give_up_at = started + RETRY_TIMEOUTS * self._config.request_timeout_s
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            if not pending:
                return
            answered_at = [time.monotonic()]
            failures = await self._answered(self._fan_out(pending, pages, answered_at), answered_at,
                                            f"{len(pending)} requests")
            if not failures:
                return
            for _, error in failures:
                if _refused(error):
                    raise StoreRejected(f"{self._where}: the server refused a request: {_describe(error)}") from error
                if isinstance(error, ClosedError):
                    raise error
                if not isinstance(error, (*RETRIABLE, Unauthorized)):
                    raise StoreUnavailable(f"{self._where}: request failed: {_describe(error)}") from error
            pending = [statement for statement, _ in failures]
            wait_s = backoff.next_s()
            if attempt == RETRY_ATTEMPTS or time.monotonic() + wait_s > give_up_at:
                break
            await asyncio.sleep(wait_s)
        error = failures[0][1]
        raise StoreUnavailable(
            f"{self._where}: {_describe(error)} ({len(failures)} of {len(statements)} writes failing after "
            f"{attempt} attempts in {time.monotonic() - started:.1f} s); retry later"
        ) from error

    def _fan_out(self, statements: list[Statement], pages: list[tuple[Statement, list[Row], bool]] | None = None,
                 answered_at: list[float] | None = None) -> asyncio.Future[list[tuple[Statement, BaseException]]]:
        """Send ``statements`` with at most ``requests_in_flight_max`` outstanding (see :class:`_FanOut`).
        Resolves to the statements that failed, with their errors. ``answered_at[0]`` is set at each answer;
        with ``pages``, each statement's first page of rows is appended to it with whether more pages follow."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[tuple[Statement, BaseException]]] = loop.create_future()
        session = self._session
        if session is None:
            done.set_exception(ClosedError(f"{self._where}: the store is closed"))
            return done
        fan_out = _FanOut(loop, done, session, statements, pages, answered_at)
        # The first sends go from the store's own thread, not the event loop: the driver's execute_async
        # waits up to 2 s for a free stream of a connection that is being replaced (its requests timed out,
        # the node is down or coming back), and on the loop that wait, once per statement, silenced the
        # shard's heartbeat until the supervisor killed it as hung.
        # Submitted, not run_in_executor: nothing waits for pump to return (the answers resolve ``done``), and
        # an asyncio future chained to it would cost the loop a wake-up per request round for nothing.
        try:
            self._sender.submit(fan_out.pump, min(len(statements), self._config.requests_in_flight_max))
        except RuntimeError:  # the store is closing: its sender is gone
            done.set_exception(ClosedError(f"{self._where}: the store is closed"))
        return done

    # ------------------------------------------------------------------------------------------ writes

    async def write(self, batch: Batch) -> None:
        """The batch's ledger and positions, with the watermarks due from earlier writes. Its own watermarks
        are due from now on: they go out with the next write or sync, since a watermark may only be written
        once its rows are acknowledged, and waiting for that here would double the write's latency."""
        check_watermarks(batch)
        if self._session is None:
            raise ClosedError(f"{self._where}: the store is closed")
        self._cancel_marks_timer()  # the due watermarks go with these rows
        marks = dict(self._marks_due)
        try:  # every row is serialised before anything is sent: a value beyond 64 bits sends nothing
            ledger = self._ledger_rows(batch.trades)
            if self._config.logged_batches:
                requests = self._logged_batches(batch) + self._partition_batches({}, {}, marks)
            else:
                requests = self._partition_batches(ledger, batch.positions, marks)
        except struct.error as e:
            check_batch(batch)  # names the value
            raise StoreRejected(f"{self._where}: refused a value: {e}; the batch was not written") from e
        # A ledger bucket is recorded before any row lands in it, so ledger() finds every row.
        new_buckets = ledger.keys() - self._known_buckets
        if new_buckets:
            await self._all([self._st.ledger_bucket.bind((s, b, b)) for s, b in sorted(new_buckets)])
            self._known_buckets |= new_buckets
        await self._all(requests)
        self._marks_sent(marks)
        await self.advance_watermarks(batch.watermarks)

    async def sync(self) -> None:
        """Send the watermarks still due. Nothing else to do: an acknowledged write is as durable as the
        cluster's commit log makes it (every replica's ``commitlog_sync``); the write's consistency level
        says how many replicas hold it."""
        if self._session is None:
            raise ClosedError(f"{self._where}: the store is closed")
        marks = dict(self._marks_due)
        if marks:
            await self._all(self._partition_batches({}, {}, marks))
            self._marks_sent(marks)

    async def advance_watermarks(self, watermarks: dict[str, int]) -> None:
        """Due from now on: sent with the next write or sync (the rows they cover are acknowledged)."""
        if self._session is None:
            raise ClosedError(f"{self._where}: the store is closed")
        due = self._marks_due
        for symbol, seq in watermarks.items():
            if seq > due.get(symbol, 0):
                due[symbol] = seq
        if due and self._marks_timer is None:
            self._marks_timer = asyncio.get_running_loop().call_later(MARKS_ALONE_AFTER_S, self._send_marks_alone)

    def _cancel_marks_timer(self) -> None:
        if self._marks_timer is not None:
            self._marks_timer.cancel()
            self._marks_timer = None

    def _send_marks_alone(self) -> None:
        self._marks_timer = None
        if self._marks_due and self._session is not None and (self._marks_alone is None or self._marks_alone.done()):
            self._marks_alone = asyncio.ensure_future(self._sync_quietly())

    async def _sync_quietly(self) -> None:
        try:
            await self.sync()
        except (StoreUnavailable, ClosedError) as e:  # still due: the next write or sync sends them
            log.debug("%s: due watermarks not sent yet: %s", self._where, e)

    def _marks_sent(self, sent: dict[str, int]) -> None:
        due = self._marks_due
        for symbol, seq in sent.items():
            if due.get(symbol) == seq:  # not moved up meanwhile by another write
                del due[symbol]

    def _write_requests(self, batch: Batch, marks: dict[str, int]) -> list[Statement]:
        """The requests of a write of ``batch`` with the watermarks ``marks`` (its ledger buckets aside)."""
        return self._partition_batches(self._ledger_rows(batch.trades), batch.positions, marks)

    def _ledger_rows(self, trades: list[Trade]) -> dict[tuple[str, int], WriteRows]:
        """The trades' ledger rows by partition: (symbol, bucket)."""
        st = self._st
        partitions: dict[tuple[str, int], WriteRows] = {}
        for t in trades:
            bucket = ledger_bucket(t.seq)
            rows = partitions.get((t.symbol, bucket))
            if rows is None:
                rows = partitions[(t.symbol, bucket)] = []
            rows.append(_ledger_row(st, t, bucket))
        return partitions

    def _partition_batches(self, ledger: dict[tuple[str, int], WriteRows], positions: dict[PositionKey, Position],
                           marks: dict[str, int]) -> list[Statement]:
        """The ledger rows (by partition, from :meth:`_ledger_rows`), the positions and the watermarks
        ``marks``, partitions with the same replicas sharing UNLOGGED batches: at a few trades per batch,
        one request in all on a cluster whose every node holds every partition."""
        st = self._st
        route = self._route
        partitions = [_Partition(*route(key), rows, LEDGER_ROW_WEIGHT) for key, rows in ledger.items()]
        by_account: dict[int, WriteRows] = {}
        for key, position in positions.items():
            rows = by_account.get(key[0])
            if rows is None:
                rows = by_account[key[0]] = []
            rows.append(_position_row(st, key, position))
        partitions += (_Partition(*route(account), rows, 1) for account, rows in by_account.items())
        partitions += (_Partition(*route(symbol), [_watermark_row(st, symbol, seq)], 1)
                       for symbol, seq in marks.items())
        return _shared_batches(partitions)

    def _route(self, key: PartitionKey) -> tuple[tuple[str, ...], bytes]:
        """The replicas of partition ``key``, as the driver's token map has them, and its routing key (cached:
        a ring that changes later only makes a coordinator forward more)."""
        route = self._routes.get(key)
        if route is None:
            routing_key = _routing_key(key)
            hosts = self._cluster.metadata.get_replicas(self._config.keyspace, routing_key)
            route = self._routes[key] = (tuple(sorted(str(host.endpoint) for host in hosts)), routing_key)
        return route

    def _logged_batches(self, batch: Batch) -> list[Statement]:
        """The design note's way: a LOGGED batch per chunk of trades, holding their ledger rows and the
        positions whose last trade is among them."""
        st = self._st
        chunks: list[tuple[bytes, WriteRows]] = []  # each routed by its first trade's partition
        chunk_of: dict[tuple[str, int], int] = {}
        for i, t in enumerate(batch.trades):
            bucket = ledger_bucket(t.seq)
            if i % LOGGED_TRADES_PER_BATCH == 0:
                chunks.append((_routing_key((t.symbol, bucket)), []))
            chunks[-1][1].append(_ledger_row(st, t, bucket))
            chunk_of[(t.symbol, t.seq)] = len(chunks) - 1
        for key, position in batch.positions.items():
            index = chunk_of.get((key[2], position.last_seq), len(chunks) - 1)
            chunks[index][1].append(_position_row(st, key, position))
        return [_batch(BatchType.LOGGED, rows, routing_key) for routing_key, rows in chunks]

    # ------------------------------------------------------------------------------------------- reads

    async def load_positions(self, keys: list[PositionKey]) -> dict[PositionKey, Position]:
        """One request for several accounts with the same replicas, as a write shares its batches: a shard's
        first batches read thousands of accounts, and a request costs the driver about 50 us of CPU."""
        wanted = set(keys)
        assets_of: defaultdict[int, set[str]] = defaultdict(set)
        for account, asset, _ in wanted:
            assets_of[account].add(asset)
        statements: list[Statement] = []
        whole: dict[int, int] = {}  # id(statement) -> the account it reads whole
        # replicas -> accounts and the assets asked of any of them, read by one request: every (account, asset)
        # pair of the two IN lists, IN_VALUES_MAX pairs at most
        filling: dict[tuple[str, ...], tuple[list[int], set[str]]] = {}
        read = self._st.accounts_assets.bind
        for account, assets in assets_of.items():
            if len(assets) > IN_VALUES_MAX:  # more than an IN list may name: the whole partition
                statement = self._st.account_rows.bind((account,))
                statements.append(statement)
                whole[id(statement)] = account
                continue
            replicas = self._route(account)[0]
            group = filling.get(replicas)
            if group is not None and (len(group[0]) + 1) * len(group[1] | assets) > IN_VALUES_MAX:
                statements.append(read((group[0], sorted(group[1]))))
                group = None
            if group is None:
                group = filling[replicas] = ([], set())
            group[0].append(account)
            group[1].update(assets)
        statements += (read((accounts, sorted(assets))) for accounts, assets in filling.values())
        for statement in statements:
            statement.fetch_size = PAGE_ROWS
        pages: list[tuple[Statement, list[Row], bool]] = []
        await self._all(statements, pages)
        out: dict[PositionKey, Position] = {}
        for statement, rows, more in pages:
            if more:  # past one page: read it all, page by page
                rows = await self._rows(statement)
            whole_account = whole.get(id(statement))
            found = rows if whole_account is None else ((whole_account, *row) for row in rows)
            for owner, asset, symbol, amount, last_seq in found:
                key = (owner, asset, symbol)
                if key in wanted:
                    out[key] = Position(amount, last_seq)
        return out

    async def watermarks(self) -> dict[str, int]:
        await self.sync()  # what this store has written, its due watermarks included
        return dict(sorted(await self._rows(self._st.all_watermarks.bind(()))))

    async def balances(self, account: int) -> dict[str, int]:
        rows = await self._rows(self._st.account_rows.bind((account,)))
        return sum_by_asset((asset, amount) for asset, _, amount, _ in rows)

    async def positions(self) -> dict[PositionKey, Position]:
        rows = await self._rows(self._st.all_positions.bind(()))
        return {
            (account, asset, symbol): Position(amount, seq) for account, asset, symbol, amount, seq in rows
        }

    async def ledger(self, symbol: str) -> list[tuple[int, int]]:
        buckets = sorted(bucket for (bucket,) in await self._rows(self._st.buckets.bind((symbol,))))
        out: list[tuple[int, int]] = []
        for bucket in buckets:
            out.extend(
                (seq, trade_id)
                for seq, trade_id in await self._rows(self._st.ledger_rows.bind((symbol, bucket)))
            )
        return out

    async def ledger_symbols(self) -> list[str]:
        symbols = {symbol for (symbol,) in await self._rows(self._st.bucket_symbols.bind(()))}
        symbols.update(await self.watermarks())
        return sorted(symbols)

    async def close(self) -> None:
        if self._session is None:
            return
        self._cancel_marks_timer()
        if self._marks_alone is not None:
            await asyncio.gather(self._marks_alone, return_exceptions=True)
        if self._marks_due:
            with contextlib.suppress(StoreUnavailable):  # the shard's WAL still holds what they cover
                await self.sync()
        self._session = None
        self._sender.shutdown(wait=False)
        await asyncio.to_thread(self._cluster.shutdown)


async def migrate(config: CassandraConfig) -> list[str]:
    """Create the keyspace and tables when missing (``settle db migrate``); returns the statements run."""
    store = await CassandraStore.open(config, create_schema=True)
    await store.close()
    return cql_statements(config)
