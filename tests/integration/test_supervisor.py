"""The supervisor halts with a named exit code instead of crash-looping."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.demo import start_engine
from engine.errors import EXIT_CONFIG, EXIT_CRASH_LOOP
from engine.testbed import System

pytestmark = pytest.mark.integration


def test_a_shard_that_keeps_dying_halts_the_engine_with_crash_loop(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"supervisor.crash_loop_restarts": 3,
                                                    "supervisor.restart_backoff_s_max": 0.2})
    system.config.wal_path(1).parent.mkdir(parents=True, exist_ok=True)
    system.config.wal_path(1).write_text("not a directory")  # shard 1 cannot open its WAL, ever
    engine = start_engine(system.config_path, tmp_path)
    try:
        assert engine.wait(120) == EXIT_CRASH_LOOP
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    log = (tmp_path / "logs" / "supervisor.log").read_text()
    assert "shard-1 died 3 times" in log
    assert str(system.config.wal_path(1)) in (tmp_path / "logs" / "shard-1.log").read_text()


def test_a_config_error_at_boot_halts_at_once(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, store="cassandra", overrides={
        "store.cassandra.port": 1, "store.cassandra.username": "settle",
        "store.cassandra.password_env": "SETTLE_TEST_UNSET_PASSWORD_VARIABLE"})
    engine = start_engine(system.config_path, tmp_path)
    try:
        assert engine.wait(120) == EXIT_CONFIG
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    shard_log = (tmp_path / "logs" / "shard-0.log").read_text()
    assert "SETTLE_TEST_UNSET_PASSWORD_VARIABLE" in shard_log
    assert "config error" in (tmp_path / "logs" / "supervisor.log").read_text()
