"""Waits that are due in under a millisecond are waited for, not polled for over and over: a paced
simulator or a shard holding a group commit open burnt a core that way, taken from the other processes on
the same cores (the latency benchmark's ME used 85% of one at 2,000 trades/s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq

from engine.core import config as configmod
from engine.sim.mesim import Simulator, sim_config
from shards import shard as shardmod
from tests.factories import routed, trade
from tests.inprocess import running_shard, wait_until


def test_a_paced_simulator_waits_between_trades(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    polls: list[Any] = []
    real_poll = zmq.Poller.poll

    def counting_poll(poller: zmq.Poller, timeout: Any = None) -> Any:
        polls.append(timeout)
        return real_poll(poller, timeout)

    monkeypatch.setattr(zmq.Poller, "poll", counting_poll)
    trades, rate = 600, 2000.0  # 2 trades a millisecond: every wait is under one
    config = sim_config(publish="tcp://127.0.0.1:*", replay="tcp://127.0.0.1:*", log_path=str(tmp_path / "me.log"),
                        wait_subscribers=0, heartbeat_interval_ms=50, trades=trades, rate=rate, linger_s=0)
    with Simulator(config) as sim:
        summary = sim.run()
    assert summary.trades == trades
    # One poll after each batch it publishes and about one wait before the next; spinning made thousands.
    assert len(polls) < 3 * trades, f"{len(polls)} polls for {trades} trades, {polls.count(0)} of them of 0 ms"


def test_a_shard_waits_out_its_group_commit_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real_wait = shardmod.Shard._wait_for_input

    async def counting_wait(shard: shardmod.Shard, *args: Any) -> bool:
        nonlocal calls
        if shard.wal is not None and shard.wal.buffered:
            calls += 1
        return await real_wait(shard, *args)

    monkeypatch.setattr(shardmod.Shard, "_wait_for_input", counting_wait)
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', f'store.path="{tmp_path}/settle.db"',
                                   "engine.shards=1", "metrics.enabled=false",
                                   "wal.fsync_wait_us_max=100000"])  # 100 ms after the first trade
    bursts, burst = 5, 4
    with running_shard(config, tmp_path) as (shard, push):
        for first in range(1, bursts * burst, burst):
            # Messages closer together than the window hold the group commit open for it.
            for seq in range(first, first + burst):
                push.send(routed(trade("BTC-USDT", seq=seq, output_sequence=seq)))

            def settled(last: int = first + burst - 1) -> bool:
                return shard.sequencer.state("BTC-USDT").settled == last

            assert wait_until(settled, 10)
    # A few waits per window (each message that arrives ends one); polling with 0 ms made hundreds.
    assert 0 < calls <= bursts * 2 * burst, f"{calls} waits over {bursts} group-commit windows"


def test_a_trade_after_a_quiet_spell_goes_at_once_and_one_after_a_commit_waits_for_company(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group-commit window (10 s here) holds a trade only while group commits are recent: the first
    trade after a quiet spell is made durable at once, one right after a commit waits for others."""
    sizes: list[int] = []
    real_commit = shardmod.Shard._group_commit

    async def recording_commit(shard: shardmod.Shard) -> None:
        assert shard.wal is not None
        sizes.append(shard.wal.buffered)
        await real_commit(shard)

    monkeypatch.setattr(shardmod.Shard, "_group_commit", recording_commit)
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', f'store.path="{tmp_path}/settle.db"',
                                   "engine.shards=1", "metrics.enabled=false", "wal.batch_trades_max=2",
                                   "wal.fsync_wait_us_max=10000000"])
    with running_shard(config, tmp_path) as (shard, push):
        assert wait_until(lambda: shard.wal is not None)

        def settled() -> int:
            return shard.sequencer.state("BTC-USDT").settled

        push.send(routed(trade("BTC-USDT", seq=1, output_sequence=1)))
        assert wait_until(lambda: settled() == 1, 5), "a trade after a quiet spell waited for the window"
        push.send(routed(trade("BTC-USDT", seq=2, output_sequence=2)))
        assert wait_until(lambda: shard.wal is not None and shard.wal.buffered == 1, 5)
        push.send(routed(trade("BTC-USDT", seq=3, output_sequence=3)))  # the second of batch_trades_max
        assert wait_until(lambda: settled() == 3, 5)
    assert sizes == [1, 2], sizes
