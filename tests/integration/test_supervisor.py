"""The supervisor halts with a named exit code instead of crash-looping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.errors import EXIT_CONFIG, EXIT_CRASH_LOOP
from engine.verify.demo import spawn, start_engine
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
    shard_log = (tmp_path / "logs" / "shard-0.log").read_text()
    assert "SETTLE_TEST_UNSET_PASSWORD_VARIABLE" in shard_log
    assert "config error" in (tmp_path / "logs" / "supervisor.log").read_text()
