"""The whole pipeline as real processes: simulator, supervisor, router, shards, embedded store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core import quarantine
from engine.verify.testbed import System
from tests.inprocess import wait_until

pytestmark = pytest.mark.integration


def assert_exact(system: System) -> None:
    report = system.check()
    assert report.ok, report.format() + "\n" + system.logs()
    assert report.published == system.sim_trades
    assert report.settled == system.sim_trades


def test_settle_demo_verifies_every_trade(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "demo",
            "--trades",
            "30000",
            "--shards",
            "2",
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "published 30000, settled 30000, missing 0" in out.stdout
    assert "verified: every published trade settled exactly once" in out.stdout


def test_sigkill_a_shard_mid_stream_is_respawned_and_loses_nothing(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2)
    try:
        system.start_engine()
        system.start_sim(60_000, rate=8000)
        system.wait_settled(5000, at_least=True)
        old = system.kill("shard-0")
        system.wait_respawned("shard-0", old)
        assert system.state()["slots"]["shard-1"]["restarts"] == 0  # the other shard never stopped
        system.wait_settled()
        assert system.state()["slots"]["shard-0"]["restarts"] >= 1
    finally:
        system.stop()
    assert_exact(system)


def test_sigkill_during_a_group_commit_fsync(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2)
    try:
        system.start_engine()
        system.start_sim(80_000, rate=0)
        system.wait_settled(2000, at_least=True)
        landed = 0
        for _ in range(3):
            old = system.pid("shard-1")
            landed += system.kill_in_syscall("shard-1")
            system.wait_respawned("shard-1", old)
        assert landed >= 1, "no kill landed inside fdatasync"
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


def test_malformed_flood_is_quarantined_while_trades_keep_settling(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2)
    try:
        system.start_engine()
        system.start_sim(20_000, rate=0, extra=["--hostile-every", "10"])
        system.wait_settled()
        wait_until(lambda: len(quarantine.read(tmp_path / "quarantine")) >= 2000, 30)  # asserted exactly below
    finally:
        system.stop()
    assert_exact(system)
    records = quarantine.read(tmp_path / "quarantine")
    assert len(records) == 2000  # one hostile frame every 10 trades, every one accounted for
    reasons = {r["reason"] for r in records}
    assert reasons <= {"malformed", "invalid", "unknown_kind", "oversize", "unsound"}
    assert {"malformed", "invalid", "oversize", "unsound"} <= reasons
    assert all(r["detail"] for r in records)
    assert (tmp_path / "run" / "supervisor.json").exists()
    state = json.loads((tmp_path / "run" / "supervisor.json").read_text())
    assert all(slot["restarts"] == 0 for slot in state["slots"].values())  # nothing crashed


def test_sigterm_stops_in_order_and_leaves_nothing_pending(tmp_path: Path) -> None:
    import signal as sig

    from engine.ops.status import gather
    from engine.verify.testbed import System as _System

    system: _System = System(tmp_path, shards=2)
    try:
        system.start_engine()
        system.start_sim(60_000, rate=10_000)
        system.wait_settled(5_000, at_least=True)
        assert system.engine is not None
        system.engine.send_signal(sig.SIGTERM)
        assert system.engine.wait(90) == 0
        import asyncio

        status = asyncio.run(gather(system.config))
        assert sum(r["pending"] for s in status["shards"] for r in s["symbols"]) == 0  # drained and flushed
        report = system.check(expect_complete=False)
        assert report.ok, report.format()
        # Started again, it finishes the stream (what arrived after intake stopped is replayed).
        system.start_engine()
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    import signal as sig

    # A drain timeout far longer than the test: only the second SIGTERM can end the supervisor in time.
    system = System(tmp_path, shards=2, overrides={"supervisor.drain_timeout_s": 3600.0})
    try:
        system.start_engine()
        system.start_sim(30_000, rate=5_000)
        system.wait_settled(2_000, at_least=True)
        stuck = system.kill("shard-0", sig.SIGSTOP)  # it cannot drain: a first SIGTERM would wait for it
        assert system.engine is not None
        system.engine.send_signal(sig.SIGTERM)
        # The first SIGTERM stops the router first, and the router cannot hand the stuck shard its queue:
        # once it says it is stopping, the supervisor is in its (hour-long) wait for it.
        router_log = tmp_path / "logs" / "router.log"
        assert wait_until(lambda: "router: stopping" in router_log.read_text(), 90), "the router was not stopped"
        assert system.engine.poll() is None  # still waiting for the stuck shard
        system.engine.send_signal(sig.SIGTERM)
        assert system.engine.wait(120) == 1
        if os.path.exists(f"/proc/{stuck}"):
            with open(f"/proc/{stuck}/status") as f:
                assert "zombie" in f.read()  # killed, not left behind
        system.start_engine()
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)
