"""Real Cassandra and Kafka servers on 127.0.0.1, driven through the ops scripts, for tests, benchmarks
and ``settle chaos``.

    with CassandraServer().start(tmp_path / "cassandra") as server:
        cluster = Cluster([server.host], port=server.port, protocol_version=4)
        ...
        server.restart()            # SIGKILL the JVM, start it again: same data dir, same ports
        server.restart(hard=False)  # the same after a clean stop

``ops/cassandra/cassandra.sh`` and ``ops/kafka/kafka.sh`` do the work (fetch the jars from Maven Central
into the cache, write the config, start the JVM, wait until it answers, stop it); this class runs them and
reads what they leave in the data directory: ``<name>.pid``, the port file, the ports of the last start.
The first start on a machine fetches the jars (10-15 s); later starts take a few seconds.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from engine.verify.demo import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT_GRACE_S = 120.0  # the script waits for its server itself; this only bounds a hung script
START_ATTEMPTS_ON_PORTS_TAKEN = 3  # starts on fresh ports when a picked port was taken before the server bound it
ADDRESS_IN_USE = "Address already in use"  # what the JVM logs (and the script shows) when a bind fails

log = logging.getLogger("settle.verify.servers")


def script_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment an ops script runs in: ours, ``PYTHON`` set to the interpreter settle runs under,
    then ``env``. The scripts wait for their server with a check that imports cassandra-driver or
    confluent-kafka, installed where settle is; their own default, ``python3`` from PATH, is another
    interpreter when settle runs from a virtualenv that is not activated ("cassandra-driver is not
    installed")."""
    return {**os.environ, "PYTHON": sys.executable, **(env or {})}


class ServerError(RuntimeError):
    """An ops script failed to fetch, start or stop its server; the message carries its output."""


class OpsServer:
    """One JVM server bound to 127.0.0.1 and owned by this object, run by an ops script."""

    host: ClassVar[str] = "127.0.0.1"
    name: ClassVar[str]  # the script's service name: ops/<name>/<name>.sh, DATA_DIR/<name>.pid
    title: ClassVar[str]
    port_file: ClassVar[str]  # DATA_DIR/<port_file>: the client port of the last start
    port_flag: ClassVar[str]  # the start option that fixes the client port
    log_file: ClassVar[str]  # under DATA_DIR/logs
    default_start_timeout_s: ClassVar[float]

    def __init__(self, *, script: Path | None = None, env: Mapping[str, str] | None = None,
                 start_timeout_s: float | None = None) -> None:
        self._script = script or REPO_ROOT / "ops" / self.name / f"{self.name}.sh"
        timeout = start_timeout_s if start_timeout_s is not None else self.default_start_timeout_s
        self._env = script_env(env)
        self._env.setdefault(f"{self.name.upper()}_START_TIMEOUT", str(int(timeout)))
        self._script_timeout_s = timeout + SCRIPT_GRACE_S
        self._data_dir: Path | None = None
        self._port: int | None = None
        self.started_in_s: float | None = None  # the script's own figure for the last start

    # -- state ---------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise ServerError(f"{self.title} was never started: call start(data_dir) first")
        return self._data_dir

    @property
    def port(self) -> int:
        """The client port."""
        if self._port is None:
            raise ServerError(f"{self.title} was never started: call start(data_dir) first")
        return self._port

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / self.log_file

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / f"{self.name}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid
        return pid is not None and alive(pid)

    # -- lifecycle -----------------------------------------------------------------------------

    def fetch(self) -> None:
        """Download the jars into the cache unless they are there."""
        self._run("fetch")

    def start(self, data_dir: str | os.PathLike[str], *, port: int | None = None,
              extra: tuple[str, ...] = ()) -> Self:
        """Start on DATA_DIR and wait until the server answers. Without PORT, the ports this data dir used
        last time are reused if free, else free ones are picked."""
        self._data_dir = Path(data_dir).resolve()
        args = ["start", str(self._data_dir), *extra]
        if port is not None:
            args += [self.port_flag, str(port)]
        for attempt in range(1, START_ATTEMPTS_ON_PORTS_TAKEN + 1):
            try:
                out = self._run(*args)
                break
            except ServerError as e:
                # Ports are picked free, but the server binds its client port last, seconds later: another
                # process may take one meanwhile. Start again on fresh ports, unless the caller fixed them.
                if port is not None or ADDRESS_IN_USE not in str(e) or attempt == START_ATTEMPTS_ON_PORTS_TAKEN:
                    raise
                log.warning("%s: a port was taken while it started (attempt %d); starting on fresh ports",
                            self.title, attempt)
        self._port = int((self._data_dir / self.port_file).read_text().strip())
        if "ready in " in out:
            self.started_in_s = float(out.rsplit("ready in ", 1)[1].split()[0])
        return self

    def stop(self) -> None:
        """Clean stop (SIGTERM; SIGKILL after the script's timeout)."""
        if self._data_dir is not None:
            self._run("stop", str(self._data_dir))

    def kill9(self, *, timeout_s: float = 30.0) -> int | None:
        """SIGKILL the JVM (a crash: nothing flushed) and wait until every thread is gone, so its ports are
        free. Returns its pid (None when it was not running)."""
        pid = self.pid
        if pid is None or not alive(pid):
            return None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while alive(pid) or threads_left(pid):
            if time.monotonic() > deadline:
                raise ServerError(f"{self.title} pid {pid} still alive {timeout_s} s after SIGKILL")
            time.sleep(0.02)
        return pid

    def restart(self, *, hard: bool = True) -> Self:
        """Bring the server down (SIGKILL if HARD, else a clean stop) and start it again on the same data
        dir and ports, so clients reconnect to the address they know."""
        port = self.port
        if hard:
            self.kill9()
        else:
            self.stop()
        return self.start(self.data_dir, port=port, extra=self._restart_args())

    def start_again(self) -> Self:
        """Start it after a :meth:`kill9` (or a stop), on the same data dir and ports."""
        return self.start(self.data_dir, port=self.port, extra=self._restart_args())

    def _restart_args(self) -> tuple[str, ...]:
        return ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run(["bash", str(self._script), *args], env=self._env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=self._script_timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"{self._script.name} {' '.join(args)}: no answer after "
                              f"{self._script_timeout_s:.0f} s") from e
        if done.returncode != 0:
            raise ServerError(f"{self._script.name} {' '.join(args)} exited with {done.returncode}:\n"
                              f"{done.stdout}{done.stderr}")
        return done.stdout


class CassandraServer(OpsServer):
    """Cassandra 5.0 (``ops/cassandra/cassandra.sh``): ``port`` is the CQL port."""

    name = "cassandra"
    title = "Cassandra"
    port_file = "cql.port"
    port_flag = "--cql-port"
    log_file = "system.log"
    default_start_timeout_s = 180.0

    @property
    def contact_point(self) -> str:
        return f"{self.host}:{self.port}"


class CassandraCluster:
    """N Cassandra nodes on 127.0.0.1, 127.0.0.2, ... (``ops/cassandra/cluster.sh``): logins, client TLS,
    datacenter ``dc1``. ``client`` is what settle's ``store.cassandra`` needs; ``node(k)`` is node k
    (1-based) as a :class:`CassandraServer` to kill and start again."""

    def __init__(self, *, script: Path | None = None, env: Mapping[str, str] | None = None,
                 start_timeout_s: float = 300.0) -> None:
        self._script = script or REPO_ROOT / "ops" / "cassandra" / "cluster.sh"
        self._env = script_env(env)
        self._timeout_s = start_timeout_s + SCRIPT_GRACE_S
        self._dir: Path | None = None
        self.client: dict[str, object] = {}
        self.started_in_s: float | None = None  # the script's figures for the last start
        self.rss_mib: int | None = None

    @property
    def data_dir(self) -> Path:
        if self._dir is None:
            raise ServerError("the Cassandra cluster was never started: call start(data_dir) first")
        return self._dir

    def start(self, data_dir: str | os.PathLike[str], *, nodes: int = 3, addresses: list[str] | None = None) -> Self:
        """Start the nodes (on ADDRESSES, default 127.0.0.1..N) and wait until each sees the others."""
        self._dir = Path(data_dir).resolve()
        where = ("--addresses", ",".join(addresses)) if addresses else ("--nodes", str(nodes))
        out = self._run("start", str(self._dir), *where)
        self.client = json.loads((self._dir / "client.json").read_text())
        if "ready in " in out:
            self.started_in_s = float(out.rsplit("ready in ", 1)[1].split()[0])
        if "rss " in out:
            self.rss_mib = int(out.rsplit("rss ", 1)[1].split()[0])
        return self

    @property
    def nodes(self) -> int:
        return len(self.client["contact_points"])  # type: ignore[arg-type]

    def node(self, k: int) -> CassandraServer:
        """Node K (1-based), to kill (``kill9``) and start again (``start(data_dir)``: same address, ports)."""
        server = CassandraServer(env=self._env)
        server._data_dir = self.data_dir / f"node{k}"
        server._port = int(self.client["port"])  # type: ignore[call-overload]
        return server

    def store_overrides(self) -> dict[str, object]:
        """``store.cassandra`` keys for settle on this cluster: RF 3 in dc1, LOCAL_QUORUM, login, TLS."""
        c = self.client
        return {
            "store.cassandra.contact_points": c["contact_points"],
            "store.cassandra.port": c["port"],
            "store.cassandra.local_dc": c["local_dc"],
            "store.cassandra.consistency": "LOCAL_QUORUM",
            "store.cassandra.username": c["username"],
            "store.cassandra.password_file": c["password_file"],
            "store.cassandra.tls_ca_file": c["tls_ca_file"],
            "store.cassandra.replication.strategy": "NetworkTopologyStrategy",
            "store.cassandra.replication.datacenters": {c["local_dc"]: min(self.nodes, 3)},
        }

    def logs(self) -> list[Path]:
        return sorted(self.data_dir.glob("node*/logs/*.log"))

    def stop(self) -> None:
        if self._dir is not None:
            self._run("stop", str(self._dir))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run(["bash", str(self._script), *args], env=self._env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=self._timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"cluster.sh {' '.join(args)}: no answer after {self._timeout_s:.0f} s") from e
        if done.returncode != 0:
            raise ServerError(f"cluster.sh {' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout


class KafkaServer(OpsServer):
    """Kafka 4 in KRaft mode, broker and controller in one JVM (``ops/kafka/kafka.sh``); alone, or one node
    of a :class:`KafkaCluster`."""

    name = "kafka"
    title = "Kafka"
    port_file = "kafka.port"
    port_flag = "--port"
    log_file = "server.log"
    default_start_timeout_s = 120.0

    def __init__(self, *, host: str = "127.0.0.1", script: Path | None = None,
                 env: Mapping[str, str] | None = None, start_timeout_s: float | None = None) -> None:
        super().__init__(script=script, env=env, start_timeout_s=start_timeout_s)
        self.host = host  # type: ignore[misc]  # the address it binds: a loopback one or a test LAN's
        self._cluster_args: tuple[str, ...] = ()

    @property
    def bootstrap(self) -> str:
        """``bootstrap.servers`` for clients."""
        return f"{self.host}:{self.port}"

    def start(self, data_dir: str | os.PathLike[str], *, port: int | None = None, extra: tuple[str, ...] = (),
              controller_port: int | None = None) -> Self:
        """Start on DATA_DIR (formatting it the first time) and wait until the broker answers."""
        if controller_port is not None:
            extra = (*extra, "--controller-port", str(controller_port))
        if "--host" not in extra:
            extra = (*extra, "--host", self.host)
        return super().start(data_dir, port=port, extra=extra)

    def start_node(self, data_dir: str | os.PathLike[str], *, node_id: int, port: int, controller_port: int,
                   voters: str, cluster_id: str, replicas: int) -> Self:
        """Start as node NODE_ID of a cluster whose static controller quorum is VOTERS."""
        self._cluster_args = ("--node-id", str(node_id), "--voters", voters, "--cluster-id", cluster_id,
                              "--replicas", str(replicas))
        return self.start(data_dir, port=port, controller_port=controller_port, extra=self._cluster_args)

    def _restart_args(self) -> tuple[str, ...]:
        return ("--controller-port", (self.data_dir / "ports").read_text().split()[1], *self._cluster_args)


class KafkaCluster:
    """N Kafka nodes, each broker and controller (a static KRaft quorum of all N), node i on HOSTS[i-1];
    internal topics with N replicas and ``min.insync.replicas`` N-1. The nodes start together (each one
    answers only once the quorum has a leader). ``started_in_s``: from the first start to the last node
    answering."""

    def __init__(self, hosts: Sequence[str] = ("127.0.0.1", "127.0.0.2", "127.0.0.3"), *,
                 env: Mapping[str, str] | None = None, start_timeout_s: float | None = None) -> None:
        self.nodes = [KafkaServer(host=h, env=env, start_timeout_s=start_timeout_s) for h in hosts]
        self.started_in_s: float | None = None

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> KafkaServer:
        """The node whose ``node.id`` (the broker id Kafka reports) is NODE_ID, from 1."""
        return self.nodes[node_id - 1]

    def start(self, base_dir: str | os.PathLike[str]) -> Self:
        base = Path(base_dir)
        ports = [free_port_pair(node.host) for node in self.nodes]
        voters = ",".join(f"{i}@{node.host}:{ports[i - 1][1]}" for i, node in enumerate(self.nodes, 1))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=").replace("-", "A")
        started = time.monotonic()
        errors: list[BaseException] = []

        def start(i: int) -> None:
            try:
                self.nodes[i].start_node(base / f"node{i + 1}", node_id=i + 1, port=ports[i][0],
                                         controller_port=ports[i][1], voters=voters, cluster_id=cluster_id,
                                         replicas=len(self.nodes))
            except BaseException as e:  # reported below, after every node's start has returned
                errors.append(e)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(len(self.nodes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise ServerError(f"the Kafka cluster did not start: {errors[0]}") from errors[0]
        self.started_in_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        for node in self.nodes:
            if node._data_dir is not None:
                node.stop()

    def partition_leaders(self, topic: str, timeout_s: float = 10.0) -> Counter[int]:
        """How many of TOPIC's partitions each broker leads, by node id, asked of the running brokers."""
        from confluent_kafka.admin import AdminClient

        bootstrap = ",".join(node.bootstrap for node in self.nodes if node.is_running())
        quiet = logging.getLogger("settle.verify.kafka-admin")
        conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "log_level": 0, "logger": quiet}
        admin = AdminClient(conf)
        meta = admin.list_topics(topic, timeout=timeout_s).topics[topic]
        if meta.error is not None:
            raise ServerError(f"Kafka topic {topic}: {meta.error}")
        return Counter(p.leader for p in meta.partitions.values())

    def rss_bytes(self) -> int:
        """Resident memory of the running nodes' JVMs, together."""
        total = 0
        for node in self.nodes:
            pid = node.pid
            if pid is None:
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
        return total

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def free_port_pair(host: str) -> tuple[int, int]:
    """Two distinct free ports of HOST (a broker's and a controller's), below the ephemeral range."""
    first = free_port(host)
    second = free_port(host)
    while second == first:
        second = free_port(host)
    return first, second


def threads_left(pid: int) -> bool:
    """A killed JVM's main thread turns zombie before its other threads are gone (they hold the sockets)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def alive(pid: int) -> bool:
    """True while PID exists and is not a zombie (PID 1 may never reap an orphaned JVM)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
