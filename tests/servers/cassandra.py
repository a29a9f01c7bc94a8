"""A real single-node Apache Cassandra on 127.0.0.1, driven through ops/cassandra/cassandra.sh.

    with CassandraServer().start(tmp_path / "cassandra") as server:
        cluster = Cluster([server.host], port=server.port, protocol_version=4)
        ...
        server.restart()          # SIGKILL the JVM, start it again: same data dir, same port
        server.restart(hard=False)  # the same after a clean stop (drain)

The first start on a machine fetches the jars from Maven Central into the cache (about 10 s);
later starts take a few seconds. No pytest here: conftest.py builds its fixtures on this class.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "ops" / "cassandra" / "cassandra.sh"


class CassandraServerError(RuntimeError):
    """The script failed to fetch, start or stop Cassandra; the message carries its output."""


class CassandraServer:
    """One Cassandra JVM bound to 127.0.0.1, owned by this object."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        script: Path = SCRIPT,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        self._script = script
        self._env = {**os.environ, **(env or {})}
        self._env.setdefault("CASSANDRA_START_TIMEOUT", str(int(start_timeout_s)))
        # The script waits for CQL itself; this only bounds a hung script.
        self._script_timeout_s = start_timeout_s + 120.0
        self._data_dir: Path | None = None
        self._port: int | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise CassandraServerError("Cassandra was never started: call start(data_dir) first")
        return self._data_dir

    @property
    def port(self) -> int:
        """The CQL (native protocol) port."""
        if self._port is None:
            raise CassandraServerError("Cassandra was never started: call start(data_dir) first")
        return self._port

    @property
    def contact_point(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "system.log"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "cassandra.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid
        return pid is not None and _alive(pid)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, data_dir: str | os.PathLike[str], *, port: int | None = None) -> CassandraServer:
        """Start on DATA_DIR and wait until CQL answers. Without PORT, the port this data dir
        used last time is reused if free, else a free one is picked."""
        self._data_dir = Path(data_dir).resolve()
        args = ["start", str(self._data_dir)]
        if port is not None:
            args += ["--cql-port", str(port)]
        self._run(*args)
        self._port = int((self._data_dir / "cql.port").read_text().strip())
        return self

    def stop(self) -> None:
        """Clean stop (SIGTERM: Cassandra drains and flushes; SIGKILL after a timeout)."""
        if self._data_dir is not None:
            self._run("stop", str(self._data_dir))

    def kill9(self, *, timeout_s: float = 30.0) -> None:
        """SIGKILL the JVM (a crash: nothing is flushed) and wait until it is gone."""
        pid = self.pid
        if pid is None or not _alive(pid):
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while _alive(pid):
            if time.monotonic() > deadline:
                raise CassandraServerError(f"Cassandra pid {pid} still alive {timeout_s} s after SIGKILL")
            time.sleep(0.02)

    def restart(self, *, hard: bool = True) -> CassandraServer:
        """Bring the server down (SIGKILL if HARD, else a clean stop) and start it again on the
        same data dir and the same CQL port, so clients reconnect to the address they know."""
        port = self.port
        if hard:
            self.kill9()
        else:
            self.stop()
        return self.start(self.data_dir, port=port)

    def __enter__(self) -> CassandraServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------------------------

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run(
                ["bash", str(self._script), *args],
                env=self._env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self._script_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise CassandraServerError(
                f"{self._script.name} {' '.join(args)}: no answer after {self._script_timeout_s:.0f} s"
            ) from e
        if done.returncode != 0:
            raise CassandraServerError(
                f"{self._script.name} {' '.join(args)} exited with {done.returncode}:\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout


def _alive(pid: int) -> bool:
    """True while PID exists and is not a zombie (PID 1 may never reap the orphaned JVM)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
