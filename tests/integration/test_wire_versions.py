"""A router of the old wire (one bare ME frame per message) meets a shard of the new one: the shard refuses
it by name and the engine halts with a configuration error, instead of misreading or quarantining a stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from engine.core.errors import EXIT_CONFIG
from engine.core.messages import encoder
from engine.verify.testbed import System
from tests.factories import trade
from tests.integration.test_supervisor import exit_code

pytestmark = pytest.mark.integration


def test_a_shard_refuses_a_router_of_the_old_wire_and_the_engine_halts(tmp_path: Path) -> None:
    system = System(tmp_path, shards=1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    old_router = ctx.socket(zmq.PUSH)
    old_router.linger = 0
    try:
        system.start_engine()
        old_router.connect(system.config.shard_endpoint(0))
        old_router.send(encoder.encode(trade("BTC-USDT", seq=1)))  # how the router sent trades before wire 2
        assert system.engine is not None
        assert exit_code(system.engine) == EXIT_CONFIG
    finally:
        old_router.close(0)
        ctx.term()
        system.stop()
    shard_log = (tmp_path / "logs" / "shard-0.log").read_text()
    assert "one ME frame per message" in shard_log, shard_log[-2000:]
    assert "same settle release" in shard_log
    assert "config error" in (tmp_path / "logs" / "supervisor.log").read_text()
    assert system.watermarks() == {}  # nothing of it was settled
