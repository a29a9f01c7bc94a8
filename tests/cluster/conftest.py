"""A 3-node Cassandra cluster with logins and TLS (``ops/cassandra/cluster.sh``), started once per test module
that uses it and stopped at the module's end, so its JVMs (~2.4 GiB) are gone before the next cluster test
starts its own servers. Tests that kill nodes start them again before they return."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.verify import netns
from engine.verify.servers import CassandraCluster, ServerError
from tests.conftest import server_unavailable, unavailable


def require_netns() -> None:
    """Fail (CI) or skip (elsewhere) the calling test when network namespaces cannot be made here."""
    reason = netns.missing()
    if reason is not None:
        unavailable(f"multi-host test: {reason}")


@pytest.fixture(scope="module")
def cassandra_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraCluster]:
    cluster = CassandraCluster()
    try:
        cluster.start(tmp_path_factory.mktemp("cassandra-cluster"), nodes=3)
    except (ServerError, OSError) as e:
        cluster.stop()
        server_unavailable("the 3-node Cassandra cluster", e)
    try:
        yield cluster
    finally:
        cluster.stop()
