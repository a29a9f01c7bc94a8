"""Validated, immutable configuration, built once at start-up from a TOML file and CLI overrides.

Nothing here reads the environment at import time. A bad value fails start-up with a
:class:`~engine.core.errors.ConfigError` naming the key, the value and what was expected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from engine.core.affinity import CpuConfig
from engine.core.errors import ConfigError
from engine.core.placement import shard_for
from engine.core.security import SecurityConfig

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Endpoint = Annotated[str, msgspec.Meta(pattern=r"^(tcp|ipc)://.+$")]


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    shards: PositiveInt | Literal["auto"] = "auto"
    data_dir: str = "var"  # WALs, ipc sockets, quarantine files, logs; relative to the working directory
    fee_account: Annotated[int, msgspec.Meta(ge=0)] = 0
    disk_free_bytes_min: Annotated[int, msgspec.Meta(ge=0)] = 1 << 30  # `settle run` refuses to start below; 0 = off
    source: Literal["zmq", "kafka"] = "zmq"  # zmq: router + WAL shards; kafka: consumer-group shards (docs/kafka.md)
    benchmark_unsafe: bool = False  # benchmarks only: allows store.factory and wal.fsync = false, which lose trades


class MEConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    publish: Endpoint = "tcp://127.0.0.1:5555"  # the ME's PUB socket; the router subscribes to it
    replay: Endpoint = "tcp://127.0.0.1:5556"  # the ME's replay endpoint (ROUTER)
    heartbeat_interval_ms: PositiveInt = 500


class RouterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    transport: Literal["ipc", "tcp"] = "ipc"
    tcp_host: str = "127.0.0.1"
    tcp_base_port: Port = 5600  # shard N listens on tcp_base_port + N when transport = "tcp"
    shard_queue_max: PositiveInt = 200_000  # frames (trades, heartbeats) held per shard while its socket is full
    rcvhwm: Annotated[int, msgspec.Meta(ge=0)] = 1_000_000


class WalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    batch_trades_max: PositiveInt = 4096
    # How long a group commit stays open for more trades after its first. 0 fsyncs as soon as intake has
    # drained its queue. On a disk whose fdatasync slows down with their rate, fewer and larger fsyncs make
    # every trade faster (measured here, bench.latency: 0 had the best p50 at 2,000 trades/s but a p99 of
    # 50 ms at 5,000; 1 ms had p50/p99 3.6-4.0/13 ms and 6.4-7.7/19 ms; 2 ms 4.8-5.0/23-34 and 7.2-7.4/20).
    fsync_wait_us_max: Annotated[int, msgspec.Meta(ge=0)] = 1000
    segment_bytes_max: Annotated[int, msgspec.Meta(ge=4096)] = 64 << 20
    pending_trades_max: PositiveInt = 500_000  # fsynced but not yet in the store; beyond it intake pauses
    gap_buffer_max: PositiveInt = 100_000  # trades held per symbol behind an open gap
    fsync: bool = True  # false loses acknowledged trades in a crash: refused unless engine.benchmark_unsafe


class ReplicationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    strategy: Literal["SimpleStrategy", "NetworkTopologyStrategy"] = "SimpleStrategy"
    replication_factor: PositiveInt = 1  # SimpleStrategy
    datacenters: dict[str, PositiveInt] = {}  # NetworkTopologyStrategy: {"dc1": 3}


class CassandraConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    contact_points: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1"])
    port: Port = 9042
    keyspace: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,47}$")] = "settle"
    replication: ReplicationConfig = ReplicationConfig()
    consistency: Literal["ONE", "LOCAL_ONE", "QUORUM", "LOCAL_QUORUM", "ALL", "EACH_QUORUM"] = "LOCAL_QUORUM"
    local_dc: str | None = None
    username: str | None = None
    password_file: str | None = None  # a file holding the password; never logged
    password_env: str | None = None  # or the name of an environment variable holding it
    tls_ca_file: str | None = None
    requests_in_flight_max: PositiveInt = 256
    # Store batches a shard writes at once. Their rows may land in any order (positions carry their trade's
    # sequence); the watermarks only ever move over the batches all written, so a crash loses nothing.
    batches_in_flight_max: PositiveInt = 4
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    logged_batches: bool = False
    create_schema: bool = True  # create keyspace and tables on first start


class StoreConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    kind: Literal["embedded", "cassandra"] = "embedded"
    # Benchmarks only: "module:Class" of a store opened instead of `kind` (bench.nullstore discards every write);
    # refused unless engine.benchmark_unsafe.
    factory: str = ""
    path: str = "var/settle.db"  # embedded store: names its files (each shard writes settle.shard-N.db)
    cassandra: CassandraConfig = CassandraConfig()


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    supervisor_port: Port = 9400
    router_port: Port = 9401
    simulator_port: Port = 9402
    shard_port_base: Port = 9410  # shard N serves on shard_port_base + N
    lag_budget_ms: PositiveInt = 25  # the settle lag p99 to hold; exported for the SettleLagOverBudget alert


class SupervisorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    ready_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    heartbeat_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    restart_backoff_s_max: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    crash_loop_restarts: PositiveInt = 8  # this many restarts of one slot within the window halt the engine
    crash_loop_window_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    drain_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0


TopicName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
Milliseconds = Annotated[int, msgspec.Meta(ge=1)]


class KafkaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: TopicName = "settle.trades"
    partitions: PositiveInt = 16  # fixed for the topic's life: partition = shard_for(symbol, partitions)
    replication_factor: PositiveInt = 1  # production: 3
    min_insync_replicas: PositiveInt = 1  # production: 2 (with acks=all a write needs that many replicas)
    create_topic: bool = True  # the bridge creates the topic when it is missing
    group_id: str = "settle"
    session_timeout_ms: Milliseconds = 10_000  # a SIGKILLed shard's partitions move after this
    heartbeat_interval_ms: Milliseconds = 1_000
    max_poll_interval_ms: Milliseconds = 300_000  # a shard stuck longer (store down) leaves the group
    consume_batch_max: PositiveInt = 10_000  # trades per consume call and store batch
    consume_wait_ms: Milliseconds = 10  # longest wait to fill a batch (bounds the added latency)
    gap_replay: bool = True  # a hole in the topic (a broker lost acked data) is filled from the ME's log
    producer_linger_ms: Annotated[int, msgspec.Meta(ge=0)] = 2
    producer_queue_max: PositiveInt = 200_000  # trades the bridge holds unacknowledged; beyond it, it waits
    bridge_tail_scan_max: PositiveInt = 20_000  # messages read from each partition's tail at bridge start
    bridge_metrics_port: Port = 9403
    run_bridge: bool = True  # `settle run` in Kafka mode supervises the bridge too; false on consumer-only hosts
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password_file: str | None = None  # a file holding the password; never logged
    ssl_ca_file: str | None = None
    ssl_certificate_file: str | None = None  # client certificate (mutual TLS)
    ssl_key_file: str | None = None
    client_options: dict[str, str] = {}  # further librdkafka properties, applied last

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                             f"session_timeout_ms ({self.session_timeout_ms})")
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(f"min_insync_replicas ({self.min_insync_replicas}) exceeds replication_factor "
                             f"({self.replication_factor})")
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password_file
        ):
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username "
                             "and sasl_password_file")

    def partition_of(self, symbol: str) -> int:
        return shard_for(symbol, self.partitions)

    def client_settings(self, client_id: str) -> dict[str, Any]:
        """librdkafka properties every settle client shares: servers, identity, security."""
        out: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": client_id,
            "security.protocol": self.security_protocol,
            "socket.keepalive.enable": True,
            "socket.nagle.disable": True,  # small requests must not wait for a delayed ACK (40 ms)
            "logger": logging.getLogger("settle.kafka.client"),  # rate-limited by engine.kafka.config
        }
        if self.sasl_mechanism:
            out["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            out["sasl.username"] = self.sasl_username
        if self.sasl_password_file:
            try:
                out["sasl.password"] = Path(self.sasl_password_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"kafka.sasl_password_file {self.sasl_password_file!r}: cannot read: "
                                  f"{e.strerror}") from None
        out.update((key, value) for key, value in (("ssl.ca.location", self.ssl_ca_file),
                                                    ("ssl.certificate.location", self.ssl_certificate_file),
                                                    ("ssl.key.location", self.ssl_key_file)) if value)
        return out

    def producer_settings(self, client_id: str) -> dict[str, Any]:
        """The bridge's idempotent producer: per-partition order and no duplicates from its own retries.

        ``message.timeout.ms = 0`` retries forever (a broker restart never expires a trade, so a later one
        can never land before it), and ``enable.gapless.guarantee`` turns any failure that could leave a hole
        into a fatal error: the bridge exits and its restart re-produces from the topic's tail.
        """
        return {
            **self.client_settings(client_id),
            "enable.idempotence": True,
            "acks": "all",
            "max.in.flight.requests.per.connection": 5,
            "enable.gapless.guarantee": True,
            "message.timeout.ms": 0,
            "linger.ms": self.producer_linger_ms,
            "queue.buffering.max.messages": self.producer_queue_max,
            "partitioner": "consistent",  # never used: every produce names its partition
            **self.client_options,
        }

    def consumer_settings(self, client_id: str) -> dict[str, Any]:
        """A shard's consumer: manual commits only, classic (eager) group protocol."""
        return {
            **self.client_settings(client_id),
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "roundrobin",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
            "max.poll.interval.ms": self.max_poll_interval_ms,
            "fetch.wait.max.ms": max(1, min(100, self.consume_wait_ms)),
            "isolation.level": "read_uncommitted",  # no transactions; no wait for the LSO
            **self.client_options,
        }


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    engine: EngineConfig = EngineConfig()
    me: MEConfig = MEConfig()
    router: RouterConfig = RouterConfig()
    wal: WalConfig = WalConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    security: SecurityConfig = SecurityConfig()
    cpu: CpuConfig = CpuConfig()
    kafka: KafkaConfig = KafkaConfig()

    @property
    def shard_count(self) -> int:
        if self.engine.shards == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.engine.shards

    @property
    def data_path(self) -> Path:
        return Path(self.engine.data_dir)

    def wal_path(self, shard: int) -> Path:
        return self.data_path / "wal" / f"shard-{shard}"

    def shard_endpoint(self, shard: int) -> str:
        if self.router.transport == "tcp":
            return f"tcp://{self.router.tcp_host}:{self.router.tcp_base_port + shard}"
        return f"ipc://{(self.data_path / 'run' / f'shard-{shard}.sock').resolve()}"

    @property
    def quarantine_path(self) -> Path:
        return self.data_path / "quarantine"


_PATH_RE = re.compile(r"at `\$((?:\.[A-Za-z_0-9]+|\[\d+\])*)`")


def _value_at(raw: dict[str, Any], path: str) -> Any:
    value: Any = raw
    for part in re.findall(r"\.([A-Za-z_0-9]+)|\[(\d+)\]", path):
        key, index = part
        try:
            value = value[key] if key else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return value


IPC_PATH_MAX: Final = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL


def _check_unsafe(config: Config, source: str) -> Config:
    """Settings that lose trades exist for benchmarks only and need ``engine.benchmark_unsafe = true``."""
    if config.engine.benchmark_unsafe:
        return config
    if config.store.factory:
        raise ConfigError(f"{source}: key 'store.factory' is {config.store.factory!r}: a store other than the "
                          "embedded or Cassandra one is for benchmarks only (it may discard every trade); remove "
                          "the key, or set engine.benchmark_unsafe = true in a benchmark")
    if not config.wal.fsync:
        raise ConfigError(f"{source}: key 'wal.fsync' is false: a crash would lose trades already acknowledged; "
                          "remove the key, or set engine.benchmark_unsafe = true in a benchmark")
    return config


def _check_ipc_paths(config: Config, source: str) -> Config:
    """A shard socket path past what a unix socket takes would only fail in the shard, as a crash loop."""
    endpoint = config.shard_endpoint(max(0, config.shard_count - 1))
    path = endpoint.removeprefix("ipc://")
    if path != endpoint and len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ConfigError(f"{source}: key 'engine.data_dir' has value {config.engine.data_dir!r}; the shard socket "
                          f"{path} is longer than the {IPC_PATH_MAX} bytes a unix socket path may have: choose a "
                          "shorter engine.data_dir, or router.transport = \"tcp\"")
    return config


def from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return _check_unsafe(_check_ipc_paths(msgspec.convert(raw, Config), source), source)
    except msgspec.ValidationError as e:
        message = str(e)
        match = _PATH_RE.search(message)
        if match is None:
            raise ConfigError(f"{source}: {message}") from None
        key = match.group(1).lstrip(".")
        expected = message[: match.start()].rstrip(" -")
        unknown = re.match(r"Object contains unknown field `([^`]+)`", expected)
        if unknown:
            full = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            raise ConfigError(f"{source}: unknown key {full!r}; see config/settle.toml for the keys") from None
        value = _value_at(raw, match.group(1))
        expected = expected.replace("Invalid enum value", "expected one of the documented values, got")
        raise ConfigError(f"{source}: key {key!r} has value {value!r}; {expected}") from None


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply a CLI override such as ``wal.batch_trades_max=512`` to the raw dict before validation."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a table")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` where value is read as a TOML value when it parses as one, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. wal.batch_trades_max=512")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = json.load(f) if str(path).endswith(".json") else tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{source}: not valid TOML/JSON: {e}") from None
    for override in overrides or []:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return from_dict(raw, source)


def dump(config: Config) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(config)
    return result
