"""The ``[kafka]`` config section: the topic, the consumer group, the bridge's producer, security.

The topic has a fixed number of partitions and a trade goes to partition
``shard_for(symbol, partitions)`` (:mod:`engine.core.placement`, the router's stable CRC32 hash), so a
symbol's trades live in one partition, in sequence order. The partition count is part of the data's
layout: changing it on a live topic would move symbols between partitions (and reorder them), so the
bridge refuses to start when the topic's count differs from the configured one.

Until ``Config`` carries this section itself, :func:`load_child_config` splits it off the raw config
before the rest is validated by :func:`engine.core.config.from_dict`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from engine.core.errors import EXIT_CONFIG, ConfigError
from engine.core.placement import shard_for

if TYPE_CHECKING:
    from engine.core.config import Config


class _Repeats(logging.Filter):
    """librdkafka logs a refused connection on every retry: one line per kind of message per 5 s."""

    def __init__(self, interval_s: float = 5.0) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", record.getMessage())[:80]
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self._interval_s:
            return False
        self._last[key] = now
        return True


client_log = logging.getLogger("settle.kafka.client")  # librdkafka's own log lines, served by poll/consume
client_log.addFilter(_Repeats())

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
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
            "logger": client_log,
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
        for key, value in (("ssl.ca.location", self.ssl_ca_file),
                           ("ssl.certificate.location", self.ssl_certificate_file),
                           ("ssl.key.location", self.ssl_key_file)):
            if value:
                out[key] = value
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


def kafka_from_dict(raw: dict[str, Any], source: str = "<config>") -> KafkaConfig:
    """Validate the ``[kafka]`` table alone. Errors name the key as ``kafka.<key>``."""
    try:
        return msgspec.convert(raw, KafkaConfig)
    except msgspec.ValidationError as e:
        message = str(e).replace("`$.", "`kafka.").replace("`$`", "`kafka`")
        raise ConfigError(f"{source}: [kafka]: {message}") from None


def split(raw: dict[str, Any], source: str = "<config>") -> tuple[Config, KafkaConfig]:
    """The engine config and the Kafka section from one raw config.

    Works before and after ``Config`` gains its ``kafka`` field (and ``engine.source``).
    """
    from engine.core import config as configmod  # here: engine.config imports this module for KafkaConfig

    fields = set(configmod.Config.__struct_fields__)
    if "kafka" in fields:
        config = configmod.from_dict(raw, source)
        kafka: KafkaConfig = config.kafka  # type: ignore[attr-defined,unused-ignore]
        return config, kafka
    rest = {k: v for k, v in raw.items() if k != "kafka"}
    engine = rest.get("engine")
    if isinstance(engine, dict) and "source" in engine:
        source_value = engine["source"]
        if source_value not in ("zmq", "kafka"):
            raise ConfigError(f"{source}: key 'engine.source' has value {source_value!r}; expected 'zmq' or 'kafka'")
        rest["engine"] = {k: v for k, v in engine.items() if k != "source"}
    kafka_raw = raw.get("kafka", {})
    if not isinstance(kafka_raw, dict):
        raise ConfigError(f"{source}: [kafka] must be a table, got {kafka_raw!r}")
    return configmod.from_dict(rest, source), kafka_from_dict(kafka_raw, source)


def load(path: str | Path | None, overrides: list[str] | None = None) -> tuple[Config, KafkaConfig]:
    """Like :func:`engine.core.config.load`, for processes of the Kafka mode."""
    from engine.core import config as configmod

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
        configmod.set_dotted(raw, *configmod.parse_override(override))
    return split(raw, source)


def load_child_config(args: argparse.Namespace) -> tuple[Config, KafkaConfig]:
    """:func:`engine.core.child.load_child_config` for the bridge and the Kafka shards (exit EXIT_CONFIG on error)."""
    try:
        return load(args.config_json or args.config, args.set)
    except ConfigError as e:
        print(f"settle: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
