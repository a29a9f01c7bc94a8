"""``settle chaos``: the whole system under random faults from a printed seed, then a checker that trusts
none of it.

It runs the ME simulator at a steady rate, the supervisor with its router and shards, and Cassandra (or
the embedded store). The fault schedule is drawn up front from the seed (:func:`engine.verify.chaos_faults.plan`)
and printed, so ``settle chaos --seed S`` replays the same schedule. Faults: SIGKILL of a shard, of the
router, of the supervisor (restarted at once, as systemd would), of Cassandra (restarted after a while);
a power loss (every shard's WAL is on a LazyFS, :mod:`engine.verify.lazyfs`: the whole engine is frozen, every
unsynced WAL write dropped, every engine process SIGKILLed, and the supervisor restarted);
a torn WAL tail (shard stopped, last segment cut at a random byte, shard killed); a full WAL disk (a small
tmpfs under the shard's WAL, kept full, later freed); the ME dropping messages and the ME publishing
hostile frames (the ME restarted on its own log with ``--drop`` / ``--hostile-every``); raw garbage, up to
16 MiB a frame, pushed straight into a shard's socket.

Then it stops injecting, lets everything heal and settle, stops the engine, and checks from the ME's log
and the store alone (:mod:`engine.verify.checker`) that every trade was settled exactly once, in order, with exact
balances and every asset conserved. Every hostile frame sent must be in its receiver's quarantine, matched
one for one by length and content: the schedule never kills a receiver right after its frames were sent,
and before any kill the runner waits until the quarantine holds what was sent. No process may die but
those it killed, and none may outlive its supervisor (an orphan). Exit code 0 only when all of that holds;
otherwise the seed, the failures and the timeline are printed.

``settle chaos --cluster`` is the same for the Kafka mode on several hosts, with the faults of a cluster
(a Cassandra node, the partition leaders' broker, a settle host cut off from the brokers):
:mod:`engine.verify.chaos_cluster`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq

from engine.core.errors import EXIT_OK, EXIT_USAGE, EXIT_VERIFY_FAILED
from engine.verify import chaos_faults as cf
from engine.verify import lazyfs
from engine.verify.chaos_run import ChaosRun
from engine.verify.checker import CheckReport
from engine.verify.testbed import ProgressWatch, SimRun, System

TICK_S: Final = 0.1
BARRIER_TIMEOUT_S: Final = 60.0
CATCH_UP_WAIT_MAX_S: Final = 60.0
ORPHAN_GRACE_S: Final = 90.0  # a child of a killed supervisor drains (at most 2 x drain_timeout_s), then exits
PROGRESS_EVERY_S: Final = 10.0
REKILL_AFTER_S: Final = 2.5  # a late schedule never kills one slot twice within this
EXIT_NO_FUSE: Final = 2  # power_loss asked for where no FUSE file system can be mounted


@dataclass(slots=True)
class _Event:
    due_s: float  # from the start of the run
    order: int
    phase: str  # "start" or "heal"
    fault: cf.Fault


class Chaos(ChaosRun):
    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        kinds = tuple(args.kinds.split(",")) if args.kinds else cf.KINDS
        super().__init__(args, seed, kinds if args.store == "cassandra" else
                         tuple(k for k in kinds if k != cf.CASSANDRA_KILL), args.shards)
        self.sim_seed = seed % 2**63
        self.soak_at = 0.0
        self.kills: Counter[str] = Counter()  # slot -> our SIGKILLs of it (its supervisor alive)
        self.last_hit: dict[str, float] = {}  # slot -> when we last took it down
        self.slots: dict[str, tuple[int | None, bool]] = {}  # slot -> (pid, ready) last seen
        self.me_runs: list[tuple[str, SimRun | None]] = []  # (mode, its summary) per finished ME process
        self.me_mode = {"drop_ppm": 0, "hostile_every": 0}
        self.me_running_mode = "normal"
        self.pushed: dict[str, Counter[cf.FrameKey]] = {}  # shard slot -> garbage frames sent to it
        self.sent_at: dict[str, float] = {}  # slot -> when hostile frames were last sent to it
        self.written_off: Counter[str] = Counter()  # slot -> frames given up waiting for (the verdict counts)
        self.orphans: dict[int, float] = {}  # pid of an engine process not the supervisor's child -> first seen
        self.reported: set[int] = set()  # orphans already reported
        self.next_orphan_scan = 0.0
        self.disks: dict[str, cf.WalDisk] = {}
        self.power: cf.WalPower | None = None
        self.power_cuts: Counter[str] = Counter()  # mode -> power losses
        self.power_points: Counter[str] = Counter()  # "in a group commit" or "at once" -> power losses
        self.power_lost: Counter[str] = Counter()  # what the power losses dropped, summed (POWER_LOSS_FIGURES)
        self.full: set[str] = set()  # shard slots whose WAL disk is kept full
        self.node: cf.CassandraNode | None = None
        self.cassandra_down_at = 0.0
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.pushes: list[zmq.Socket[bytes]] = []
        self._system: System | None = None

    @property
    def system(self) -> System:
        assert self._system is not None
        return self._system

    # ---------------------------------------------------------------- the run

    def run(self) -> int:
        args = self.args
        print(f"settle chaos: seed {self.seed}\nsoak {self.soak_s:.0f}s at {self.rate:,.0f} trades/s, {self.total} "
              f"trades, {args.shards} shards, {args.store} store; {len(self.schedule)} faults:")
        for fault in self.schedule:
            print(f"  +{fault.at_s:7.1f}s  {fault.describe()}")
        if args.plan_only:
            return EXIT_OK
        root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="settle-chaos-"))
        print(f"data in {root}", flush=True)
        with contextlib.ExitStack() as stack:
            try:
                code = self._run(root, stack)
            except BaseException as e:
                self.fail(f"the chaos run stopped early: {type(e).__name__}: {e}")
                raise
            finally:
                stack.close()  # every process stopped, every mount gone, before the verdict is printed
                if self.failures:
                    self._print_failure(root, self._replay_command())
        if self.failures:  # teardown may find more (an orphan process)
            code = EXIT_VERIFY_FAILED
        if code == EXIT_OK and not args.data_dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return code

    def _run(self, root: Path, stack: contextlib.ExitStack) -> int:
        args = self.args
        root.mkdir(parents=True, exist_ok=True)
        # each WAL sits on a small tmpfs (disk_full): start-up must not refuse it for its size
        overrides: dict[str, Any] = {"me.heartbeat_interval_ms": 200, "wal.segment_bytes_max": 256 * 1024,
                                     "engine.disk_free_bytes_min": 0}
        if args.store == "cassandra":
            self.node = self._cassandra(root, stack)
            overrides |= {"store.cassandra.port": self.node.port, "store.cassandra.consistency": "ONE",
                          "store.cassandra.keyspace": f"chaos_{self.seed % 10**12}_{random.getrandbits(24):06x}",
                          "store.cassandra.request_timeout_s": 2.0}  # fmt: skip
        system = self._system = System(root, shards=args.shards, store=args.store, overrides=overrides)
        self.tally = cf.QuarantineTally(system.config.quarantine_path)
        stack.callback(self._unmount)  # after the engine stopped (LIFO)
        wal_paths = [system.config.wal_path(shard) for shard in range(args.shards)]
        # With power_loss the WAL is a LazyFS over walfs/shard-N/disk/wal and the tmpfs is that disk.
        power = cf.POWER_LOSS in self.kinds
        disk_paths = [root / "walfs" / f"shard-{s}" / "disk" for s in range(args.shards)] if power else wal_paths
        if cf.DISK_FULL in self.kinds:
            for shard, path in enumerate(disk_paths):
                self.disks[f"shard-{shard}"] = disk = cf.WalDisk(path, args.wal_disk_mb)
                disk.mount()
        if power:
            self.power = cf.WalPower(root / "walfs", wal_paths, disk_paths)
            self.power.mount()
        stack.callback(self._reap_orphans)  # after the engine stopped
        stack.callback(system.stop)
        self.ctx = zmq.Context()
        stack.callback(self._close_pushes)
        self.log(f"starting the engine: {args.shards} shards, {args.store} store")
        system.start_engine()
        self._observe()
        self._progress = stack.enter_context(ProgressWatch(system))
        self._start_me()
        self.soak_at = self.now()
        self.log(f"soak started: the ME publishes; fault offsets count from t={self.soak_at:.1f}s")
        self._inject()
        self.log("all faults injected and healed; waiting until every trade is settled")
        settled = self._wait_settled()
        deadline = time.monotonic() + BARRIER_TIMEOUT_S  # what was sent is in quarantine before the stop
        while not self._caught_up(list(self.slots)) and time.monotonic() < deadline:
            self._tick()
            time.sleep(TICK_S)
        self.log("stopping the engine")
        if (code := system.stop_engine()) != 0:
            self.fail(f"the engine stopped with exit code {code}")
        self._stop_me()
        self._reap_orphans()
        return self._verdict(settled)

    def _cassandra(self, root: Path, stack: contextlib.ExitStack) -> cf.CassandraNode:
        node = cf.CassandraNode(Path(self.args.cassandra_dir) if self.args.cassandra_dir else root / "cassandra")
        if node.running():
            print(f"using the Cassandra running on {node.data_dir} (CQL port {node.port}); it is left running")
            stack.callback(self._hand_back, node)
        else:
            print(f"starting Cassandra on {node.data_dir} (ops/cassandra/cassandra.sh)", flush=True)
            stack.callback(node.stop)
            node.start()
        return node

    @staticmethod
    def _hand_back(node: cf.CassandraNode) -> None:
        """A Cassandra we did not start is left as we found it: running (a run cut short may have killed it)."""
        node.wait_started()
        if not node.running():
            node.start()

    def _unmount(self) -> None:
        if self.power is not None:  # the LazyFS first: its backing folder is on the tmpfs
            if self.failures:
                for shard, fs in enumerate(self.power.filesystems):
                    with contextlib.suppress(OSError):
                        shutil.copytree(fs.backing, self.system.root / "wal-at-end" / f"shard-{shard}")
            self.power.stop()
        for slot, disk in self.disks.items():
            if self.failures and disk.mounted and self.power is None:  # the tmpfs dies with the mount: keep its WAL
                with contextlib.suppress(OSError):
                    shutil.copytree(disk.path, self.system.root / "wal-at-end" / slot,
                                    ignore=shutil.ignore_patterns(cf.FILLER_NAME))
            disk.unmount()

    def _close_pushes(self) -> None:
        for sock in self.pushes:
            sock.close(0)
        if self.ctx is not None:
            self.ctx.term()

    # ---------------------------------------------------------------- the schedule

    def _inject(self) -> None:
        """Fault starts and heals in time order; a start waits until its target can take it (a slot must be
        alive to be killed) while other resources' starts go on, and heals go on whatever waits. An episode
        lasts its full duration from its actual start."""
        events = [_Event(self.soak_at + f.at_s, i, "start", f) for i, f in enumerate(self.schedule)]
        while events:
            blocked: set[str] = set()
            for event in sorted(events, key=lambda e: (e.due_s, e.order, e.phase == "start")):
                if event.due_s > self.now():
                    break
                resource = _resource(event.fault)
                late_s = self.now() - event.due_s
                # Only starts wait (in order, per resource); a heal never does: a start waiting for its
                # resource (a Cassandra kill due while the node is down) may be waiting for that very heal.
                if event.phase == "start" and (resource in blocked or not self._can_start(event.fault)):
                    blocked.add(resource)
                    continue
                events.remove(event)
                lag = f" ({late_s:.1f}s late)" if late_s > 1.0 else ""
                fault = event.fault
                if event.phase == "heal":
                    self._heal(fault, lag)
                    continue
                self.executed[fault.kind] += 1
                action: Callable[[cf.Fault], str] = getattr(self, f"_do_{fault.kind}")
                self.log(f"{fault.kind} {fault.target}: {action(fault)}{lag}")
                if fault.duration_s:
                    events.append(_Event(self.now() + fault.duration_s, event.order, "heal", fault))
            self._tick()
            time.sleep(TICK_S)
        while self.node is not None and (self.node.starting or not self.node.running()):
            self._tick()
            time.sleep(TICK_S)

    def _can_start(self, fault: cf.Fault) -> bool:
        system = self.system
        if fault.kind in (cf.SHARD_KILL, cf.TORN_WRITE, cf.ROUTER_KILL):
            rested = self.now() - self.last_hit.get(fault.target, -1e9) >= REKILL_AFTER_S
            ready = fault.kind != cf.ROUTER_KILL or self._ready("router")
            return rested and ready and self._caught_up([fault.target]) and (
                system.child_pid(fault.target) is not None)
        if fault.kind in cf.WHOLE_ENGINE_KINDS:
            return system.engine_ready() and self._caught_up(list(self.slots))
        if fault.kind == cf.CASSANDRA_KILL:
            return self.node is not None and not self.node.starting and self.node.running()
        if fault.kind in (cf.HOSTILE_FLOOD, cf.GARBAGE):  # the receiver must be there to read the frames
            target = "router" if fault.kind == cf.HOSTILE_FLOOD else fault.target
            return system.child_pid(target) is not None and self._ready(target) and target not in self.full
        return True

    def _ready(self, slot: str) -> bool:
        return self.slots.get(slot, (None, False))[1]

    def _caught_up(self, slots: list[str]) -> bool:
        """May these slots be killed without losing hostile frames sent to them? Not while the ME floods the
        router, nor before each slot's quarantine holds what was sent to it (a shard still recovering reads
        nothing yet). Frames still missing CATCH_UP_WAIT_MAX_S after they were sent are left to the verdict."""
        if "router" in slots and self.me_mode["hostile_every"]:
            return False
        sent = self._hostile_sent()
        for slot in slots:
            want = sent.get(slot, 0) - self.written_off[slot]
            have = self.tally.count(slot) if want else 0
            if have >= want:
                continue
            waited = self.now() - self.sent_at.get(slot, 0.0)
            if waited <= CATCH_UP_WAIT_MAX_S:
                return False
            self.log(f"{slot}'s quarantine holds {have} of the {want} hostile frames sent to it, {waited:.0f}s "
                     "after the last one; going on (the verdict counts them)")
            self.written_off[slot] += want - have
        return True

    def _kill(self, slot: str, tear: int | None = None) -> str:
        pid = self.system.child_pid(slot)
        if pid is None:
            return "gone before the kill; skipped"
        what = ""
        if tear is not None:  # stopped while its WAL is cut: the new process finds the torn tail
            signal_pid(pid, signal.SIGSTOP)
            try:
                what = f"SIGSTOP, {cf.tear_wal(self.system.config.wal_path(int(slot.split('-')[1])), tear)}, "
            finally:
                signal_pid(pid, signal.SIGKILL)
        else:
            signal_pid(pid, signal.SIGKILL)
        self.kills[slot] += 1
        self.last_hit[slot] = self.now()
        return f"pid {pid}: {what}SIGKILL"

    def _do_shard_kill(self, fault: cf.Fault) -> str:
        return self._kill(fault.target)

    def _do_router_kill(self, fault: cf.Fault) -> str:
        return self._kill(fault.target)

    def _do_torn_write(self, fault: cf.Fault) -> str:
        return self._kill(fault.target, tear=fault.param)

    def _do_supervisor_kill(self, fault: cf.Fault) -> str:
        pid = self.system.kill_engine()
        self.last_hit |= dict.fromkeys(self.slots, self.now())
        self.system.restart_engine()
        return f"SIGKILL pid {pid} (its children get SIGTERM); `settle run` restarted: pid {self.system.engine_pid}"

    def _do_power_loss(self, fault: cf.Fault) -> str:
        assert self.power is not None
        assert self.system.engine is not None
        pid = self.system.engine.pid
        mode, where, lost = self.power.cut(pid, fault.param)
        self.system.engine.wait()
        self.power_cuts[mode] += 1
        self.power_points[where.split(" of ")[0]] += 1
        self.power_lost.update(lost)
        self.last_hit |= dict.fromkeys(self.slots, self.now())
        self.system.restart_engine()
        return (f"power cut under the WALs {where} (mode {mode}): supervisor pid {pid} and its tree frozen, "
                f"{lost.get('victims', 0)} processes SIGKILLed, {lost.get('bytes_dropped', 0)} unsynced WAL bytes "
                f"dropped in {lost.get('files_reverted', 0)} files, {lost.get('lost_count', 0)} paths lost; "
                f"`settle run` restarted: pid {self.system.engine_pid}")

    def _do_cassandra_kill(self, fault: cf.Fault) -> str:
        assert self.node is not None
        pid = self.node.kill9()
        self.cassandra_down_at = self.now()
        return f"SIGKILL JVM pid {pid}; restarted in {fault.duration_s:.1f}s"

    def _do_disk_full(self, fault: cf.Fault) -> str:
        disk = self.disks[fault.target]
        added = disk.fill()
        self.full.add(fault.target)
        return f"WAL tmpfs ({disk.size_mb} MiB) filled: filler took {added} bytes; kept full {fault.duration_s:.1f}s"

    def _do_me_drop(self, fault: cf.Fault) -> str:
        self.me_mode["drop_ppm"] = fault.param
        return self._restart_me()

    def _do_hostile_flood(self, fault: cf.Fault) -> str:
        self.me_mode["hostile_every"] = fault.param
        return self._restart_me()

    def _do_garbage(self, fault: cf.Fault) -> str:
        assert self.ctx is not None
        sock = self.ctx.socket(zmq.PUSH)  # a fresh connection reaches the shard bound now, not a predecessor
        self.pushes.append(sock)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.connect(self.system.config.shard_endpoint(int(fault.target.split("-")[1])))
        sent = refused = size = 0
        expected = self.pushed.setdefault(fault.target, Counter())
        for message in cf.garbage_burst(fault.param):
            try:
                sock.send_multipart(message, zmq.NOBLOCK)
            except zmq.Again:
                refused += len(message)
                continue
            expected.update(cf.frame_key(frame) for frame in message)
            sent += len(message)
            size += sum(map(len, message))
        self.sent_at[fault.target] = self.now()
        return f"pushed {sent} hostile frames ({size / 2**20:.1f} MiB) into its socket" + (
            f", {refused} refused (queue full)" if refused else "")

    def _heal(self, fault: cf.Fault, lag: str) -> None:
        if fault.kind == cf.CASSANDRA_KILL:
            assert self.node is not None
            self.node.restart_async(self.system.root / "logs" / "cassandra-start.log")
            self.log(f"heal {fault.kind}: restarting Cassandra on port {self.node.port}{lag}")
        elif fault.kind == cf.DISK_FULL:
            self.full.discard(fault.target)
            freed = self.disks[fault.target].free()
            self.log(f"heal {fault.kind} {fault.target}: filler removed, {freed} bytes free again{lag}")
        elif fault.kind in (cf.ME_DROP, cf.HOSTILE_FLOOD):
            self.me_mode["drop_ppm" if fault.kind == cf.ME_DROP else "hostile_every"] = 0
            self.log(f"heal {fault.kind}: {self._restart_me()}{lag}")

    # ---------------------------------------------------------------- the ME

    def _mode_text(self) -> str:
        drop, every = self.me_mode["drop_ppm"], self.me_mode["hostile_every"]
        parts = ([f"drop {drop / 10_000:.2f}%"] if drop else []) + ([f"hostile every {every}"] if every else [])
        return ", ".join(parts) or "normal"

    def _start_me(self) -> None:
        extra = ["--wait-timeout", "3600"]
        if self.me_mode["drop_ppm"]:
            extra += ["--drop", str(self.me_mode["drop_ppm"] / 1_000_000)]
        if self.me_mode["hostile_every"]:
            extra += ["--hostile-every", str(self.me_mode["hostile_every"])]
        system = self.system
        system.start_sim(self.total, rate=int(self.rate), seed=self.sim_seed, symbols=self.args.symbols,
                         accounts=self.args.accounts, extra=extra, log_name=f"simulator-{len(self.me_runs) + 1}.log")
        self.me_running_mode = self._mode_text()
        sim, sim_log = system.sim, system.sim_log
        assert sim is not None
        assert sim_log is not None
        deadline = time.monotonic() + 120.0  # a loaded box takes seconds to import; a signal then kills it
        while b"publishing on" not in sim_log.read_bytes() and sim.poll() is None and time.monotonic() < deadline:
            time.sleep(TICK_S)

    def _stop_me(self) -> SimRun | None:
        run = self.system.stop_sim()
        self.me_runs.append((self.me_running_mode, run))
        if run is not None and run.hostile:
            self.sent_at["router"] = self.now()
        if run is None:
            self.fail(f"ME run {len(self.me_runs)} printed no summary; see logs/simulator-{len(self.me_runs)}.log")
        return run

    def _restart_me(self) -> str:
        previous = self.me_running_mode
        run = self._stop_me()
        self._start_me()
        told = f"{run.trades} trades, {run.dropped} dropped, {run.hostile} hostile frames" if run else "no summary"
        return f"ME restarted on its log, mode {self.me_running_mode} (its last run: {previous}, {told})"

    # ---------------------------------------------------------------- watching

    def _tick(self) -> None:
        system = self.system
        for slot in self.full:
            self.disks[slot].fill()
        if self.node is not None and (code := self.node.poll_started()) is not None:
            if code == 0:
                self.log(f"Cassandra up again (CQL answers), {self.now() - self.cassandra_down_at:.1f}s after the kill")
            else:
                self.fail(f"Cassandra did not start again (exit {code}); retrying; see logs/cassandra-start.log")
                self.node.restart_async(system.root / "logs" / "cassandra-start.log")
        if system.engine is not None and system.engine.poll() is not None:
            self.fail(f"the supervisor exited by itself with code {system.engine.returncode}; restarting it "
                      "(see logs/supervisor.log)")
            system.restart_engine()
        if system.sim is not None and system.sim.poll() is not None:
            self.fail(f"the ME simulator exited by itself with code {system.sim.returncode}; restarting it")
            self._stop_me()
            self._start_me()
        self._observe()
        if self.now() >= self.next_orphan_scan:
            self.next_orphan_scan = self.now() + 5.0
            self._scan_orphans()
        if self._progress is not None and self.now() >= self.next_progress:
            self.next_progress = self.now() + PROGRESS_EVERY_S
            error = f", store: {self._progress.error[:100]}" if self._progress.error else ""
            self.log(f"progress: settled {self._progress.settled} of {self.total}{error}")

    def _observe(self) -> None:
        """Log every slot's new pid and readiness, with the time since we last took it down."""
        system = self.system
        try:
            state = system.state()
        except (OSError, ValueError):
            return
        if state.get("pid") != system.engine_pid:
            return
        for slot, st in state["slots"].items():
            new, old = (st["pid"], bool(st["ready"])), self.slots.get(slot)
            if old == new:
                continue
            self.slots[slot] = new
            since = f", {self.now() - self.last_hit[slot]:.1f}s after the fault" if slot in self.last_hit else ""
            if new[0] and (old is None or old[0] != new[0]):
                self.log(f"{slot}: started as pid {new[0]}{since}")
            if new[1]:
                self.log(f"{slot}: ready (pid {new[0]}){since}")

    def _scan_orphans(self) -> None:
        """An engine process whose parent is not the running supervisor must be gone within ORPHAN_GRACE_S:
        a killed supervisor's children get SIGTERM from the kernel and drain."""
        supervisor = self.system.engine_pid
        for pid, (ppid, role) in cf.engine_processes(self.system.config.data_path).items():
            if ppid == supervisor or pid in self.reported:
                continue
            if self.now() - self.orphans.setdefault(pid, self.now()) > ORPHAN_GRACE_S:
                self.reported.add(pid)
                self.fail(f"orphan: {role} pid {pid} (parent {ppid}) has outlived its supervisor by more than "
                          f"{ORPHAN_GRACE_S:.0f}s and runs next to the current engine")

    def _reap_orphans(self) -> None:
        """Once the engine stopped nothing of it may run: what still does after ORPHAN_GRACE_S is reported
        (unless it was already) and killed."""
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while (left := cf.engine_processes(self.system.config.data_path)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid, (ppid, role) in left.items():
            if pid not in self.reported:
                self.fail(f"orphan: {role} pid {pid} (parent {ppid}) still runs after the engine stopped")
            signal_pid(pid, signal.SIGKILL)

    def _hostile_sent(self) -> dict[str, int]:
        sent = {slot: keys.total() for slot, keys in self.pushed.items()}
        sent["router"] = sum(run.hostile for _, run in self.me_runs if run is not None)
        return {slot: n for slot, n in sorted(sent.items()) if n}

    # ---------------------------------------------------------------- the verdict

    def _verdict(self, settled: int) -> int:
        system = self.system
        report = system.check()
        for line in report.format().splitlines():
            self.log(f"checker: {line}")
        if not report.ok:
            self.fail("the checker found settlement errors (above)")
        if report.published != self.total:
            self.fail(f"the ME log holds {report.published} trades, not {self.total}")
        self.failures += [f"no {kind} fault was injected" for kind in self.kinds if not self.executed[kind]]
        expected = {slot: Counter(keys) for slot, keys in self.pushed.items()}
        router = expected.setdefault("router", Counter())
        for _, run in self.me_runs:
            if run is not None and run.hostile:
                router.update(cf.frame_key(f) for f in cf.me_hostile_frames(self.sim_seed, run.hostile))
        unaccounted, problems = cf.account_hostile(expected, system.config.quarantine_path)
        problems += cf.unexpected_deaths((system.root / "logs" / "supervisor.log").read_text(errors="replace"),
                                         self.kills)  # fmt: skip
        for problem in problems:
            self.fail(problem)
        self._report(report, settled, unaccounted)
        return EXIT_OK if not self.failures else EXIT_VERIFY_FAILED

    def _report(self, report: CheckReport, settled: int, unaccounted: int) -> None:
        quarantined = cf.quarantine_reasons(self.system.config.quarantine_path)
        sent = self._hostile_sent()
        summary = {
            "seed": self.seed, "passed": not self.failures, "minutes": self.args.minutes, "store": self.args.store,
            "shards": self.args.shards, "duration_s": round(self.now(), 1),
            "faults": dict(sorted(self.executed.items())), "faults_total": self.executed.total(),
            "trades_published": report.published,
            "trades_settled": report.settled, "watermark_sum": settled, "lost": report.missing_count,
            "duplicated": report.unexpected_count, "balance_mismatches": report.balance_mismatch_count,
            "order_errors": report.order_error_count, "assets": report.assets,
            "assets_not_conserved": len(report.conservation), "hostile_sent": sent,
            "quarantined": quarantined.total(), "quarantined_by_reason": dict(sorted(quarantined.items())),
            "hostile_unaccounted": unaccounted, "me_runs": [[mode, run.hostile if run else None]
                                                             for mode, run in self.me_runs],
            "power_cuts": dict(sorted(self.power_cuts.items())), "power_loss": dict(sorted(self.power_lost.items())),
            "power_cut_points": dict(sorted(self.power_points.items())),
            "failures": self.failures,
        }  # fmt: skip
        (self.system.root / "chaos-report.json").write_text(json.dumps(summary, indent=2))
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.executed.items()))
        print(f"\nsettle chaos: {'PASSED' if not self.failures else 'FAILED'}, seed {self.seed}, {self.now():.0f}s\n"
              f"  faults injected: {self.executed.total()} ({faults})\n"
              f"  trades checked: {report.published}: lost {report.missing_count}, duplicated "
              f"{report.unexpected_count}, balance mismatches {report.balance_mismatch_count}, order errors "
              f"{report.order_error_count}, assets conserved {report.assets - len(report.conservation)}/"
              f"{report.assets}\n  hostile frames: sent {sum(sent.values())} {sent}, quarantined "
              f"{quarantined.total()}, unaccounted {unaccounted}", flush=True)
        if self.power_cuts:
            modes = "; ".join(", ".join(f"{key} {n}" for key, n in sorted(counts.items()))
                              for counts in (self.power_cuts, self.power_points))
            lost = self.power_lost
            print(f"  power cuts: {self.power_cuts.total()} ({modes}): {lost['bytes_dropped']} unsynced WAL bytes "
                  f"dropped in {lost['files_reverted']} files, {lost['lost_count']} paths lost, "
                  f"{lost['revived_count']} revived", flush=True)

    def _replay_command(self) -> str:
        a = self.args
        return (f"settle chaos --seed {self.seed} --minutes {a.minutes:g} --trades {a.trades} --rate {a.rate:g} "
                f"--shards {a.shards} --store {a.store}{f' --kinds {a.kinds}' if a.kinds else ''}")


def _resource(fault: cf.Fault) -> str:
    """Events of one resource run in schedule order."""
    if fault.kind in cf.ENGINE_KINDS:
        return "engine"
    if fault.kind in (cf.ME_DROP, cf.HOSTILE_FLOOD):
        return "me"
    return f"{fault.kind}:{fault.target}"


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="settle chaos", description="Run the whole system under random faults "
                                "from a seed, then prove every trade settled exactly once.")  # fmt: skip
    p.add_argument("--cluster", action="store_true", help="the Kafka mode on several hosts instead: two settle "
                   "hosts (network namespaces) in one consumer group, 3 Kafka brokers, a 3-node Cassandra with "
                   f"logins and TLS (RF 3, LOCAL_QUORUM), all started here; fault kinds {','.join(cf.CLUSTER_KINDS)}."
                   " Needs root, ip, iptables, Java and ~4 GiB of memory; --shards, --store and --cassandra-dir "
                   "are not for it")
    p.add_argument("--seed", type=int, default=None, help="fault schedule and trades (default: random, printed)")
    p.add_argument("--minutes", type=float, default=3.0, help="soak length: the ME publishes this long (default 3)")
    p.add_argument("--trades", type=int, default=100_000, help="trades at least; the rate rises to fit")
    p.add_argument("--rate", type=float, default=1000.0, help="ME trades/s at least (default 1000)")
    p.add_argument("--shards", type=int, default=2, help="shard processes (default 2)")
    p.add_argument("--store", choices=["embedded", "cassandra"], default="cassandra")
    p.add_argument("--data-dir", help="where everything goes (default: a temporary directory, kept on failure)")
    p.add_argument("--cassandra-dir", help="a Cassandra data dir of ops/cassandra/cassandra.sh; a node running "
                   "there is used and left running (default: DATA_DIR/cassandra, started and stopped)")
    p.add_argument("--faults", type=int, default=0, help="faults to inject (default: one per 6 s of soak)")
    p.add_argument("--kinds", help=f"only these fault kinds, comma-separated: {','.join(cf.KINDS)} (power_loss "
                   "needs root and FUSE; without them it is left out of the default, and asking for it is an error); "
                   f"with --cluster: {','.join(cf.CLUSTER_KINDS)}")
    p.add_argument("--symbols", type=int, default=8)
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--wal-disk-mb", type=int, default=16, help="each shard's WAL tmpfs, for disk_full (default 16); "
                   "with power_loss the LazyFS under the WAL keeps its data on it")
    p.add_argument("--stall-timeout", type=float, default=180.0,
                   help="fail when nothing settles for this long after the faults stopped (default 180)")
    p.add_argument("--plan-only", action="store_true", help="print the fault schedule and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory of a passing run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cluster:
        return _main_cluster(args)
    unknown = sorted(set(args.kinds.split(",")) - set(cf.KINDS)) if args.kinds else []
    if unknown or args.minutes <= 0 or args.shards < 1:
        print(f"settle chaos: unknown fault kinds {unknown}; expected some of {', '.join(cf.KINDS)}" if unknown
              else "settle chaos: --minutes and --shards must be positive", file=sys.stderr)
        return EXIT_USAGE
    kinds = args.kinds.split(",") if args.kinds else cf.KINDS
    if cf.POWER_LOSS in kinds and not args.plan_only and (missing := lazyfs.unavailable()):
        if args.kinds:
            print(f"settle chaos: power_loss needs a FUSE file system (LazyFS) under the WALs and none can be "
                  f"mounted here: {missing}. Run as root with fuse3 installed (ops/install.sh), or leave "
                  "power_loss out of --kinds", file=sys.stderr)
            return EXIT_NO_FUSE
        args.kinds = ",".join(kind for kind in cf.KINDS if kind != cf.POWER_LOSS)
        print(f"settle chaos: power_loss left out, no FUSE file system can be mounted here ({missing}); "
              f"running --kinds {args.kinds}", flush=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    return _unwinding_on_sigterm(Chaos(args, seed).run)


def _main_cluster(args: argparse.Namespace) -> int:
    from engine.verify import chaos_cluster

    if (problem := chaos_cluster.usage_error(args)) or args.minutes <= 0:
        print(f"settle chaos: {problem or '--minutes must be positive'}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    return _unwinding_on_sigterm(chaos_cluster.ClusterChaos(args, seed).run)


def _unwinding_on_sigterm(run: Callable[[], int]) -> int:
    """SIGTERM unwinds the run: every process and server stopped, every mount and namespace gone, then exit."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return run()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
