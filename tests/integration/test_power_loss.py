"""Power loss: the shard WALs live on LazyFS, which forgets whatever was not fsynced when the power goes.

SIGKILL keeps the page cache, so a WAL that forgot an fsync passes every kill test; here the machine
loses power at chosen points (inside a group commit, a segment rotation, a checkpoint's deletions, a
`settle recover`, or any moment), comes back with only what was durable, restarts, and the checker
proves from the ME's log that every trade settled exactly once with exact balances.

The ME and the store are other machines: the ME's log and the embedded store stay on the ordinary disk,
the ME keeps running through the outage (trades it publishes meanwhile come back by replay), and only
``<data_dir>/wal`` (a symlink into the mount) loses power.

After every power cut, before anything restarts, one more invariant is checked on the disk as it came
back: *durable before visible*. Every trade the store holds (up to its watermark) must still be in the
durable WAL. The WAL-level test below checks the same of every commit a writer was told was durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.core.wal import ShardWal, scan_stats
from engine.sim.melog import read_all
from engine.verify.lazyfs import MODES, PAGE_BYTES, REPO, LazyFS
from engine.verify.testbed import System
from tests.factories import trade

pytestmark = pytest.mark.integration

SEG = r"\.seg$"
SYMBOLS = 8
SYMBOL_DIR = r"/[A-Z0-9]+-[A-Z0-9]+$"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Tally:
    """Power cuts and the points they landed on, for the assertions and the closing summary."""

    def __init__(self) -> None:
        self.points: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.kills = 0

    def add(self, point: str, report: dict[str, Any]) -> None:
        if report.get("action") == "kill":
            self.kills += 1
            return
        assert "mode" in report, report
        self.points[point] += 1
        self.modes[report["mode"]] += 1

    @property
    def cuts(self) -> int:
        return sum(self.points.values())

    def summary(self) -> str:
        points = ", ".join(f"{p} {n}" for p, n in sorted(self.points.items()))
        modes = ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items()))
        return f"{self.cuts} power cuts ({points}; modes: {modes}); {self.kills} process kills"


# -- the WAL alone ---------------------------------------------------------------------------------------

WAL_WRITER = """
import sys
from pathlib import Path
from engine.core.errors import WalFull
from engine.core.wal import ShardWal
from tests.factories import trade
root, segment_bytes_max, symbols = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")

def append(wal, commits):
    for i, symbol in enumerate(symbols):
        last = wal.last_seq(symbol)
        for seq in range(last + 1, last + 2 + (commits * 7 + i * 13) % 40):  # commits of 1 to 40 records
            wal.append(trade(symbol, seq))

with ShardWal(root, segment_bytes_max=segment_bytes_max, shard=0) as wal:
    wal.recover()
    # What recovery found is what a shard goes on to settle: it must be durable now.
    print("visible", *(wal.last_seq(s) for s in symbols), flush=True)
    commits = 0
    while True:
        append(wal, commits)
        while True:
            try:
                wal.commit()
                break
            except WalFull:  # some symbols were written, not synced; more records go on top of them
                print("full", flush=True)
                sys.stdin.readline()
                append(wal, commits + 1)
        commits += 1
        print("visible", *(wal.last_seq(s) for s in symbols), flush=True)
        if commits % 5 == 0:
            wal.checkpoint({s: max(0, wal.last_seq(s) - 20) for s in symbols})
"""
WAL_SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
WAL_SEGMENT_BYTES = 32768  # a few commits a segment, and commits that span pages


class WalRig:
    def __init__(self, fs: LazyFS, rng: random.Random) -> None:
        self.fs = fs
        self.rng = rng
        self.root = fs.mount / "wal" / "shard-0"
        self.visible = dict.fromkeys(WAL_SYMBOLS, 0)  # the highest seq a writer was told is durable
        self.tally = Tally()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-c", WAL_WRITER, str(self.root), str(WAL_SEGMENT_BYTES), ",".join(WAL_SYMBOLS)]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def reap(self) -> int:
        """Collect what the dead writer said was durable; returns how often it said so."""
        assert self.proc is not None
        out, err = self.proc.communicate()
        assert self.proc.returncode == -9, f"the writer died by itself ({self.proc.returncode}):\n{err}"
        said = sum(self.take(line) for line in out.splitlines())
        self.proc = None
        return said

    def take(self, line: str) -> bool:
        if not line.startswith("visible "):
            return False
        for symbol, seq in zip(WAL_SYMBOLS, line.split()[1:], strict=True):
            self.visible[symbol] = max(self.visible[symbol], int(seq))
        return True

    def arm(self, point: str, **arm: Any) -> None:
        mode = arm.pop("mode", None) or self.rng.choice(MODES)
        self.fs.arm(**arm, mode=mode, seed=self.rng.randrange(1 << 30), label=point)

    def wait(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """The armed fault's report, or None after ``timeout_s``; fails at once when the writer dies on its own."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = self.proc.poll() is not None
            report = self.fs.wait(10 if dead else 0.5)  # a dead writer: was it the armed fault?
            if report is not None:
                return report
            if dead:
                _, err = self.proc.communicate()
                raise AssertionError(f"the writer died by itself ({self.proc.returncode}):\n{err}")
        return None

    def fire(self, point: str, timeout_s: float = 60.0) -> dict[str, Any]:
        assert self.proc is not None
        report = self.wait(timeout_s)
        if report is None:
            report = self.fs.disarm() or self.fs.crash(roots=[self.proc.pid], mode="torn", label="any moment")
            point = "any moment"
        said = self.reap()
        if point == "recover" and said:
            point = "group commit"  # the writer was through its recovery before the armed operation came
        self.tally.add(point, report)
        return report

    def check_durable(self, report: dict[str, Any]) -> None:
        stats = scan_stats(self.root)
        for symbol, seq in self.visible.items():
            durable = stats[symbol].last_seq if symbol in stats else 0
            assert durable >= seq, (
                f"{symbol}: seq {seq} was reported durable, the disk after the power loss holds up to {durable}"
                f"\n{report}\n{self.fs.log()}"
            )

    def round(self, point: str, **arm: Any) -> None:
        """Start a writer, lose power at ``point``, check what the disk kept."""
        self.start()
        self.arm(point, **arm)
        report = self.fire(point)
        self.check_durable(report)

    def kill_then_cut(self, point: str, kill: dict[str, Any], cut: dict[str, Any]) -> None:
        """A process crash at ``kill`` (the page cache survives), a restart that recovers what it left, then
        a power loss at ``cut`` on the same symbol's segments: what the restart recovered, and what it
        appended after it, must be durable."""
        self.start()
        self.fs.arm(**kill, action="kill", label=point + " kill")
        killed = self.fire(point)
        self.arm(point, **cut, path=same_symbol(killed["op"]), mode="drop")  # torn survivors could hide a loss
        self.start()
        report = self.fire(point)
        self.check_durable(report)


    def full_then_cut(self, point: str, *, skip: int) -> None:
        """A commit fails on a full disk after writing some symbols; the retry appends more records on top of
        those unsynced ones. Power goes at the retry's first fsync: only that commit may be torn."""
        self.start()
        self.fs.arm({"write"}, path=SEG, skip=skip, action="fail", error=errno.ENOSPC, label=point + " ENOSPC")
        assert self.wait() is not None
        assert self.proc is not None
        assert self.proc.stdout is not None
        assert self.proc.stdin is not None
        while (line := self.proc.stdout.readline()) != "full\n":
            assert self.take(line), f"the writer said {line!r} instead of reporting the full disk"
        self.arm(point, ops={"fsync"}, path=SEG, pending=True, mode="pages")  # a hole, records after it
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        report = self.fire(point)
        self.check_durable(report)


def same_symbol(op: str) -> str:
    """A regex for the segments of the symbol that ``op`` ("before fsyncdir /wal/shard-0/BTC-USDT") touched."""
    match = re.search(r"(/[A-Z0-9]+-[A-Z0-9]+)(/|$)", op)
    assert match is not None, op
    return re.escape(match.group(1)) + r"/\d+\.seg$"


def test_wal_keeps_every_commit_it_acknowledged_through_power_cuts(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    with LazyFS(tmp_path / "lazyfs") as fs:
        (fs.mount / "wal").mkdir()
        fsync_dir(fs.mount)
        rig = WalRig(fs, rng)
        for _ in range(3):
            when = rng.choice(["before", "after"])
            rig.round("group commit", ops={"fsync"}, path=SEG, pending=True, when="before", skip=rng.randrange(30))
            rig.round("group commit", ops={"fsync"}, path=SEG, pending=True, when="after", skip=rng.randrange(30))
            rig.round("rotation", ops={"create"}, path=SEG, when=when, skip=rng.randrange(4))
            rig.round("rotation", ops={"fsyncdir"}, path=SYMBOL_DIR, dirty="create", when=when,
                      skip=rng.randrange(4))
            rig.round("checkpoint", ops={"unlink"}, path=SEG, when=when, skip=rng.randrange(3))
            rig.round("checkpoint", ops={"fsyncdir"}, path=SYMBOL_DIR, dirty="unlink", when=when)
            # Armed before the writer starts: the first operations are its recovery's.
            rig.round("recover", ops={"fsync", "fsyncdir", "truncate", "write"}, skip=rng.randrange(8))
            rig.kill_then_cut(
                "recover after a kill",
                kill={"ops": {"fsync"}, "path": SEG, "pending": True, "skip": rng.randrange(20)},
                cut={"ops": {"fsync"}, "pending": True},
            )
            rig.kill_then_cut(
                "recover after a kill",
                kill={"ops": {"fsyncdir"}, "path": SYMBOL_DIR, "dirty": "create", "skip": rng.randrange(3)},
                cut={"ops": {"fsync"}, "skip": 1 + rng.randrange(2)},
            )
            for _ in range(3):
                rig.full_then_cut("commit after a full disk", skip=1 + rng.randrange(20))
        # Everything the writers were told is durable reads back, in order, exactly.
        with ShardWal(rig.root, segment_bytes_max=WAL_SEGMENT_BYTES, shard=0) as wal:
            wal.recover()
            for symbol, seq in rig.visible.items():
                last = wal.last_seq(symbol)
                assert last >= seq
                first = scan_stats(rig.root)[symbol].first_seq or last + 1
                assert list(wal.read_after(symbol, first - 1)) == [trade(symbol, s) for s in range(first, last + 1)]
    print(f"\nWAL: {rig.tally.summary()}; {sum(rig.visible.values())} acknowledged records checked")
    assert rig.tally.cuts >= 27
    assert set(rig.tally.points) == {"group commit", "rotation", "checkpoint", "recover",
                                     "recover after a kill", "commit after a full disk"}
    assert set(rig.tally.modes) == set(MODES)


# -- the whole system ------------------------------------------------------------------------------------


class SystemRig:
    """The engine with its WALs on LazyFS; the simulator and the store on the ordinary disk."""

    def __init__(self, tmp_path: Path, fs: LazyFS, *, shards: int = 2, seed: int = 1) -> None:
        self.fs = fs
        self.rng = random.Random(seed)
        (fs.mount / "wal").mkdir()
        fsync_dir(fs.mount)
        self.system = System(tmp_path / "settle", shards=shards,
                             overrides={"wal.segment_bytes_max": 65536, "supervisor.restart_backoff_s_max": 0.2})
        (self.system.root / "wal").symlink_to(fs.mount / "wal")
        self.tally = Tally()
        self.rate = 0

    @property
    def engine_pid(self) -> int:
        pid = self.system.engine_pid
        assert pid is not None, f"the engine is not running:\n{self.system.logs()}"
        return pid

    def start(self, rate: int) -> None:
        """The engine, then the ME publishing ``rate`` trades/s until :meth:`finish`: every cut is under load."""
        self.rate = rate
        self.system.start_engine()
        self.system.start_sim(0, rate=rate, symbols=SYMBOLS)
        self.system.wait_settled(1000, at_least=True)

    def restart(self, timeout_s: float = 120.0) -> None:
        self.system.restart_engine()
        deadline = time.monotonic() + timeout_s
        while not self.system.engine_ready():
            assert self.system.engine is not None
            if self.system.engine.poll() is not None or time.monotonic() > deadline:
                logs = self.system.logs()
                damage = "\n".join(line for line in logs.splitlines() if "WAL segment" in line)
                raise AssertionError(f"the engine did not come back after the power loss:\n{damage}\n{logs}")
            time.sleep(0.05)

    def reap_engine(self) -> None:
        assert self.system.engine is not None
        self.system.engine.wait()

    def arm(self, point: str, **arm: Any) -> None:
        mode = arm.pop("mode", None) or self.rng.choice(MODES)
        self.fs.arm(**arm, roots=[self.engine_pid], mode=mode, seed=self.rng.randrange(1 << 30), label=point)

    def wait(self, point: str, timeout_s: float = 60.0) -> dict[str, Any]:
        report = self.fs.wait(timeout_s)
        if report is None:  # the point did not come up in time: cut the power now instead
            report = self.fs.disarm() or self.fs.crash(roots=[self.engine_pid], mode="torn", label="any moment")
            point = "any moment"
        self.tally.add(point, report)
        return report

    def check_durable_before_visible(self, report: dict[str, Any]) -> None:
        """Every trade the store holds is still in the WAL that came back (checkpoints delete only whole
        segments and never the last one, so the durable log reaches at least the watermark)."""
        durable: dict[str, int] = {}
        for shard in range(self.system.config.shard_count):
            for symbol, stats in scan_stats(self.system.config.wal_path(shard)).items():
                if self.system.shard_of(symbol) == shard:
                    durable[symbol] = stats.last_seq
        for symbol, watermark in self.system.watermarks().items():
            assert durable.get(symbol, 0) >= watermark, (
                f"{symbol}: the store holds up to seq {watermark}, the WAL after the power loss only up to "
                f"{durable.get(symbol, 0)}: a store write came before its WAL record was durable\n{report}"
            )

    def cut(self, point: str, *, backlog_s: float = 0.0, **arm: Any) -> dict[str, Any]:
        """Lose power at ``point`` under load, check the disk, bring the engine back. With ``backlog_s``, the
        router is stopped that long once the cut is armed, and the shards then take the ME's backlog at once:
        group commits of many pages whatever the disk (on a fast one, live commits hold a few trades)."""
        if arm:
            self.arm(point, **arm)
            if backlog_s:
                self.hold_router(backlog_s)
            report = self.wait(point)
        else:
            time.sleep(self.rng.uniform(0.0, 1.0))
            report = self.fs.crash(roots=[self.engine_pid], mode=self.rng.choice(MODES),
                                   seed=self.rng.randrange(1 << 30), label=point)
            self.tally.add(point, report)
        self.reap_engine()
        self.check_durable_before_visible(report)
        self.restart()
        return report

    def hold_router(self, seconds: float) -> None:
        """Stop the router for ``seconds``. The armed cut may come meanwhile (a shard catching up by replay,
        which does not pass the router, commits many pages too) and SIGKILL it with the rest of the engine."""
        pid = int(self.system.state()["slots"]["router"]["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)  # the ME's trades queue up meanwhile: the backlog this is for
            finally:
                os.kill(pid, signal.SIGCONT)

    def kill_then_cut(self, point: str, kill: dict[str, Any], cut: dict[str, Any]) -> None:
        """SIGKILL a shard at ``kill`` (the supervisor respawns it; it recovers from the page cache), then lose
        power at ``cut`` on the same symbol's segments, armed the moment the kill lands."""
        # Mode "drop": a torn survivor of the unsynced writes could hide the very records in question.
        then = {**cut, "path": r"{dir}/\d+\.seg$", "roots": [self.engine_pid], "mode": "drop", "label": point}
        self.fs.arm(**kill, action="kill", label=point + " kill", then=then)
        report = self.fs.wait(60)
        assert report is not None, f"the shard never reached {kill} and {cut}:\n{self.system.logs()}"
        assert [r["action"] for r in report["before"]] == ["kill"]
        self.tally.add(point, report["before"][0])
        self.tally.add(point, report)
        self.reap_engine()
        self.check_durable_before_visible(report)
        self.restart()

    def recover_with_power_cut(self, shard: int, **arm: Any) -> None:
        """Run `settle recover --shard N` and lose power in the middle of it, then recover again."""
        self.fs.arm(**arm, mode=self.rng.choice(MODES), seed=self.rng.randrange(1 << 30), label="recover")
        done = settle(self.system, "recover", "--shard", str(shard))
        report = self.fs.disarm()
        if report is not None:
            assert done.returncode == -9, done.stderr
            self.tally.add("recover", report)
            self.check_durable_before_visible(report)
        else:
            assert done.returncode == 0, done.stderr
        again = settle(self.system, "recover", "--shard", str(shard))
        assert again.returncode == 0, again.stderr

    def finish(self) -> None:
        """Stop publishing (a simulator restarted on its log, with nothing left to publish, goes on serving
        replays), let the engine catch up, stop everything, and check the store against the ME's log."""
        self.system.stop_sim()
        total = sum(1 for _ in read_all(str(self.system.log_path)))
        self.system.start_sim(total, rate=self.rate, symbols=SYMBOLS)
        try:
            self.system.wait_settled(total, timeout_s=120)
        finally:
            self.system.stop()
        report = self.system.check()
        assert report.ok, report.format() + "\n" + self.system.logs()
        assert report.published == total
        assert report.settled == total
        print(f"\nsystem: {self.tally.summary()}; {report.published} trades checked: settled "
              f"{report.settled}, missing {report.missing_count}, unexpected {report.unexpected_count}")


def settle(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args, "--config", str(system.config_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[SystemRig]:
    with LazyFS(tmp_path / "lazyfs") as fs:
        rig = SystemRig(tmp_path, fs)
        try:
            yield rig
        finally:
            rig.system.stop()


def test_power_cuts_in_group_commits_and_segment_rotations(rig: SystemRig) -> None:
    rng = rig.rng
    rig.start(rate=1500)
    rig.cut("group commit", ops={"fsync"}, path=SEG, pending=True, when="before", skip=rng.randrange(100))
    rig.cut("group commit", ops={"fsync"}, path=SEG, pending=True, when="after", skip=rng.randrange(100))
    # A commit of several pages, torn by a disk that reorders: a hole, then sound records of the same commit.
    rig.cut("group commit", ops={"write"}, path=SEG, when="after", min_bytes=3 * PAGE_BYTES, mode="pages",
            backlog_s=2.0)
    rig.cut("rotation", ops={"create"}, path=SEG, when="after", skip=rng.randrange(3))
    rig.cut("rotation", ops={"fsyncdir"}, path=SYMBOL_DIR, dirty="create", when="before")
    rig.cut("rotation", ops={"fsyncdir"}, path=SYMBOL_DIR, dirty="create", when="after")
    rig.finish()
    assert rig.tally.points["group commit"] == 3
    assert rig.tally.points["rotation"] == 3


def test_power_cuts_in_checkpoints_and_segment_deletions(rig: SystemRig) -> None:
    rng = rig.rng
    rig.start(rate=1500)
    rig.cut("checkpoint", ops={"unlink"}, path=SEG, when="before", skip=rng.randrange(3))
    rig.cut("checkpoint", ops={"unlink"}, path=SEG, when="after", skip=rng.randrange(3))
    rig.cut("checkpoint", ops={"fsyncdir"}, path=SYMBOL_DIR, dirty="unlink", when="before")
    rig.cut("checkpoint", ops={"fsyncdir"}, path=SYMBOL_DIR, dirty="unlink", when="after")
    rig.cut("any moment")
    rig.finish()
    assert rig.tally.points["checkpoint"] == 4


def test_power_cuts_during_recovery(rig: SystemRig) -> None:
    rng = rig.rng
    rig.start(rate=1500)
    rig.cut("any moment")
    # The catch-up after the restart writes big commits: tear one with a reordering disk.
    rig.arm("group commit", ops={"write"}, path=SEG, when="after", min_bytes=3 * PAGE_BYTES, mode="pages")
    rig.wait("group commit")
    rig.reap_engine()
    # The engine is down; an operator runs recover on each shard, and the power goes again.
    for shard in range(2):
        rig.recover_with_power_cut(shard, ops={"fsync", "fsyncdir", "truncate", "unlink", "write"},
                                   skip=rng.randrange(6))
    rig.restart()
    # A shard killed before its fdatasync recovers records that are only in the page cache, and re-settles
    # them: they must be made durable before that, or the next power loss takes them from under the store.
    rig.kill_then_cut(
        "recover after a kill",
        kill={"ops": {"fsync"}, "path": SEG, "pending": True, "skip": rng.randrange(50)},
        cut={"ops": {"fsync"}, "path": SEG, "pending": True},
    )
    # A shard killed between creating a segment and fsyncing its directory: the respawned one appends to it.
    rig.kill_then_cut(
        "recover after a kill",
        kill={"ops": {"fsyncdir"}, "path": SYMBOL_DIR, "dirty": "create"},
        cut={"ops": {"fsync"}, "path": SEG, "skip": 2 + rng.randrange(5)},
    )
    rig.finish()
    assert rig.tally.points["recover"] >= 1
    assert rig.tally.points["recover after a kill"] == 2


def test_wal_dir_is_really_on_the_lazy_file_system(rig: SystemRig) -> None:
    """The rig's premise: the WAL the engine writes is the one LazyFS forgets."""
    rig.start(rate=5000)
    wal = rig.system.config.wal_path(0)
    assert os.path.realpath(wal).startswith(str(rig.fs.mount) + "/")
    assert re.search(r"\.seg$", str(next(wal.glob("*/*.seg"))))
    assert rig.fs.stats()["counts"].get("fsync", 0) > 0
    rig.finish()
