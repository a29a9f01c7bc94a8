"""A real single-node Apache Kafka (KRaft, broker + controller in one JVM) on 127.0.0.1,
driven through ops/kafka/kafka.sh.

    with KafkaServer().start(tmp_path / "kafka") as server:
        producer = Producer({"bootstrap.servers": server.bootstrap})
        ...
        server.restart()            # SIGKILL the JVM, start it again: same data dir, same ports
        server.restart(hard=False)  # the same after a clean stop

The first start on a machine fetches the jars from Maven Central into the cache (about 15 s);
later starts take a few seconds. No pytest here: test modules build their fixtures on this class.
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
SCRIPT = REPO_ROOT / "ops" / "kafka" / "kafka.sh"


class KafkaServerError(RuntimeError):
    """The script failed to fetch, start or stop Kafka; the message carries its output."""


class KafkaServer:
    """One Kafka JVM bound to 127.0.0.1, owned by this object."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        script: Path = SCRIPT,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self._script = script
        self._env = {**os.environ, **(env or {})}
        self._env.setdefault("KAFKA_START_TIMEOUT", str(int(start_timeout_s)))
        self._script_timeout_s = start_timeout_s + 120.0  # the script waits itself; this bounds a hung one
        self._data_dir: Path | None = None
        self._port: int | None = None
        self.started_in_s: float | None = None  # the script's own figure for the last start

    # -- state ---------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise KafkaServerError("Kafka was never started: call start(data_dir) first")
        return self._data_dir

    @property
    def port(self) -> int:
        if self._port is None:
            raise KafkaServerError("Kafka was never started: call start(data_dir) first")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "kafka.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid
        return pid is not None and _alive(pid)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, data_dir: str | os.PathLike[str], *, port: int | None = None,
              controller_port: int | None = None) -> KafkaServer:
        """Start on DATA_DIR (formatting it the first time) and wait until the broker answers. Without
        ports, the ones this data dir used last time are reused if free, else free ones are picked."""
        self._data_dir = Path(data_dir).resolve()
        args = ["start", str(self._data_dir)]
        if port is not None:
            args += ["--port", str(port)]
        if controller_port is not None:
            args += ["--controller-port", str(controller_port)]
        out = self._run(*args)
        self._port = int((self._data_dir / "kafka.port").read_text().strip())
        if "ready in " in out:
            self.started_in_s = float(out.rsplit("ready in ", 1)[1].split()[0])
        return self

    def stop(self) -> None:
        """Clean stop (SIGTERM; SIGKILL after a timeout)."""
        if self._data_dir is not None:
            self._run("stop", str(self._data_dir))

    def kill9(self, *, timeout_s: float = 30.0) -> None:
        """SIGKILL the JVM (a crash) and wait until it is gone: every thread, so its ports are free."""
        pid = self.pid
        if pid is None or not _alive(pid):
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) or _threads_left(pid):
            if time.monotonic() > deadline:
                raise KafkaServerError(f"Kafka pid {pid} still alive {timeout_s} s after SIGKILL")
            time.sleep(0.02)

    def restart(self, *, hard: bool = True) -> KafkaServer:
        """Bring the broker down (SIGKILL if HARD, else a clean stop) and start it again on the same data
        dir and ports, so clients reconnect to the address they know."""
        port = self.port
        controller_port = int((self.data_dir / "ports").read_text().split()[1])
        if hard:
            self.kill9()
        else:
            self.stop()
        return self.start(self.data_dir, port=port, controller_port=controller_port)

    def __enter__(self) -> KafkaServer:
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
            raise KafkaServerError(
                f"{self._script.name} {' '.join(args)}: no answer after {self._script_timeout_s:.0f} s"
            ) from e
        if done.returncode != 0:
            raise KafkaServerError(
                f"{self._script.name} {' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout


def _threads_left(pid: int) -> bool:
    """A killed JVM's main thread turns zombie before its other threads are gone (they hold the sockets)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True while PID exists and is not a zombie (PID 1 may never reap the orphaned JVM)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
