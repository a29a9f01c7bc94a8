"""Operator commands against a real run: status, balances, check, recover (torn tail, damage, lost disk)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.core.errors import EXIT_WAL_CORRUPT
from engine.core.records import HEADER_BYTES, scan
from engine.core.wal import TYPE_COMMIT_START
from engine.verify.demo import start_engine
from engine.verify.testbed import System
from tests.integration.test_pipeline import assert_exact

pytestmark = pytest.mark.integration

HALT_TIMEOUT_S = 600.0  # a hang guard: on a loaded machine one shard's start alone has taken 40 s


def settle(system: System, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "engine.cli", *args, "--config", str(system.config_path)],
                         capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def crash_everything(system: System) -> None:
    """SIGKILL the supervisor and every child at once: nothing drains, nothing flushes."""
    state = system.state()
    pids = [state["pid"], *(s["pid"] for s in state["slots"].values() if s["pid"])]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert system.engine is not None
    system.engine.wait()
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text():
            time.sleep(0.05)


def halted_with(engine: subprocess.Popen[bytes], system: System, timeout_s: float = HALT_TIMEOUT_S) -> int:
    """The exit code of ENGINE, a ``settle run`` expected to halt on its own. Past TIMEOUT_S (a hang guard,
    not a speed limit) it is killed, reaped, and the test fails with its logs."""
    try:
        return engine.wait(timeout_s)
    except subprocess.TimeoutExpired:
        engine.kill()  # its children get SIGTERM from the kernel when it dies (PR_SET_PDEATHSIG)
        engine.wait()
        pytest.fail(f"settle run did not halt within {timeout_s:.0f} s\n{system.logs()}")


def segments(system: System, shard: int) -> list[Path]:
    return sorted(system.config.wal_path(shard).glob("*/*.seg"))


def test_status_balances_and_check_read_the_store(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2)
    try:
        system.start_engine()
        system.start_sim(5_000)
        system.wait_settled()
        status = json.loads(settle(system, "status", "--json").stdout)
        assert [s["shard"] for s in status["shards"]] == [0, 1]
        assert all(s["ready"] for s in status["shards"])
        assert sum(r["watermark"] for s in status["shards"] for r in s["symbols"]) == 5_000
        assert all(system.shard_of(r["symbol"]) == s["shard"] for s in status["shards"] for r in s["symbols"])
        text = settle(system, "status").stdout
        assert "shard 0: ready" in text
        assert "watermark" in text
    finally:
        system.stop()
    from engine.verify.checker import expected_balances

    expected = expected_balances(str(system.log_path), 0)
    account = next(a for (a, _asset) in expected if a != 0)
    balances = json.loads(settle(system, "balances", str(account), "--json").stdout)["balances"]
    assert balances == {asset: v for (a, asset), v in expected.items() if a == account and v}
    assert "missing 0" in settle(system, "check", "--log", str(system.log_path)).stdout


def test_recover_resettles_what_a_crash_left_pending(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"store.path": str(tmp_path / "settle.db")})
    try:
        system.start_engine()
        system.start_sim(200_000, rate=0)
        system.wait_settled(20_000, at_least=True)
        crash_everything(system)
        assert system.sim is not None
        system.sim.kill()
        system.sim.wait()
        before = json.loads(settle(system, "status", "--json").stdout)
        for shard in (0, 1):
            out = settle(system, "recover", "--shard", str(shard))
            assert f"shard {shard}:" in out.stdout
        after = json.loads(settle(system, "status", "--json").stdout)
        assert sum(r["pending"] for s in after["shards"] for r in s["symbols"]) == 0
        pending_before = sum(r["pending"] for s in before["shards"] for r in s["symbols"])
        settled_before = sum(r["watermark"] for s in before["shards"] for r in s["symbols"])
        assert pending_before > 0, "the crash left nothing pending: the test proves nothing"
        assert sum(r["watermark"] for s in after["shards"] for r in s["symbols"]) == settled_before + pending_before
        report = system.check(expect_complete=False)
        assert report.ok, report.format()
        # Then the engine and the ME come back and finish the job.
        system.start_engine()
        system.start_sim(200_000, rate=0)
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


def mid_log_damage(paths: list[Path]) -> tuple[Path, int] | None:
    """In one symbol's segments (oldest first): a segment and the offset of a byte inside a record's payload
    that a later commit follows, in the same segment or a later one. A flipped byte there can only be
    corruption, never a torn tail (the WAL truncates damage after which no commit starts). None if the
    symbol has no such record."""
    for index, path in enumerate(paths):
        records = scan(path.read_bytes()).records
        commit_starts = [offset for offset, kind, _ in records if kind == TYPE_COMMIT_START]
        for offset, _kind, _payload in records:
            if index < len(paths) - 1 or any(start > offset for start in commit_starts):
                return path, offset + HEADER_BYTES  # the payload's first byte: its checksum fails
    return None


def test_torn_tail_is_truncated_and_mid_segment_damage_halts_until_recover(tmp_path: Path) -> None:
    # At most 32 trades per group commit, so a full segment (8 KiB) always holds several commits, however
    # far behind a loaded machine runs: there is mid-segment damage to make, whatever the timing.
    system = System(tmp_path, shards=1, overrides={"wal.segment_bytes_max": 8192, "wal.batch_trades_max": 32})
    try:
        system.start_engine()
        system.start_sim(20_000, rate=5_000)
        system.wait_settled(3_000, at_least=True)
        crash_everything(system)
        segs = segments(system, 0)
        # A torn tail on one symbol: the last segment cut in the middle of its last record.
        last = max((p for p in segs), key=lambda p: (p.parent.name, p.name))
        by_symbol: dict[str, list[Path]] = {}
        for p in segs:
            by_symbol.setdefault(p.parent.name, []).append(p)
        torn_symbol, *others = sorted(by_symbol)
        tail = by_symbol[torn_symbol][-1]
        with open(tail, "r+b") as f:
            f.truncate(tail.stat().st_size - 7)
        # Damage in the middle of another symbol's log (a flipped byte, a later commit after it).
        spots = [spot for symbol in others if (spot := mid_log_damage(by_symbol[symbol])) is not None]
        assert spots, f"no record with a later commit after it in any of {others}: {segs}"
        middle, at = spots[0]
        data = bytearray(middle.read_bytes())
        data[at] ^= 0xFF
        middle.write_bytes(bytes(data))
        assert last.exists()
        # The engine refuses to start: the shard exits EXIT_WAL_CORRUPT and the supervisor halts with it.
        assert halted_with(start_engine(system.config_path, tmp_path), system) == EXIT_WAL_CORRUPT
        log = (tmp_path / "logs" / "shard-0.log").read_text()
        assert str(middle) in log
        assert "settle recover --shard 0" in log
        refused = settle(system, "recover", "--shard", "0", check=False)
        assert refused.returncode == EXIT_WAL_CORRUPT
        assert "--repair-corruption" in refused.stderr
        repaired = settle(system, "recover", "--shard", "0", "--repair-corruption")
        assert "truncated" in repaired.stdout
        system.start_engine()  # the simulator kept running: it serves what the shard is missing
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


def test_recover_from_store_after_the_disk_is_lost(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2)
    try:
        system.start_engine()
        system.start_sim(30_000, rate=10_000)
        system.wait_settled(5_000, at_least=True)
        crash_everything(system)  # the ME keeps running: it serves the replay
        import shutil

        shutil.rmtree(system.config.wal_path(0))
        out = settle(system, "recover", "--shard", "0", "--from-store")
        assert "replayed from the ME" in out.stdout
        system.start_engine()
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)
