"""The supervisor halts with a named exit code instead of crash-looping, kills and respawns a hung child,
and halts when a child is not ready in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.core.errors import EXIT_CONFIG, EXIT_CRASH_LOOP, EXIT_FAILURE
from engine.verify.demo import free_port, spawn, start_engine
from engine.verify.testbed import System

pytestmark = pytest.mark.integration


def supervisor_only(system: System) -> subprocess.Popen[bytes]:
    """The supervisor without `settle run`'s preflight, which finds host problems before any child runs."""
    code = ("import sys; from pathlib import Path; from engine.core import config, supervisor; "
            "sys.exit(supervisor.run(config.load(sys.argv[1]), Path(sys.argv[2])))")
    return spawn([sys.executable, "-c", code, str(system.config_path), str(system.root / "logs")],
                 system.root / "logs" / "supervisor.log")


def exit_code(engine: subprocess.Popen[bytes], timeout_s: float = 120.0) -> int | None:
    """The supervisor's exit code; killed (and None) when it has not halted within ``timeout_s``."""
    try:
        return engine.wait(timeout_s)
    except subprocess.TimeoutExpired:
        engine.kill()
        engine.wait()
        return None


def test_a_shard_that_keeps_dying_halts_the_engine_with_crash_loop(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"supervisor.crash_loop_restarts": 3,
                                                    "supervisor.restart_backoff_s_max": 0.2})
    system.config.wal_path(1).parent.mkdir(parents=True, exist_ok=True)
    system.config.wal_path(1).write_text("not a directory")  # shard 1 cannot open its WAL, ever
    engine = supervisor_only(system)  # `settle run` would refuse to start: test_preflight covers that
    assert exit_code(engine) == EXIT_CRASH_LOOP
    log = (tmp_path / "logs" / "supervisor.log").read_text()
    assert "shard-1 died 3 times" in log
    assert str(system.config.wal_path(1)) in (tmp_path / "logs" / "shard-1.log").read_text()


SECRET_FROM_UNSET_ENV = {"store.cassandra.port": 1, "store.cassandra.username": "settle",
                         "store.cassandra.password_env": "SETTLE_TEST_UNSET_PASSWORD_VARIABLE"}


def test_a_config_error_found_before_start_spawns_nothing(tmp_path: Path) -> None:
    """`settle run` checks the host (preflight) before it spawns anything: exit 78, the key named."""
    system = System(tmp_path, shards=2, store="cassandra", overrides=SECRET_FROM_UNSET_ENV)
    engine = start_engine(system.config_path, tmp_path)
    assert exit_code(engine) == EXIT_CONFIG
    log = (tmp_path / "logs" / "supervisor.log").read_text()
    assert "SETTLE_TEST_UNSET_PASSWORD_VARIABLE" in log
    assert "not starting" in log
    assert not (tmp_path / "logs" / "shard-0.log").exists()


def test_a_config_error_in_a_child_halts_at_once(tmp_path: Path) -> None:
    """A child that finds its config wrong exits 78 and the supervisor halts with it (no respawns). The
    supervisor is started without `settle run`'s preflight, which would have caught this one first."""
    system = System(tmp_path, shards=2, store="cassandra", overrides=SECRET_FROM_UNSET_ENV)
    engine = supervisor_only(system)
    assert exit_code(engine) == EXIT_CONFIG
    # Either shard may find it first: the supervisor then stops the other, which may not have got that far.
    shard_logs = [path.read_text() for path in sorted((tmp_path / "logs").glob("shard-*.log"))]
    assert any("SETTLE_TEST_UNSET_PASSWORD_VARIABLE" in log for log in shard_logs), shard_logs
    assert "config error" in (tmp_path / "logs" / "supervisor.log").read_text()


def supervisor_restarts(system: System) -> dict[tuple[str, str], float]:
    """settle_supervisor_restarts_total by (slot, reason), scraped from the supervisor's metrics port."""
    url = f"http://127.0.0.1:{system.config.metrics.supervisor_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.labels["slot"], sample.labels["reason"]): sample.value
            for family in text_string_to_metric_families(text) if family.name == "settle_supervisor_restarts"
            for sample in family.samples if sample.name == "settle_supervisor_restarts_total"}


def kill_children_left(system: System) -> None:
    """SIGKILL the children a supervisor that was itself killed leaves behind (a shard still retrying its
    store when the SIGTERM of PR_SET_PDEATHSIG comes does not stop until its start-up ends)."""
    for slot in system.state()["slots"].values():
        pid = slot["pid"]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = str(system.root).encode() in f.read()
        except (FileNotFoundError, TypeError):
            continue
        if ours:
            os.kill(pid, signal.SIGKILL)


def test_a_hung_shard_is_killed_and_respawned_into_its_slot(tmp_path: Path) -> None:
    """SIGSTOP a ready shard: its lifeline falls silent, and after heartbeat_timeout_s the supervisor kills
    it (a stopped process is not left behind), respawns it into the same slot and counts the restart as
    hung. The other shard is never touched."""
    system = System(tmp_path, shards=2, overrides={"supervisor.heartbeat_timeout_s": 3.0})
    try:
        system.start_engine()
        assert supervisor_restarts(system)[("shard-0", "hung")] == 0
        stuck = system.kill("shard-0", signal.SIGSTOP)
        system.wait_respawned("shard-0", stuck)
        assert not os.path.exists(f"/proc/{stuck}")  # killed and reaped, not stopped forever
        restarts = supervisor_restarts(system)
        assert restarts[("shard-0", "hung")] == 1, restarts
        assert sum(count for (slot, _), count in restarts.items() if slot != "shard-0") == 0, restarts
        assert f"shard-0: pid {stuck} silent for" in (tmp_path / "logs" / "supervisor.log").read_text()
        assert system.state()["slots"]["shard-1"]["restarts"] == 0
    finally:
        system.stop()


def test_a_shard_not_ready_in_time_halts_the_engine(tmp_path: Path) -> None:
    """A shard whose store never answers keeps retrying and never reports ready: after ready_timeout_s
    the supervisor halts with EXIT_FAILURE, naming the slot, and never starts the router."""
    nothing_listens = free_port()
    system = System(tmp_path, shards=1, store="cassandra", overrides={
        "store.cassandra.port": nothing_listens, "supervisor.ready_timeout_s": 3.0,
        "supervisor.drain_timeout_s": 2.0})  # the halt stops the shard: it is in its store retries, not draining
    engine = supervisor_only(system)
    try:
        assert exit_code(engine, timeout_s=90) == EXIT_FAILURE
    finally:
        kill_children_left(system)
    log = (tmp_path / "logs" / "supervisor.log").read_text()
    assert "supervisor halting: not ready after 3s: shard-0" in log
    assert "connect to the store failed" in (tmp_path / "logs" / "shard-0.log").read_text()
    assert not (tmp_path / "logs" / "router.log").exists()
