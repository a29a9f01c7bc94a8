"""A real Cassandra for the benchmarks (:class:`engine.verify.servers.CassandraServer`), its start-up timed.

    with Cassandra(work_dir / "cassandra") as server:      # started (timed), stopped on exit
        server.port, server.start_s
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType

from bench.settlerun import CassandraTarget
from engine.verify.servers import CassandraServer
from engine.verify.servers import ServerError as CassandraError

__all__ = ["Cassandra", "CassandraError"]


class Cassandra:
    """One Cassandra JVM on 127.0.0.1 and a free port, data under ``data_dir``."""

    host = "127.0.0.1"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.server = CassandraServer(start_timeout_s=280.0)
        self.port = 0
        self.start_s = 0.0  # `cassandra.sh start` until CQL answered (the jars fetched beforehand)
        self.fetch_s = 0.0

    def start(self) -> Cassandra:
        started = time.monotonic()
        self.server.fetch()
        self.fetch_s = time.monotonic() - started
        started = time.monotonic()
        self.server.start(self.data_dir)
        self.start_s = time.monotonic() - started
        self.port = self.server.port
        return self

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.port else None

    @property
    def target(self) -> CassandraTarget:
        return CassandraTarget(self.host, self.port)

    def stop(self) -> None:
        if self.port:
            self.server.stop()

    def __enter__(self) -> Cassandra:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
