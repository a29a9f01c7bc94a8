"""settle_stage_seconds accounts for every settled trade, and its stages add up to the settle lag.

The stages (intake, commit_wait, fsync, store_wait, read, write) follow one another on the path of a
trade, so each one observes every settled trade once, and their sums together are the lag from the
ME's timestamp to the store's acknowledgement (the last stage ends where the lag is taken).
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.core import config as configmod
from engine.core.metrics import STAGES
from tests.factories import routed, trade
from tests.inprocess import running_shard, wait_until


def histogram_totals(text: str, name: str) -> dict[str, tuple[float, float]]:
    """``{stage label or "": (count, sum)}`` of histogram family ``name`` in an exposition."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            entry = totals.setdefault(sample.labels.get("stage", ""), [0.0, 0.0])
            if sample.name == f"{name}_count":
                entry[0] += sample.value
            elif sample.name == f"{name}_sum":
                entry[1] += sample.value
    return {key: (count, total) for key, (count, total) in totals.items()}


def test_every_stage_observes_every_settled_trade_once_and_the_stages_add_up_to_the_lag(tmp_path: Path) -> None:
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1",
                                   f'store.path="{tmp_path / "s.db"}"', "metrics.enabled=true",
                                   "wal.batch_trades_max=64"])
    total = 3000
    symbols = ("BTC-USDT", "ETH-USDT", "SOL-USDT")
    with running_shard(config, tmp_path) as (shard, push):
        for i in range(1, total + 1):
            push.send(routed(trade(symbols[i % 3], seq=(i + 2) // 3, output_sequence=i,
                                           ts_ns=time.time_ns())))
            if i % 500 == 0:
                time.sleep(0.01)  # several group commits and store batches, not one
        def settled() -> float:
            return histogram_totals(generate_latest(shard.registry).decode(), "settle_lag_seconds")[""][0]

        assert wait_until(lambda: settled() >= total), "the shard did not settle every trade"
        text = generate_latest(shard.registry).decode()
    stages = histogram_totals(text, "settle_stage_seconds")
    lag_count, lag_sum = histogram_totals(text, "settle_lag_seconds")[""]
    assert lag_count == total
    assert set(stages) == set(STAGES)
    assert {stage: count for stage, (count, _) in stages.items()} == dict.fromkeys(STAGES, total)
    stage_sum = sum(seconds for _, seconds in stages.values())
    # Only the moments between one stage's end and the next one's start (a few Python statements each)
    # and the difference between the wall clock and the monotonic one are not in a stage.
    assert 0.8 * lag_sum <= stage_sum <= 1.05 * lag_sum, (stage_sum, lag_sum, stages)
