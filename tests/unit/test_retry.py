"""The one retry policy (engine.core.retry): its waits stay within bounds, are spread so that shards which
failed together do not retry in step, and the callers that use it still log, count and give up as before."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from confluent_kafka import KafkaError, KafkaException

from engine.core import metrics as metricsmod
from engine.core.errors import ConfigError, SettleError, StoreRejected, StoreUnavailable
from engine.core.retry import Backoff, retry
from engine.kafka import bridge as bridgemod
from engine.kafka.bridge import Bridge
from shards import settling
from shards.settling import SettleStage
from shards.state import Sequencer

FIRST_S = 0.05
MAX_S = 2.0


def test_each_wait_is_within_the_floor_and_a_doubling_ceiling_capped_at_max() -> None:
    backoff = Backoff(FIRST_S, MAX_S, random.Random(7))
    ceiling = FIRST_S
    for _ in range(40):
        assert backoff.ceiling_s == pytest.approx(ceiling)
        wait_s = backoff.next_s()
        assert FIRST_S <= wait_s <= ceiling
        ceiling = min(MAX_S, ceiling * 2)
    assert backoff.ceiling_s == MAX_S
    backoff.reset()
    assert backoff.ceiling_s == FIRST_S
    assert backoff.next_s() == FIRST_S  # the first wait after a success is the floor itself


def test_a_backoff_refuses_bounds_that_make_no_sense() -> None:
    with pytest.raises(ValueError, match="first_s"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="first_s"):
        Backoff(2.0, 1.0)


def test_shards_that_failed_together_spread_their_retries_over_the_window() -> None:
    # Sixteen shards lose the store at the same moment and have each waited five times: without jitter they
    # would all retry at the same instant. With it, their next retries cover most of the window.
    waits = []
    for shard in range(16):
        backoff = Backoff(FIRST_S, MAX_S, random.Random(shard))
        for _ in range(5):
            backoff.next_s()
        waits.append(backoff.next_s())
    assert len(set(waits)) == len(waits)
    assert max(waits) - min(waits) > 0.6 * (MAX_S - FIRST_S)
    deciles = {int(10 * (w - FIRST_S) / (MAX_S - FIRST_S)) for w in waits}
    assert len(deciles) >= 6  # not bunched in one corner of the window


def test_retry_propagates_what_is_not_retriable_and_lets_on_retry_give_up() -> None:
    calls = 0

    async def rejected() -> None:
        nonlocal calls
        calls += 1
        raise StoreRejected("refused")

    def never(error: Exception, wait_s: float) -> None:
        raise AssertionError("a non-retriable error was retried")

    with pytest.raises(StoreRejected):
        asyncio.run(retry(rejected, Backoff(0.001, 0.001), never))
    assert calls == 1

    async def unavailable() -> None:
        raise StoreUnavailable("down")

    def give_up(error: Exception, wait_s: float) -> None:
        raise RuntimeError("gave up") from error

    with pytest.raises(RuntimeError, match="gave up"):
        asyncio.run(retry(unavailable, Backoff(0.001, 0.001), give_up))


class _Stage(SettleStage):
    def __init__(self) -> None:
        self.shard = 3
        self.m = metricsmod.ShardMetrics(metricsmod.new_registry(), 3)
        self.sequencer = Sequencer(16)
        self.store = None
        self.settler = None


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settling, "RETRY_BACKOFF_S_MIN", 0.001)
    monkeypatch.setattr(settling, "RETRY_BACKOFF_S_MAX", 0.002)
    monkeypatch.setattr(bridgemod, "RETRY_BACKOFF_S_MIN", 0.001)
    monkeypatch.setattr(bridgemod, "RETRY_BACKOFF_S_MAX", 0.002)


@pytest.mark.usefixtures("short_waits")
def test_a_shard_logs_and_counts_each_store_failure_then_gets_its_result(caplog: pytest.LogCaptureFixture) -> None:
    stage = _Stage()
    failures = [StoreUnavailable("cassandra at 127.0.0.1:9042: no host"), StoreUnavailable("still down")]

    async def write() -> str:
        if failures:
            raise failures.pop(0)
        return "written"

    with caplog.at_level(logging.WARNING, logger="settle.shard"):
        assert asyncio.run(stage._retry("write a batch", write)) == "written"
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) == 2
    assert retried[0].startswith("shard 3: write a batch failed, retrying in 0.00")
    assert retried[0].endswith("s: cassandra at 127.0.0.1:9042: no host")
    assert stage.m.store_errors._value.get() == 2


@pytest.mark.usefixtures("short_waits")
def test_a_shard_stops_at_once_on_an_error_that_is_not_retriable() -> None:
    stage = _Stage()

    async def write() -> None:
        raise StoreRejected("the server refused a request")

    with pytest.raises(StoreRejected):
        asyncio.run(stage._retry("write a batch", write))
    assert stage.m.store_errors._value.get() == 0


def _bridge() -> Bridge:
    bridge = object.__new__(Bridge)  # _retry needs nothing but the stop event
    bridge._stopping = asyncio.Event()
    return bridge


@pytest.mark.usefixtures("short_waits")
def test_the_bridge_retries_the_broker_but_not_a_config_error(caplog: pytest.LogCaptureFixture) -> None:
    bridge = _bridge()
    broker_down = [KafkaException(KafkaError(KafkaError._TRANSPORT))]

    async def check_topic() -> int:
        if broker_down:
            raise broker_down.pop()
        return 12

    with caplog.at_level(logging.WARNING, logger="settle.bridge"):
        assert asyncio.run(bridge._retry("check the topic", check_topic)) == 12
    assert any(r.getMessage().startswith("bridge: check the topic failed, retrying in") for r in caplog.records)

    async def misconfigured() -> None:
        raise ConfigError("kafka.topic: bad")

    with pytest.raises(ConfigError):
        asyncio.run(bridge._retry("check the topic", misconfigured))


@pytest.mark.usefixtures("short_waits")
def test_a_stopping_bridge_gives_up_retrying() -> None:
    bridge = _bridge()
    bridge._stopping.set()

    async def store_down() -> None:
        raise StoreUnavailable("down")

    with pytest.raises(SettleError, match="bridge: stopped while trying to read the store's watermarks"):
        asyncio.run(bridge._retry("read the store's watermarks", store_down))
