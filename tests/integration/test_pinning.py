"""Pinning with the real engine: every thread of every process runs on its configured core (/proc)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from engine.core import affinity
from engine.verify.testbed import System

pytestmark = pytest.mark.integration

USABLE = affinity.usable_cores()


def threads_on(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of the process's threads (one set when every thread agrees)."""
    return {frozenset(affinity.read_affinity(pid, int(t.name))) for t in Path(f"/proc/{pid}/task").iterdir()}


def test_every_process_runs_on_its_configured_core(tmp_path: Path) -> None:
    first, last = USABLE[0], USABLE[-1]
    cores = {"supervisor": first, "router": last, "shard-0": first, "shard-1": last}
    system = System(tmp_path, shards=2, overrides={"cpu.supervisor": first, "cpu.router": last,
                                                    "cpu.shards": [first, last]})
    try:
        system.start_engine()
        state = system.state()
        pids = {slot: system.pid(slot) for slot in ("router", "shard-0", "shard-1")}
        pids["supervisor"] = int(state["pid"])
        for slot, pid in pids.items():
            assert threads_on(pid) == {frozenset({cores[slot]})}, (slot, pid)
        old = system.kill("shard-1", signal.SIGKILL)
        new = system.wait_respawned("shard-1", old)
        assert threads_on(new) == {frozenset({last})}  # a respawn lands on its slot's core again
    finally:
        system.stop()
    log = (tmp_path / "logs" / "supervisor.log").read_text()
    assert f"CPU placement (this process may use cores {affinity.format_cores(USABLE)}):" in log
    assert f"  shard-1     core {last}" in log


def test_auto_placement_and_unpinned_slots(tmp_path: Path) -> None:
    """``auto`` spreads the router and shards; the supervisor is not pinned and keeps every core."""
    system = System(tmp_path, shards=2, overrides={"cpu.router": "auto", "cpu.shards": "auto"})
    expected = affinity.plan(system.config, USABLE)
    assert set(expected) == {"router", "shard-0", "shard-1"}
    try:
        system.start_engine()
        assert threads_on(int(system.state()["pid"])) == {frozenset(USABLE)}
        for slot, core in expected.items():
            assert threads_on(system.pid(slot)) == {frozenset({core})}, slot
    finally:
        system.stop()
