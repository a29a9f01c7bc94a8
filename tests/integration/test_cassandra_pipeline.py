"""The whole pipeline on a real Cassandra: real processes, real kills, the server stopped and restarted."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.verify.testbed import System
from tests.conftest import server_unavailable
from tests.integration.test_pipeline import assert_exact
from tests.servers.cassandra import CassandraServer, CassandraServerError

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cassandra")]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CassandraServer]:
    """A Cassandra of this test's own: the test kills and freezes it."""
    cass = CassandraServer()
    try:
        cass.start(tmp_path / "cassandra")
    except (CassandraServerError, OSError) as e:
        server_unavailable("Cassandra", e)
    try:
        yield cass
    finally:
        if cass.pid:
            try:
                os.kill(cass.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        cass.stop()


def on_cassandra(tmp_path: Path, server: CassandraServer, **overrides: object) -> System:
    return System(tmp_path / "run", shards=2, store="cassandra", overrides={
        "store.cassandra.port": server.port,
        "store.cassandra.keyspace": f"t_{uuid.uuid4().hex[:12]}",
        "store.cassandra.consistency": "ONE",
        "store.cassandra.request_timeout_s": 2.0,
        **overrides,
    })


def test_every_trade_settled_once_on_cassandra(tmp_path: Path, cassandra: CassandraServer) -> None:
    system = on_cassandra(tmp_path, cassandra)
    try:
        system.start_engine()
        system.start_sim(15_000, rate=3_000)
        system.wait_settled()
        old = system.kill("shard-1")
        system.wait_respawned("shard-1", old)
    finally:
        system.stop()
    assert_exact(system)


def test_sigkill_a_shard_with_batches_in_flight_between_wal_fsync_and_the_store_write(
        tmp_path: Path, server: CassandraServer) -> None:
    """Several store batches of a shard are being written (and retried) when it is killed: the watermarks
    moved over the written prefix only, so the WAL re-settles whatever was not in, nothing twice."""
    system = on_cassandra(tmp_path, server)
    try:
        system.start_engine()
        # Few accounts, and enough settled first, so that every position a batch touches is cached: a batch
        # needing a read would wait on the stopped store before going out, and no second batch would follow.
        # The stream lasts a minute, so trades keep coming while the store is stopped, however slowly the
        # store warmed up; each shard gets the trades of its own symbols, so the shard to kill is whichever
        # first has several batches out.
        system.start_sim(60_000, rate=1_000, accounts=10)
        system.wait_settled(4_000, at_least=True)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)  # the store stops answering: trades pile up fsynced in the WAL
        try:
            deadline = time.monotonic() + 60
            ahead, in_flight = 0, [0, 0]
            while time.monotonic() < deadline and (ahead < 500 or max(in_flight) < 2):
                time.sleep(0.1)
                ahead, in_flight = _wal_ahead(system), [_in_flight(system, shard) for shard in (0, 1)]
            assert ahead >= 500, f"the WAL did not get ahead of the store ({ahead})\n{system.logs()}"
            assert max(in_flight) >= 2, f"no shard had several batches in flight ({in_flight})\n{system.logs()}"
            slot = f"shard-{in_flight.index(max(in_flight))}"
            old = system.kill(slot)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        system.wait_respawned(slot, old, timeout_s=120)
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


def test_cassandra_stopped_mid_run_then_started_again(tmp_path: Path, server: CassandraServer) -> None:
    system = on_cassandra(tmp_path, server)
    try:
        system.start_engine()
        system.start_sim(30_000, rate=1_500)
        system.wait_settled(2_000, at_least=True)
        server.kill9()
        time.sleep(5)  # the DB is down for a while; the shards keep accepting into their WALs
        ahead = _wal_ahead(system)
        server.start(server.data_dir)
        system.wait_settled(timeout_s=300)
        state = system.state()
        assert all(slot["restarts"] == 0 for slot in state["slots"].values()), state  # nobody crashed
    finally:
        system.stop()
    assert ahead > 0, "nothing reached the WAL while the DB was down"
    assert_exact(system)


def _shard_gauge(system: System, name: str, shards: range | None = None) -> int:
    """The sum of gauge ``name`` over the shards (all, or ``shards``), from their own /metrics."""
    total = 0.0
    for shard in shards if shards is not None else range(system.config.shard_count):
        port = system.config.metrics.shard_port_base + shard
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue  # restarting
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name}{{"))
    return int(total)


def _wal_ahead(system: System) -> int:
    """Trades fsynced in the shards' WALs and not yet in the store."""
    return _shard_gauge(system, "settle_wal_pending_trades")


def _in_flight(system: System, shard: int) -> int:
    """Store batches ``shard`` is writing."""
    return _shard_gauge(system, "settle_store_inflight_batches", range(shard, shard + 1))


def test_store_down_fills_the_wal_to_its_bound_then_pushes_back(tmp_path: Path, server: CassandraServer) -> None:
    bound, batch = 3_000, 256
    system = on_cassandra(tmp_path, server, **{"wal.pending_trades_max": bound, "wal.batch_trades_max": batch})
    try:
        system.start_engine()
        system.start_sim(40_000, rate=2_000)
        system.wait_settled(1_000, at_least=True)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            seen = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                seen.append(_wal_ahead(system))
                if len(seen) > 20 and seen[-1] >= bound - batch and seen[-1] == seen[-10]:
                    break  # the WAL stopped growing at its bound
                time.sleep(0.25)
            assert max(seen) >= bound - batch, f"the WAL never filled to its bound: {seen[-10:]}"
            assert max(seen) <= system.config.shard_count * (bound + batch), f"the bound did not hold: {max(seen)}"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        system.wait_settled(timeout_s=300)
        state = system.state()
        assert all(slot["restarts"] == 0 for slot in state["slots"].values()), state
    finally:
        system.stop()
    assert_exact(system)
