"""The faults of ``settle chaos``: the schedule drawn from a seed, and the tools that inject each fault.

- :func:`plan` draws the whole fault schedule up front from the seed: the same seed and settings give
  the same list of :class:`Fault` (time offset, kind, target, duration, parameter), whatever happens;
  ``KINDS`` are those of the one-host run, ``CLUSTER_KINDS`` those of ``settle chaos --cluster``.
- :class:`CassandraNode` starts, SIGKILLs and restarts a Cassandra through ``ops/cassandra/cassandra.sh``
  (what an operator has in a checkout; ``engine/`` never imports ``tests/``).
- :class:`WalDisk` mounts a small tmpfs under a shard's WAL directory and fills it on demand.
- :class:`WalPower` puts each shard's WAL directory on a LazyFS (:mod:`engine.verify.lazyfs`), over that tmpfs
  when there is one, and cuts the power under all of them at once.
- :func:`tear_wal` cuts a symbol's last WAL segment at a random byte.
- :func:`garbage_burst` builds raw hostile frames (huge ones too) to push straight into a shard's socket;
  :func:`me_hostile_frames` re-derives the hostile frames a simulator run published.
- :func:`frame_key` / :func:`quarantine_keys` / :func:`account_hostile` match every hostile frame sent to
  one quarantine record: ``(length, sha256 of the first bytes kept)``; :class:`QuarantineTally` counts
  records as they come.
- :func:`unexpected_deaths` reads the supervisors' log for deaths nobody caused; :func:`engine_processes`
  finds a run's processes by their config, to catch orphans.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.core.quarantine import FRAME_BYTES_KEPT
from engine.core.quarantine import read as read_quarantine
from engine.sim import hostile
from engine.verify.lazyfs import MODES as POWER_MODES
from engine.verify.lazyfs import LazyFS, cut_power
from engine.verify.servers import alive, script_env, threads_left

# -- the schedule -------------------------------------------------------------------------------------

SHARD_KILL: Final = "shard_kill"
ROUTER_KILL: Final = "router_kill"
SUPERVISOR_KILL: Final = "supervisor_kill"
POWER_LOSS: Final = "power_loss"
CASSANDRA_KILL: Final = "cassandra_kill"
TORN_WRITE: Final = "torn_write"
DISK_FULL: Final = "disk_full"
ME_DROP: Final = "me_drop"
HOSTILE_FLOOD: Final = "hostile_flood"
GARBAGE: Final = "garbage"
KINDS: Final = (SHARD_KILL, ROUTER_KILL, SUPERVISOR_KILL, POWER_LOSS, CASSANDRA_KILL, TORN_WRITE, DISK_FULL,
                ME_DROP, HOSTILE_FLOOD, GARBAGE)  # fmt: skip
# The kinds of ``settle chaos --cluster`` (engine.verify.chaos_cluster): the Kafka mode on two hosts, three
# brokers and a 3-node Cassandra.
CASSANDRA_NODE_KILL: Final = "cassandra_node_kill"  # one node of the cluster SIGKILLed, restarted later
BROKER_KILL: Final = "broker_kill"  # the broker leading most of the topic's partitions SIGKILLed, restarted
HOST_PARTITION: Final = "host_partition"  # one settle host cut off from every broker, then reconnected
CLUSTER_KINDS: Final = (CASSANDRA_NODE_KILL, BROKER_KILL, HOST_PARTITION)
CLUSTER_HOSTS: Final = ("a", "b")
CASSANDRA_NODES: Final = 3
WEIGHTS: Final = {SHARD_KILL: 3, ROUTER_KILL: 2, SUPERVISOR_KILL: 1, POWER_LOSS: 1, CASSANDRA_KILL: 1,
                  TORN_WRITE: 2, DISK_FULL: 2, ME_DROP: 2, HOSTILE_FLOOD: 1, GARBAGE: 2,
                  CASSANDRA_NODE_KILL: 1, BROKER_KILL: 1, HOST_PARTITION: 1}  # fmt: skip
ENGINE_KINDS: Final = frozenset({SHARD_KILL, ROUTER_KILL, SUPERVISOR_KILL, POWER_LOSS, TORN_WRITE})
WHOLE_ENGINE_KINDS: Final = frozenset({SUPERVISOR_KILL, POWER_LOSS})  # every slot goes down
FAULT_INTERVAL_S: Final = 6.0  # default density: one fault per this many seconds of the window

# Spacing the schedule keeps, in seconds (see _conflict).
SLOT_KILL_GAP_S: Final = 5.0  # between two kills of one slot
SLOT_KILLS_PER_MINUTE_MAX: Final = 4  # the supervisor halts a slot that dies 8 times a minute: stay far below
SUPERVISOR_GAP_S: Final = 25.0  # between two takedowns of the whole engine (supervisor kill, power loss)
CASSANDRA_RESTART_S: Final = 15.0  # a restart takes 3-10 s; keep outages apart
# One cluster node, one broker, one host down at a time: RF 3 with LOCAL_QUORUM (and min.insync.replicas 2)
# keeps working with one replica gone, not two. On the 2-core box with all of the cluster on it, a
# Cassandra node's restart took 33-44 s (it rejoins the ring and replays its commit log) and a broker's
# 33-37 s (it catches up with the quorum before it answers); a host rejoins its group within seconds.
# A start due while its resource is still restarting waits (engine.verify.chaos_cluster).
CLUSTER_NODE_RESTART_S: Final = 45.0
BROKER_RESTART_S: Final = 35.0
HOST_REJOIN_S: Final = 10.0
ME_GAP_S: Final = 3.0
SETTLE_AFTER_S: Final = 5.0  # a burst of hostile frames is read and quarantined well within this


@dataclass(frozen=True, slots=True)
class Fault:
    at_s: float  # offset from the start of the soak
    kind: str
    target: str  # "shard-N", "router", "supervisor", "engine" (power loss), "cassandra", "me";
    # --cluster: "node-K" (Cassandra node K), "leaders" (resolved when it strikes), "host-a" / "host-b"
    duration_s: float = 0.0  # episodes (cassandra down, disk full, ME mode): how long until healed
    param: int = 0  # kind-specific: drop ppm, hostile every N trades, a seed for the cut, burst or power loss

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    def describe(self) -> str:
        text = f"{self.kind:<19} {self.target:<10}"
        if self.kind == ME_DROP:
            text += f" drop {self.param / 10_000:.2f}% for {self.duration_s:.1f}s"
        elif self.kind == HOSTILE_FLOOD:
            text += f" one hostile frame every {self.param} trades for {self.duration_s:.1f}s"
        elif self.duration_s:
            text += f" for {self.duration_s:.1f}s"
        elif self.kind in (TORN_WRITE, GARBAGE):
            text += f" (draw {self.param})"
        elif self.kind == POWER_LOSS:
            text += f" mode {power_mode(self.param)} (draw {self.param})"
        return text


def power_mode(draw: int) -> str:
    """What survives of the unsynced WAL writes in a power loss (see :mod:`engine.verify.lazyfs`)."""
    return POWER_MODES[draw % len(POWER_MODES)]


def plan(
    seed: int, *, start_s: float, end_s: float, shards: int, kinds: tuple[str, ...] = KINDS, count: int = 0
) -> list[Fault]:
    """The fault schedule: a pure function of its arguments. Every kind in ``kinds`` appears at least once
    (when the window has room for it); ``count`` (default: one per FAULT_INTERVAL_S) faults in all."""
    assert end_s > start_s >= 0, (start_s, end_s)
    rng = random.Random(f"settle-chaos-plan:{seed}")
    count = max(count or round((end_s - start_s) / FAULT_INTERVAL_S), len(kinds))
    extra = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds], k=count - len(kinds))
    chosen: list[Fault] = []
    for kind in [*kinds, *extra]:  # every kind is placed first, while the window is empty
        for _ in range(200):
            fault = _draw(rng, kind, start_s, end_s, shards)
            if not any(_conflict(fault, other) or _conflict(other, fault) for other in chosen) and (
                _kills_per_minute_ok(fault, chosen)
            ):
                chosen.append(fault)
                break
    return sorted(chosen, key=lambda f: (f.at_s, f.kind, f.target))


def _draw(rng: random.Random, kind: str, start_s: float, end_s: float, shards: int) -> Fault:
    at = round(rng.uniform(start_s, end_s), 1)
    shard = f"shard-{rng.randrange(shards)}"
    if kind == SHARD_KILL:
        return Fault(at, kind, shard)
    if kind == ROUTER_KILL:
        return Fault(at, kind, "router")
    if kind == SUPERVISOR_KILL:
        return Fault(at, kind, "supervisor")
    if kind == POWER_LOSS:
        return Fault(at, kind, "engine", param=rng.getrandbits(32))
    if kind == CASSANDRA_KILL:
        return Fault(at, kind, "cassandra", round(rng.uniform(1.0, 6.0), 1))
    if kind == TORN_WRITE:
        return Fault(at, kind, shard, param=rng.getrandbits(32))
    if kind == DISK_FULL:
        return Fault(at, kind, shard, round(rng.uniform(3.0, 10.0), 1))
    if kind == ME_DROP:
        return Fault(at, kind, "me", round(rng.uniform(3.0, 10.0), 1), param=rng.randint(50, 500) * 100)
    if kind == HOSTILE_FLOOD:
        return Fault(at, kind, "me", round(rng.uniform(3.0, 8.0), 1), param=rng.choice((10, 20, 50, 100)))
    if kind == GARBAGE:
        return Fault(at, kind, shard, param=rng.getrandbits(32))
    if kind == CASSANDRA_NODE_KILL:
        return Fault(at, kind, f"node-{rng.randint(1, CASSANDRA_NODES)}", round(rng.uniform(2.0, 8.0), 1))
    if kind == BROKER_KILL:
        return Fault(at, kind, "leaders", round(rng.uniform(2.0, 8.0), 1))
    if kind == HOST_PARTITION:  # longer than the group's session timeout (3 s): the partitions move
        return Fault(at, kind, f"host-{rng.choice(CLUSTER_HOSTS)}", round(rng.uniform(6.0, 15.0), 1))
    raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(KINDS)}")


def busy(f: Fault) -> tuple[float, float]:
    """The interval a fault occupies its resource, restart time included."""
    if f.kind == CASSANDRA_KILL:
        return f.at_s, f.end_s + CASSANDRA_RESTART_S
    if f.kind == CASSANDRA_NODE_KILL:
        return f.at_s, f.end_s + CLUSTER_NODE_RESTART_S
    if f.kind == BROKER_KILL:
        return f.at_s, f.end_s + BROKER_RESTART_S
    if f.kind == HOST_PARTITION:
        return f.at_s, f.end_s + HOST_REJOIN_S
    if f.kind in (ME_DROP, HOSTILE_FLOOD):
        return f.at_s - ME_GAP_S, f.end_s + ME_GAP_S
    return f.at_s, f.end_s


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _kills(f: Fault, slot: str) -> bool:
    """Does ``f`` kill ``slot`` (a supervisor kill or a power loss takes every child down with it)?"""
    return f.kind in WHOLE_ENGINE_KINDS or (f.kind in (SHARD_KILL, TORN_WRITE) and f.target == slot) or (
        f.kind == ROUTER_KILL and slot == "router"
    )


def _conflict(f: Fault, other: Fault) -> bool:
    """Pairs the schedule keeps apart: one resource's episodes, kills too close for the crash-loop guard,
    and kills that would lose hostile frames before their receiver read them (so that every hostile frame
    can be required in quarantine)."""
    if f.kind == other.kind and f.kind in (CASSANDRA_KILL, ME_DROP, HOSTILE_FLOOD, DISK_FULL, *CLUSTER_KINDS):
        same_resource = f.kind != DISK_FULL or f.target == other.target
        if same_resource and _overlap(busy(f), busy(other)):
            return True
    if {f.kind, other.kind} == {ME_DROP, HOSTILE_FLOOD} and _overlap(busy(f), busy(other)):
        return True  # one ME: its modes take turns
    whole = f.kind in WHOLE_ENGINE_KINDS and other.kind in WHOLE_ENGINE_KINDS
    if whole and abs(f.at_s - other.at_s) < SUPERVISOR_GAP_S:
        return True
    same_slot = f.kind in ENGINE_KINDS and other.kind in ENGINE_KINDS and f.target == other.target
    if same_slot and abs(f.at_s - other.at_s) < SLOT_KILL_GAP_S:
        return True
    if (f.kind == HOSTILE_FLOOD and _kills(other, "router")
            and f.at_s - ME_GAP_S <= other.at_s <= f.end_s + ME_GAP_S + SETTLE_AFTER_S):
        return True
    if f.kind == GARBAGE:
        if _kills(other, f.target) and f.at_s - 1.0 <= other.at_s <= f.at_s + SETTLE_AFTER_S:
            return True
        if other.kind == DISK_FULL and other.target == f.target:
            return _overlap((f.at_s - 2.0, f.at_s + SETTLE_AFTER_S), busy(other))
    return False


def _kills_per_minute_ok(f: Fault, chosen: list[Fault]) -> bool:
    if f.kind not in (SHARD_KILL, TORN_WRITE, ROUTER_KILL):
        return True
    times = sorted([o.at_s for o in chosen if o.kind in (SHARD_KILL, TORN_WRITE, ROUTER_KILL)
                    and o.target == f.target] + [f.at_s])  # fmt: skip
    return all(times[i + SLOT_KILLS_PER_MINUTE_MAX] - times[i] > 60.0
               for i in range(len(times) - SLOT_KILLS_PER_MINUTE_MAX))  # fmt: skip


# -- Cassandra ----------------------------------------------------------------------------------------

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
CASSANDRA_SCRIPT: Final = REPO_ROOT / "ops" / "cassandra" / "cassandra.sh"


class CassandraError(RuntimeError):
    pass


class CassandraNode:
    """A Cassandra managed by ``ops/cassandra/cassandra.sh`` on ``data_dir``: the pid file and the CQL port
    are the script's (``cassandra.pid``, ``cql.port``), so a node started by someone else can be used too."""

    def __init__(self, data_dir: Path, script: Path = CASSANDRA_SCRIPT) -> None:
        self.data_dir = data_dir.resolve()
        self.script = script
        self._starting: subprocess.Popen[bytes] | None = None
        self._starting_log: Path | None = None

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "cassandra.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def port(self) -> int:
        return int((self.data_dir / "cql.port").read_text().strip())

    def running(self) -> bool:
        pid = self.pid
        return pid is not None and alive(pid)

    def start(self, timeout_s: float = 300.0) -> None:
        """Start and wait until CQL answers (fetches the jars on first use)."""
        done = subprocess.run(["bash", str(self.script), "start", str(self.data_dir)], stdin=subprocess.DEVNULL,
                              env=script_env(), capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise CassandraError(f"{self.script} start {self.data_dir} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")

    def kill9(self, timeout_s: float = 30.0) -> int | None:
        """SIGKILL the JVM (nothing flushed) and wait until it is gone, every thread of it: the main thread
        turns zombie first, and the others hold the CQL port until they exit (a restart on that port in the
        meantime is refused: "port already in use"). Returns its pid."""
        pid = self.pid
        if pid is None or not alive(pid):
            return None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while alive(pid) or threads_left(pid):
            if time.monotonic() > deadline:
                raise CassandraError(f"Cassandra pid {pid} alive {timeout_s:.0f}s after SIGKILL")
            time.sleep(0.02)
        return pid

    def restart_async(self, log_path: Path) -> None:
        """Start it again on the same data dir and CQL port, without waiting; see :meth:`poll_started`."""
        assert self._starting is None, "a start is already in progress"
        argv = ["bash", str(self.script), "start", str(self.data_dir), "--cql-port", str(self.port)]
        with open(log_path, "ab") as log:
            self._starting = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=script_env())
        self._starting_log = log_path

    @property
    def starting(self) -> bool:
        return self._starting is not None

    def poll_started(self) -> int | None:
        """None while a restart runs; then the script's exit code (0: CQL answers), once."""
        if self._starting is None:
            return None
        code = self._starting.poll()
        if code is not None:
            self._starting = None
        return code

    def wait_started(self) -> int | None:
        if self._starting is None:
            return None
        code = self._starting.wait()
        self._starting = None
        return code

    def stop(self) -> None:
        self.wait_started()
        subprocess.run(["bash", str(self.script), "stop", str(self.data_dir)], stdin=subprocess.DEVNULL,
                       env=script_env(), capture_output=True, timeout=180, check=False)


def engine_processes(data_path: Path) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, role) of every live process a supervisor started on ``data_path``'s config."""
    needle = str(data_path / "run" / "config.json").encode()
    found: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if b"--config-json" in argv and needle in argv and state not in ("Z", "X"):
            role = "router" if b"router" in argv else "shard " + (argv[argv.index(b"--shard") + 1].decode()
                                                                   if b"--shard" in argv else "?")
            found[int(entry.name)] = (int(ppid), role)
    return found


# -- a full disk under a shard's WAL ------------------------------------------------------------------

FILLER_NAME: Final = "chaos-filler"  # not a symbol's name: the WAL ignores it


class WalDisk:
    """A size-limited tmpfs mounted on a shard's WAL directory (with power_loss: on the disk under its
    LazyFS, see :class:`WalPower`); :meth:`fill` takes every free byte."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.mounted = False
        self.filled = 0  # bytes the filler holds

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs",
                               str(self.path)], capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise OSError(f"mount -t tmpfs on {self.path} failed: {done.stderr.strip() or done.returncode}")
        self.mounted = True

    def fill(self) -> int:
        """Grow the filler until the disk says ENOSPC (again, after the WAL freed space). Returns bytes added."""
        added = 0
        block = b"\0" * (64 * 1024)
        fd = os.open(self.path / FILLER_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    written = os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 2]
                    continue
                added += written
        finally:
            os.close(fd)
        self.filled += added
        return added

    def free(self) -> int:
        freed, self.filled = self.filled, 0
        (self.path / FILLER_NAME).unlink(missing_ok=True)
        return freed

    def unmount(self) -> None:
        if not self.mounted:
            return
        done = subprocess.run(["umount", str(self.path)], capture_output=True, text=True, check=False)
        if done.returncode != 0:  # still busy (a straggler holds a file): detach it now, freed when closed
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
        self.mounted = False


# -- power loss under the WALs -----------------------------------------------------------------------


class WalPower:
    """Each shard's WAL directory is a LazyFS mount over ``disk/wal`` (``disk``: the shard's :class:`WalDisk`
    mount point, or a plain directory), so that a :class:`WalDisk` filler next to ``wal`` fills the same
    disk without being part of the WAL (LazyFS' rebuild never touches it). :meth:`cut` is one power loss
    for the whole machine: every WAL keeps only what was fsynced."""

    def __init__(self, root: Path, wal_paths: list[Path], disks: list[Path]) -> None:
        self.filesystems = [LazyFS(root / f"shard-{shard}", backing=disk / "wal", mount=wal)
                            for shard, (wal, disk) in enumerate(zip(wal_paths, disks, strict=True))]  # fmt: skip

    def mount(self) -> None:
        for fs in self.filesystems:
            fs.start()

    def cut(self, supervisor_pid: int, draw: int) -> tuple[str, str, dict[str, int]]:
        """Lose power in :func:`power_mode`: freeze the supervisor's tree (and any process using a WAL), keep
        only what every WAL made durable, SIGKILL them all. The cut is armed at the next fsync of a segment
        holding unsynced writes on one shard (drawn): a group commit's writes are what a real power loss
        takes; when none comes within POWER_ARM_WAIT_S (a full disk fails its writes first) it comes at once.
        Returns (mode, where it landed, what was lost summed over the shards)."""
        mode = power_mode(draw)
        shard = (draw >> 8) % len(self.filesystems)
        armed = self.filesystems[shard]
        armed.arm({"fsync"}, path=r"\.seg$", pending=True, when="before", roots=[supervisor_pid], mode=mode,
                  seed=draw, label="chaos")
        first = armed.wait(POWER_ARM_WAIT_S) or armed.disarm()
        if first is None:
            where = "at once"
            reports = cut_power(self.filesystems, roots=[supervisor_pid], mode=mode, seed=draw, label="chaos")
        else:  # the machine is frozen and killed by then: the other disks lose their unsynced writes too
            where = f"in a group commit of shard-{shard}"
            reports = [first] + [fs.crash(roots=[supervisor_pid], mode=mode, seed=draw + i, label="chaos")
                                 for i, fs in enumerate(self.filesystems) if fs is not armed]  # fmt: skip
        lost: Counter[str] = Counter()
        for report in reports:
            lost["victims"] += len(report.get("victims", ()))
            lost.update({key: value for key, value in report.items() if key in POWER_LOSS_FIGURES})
        return mode, where, dict(lost)

    def stop(self) -> None:
        for fs in self.filesystems:
            fs.stop()


POWER_ARM_WAIT_S: Final = 5.0
POWER_LOSS_FIGURES: Final = ("bytes_dropped", "files_reverted", "writes_torn", "pages_lost", "pages_kept",
                             "lost_count", "revived_count")  # fmt: skip


# -- a torn write -------------------------------------------------------------------------------------


def tear_wal(wal_root: Path, draw: int) -> str:
    """Cut the last segment of one of the shard's symbols (chosen by ``draw``) at a random byte. The
    shard must be stopped. Returns what was done."""
    rng = random.Random(draw)
    symbols = sorted(p for p in wal_root.iterdir() if p.is_dir() and any(p.glob("*.seg")))
    if not symbols:
        return f"no WAL segment under {wal_root} yet: nothing cut"
    symbol = rng.choice(symbols)
    last = max(symbol.glob("*.seg"))
    size = last.stat().st_size
    cut = rng.randrange(size) if size else 0
    os.truncate(last, cut)
    return f"cut {symbol.name}/{last.name} at byte {cut} of {size} ({size - cut} bytes dropped)"


# -- hostile input and its accounting -----------------------------------------------------------------

FrameKey = tuple[int, str]  # (frame length, sha256 of the bytes the quarantine keeps)


def frame_key(frame: bytes) -> FrameKey:
    return len(frame), hashlib.sha256(frame[:FRAME_BYTES_KEPT]).hexdigest()


def quarantine_keys(directory: Path) -> dict[str, Counter[FrameKey]]:
    """Process name ("router", "shard-0", ...) -> the keys of the frames it quarantined."""
    out: dict[str, Counter[FrameKey]] = {}
    if not directory.exists():
        return out
    for record in read_quarantine(directory):
        kept = base64.b64decode(str(record["frame_b64"]))
        length = record["bytes"]
        assert isinstance(length, int), record
        out.setdefault(str(record["process"]), Counter())[(length, hashlib.sha256(kept).hexdigest())] += 1
    return out


def quarantine_reasons(directory: Path) -> Counter[str]:
    if not directory.exists():
        return Counter()
    return Counter(f"{r['process']}:{r['reason']}" for r in read_quarantine(directory))


class QuarantineTally:
    """Records each process has quarantined so far, read incrementally: the files only grow (a rotated
    file starts a new one, ``<process>.jsonl.1`` keeps the old)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seen: dict[Path, tuple[int, int]] = {}  # path -> (bytes read, lines in them)

    def count(self, process: str) -> int:
        total = 0
        for path in (self.directory / f"{process}.jsonl.1", self.directory / f"{process}.jsonl"):
            offset, lines = self._seen.get(path, (0, 0))
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < offset:  # rotated: a new file under this name
                offset, lines = 0, 0
            if size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(size - offset)
                self._seen[path] = offset + len(data), lines + data.count(b"\n")
            total += self._seen.get(path, (0, 0))[1]
        return total


def account_hostile(expected: dict[str, Counter[FrameKey]], directory: Path) -> tuple[int, list[str]]:
    """Match every hostile frame sent (process -> keys) with one quarantine record of that process, and
    every record with a frame sent. Returns (frames unaccounted for, what is wrong)."""
    got = quarantine_keys(directory)
    unaccounted, problems = 0, []
    for process in sorted(set(expected) | set(got)):
        want, have = expected.get(process, Counter()), got.get(process, Counter())
        missing, extra = want - have, have - want
        if missing:
            problems.append(f"{process}: {missing.total()} of {want.total()} hostile frames sent to it are not "
                            f"in its quarantine (frames of {sorted(n for n, _ in missing)[:5]} bytes, ...)")
        if extra:
            problems.append(f"{process}: {extra.total()} quarantined frames were never sent as hostile input (a "
                            f"real trade or heartbeat quarantined?): frames of {sorted(n for n, _ in extra)[:5]} "
                            "bytes, ...")
        unaccounted += missing.total() + extra.total()
    return unaccounted, problems


_DEATH: Final = re.compile(r"(shard-\d+|router): died \(([^,]+), code (-?\d+)\)")


def unexpected_deaths(supervisor_log: str, kills: Counter[str]) -> list[str]:
    """Every child death the supervisors logged must be one of our SIGKILLs (``kills``: slot -> count)."""
    problems, deaths = [], Counter[str]()
    for slot, reason, code in _DEATH.findall(supervisor_log):
        if reason == "signal_SIGKILL":
            deaths[slot] += 1
        else:
            problems.append(f"{slot} died by itself ({reason}, code {code}); see logs/{slot}.log")
    for slot, count in sorted(deaths.items()):
        if count > kills[slot]:
            problems.append(f"{slot} was SIGKILLed {count} times, {count - kills[slot]} of them not by us "
                            "(hung?); see logs/supervisor.log")
    return problems


def me_hostile_frames(sim_seed: int, count: int) -> list[bytes]:
    """The hostile frames one simulator run sent: the first ``count`` of its hostile sequence.

    Mirrors ``engine.sim.mesim.Simulator``: one ``random.Random(seed ^ 0x5EED)`` per run feeding
    :func:`engine.sim.hostile.frame`. If that changes, the accounting reports every frame missing: loudly.
    """
    rng = random.Random(sim_seed ^ 0x5EED)
    return [hostile.frame(rng)[1] for _ in range(count)]


HUGE_FRAME_BYTES_MAX: Final = 16 << 20


def garbage_burst(draw: int) -> list[list[bytes]]:
    """Messages (each a list of frames: some are multipart) to push straight into a shard's socket:
    every hostile generator's kind, random bytes up to 16 MiB, a huge valid-looking map, deep nesting."""
    rng = random.Random(draw)
    messages: list[list[bytes]] = [[hostile.GENERATORS[kind](rng)] for kind in hostile.KINDS]
    messages += [[hostile.frame(rng)[1]] for _ in range(rng.randint(10, 40))]
    for _ in range(rng.randint(1, 3)):
        messages.append([b"\xc1" + rng.randbytes(rng.randint(1 << 20, HUGE_FRAME_BYTES_MAX))])
    big_symbol = "A" * rng.randint(1 << 20, 4 << 20)
    messages.append([b"\x82\xa4kind\xa5trade\xa6symbol\xdb" + len(big_symbol).to_bytes(4, "big")
                     + big_symbol.encode()])  # fmt: skip
    messages.append([b"\x91" * rng.randint(10_000, 1_000_000) + b"\xc0"])  # nested arrays
    messages.append([b"\x81\xa4kind" + b"\x81\xa1k" * 100_000 + b"\xc0"])  # nested maps under "kind"
    messages.append([b"\xdb\xff\xff\xff\xff"])  # a str header claiming 4 GiB
    messages.append([hostile.frame(rng)[1] for _ in range(3)])  # multipart: each part is a frame
    rng.shuffle(messages)
    return messages
