"""The ``[kafka]`` config section: the topic, the consumer group, the bridge's producer, security.

The topic has a fixed number of partitions and a trade goes to partition
``shard_for(symbol, partitions)`` (:mod:`engine.core.placement`, the router's stable CRC32 hash), so a
symbol's trades live in one partition, in sequence order. The partition count is part of the data's
layout: changing it on a live topic would move symbols between partitions (and reorder them), so the
bridge refuses to start when the topic's count differs from the configured one.

The section itself (:class:`KafkaConfig`) is part of :class:`engine.core.config.Config`; this module
loads it for the Kafka mode's processes and rate-limits librdkafka's own log lines.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from engine.core import config as configmod
from engine.core.config import Config, KafkaConfig

__all__ = ["KafkaConfig", "load", "split"]


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


def split(raw: dict[str, Any], source: str = "<config>") -> tuple[Config, KafkaConfig]:
    """The engine config and its Kafka section from one raw config."""
    config = configmod.from_dict(raw, source)
    return config, config.kafka


def load(path: str | Path | None, overrides: list[str] | None = None) -> tuple[Config, KafkaConfig]:
    """:func:`engine.core.config.load`, with the Kafka section apart."""
    config = configmod.load(path, overrides)
    return config, config.kafka
