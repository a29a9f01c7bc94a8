"""The store contract (tests/contract.py) on a real Cassandra, plus what only a networked store can do:
lose its server mid-write, and get it back.

Every test works in keyspaces of its own (random names), so tests are independent of each other and
of their order. They share the session's server (the ``cassandra`` fixture of tests/conftest.py); the
tests that kill or freeze a server start one of their own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cassandra.cluster import ResponseFuture, Session
from cassandra.query import BatchStatement, BatchType

from engine.core.config import CassandraConfig, ReplicationConfig
from engine.core.errors import ConfigError, StoreRejected, StoreUnavailable
from engine.core.settlement import Settler
from engine.core.store import cassandra as cassandra_store
from engine.core.store.base import Batch, Position, Store
from engine.core.store.cassandra import CassandraStore, migrate
from engine.core.store.schema import ledger_bucket, ledger_ints
from tests import contract
from tests.conftest import unavailable
from tests.servers.cassandra import CassandraServer, CassandraServerError

pytestmark = pytest.mark.integration
shared_server = pytest.mark.xdist_group("cassandra")


def _start_or_skip(data_dir: Path) -> CassandraServer:
    server = CassandraServer()
    try:
        return server.start(data_dir)
    except (CassandraServerError, OSError) as e:
        unavailable(f"cannot start Cassandra with ops/cassandra/cassandra.sh: {e}")


@pytest.fixture
def cassandra_server(cassandra: CassandraServer) -> CassandraServer:
    """The session's shared server (tests/conftest.py); these tests never stop it."""
    return cassandra


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[CassandraServer]:
    """A server this test may kill."""
    server = _start_or_skip(tmp_path / "cassandra")
    yield server
    server.stop()


def config_for(server: CassandraServer, keyspace: str, **overrides: Any) -> CassandraConfig:
    return CassandraConfig(contact_points=[server.host], port=server.port, keyspace=keyspace, **overrides)


def new_keyspace() -> str:
    return f"t{uuid.uuid4().hex[:16]}"


def factory(server: CassandraServer, **overrides: Any) -> contract.OpenStore:
    prefix = new_keyspace()

    async def open_store(name: str) -> Store:
        return await CassandraStore.open(
            config_for(server, f"{prefix}_{name}", **overrides), create_schema=True
        )

    return open_store


@shared_server
@pytest.mark.parametrize("check", contract.CHECKS, ids=contract.check_id)
def test_contract(check: contract.Check, cassandra_server: CassandraServer) -> None:
    asyncio.run(check(factory(cassandra_server)))


LOGGED_CHECKS = [
    contract.check_replay_is_idempotent,
    contract.check_crash_mid_batch_then_resettle,
    contract.check_stale_replay_changes_nothing,
    contract.check_conservation,
]


@shared_server
@pytest.mark.parametrize("check", LOGGED_CHECKS, ids=contract.check_id)
def test_contract_logged_batches(check: contract.Check, cassandra_server: CassandraServer) -> None:
    asyncio.run(check(factory(cassandra_server, logged_batches=True)))


@shared_server
def test_a_write_sends_the_watermarks_due_with_its_rows(cassandra_server: CassandraServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its ledger buckets exist, a write is one round of requests: its rows and the watermarks of the
    writes before it together (never a round trip of their own), and its own watermarks wait, due."""
    monkeypatch.setattr(cassandra_store, "MARKS_ALONE_AFTER_S", 600.0)  # no write comes: sent by sync only

    async def main() -> None:
        store = await CassandraStore.open(config_for(cassandra_server, new_keyspace()), create_schema=True)
        reader = await CassandraStore.open(config_for(cassandra_server, store._config.keyspace), create_schema=False)
        rounds: list[list[Any]] = []
        fan_out = store._all

        async def counted(statements: Sequence[Any], pages: Any = None) -> None:
            if statements:
                rounds.append(list(statements))
            await fan_out(statements, pages)

        store._all = counted  # type: ignore[method-assign]
        try:
            await store.write(Batch([contract.trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1}))
            rounds.clear()
            await store.write(Batch([contract.trade("BTC-USDT", 2, 1, 2)], {}, {"BTC-USDT": 2}))
            assert len(rounds) == 1, rounds
            assert await reader.watermarks() == {"BTC-USDT": 1}  # sent with the second write's rows
            assert store._marks_due == {"BTC-USDT": 2}
            await store.sync()
            assert await reader.watermarks() == {"BTC-USDT": 2}
            assert store._marks_due == {}
        finally:
            await store.close()
            await reader.close()

    asyncio.run(main())


@shared_server
def test_a_quiet_streams_last_watermarks_go_alone_within_milliseconds(cassandra_server: CassandraServer) -> None:
    """With no write after it, a batch's watermarks go out on their own: a reader (`settle status`, an audit)
    sees the last batch of a quiet stream settled without waiting for the shard's next sync."""

    async def main() -> None:
        store = await CassandraStore.open(config_for(cassandra_server, new_keyspace()), create_schema=True)
        reader = await CassandraStore.open(config_for(cassandra_server, store._config.keyspace), create_schema=False)
        try:
            await store.write(Batch([contract.trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1}))
            deadline = time.monotonic() + 10
            while (marks := await reader.watermarks()) != {"BTC-USDT": 1}:
                assert time.monotonic() < deadline, marks
                await asyncio.sleep(0.01)
            assert store._marks_due == {}
        finally:
            await store.close()
            await reader.close()

    asyncio.run(main())


REQUEST_OBJECTS = {"ResponseFuture", "Timer", "BatchStatement", "BoundStatement", "BatchMessage", "ExecuteMessage",
                   "_FanOut", "Event", "Condition", "function", "cell", "Future"}


@shared_server
def test_writes_and_reads_leave_no_reference_cycles(cassandra_server: CassandraServer) -> None:
    """Only the cyclic collector frees a reference cycle, and at dozens of objects per request its
    collections stalled a shard's loop for 50-350 ms: requests must leave none behind (the driver's own
    request and its timeout timer form one until the store breaks it)."""
    trades = contract.stream(contract.SYMBOLS, 200, accounts=40, seed=5)

    async def main() -> None:
        store = await CassandraStore.open(config_for(cassandra_server, new_keyspace()), create_schema=True)
        settler = Settler(store, contract.FEE)
        try:
            await store.write(await settler.prepare(trades[:4]))  # the ledger buckets: written once
            await store.watermarks()
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for start in range(4, len(trades), 4):
                    await store.write(await settler.prepare(trades[start:start + 4]))
                await store.sync()
                await store.watermarks()
                await store.balances(3)
                gc.collect()
                left = {type(o).__name__ for o in gc.garbage}
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            # The driver's schema metadata, rebuilt when the new keyspace's tables were announced, may be
            # there too: it is not made per request.
            assert not left & REQUEST_OBJECTS, sorted(left & REQUEST_OBJECTS)
        finally:
            await store.close()

    asyncio.run(main())


@shared_server
def test_rows_are_serialised_as_the_driver_binds_them(cassandra_server: CassandraServer) -> None:
    """The store serialises the rows it writes itself (the driver's bind costs five times the CPU): every
    value, a batch's routing key and keyspace, and a lone row's, are byte for byte what the driver's bind and
    BatchStatement.add make of the same rows, at the ends of the 64-bit range and with non-ASCII text."""
    top = 2**63 - 1
    # Beyond what a trade may be: only the encoding counts here.
    trade = msgspec.structs.replace(contract.trade("BTC-USDT", top, 1, top, trade_id=1), trade_id=top, price=top,
                                    buyer_fee=0, seller_fee=top, ts_ns=top)
    bucket = ledger_bucket(trade.seq)

    async def main() -> None:
        store = await CassandraStore.open(config_for(cassandra_server, new_keyspace()), create_schema=True)
        try:
            st = store._st
            rows = [
                (cassandra_store._ledger_row(st, trade, bucket),
                 (trade.symbol, bucket, *ledger_ints(trade), trade.seq)),
                (cassandra_store._position_row(st, (-(2**63), "USDT", "BTC-USDT"), Position(-(2**63), top)),
                 (-(2**63), "USDT", "BTC-USDT", -(2**63), top, top)),
                (cassandra_store._watermark_row(st, "ÉTH-ÜSD", 0), ("ÉTH-ÜSD", 0, 0)),
            ]
            reference = BatchStatement(batch_type=BatchType.UNLOGGED)
            for (statement, values), raw in rows:
                bound = statement.bind(raw)
                assert values == bound.values, statement.query_string
                lone = cassandra_store._bound(statement, values)
                assert (lone.values, lone.routing_key, lone.keyspace) == (bound.values, bound.routing_key,
                                                                          bound.keyspace)
                reference.add(statement, raw)
            ours = cassandra_store._batch(BatchType.UNLOGGED, [row for row, _ in rows],
                                          cassandra_store._routing_key((trade.symbol, bucket)))
            assert ours._statements_and_parameters == reference._statements_and_parameters
            assert (ours.routing_key, ours.keyspace) == (reference.routing_key, reference.keyspace)
        finally:
            await store.close()

    asyncio.run(main())


@shared_server
def test_a_few_trades_on_several_symbols_are_one_request(cassandra_server: CassandraServer) -> None:
    """On a node alone every partition has the same replicas: a batch of a few trades (its ledger rows, its
    positions and the watermarks due) is one UNLOGGED batch. The partitions are routed as the driver does."""
    trades = [contract.trade("BTC-USDT", 1, 1, 2), contract.trade("ETH-USDT", 1, 3, 4)]

    async def main() -> None:
        store = await CassandraStore.open(config_for(cassandra_server, new_keyspace()), create_schema=True)
        try:
            st = store._st
            for key, bound in ((("BTC-USDT", 0), st.ledger_rows.bind(("BTC-USDT", 0))),
                               (7, st.account_rows.bind((7,))), ("BTC-USDT", st.watermark.bind(("BTC-USDT", 1, 1)))):
                assert cassandra_store._routing_key(key) == bound.routing_key, key
            batch = await contract.settle(store, trades)
            marks = {"BTC-USDT": 9, "ETH-BTC": 9}
            requests = store._write_requests(batch, marks)
            assert len(requests) == 1, [len(_rows_of(r)) for r in requests]
            assert len(_rows_of(requests[0])) == len(trades) + len(batch.positions) + len(marks)
        finally:
            await store.close()

    asyncio.run(main())


@shared_server
def test_positions_of_several_accounts_share_a_request(cassandra_server: CassandraServer) -> None:
    """Accounts whose partitions have the same replicas go in one batch (a node alone holds them all), each
    batch within the row and partition bounds, every position exactly once, and every value lands."""
    trades = contract.stream(contract.SYMBOLS, 120, accounts=300, seed=9)

    async def main() -> None:
        store = await CassandraStore.open(config_for(cassandra_server, new_keyspace()), create_schema=True)
        try:
            batch = await contract.settle(store, trades)
            requests = [_rows_of(statement) for statement in store._write_requests(batch, {})]
            position_rows = [[values for values in rows if len(values) == POSITION_VALUES] for rows in requests]
            position_requests = [rows for rows in position_rows if rows]
            accounts = [len({values[0] for values in rows}) for rows in position_requests]
            assert sum(len(rows) for rows in position_requests) == len(batch.positions)
            assert 1 < max(accounts) <= cassandra_store.PARTITIONS_PER_BATCH, accounts
            assert max(len(rows) for rows in requests) <= cassandra_store.ROWS_PER_BATCH
            assert len(position_requests) < len({key[0] for key in batch.positions}) / 3
            assert await store.positions() == batch.positions
            assert await contract.balances_of(store, range(301)) == contract.expected_balances(trades)
        finally:
            await store.close()

    asyncio.run(main())


POSITION_VALUES = 6  # account, asset, symbol, amount, last_seq and the write timestamp


def _rows_of(statement: Any) -> list[list[bytes]]:
    """The values (as sent) of each row a request writes: a batch's rows, or a lone statement's."""
    if isinstance(statement, BatchStatement):
        return [list(values) for _, _, values in statement._statements_and_parameters]
    return [list(statement.values)]


@shared_server
def test_big_batch_spans_partitions_without_batch_warnings(
    cassandra_server: CassandraServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A shard-sized batch: many trades per symbol, accounts with many positions. The server warns
    (and the driver logs it) when a batch exceeds its size threshold; ours never should."""
    trades = contract.stream(contract.SYMBOLS, 700, accounts=40, seed=5)

    async def main() -> None:
        for logged in (False, True):
            store = await CassandraStore.open(
                config_for(cassandra_server, new_keyspace(), logged_batches=logged), create_schema=True
            )
            try:
                await contract.settle(store, trades)
                assert await contract.balances_of(store, range(41)) == contract.expected_balances(trades)
                assert await store.ledger("ETH-BTC") == [
                    (t.seq, t.trade_id) for t in trades if t.symbol == "ETH-BTC"
                ]
            finally:
                await store.close()

    with caplog.at_level(logging.WARNING, logger="cassandra"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if "batch" in r.getMessage().lower()]
    assert warnings == []


@shared_server
def test_migrate_is_idempotent_and_open_without_schema_says_what_to_do(
    cassandra_server: CassandraServer,
) -> None:
    keyspace = new_keyspace()
    config = config_for(cassandra_server, keyspace)

    async def main() -> None:
        with pytest.raises(StoreRejected, match=rf"keyspace '{keyspace}'.*settle db migrate"):
            await CassandraStore.open(config, create_schema=False)
        applied = await migrate(config)
        assert applied[0].startswith(f"CREATE KEYSPACE IF NOT EXISTS {keyspace} ")
        assert "'class': 'SimpleStrategy', 'replication_factor': 1" in applied[0]
        assert len(applied) == 5
        assert await migrate(config) == applied
        store = await CassandraStore.open(config, create_schema=False)
        try:
            await store.write(Batch([contract.trade("BTC-USDT", 1, 1, 2)], {}, {"BTC-USDT": 1}))
            assert await store.watermarks() == {"BTC-USDT": 1}
        finally:
            await store.close()

    asyncio.run(main())


@shared_server
def test_network_topology_replication(cassandra_server: CassandraServer) -> None:
    keyspace = new_keyspace()
    replication = ReplicationConfig(strategy="NetworkTopologyStrategy", datacenters={"datacenter1": 1})
    config = config_for(cassandra_server, keyspace, replication=replication, local_dc="datacenter1")

    async def main() -> None:
        applied = await migrate(config)
        assert "'class': 'NetworkTopologyStrategy', 'datacenter1': 1" in applied[0]
        await contract.check_watermarks_never_go_backwards(factory(cassandra_server, local_dc="datacenter1"))

    asyncio.run(main())
    with pytest.raises(ConfigError, match="datacenters is empty"):
        asyncio.run(migrate(config_for(cassandra_server, keyspace, replication=ReplicationConfig(
            strategy="NetworkTopologyStrategy"))))  # fmt: skip


@shared_server
def test_password_is_read_at_open_and_never_shown(cassandra_server: CassandraServer, tmp_path: Path) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    password_file = tmp_path / "password"
    password_file.write_text(secret + "\n")
    config = config_for(cassandra_server, new_keyspace(), username="settle", password_file=str(password_file))

    async def main() -> None:
        # The test server allows everyone; the driver still builds its authenticator from the file.
        store = await CassandraStore.open(config, create_schema=True)
        try:
            assert secret not in repr(store)
            assert secret not in str(vars(store))
        finally:
            await store.close()
        missing = config_for(
            cassandra_server, new_keyspace(), username="settle", password_env="SETTLE_NO_SUCH_VAR"
        )
        with pytest.raises(ConfigError, match="password_env names 'SETTLE_NO_SUCH_VAR'"):
            await CassandraStore.open(missing, create_schema=True)

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_server_is_store_unavailable_naming_the_contact_point() -> None:
    port = _free_port()
    config = CassandraConfig(contact_points=["127.0.0.1"], port=port, request_timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=rf"cassandra at 127\.0\.0\.1:{port}.*cannot connect") as info:
        asyncio.run(CassandraStore.open(config, create_schema=True))
    assert info.value.retriable
    assert time.monotonic() - started < 15


async def _write_until_it_succeeds(store: Store, batch: Batch, deadline_s: float) -> int:
    """What the shard's retry loop does; returns how many attempts failed first."""
    failures = 0
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            await store.write(batch)
            return failures
        except StoreUnavailable:
            failures += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)  # a retry's backoff, as the shard's; the deadline bounds the wait


def test_server_killed_mid_write_then_restarted(own_server: CassandraServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the server while a write is in flight: the write fails with StoreUnavailable in bounded
    time (no hang), writes while it is down fail the same way, and once it is back the same store object
    (the same driver session) writes again and the data is exactly that of settling once."""
    first = contract.stream(contract.SYMBOLS, 50, accounts=30, seed=71)
    second = contract.stream(contract.SYMBOLS, 1500, accounts=300, seed=72, first_seq=51)
    third = contract.stream(contract.SYMBOLS, 20, accounts=30, seed=73, first_seq=1551)
    config = config_for(own_server, new_keyspace(), request_timeout_s=2.0)

    async def main() -> None:
        store = await CassandraStore.open(config, create_schema=True)
        try:
            settler = Settler(store, contract.FEE)
            await contract.settle(store, first, settler)
            batch = await settler.prepare(second)  # large: thousands of requests

            # The kill must land while the write has requests out: wait until the driver has sent some.
            sent = threading.Event()
            real_execute_async = Session.execute_async

            def execute_async(self: Session, *args: Any, **kwargs: Any) -> ResponseFuture:
                sent.set()
                return real_execute_async(self, *args, **kwargs)

            monkeypatch.setattr(Session, "execute_async", execute_async)
            write = asyncio.create_task(store.write(batch))
            assert await asyncio.to_thread(sent.wait, 60), "the write sent no request"
            assert not write.done(), "the write finished before the kill; make the batch bigger"
            await asyncio.to_thread(own_server.kill9)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"cassandra at 127\.0\.0\.1:\d+") as info:
                await asyncio.wait_for(write, timeout=60)
            assert info.value.retriable
            assert time.monotonic() - started < 30

            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(store.write(batch), timeout=60)
            assert time.monotonic() - started < 30

            await asyncio.to_thread(own_server.restart, hard=True)  # not running: just starts it again
            await _write_until_it_succeeds(store, batch, deadline_s=60)
            await contract.settle(store, third, settler)

            reference = await CassandraStore.open(config_for(own_server, new_keyspace()), create_schema=True)
            try:
                await contract.settle(reference, first + second + third)
                want = await contract.snapshot(reference)
            finally:
                await reference.close()
            assert await contract.snapshot(store) == want
            expected = contract.expected_balances(first + second + third)
            assert await contract.balances_of(store, range(301)) == expected
        finally:
            await store.close()

    asyncio.run(main())


def test_server_killed_between_writes_then_restarted(own_server: CassandraServer) -> None:
    """Acknowledged writes survive a SIGKILL of the server, and the session reconnects by itself. The test
    server writes its commit log before it acknowledges (`commitlog_sync: batch`) but skips the fsync
    (``CASSANDRA_DURABILITY=process`` in ops/cassandra/cassandra.sh): an acknowledged write is in the page
    cache, which a SIGKILL of the JVM does not lose and a power loss would."""
    trades = contract.stream(contract.SYMBOLS, 40, seed=81)
    config = config_for(own_server, new_keyspace(), request_timeout_s=2.0)

    async def main() -> None:
        store = await CassandraStore.open(config, create_schema=True)
        try:
            settler = Settler(store, contract.FEE)
            await contract.settle(store, trades[:60], settler)
            before = await contract.snapshot(store)
            await asyncio.to_thread(own_server.kill9)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.watermarks()
            assert time.monotonic() - started < 30
            await asyncio.to_thread(own_server.restart, hard=True)
            batch = await settler.prepare(trades[60:])
            await _write_until_it_succeeds(store, batch, deadline_s=60)
            after = await contract.snapshot(store)
            assert {k: v for k, v in after.positions.items() if k not in batch.positions} == {
                k: v for k, v in before.positions.items() if k not in batch.positions
            }
            assert await contract.balances_of(store, range(7)) == contract.expected_balances(trades)
        finally:
            await store.close()

    asyncio.run(main())


def test_hung_server_is_unavailable_in_bounded_time(own_server: CassandraServer) -> None:
    """SIGSTOP the server (it accepts nothing, refuses nothing): calls end with StoreUnavailable after
    about three request timeouts, and the same store object works again once the server resumes."""
    trades = contract.stream(contract.SYMBOLS, 40, seed=91)
    config = config_for(own_server, new_keyspace(), request_timeout_s=1.0)

    async def main() -> None:
        store = await CassandraStore.open(config, create_schema=True)
        try:
            settler = Settler(store, contract.FEE)
            await contract.settle(store, trades[:60], settler)
            batch = await settler.prepare(trades[60:])
            pid = own_server.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                for call in (store.write(batch), store.load_positions([(1, "BTC", "BTC-USDT")])):
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailable, match=r"cassandra at 127\.0\.0\.1:\d+"):
                        await asyncio.wait_for(call, timeout=30)
                    assert time.monotonic() - started < 3 * config.request_timeout_s + 2
            finally:
                os.kill(pid, signal.SIGCONT)
            await _write_until_it_succeeds(store, batch, deadline_s=60)
            assert await contract.balances_of(store, range(7)) == contract.expected_balances(trades)
            assert await store.watermarks() == dict.fromkeys(contract.SYMBOLS, 40)
        finally:
            await store.close()

    asyncio.run(main())
