"""A real Cassandra for the benchmarks, through ``ops/cassandra/cassandra.sh`` (bench/ never imports tests/).

    with Cassandra(work_dir / "cassandra") as server:      # started (timed), stopped on exit
        server.port, server.start_s
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import TracebackType

from bench.settlerun import CassandraTarget

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "cassandra" / "cassandra.sh"
SCRIPT_TIMEOUT_S = 400.0


class CassandraError(RuntimeError):
    """The ops script failed; the message carries its output."""


def _run(*args: str) -> str:
    try:
        done = subprocess.run(["bash", str(SCRIPT), *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=SCRIPT_TIMEOUT_S, check=False, env=dict(os.environ))
    except subprocess.TimeoutExpired as e:
        raise CassandraError(f"cassandra.sh {' '.join(args)}: no answer after {SCRIPT_TIMEOUT_S:.0f}s") from e
    if done.returncode != 0:
        raise CassandraError(f"cassandra.sh {' '.join(args)} exited with {done.returncode}:\n"
                             f"{done.stdout}{done.stderr}")
    return done.stdout


class Cassandra:
    """One Cassandra JVM on 127.0.0.1 and a free port, data under ``data_dir``."""

    host = "127.0.0.1"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = 0
        self.start_s = 0.0  # `cassandra.sh start` until CQL answered (the jars fetched beforehand)
        self.fetch_s = 0.0

    def start(self) -> Cassandra:
        started = time.monotonic()
        _run("fetch")
        self.fetch_s = time.monotonic() - started
        started = time.monotonic()
        _run("start", str(self.data_dir))
        self.start_s = time.monotonic() - started
        self.port = int((self.data_dir / "cql.port").read_text().strip())
        return self

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "cassandra.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def target(self) -> CassandraTarget:
        return CassandraTarget(self.host, self.port)

    def stop(self) -> None:
        if (self.data_dir / "cassandra.pid").exists():
            _run("stop", str(self.data_dir))

    def __enter__(self) -> Cassandra:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
