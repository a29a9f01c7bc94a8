"""Fixtures for real servers: started once per test session (per xdist worker group), stopped at the end.

In CI (``CI`` set) a server that cannot start fails the run; locally the tests that need it are skipped
with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from engine.verify.demo import PORT_RANGE_ENV, port_range, port_slice
from tests.servers.cassandra import CassandraServer, CassandraServerError


def _worker_port_range() -> None:
    """Give each xdist worker its own slice of the ports below the ephemeral range. A port is free when
    picked and bound later by its process; without slices, a worker's pick could meanwhile be bound by
    another worker's server (a Cassandra node restarting on the port it had before, say)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()) or PORT_RANGE_ENV in os.environ:
        return
    low, high = port_slice(int(worker[2:]), int(count), port_range())
    os.environ[PORT_RANGE_ENV] = f"{low}-{high}"


_worker_port_range()


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist registers this marker; ops/test.sh runs tests/cluster without xdist (-p no:xdist), where
    # --strict-markers would otherwise reject it.
    config.addinivalue_line("markers", "xdist_group(name): run in the same xdist worker as the group's other tests")


def unavailable(message: str) -> NoReturn:
    """A test's server or tool is missing: the test fails in CI and is skipped elsewhere, with ``message``."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def server_unavailable(what: str, error: Exception) -> NoReturn:
    unavailable(f"{what} could not start: {error}")


@pytest.fixture(scope="session")
def cassandra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraServer]:
    """A real Cassandra 5.0 on a free loopback port. Mark users with xdist_group('cassandra')."""
    data_dir: Path = tmp_path_factory.mktemp("cassandra")
    server = CassandraServer()
    try:
        server.start(data_dir)
    except (CassandraServerError, OSError) as e:
        server_unavailable("Cassandra", e)
    try:
        yield server
    finally:
        server.stop()
