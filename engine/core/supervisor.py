"""The supervisor: starts the shards, waits until each has recovered, then starts the router; keeps them up.

- Each child lives in a *slot* (``shard-0`` .. ``shard-N``, ``router``). A dead or hung child is respawned
  into the same slot, so a shard finds its own WAL again, with jittered exponential backoff (engine.core.retry).
- One slot's trouble never stops another: the router keeps routing while a shard restarts.
- A slot that dies ``crash_loop_restarts`` times within ``crash_loop_window_s`` halts the engine with
  ``EXIT_CRASH_LOOP``; a child that exits with ``EXIT_CONFIG`` (or ``EXIT_WAL_CORRUPT``) halts it at once
  with that code instead of looping.
- Signal handlers only enqueue; the main loop dispatches ``handle_<signal>()``. SIGTERM stops in order:
  the router first (intake), then the shards (each drains, fsyncs, flushes to the store, closes).
  A second SIGTERM kills every child and exits at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from engine.core import affinity
from engine.core import metrics as metricsmod
from engine.core.config import Config, dump
from engine.core.errors import EXIT_CONFIG, EXIT_CRASH_LOOP, EXIT_FAILURE, EXIT_OK, EXIT_WAL_CORRUPT
from engine.core.retry import Backoff

HALTING_EXIT_CODES: Final = {EXIT_CONFIG: "config error", EXIT_WAL_CORRUPT: "WAL damaged in the middle"}
TICK_S: Final = 0.2
RESPAWN_WAIT_S_FIRST: Final = 0.1  # then doubling, jittered, up to supervisor.restart_backoff_s_max

log = logging.getLogger("settle.supervisor")


try:  # loaded in the parent: a child between fork and exec should not import or dlopen anything
    import ctypes

    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """In the child before exec: get SIGTERM when the supervisor dies, so no orphan holds a WAL.

    PR_SET_PDEATHSIG only covers a parent that dies after it is set. A supervisor killed between the fork
    and this call leaves a child no signal will ever reach (``settle chaos`` found an orphaned router that
    routed and quarantined everything twice for the rest of the run), so once the signal is armed the child
    checks that its parent is still the supervisor, and leaves if not (prctl(2)).
    """

    def arm() -> None:
        if _LIBC is not None:
            _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(EXIT_FAILURE)

    return arm


def state_path(data_dir: Path) -> Path:
    """Where the supervisor keeps its pids and readiness (for `settle status`, the demo, tests, chaos runs)."""
    return data_dir / "run" / "supervisor.json"


@dataclass
class Slot:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    pipe: int | None = None  # read end of the lifeline
    ready: bool = False
    last_beat: float = 0.0
    started_at: float = 0.0
    restarts: deque[float] = field(default_factory=deque)
    respawn_at: float | None = None
    backoff: Backoff | None = None  # waits between respawns since the child was last ready


class Halt(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Supervisor:
    def __init__(self, config: Config, config_json: Path, log_dir: Path | None = None, *,
                 placement: dict[str, int] | None = None, usable: list[int] | None = None) -> None:
        self.config = config
        self.placement = placement or {}  # slot -> core (engine.core.affinity.plan)
        self.usable = usable if usable is not None else affinity.usable_cores()
        self.config_json = config_json
        self.log_dir = log_dir
        self.registry = metricsmod.new_registry(config.metrics.enabled)
        self.m = metricsmod.SupervisorMetrics(self.registry)
        py = sys.executable
        common = ["--config-json", str(config_json)]
        kafka = config.engine.source == "kafka"
        shard_module = "engine.kafka.shard" if kafka else "shards"
        self.shards = [Slot(f"shard-{i}", [py, "-m", shard_module, *common, "--shard", str(i)])
                       for i in range(config.shard_count)]
        # Intake: the router (ZMQ mode), or the ZMQ-to-Kafka bridge (Kafka mode, when this box runs it).
        self.intake: Slot | None = Slot("router", [py, "-m", "router", *common])
        if kafka:
            self.intake = (Slot("bridge", [py, "-m", "engine.kafka.bridge", *common]) if config.kafka.run_bridge
                           else None)
        self.m.init_slots(slot.name for slot in self.slots)
        self.sel = selectors.DefaultSelector()
        self.signals: deque[int] = deque()
        self.stopping = False
        self.terms = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)

    @property
    def slots(self) -> list[Slot]:
        return [*self.shards, *([self.intake] if self.intake else [])]

    # ---------------------------------------------------------------- signals

    def install_signals(self) -> None:
        def enqueue(signum: int, frame: object) -> None:
            self.signals.append(signum)
            try:
                os.write(self._wake_w, b"s")
            except BlockingIOError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, enqueue)

    def dispatch_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            name = signal.Signals(signum).name.lower()
            getattr(self, f"handle_{name}")()

    def handle_sigterm(self) -> None:
        self.terms += 1
        if self.terms > 1:
            log.warning("second SIGTERM: killing every child now")
            for slot in self.slots:
                if slot.proc and slot.proc.poll() is None:
                    slot.proc.kill()
            raise Halt(EXIT_FAILURE, "second SIGTERM")
        self.stopping = True

    handle_sigint = handle_sigterm

    def handle_sigchld(self) -> None:
        pass  # exits are reaped by the main loop

    # ---------------------------------------------------------------- children

    def spawn(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        with contextlib.ExitStack() as stack:
            stderr = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                stderr = stack.enter_context(open(self.log_dir / f"{slot.name}.log", "ab"))
            slot.proc = subprocess.Popen([*slot.argv, "--ready-fd", str(write_fd)], pass_fds=(write_fd,),
                                         stdin=subprocess.DEVNULL, stderr=stderr,
                                         preexec_fn=affinity.pin_before_exec(
                                             affinity.cpus_for(self.placement, slot.name, self.usable),
                                             then=_die_with_parent(os.getpid())))
        os.close(write_fd)
        if slot.pipe is not None:
            self._close_pipe(slot)
        slot.pipe = read_fd
        slot.ready = False
        slot.started_at = slot.last_beat = time.monotonic()
        slot.respawn_at = None
        self.sel.register(read_fd, selectors.EVENT_READ, slot)
        log.info("%s: started pid %d", slot.name, slot.proc.pid)
        self.write_state()

    def _close_pipe(self, slot: Slot) -> None:
        assert slot.pipe is not None
        self.sel.unregister(slot.pipe)
        os.close(slot.pipe)
        slot.pipe = None

    def on_lifeline(self, slot: Slot) -> None:
        assert slot.pipe is not None
        try:
            data = os.read(slot.pipe, 4096)
        except OSError:
            data = b""
        if not data:
            self._close_pipe(slot)
            return
        slot.last_beat = time.monotonic()
        if b"R" in data and not slot.ready:
            slot.ready = True
            slot.backoff = None
            self.m.up.labels(slot.name).set(1)
            log.info("%s: ready after %.2fs", slot.name, time.monotonic() - slot.started_at)
            self.write_state()

    def reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.proc
            if proc is None or slot.respawn_at is not None:
                continue
            code = proc.poll()
            hung = code is None and now - slot.last_beat > self.config.supervisor.heartbeat_timeout_s and (
                slot.ready or now - slot.started_at > self.config.supervisor.ready_timeout_s)
            if hung:
                log.error("%s: pid %d silent for %.1fs; killing it", slot.name, proc.pid, now - slot.last_beat)
                proc.kill()
                proc.wait()
                code = proc.returncode
                reason = "hung"
            elif code is None:
                continue
            else:
                reason = "exit" if code >= 0 else f"signal_{signal.Signals(-code).name}"
            self.m.up.labels(slot.name).set(0)
            if slot.pipe is not None:
                self._close_pipe(slot)
            if self.stopping:
                continue
            if code in HALTING_EXIT_CODES:
                raise Halt(code, f"{slot.name} exited with {code} ({HALTING_EXIT_CODES[code]}); see its log")
            self.schedule_respawn(slot, reason, code)

    def schedule_respawn(self, slot: Slot, reason: str, code: int | None) -> None:
        cfg = self.config.supervisor
        now = time.monotonic()
        slot.restarts.append(now)
        while slot.restarts and now - slot.restarts[0] > cfg.crash_loop_window_s:
            slot.restarts.popleft()
        if len(slot.restarts) >= cfg.crash_loop_restarts:
            raise Halt(EXIT_CRASH_LOOP, f"{slot.name} died {len(slot.restarts)} times within "
                                        f"{cfg.crash_loop_window_s:.0f}s (last: {reason}, code {code}); "
                                        f"see its log and `settle status`")
        if slot.backoff is None:
            slot.backoff = Backoff(min(RESPAWN_WAIT_S_FIRST, cfg.restart_backoff_s_max), cfg.restart_backoff_s_max)
        wait_s = slot.backoff.next_s()
        slot.respawn_at = now + wait_s
        self.m.restarts.labels(slot.name, reason).inc()
        log.warning("%s: died (%s, code %s); respawning in %.1fs", slot.name, reason, code, wait_s)

    def respawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at:
                self.spawn(slot)

    def write_state(self) -> None:
        """``run/supervisor.json``: pids and readiness, for `settle status`, tests and chaos runs."""
        state = {
            "pid": os.getpid(),
            "slots": {s.name: {"pid": s.proc.pid if s.proc else None, "ready": s.ready,
                               "restarts": len(s.restarts)} for s in self.slots},
        }
        path = state_path(self.config.data_path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    # ---------------------------------------------------------------- main loop

    def poll_once(self, timeout: float = TICK_S) -> None:
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                os.read(self._wake_r, 4096)
            else:
                self.on_lifeline(key.data)
        self.dispatch_signals()

    def wait_ready(self, slots: list[Slot]) -> None:
        deadline = time.monotonic() + self.config.supervisor.ready_timeout_s
        while not all(s.ready for s in slots):
            if time.monotonic() > deadline:
                waiting = ", ".join(s.name for s in slots if not s.ready)
                raise Halt(EXIT_FAILURE, f"not ready after {self.config.supervisor.ready_timeout_s:.0f}s: {waiting}")
            self.poll_once()
            self.reap()
            self.respawn_due()
            if self.stopping:
                return

    def run(self) -> int:
        try:
            for slot in self.shards:
                self.spawn(slot)
            self.wait_ready(self.shards)
            if not self.stopping and self.intake is not None:
                self.spawn(self.intake)
                self.wait_ready([self.intake])
            log.info("engine up: %d shards%s", len(self.shards), f" and the {self.intake.name}" if self.intake else "")
            while not self.stopping:
                self.poll_once()
                self.reap()
                self.respawn_due()
            self.stop_children()
            return EXIT_OK
        except Halt as halt:
            log.error("supervisor halting: %s", halt)
            self.stop_children(kill=halt.code == 1 and self.terms > 1)
            return halt.code

    def stop_children(self, kill: bool = False) -> None:
        """Intake first (router or bridge), then the shards (drain, fsync, flush, close).

        Waits in short steps so that a second SIGTERM is handled at once: it kills every child.
        """
        self.stopping = True
        timeout = self.config.supervisor.drain_timeout_s + 5
        for group in ([self.intake] if self.intake else [], self.shards):
            for slot in group:
                if slot.proc and slot.proc.poll() is None:
                    if kill:
                        slot.proc.kill()
                    else:
                        slot.proc.terminate()
            deadline = time.monotonic() + timeout
            while any(s.proc and s.proc.poll() is None for s in group):
                if time.monotonic() > deadline:
                    for slot in group:
                        if slot.proc and slot.proc.poll() is None:
                            log.error("%s: did not stop in %.0fs; killing it", slot.name, timeout)
                            slot.proc.kill()
                    break
                time.sleep(0.05)
                if not kill:
                    self.dispatch_signals()  # a second SIGTERM raises Halt after killing everyone
            for slot in group:
                if slot.proc is not None:
                    slot.proc.wait()
                self.m.up.labels(slot.name).set(0)
        self.write_state()


def prepare_run_dir(config: Config) -> Path:
    """Create the data directory layout and write the validated config the children load."""
    run = config.data_path / "run"
    run.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(run, 0o700)  # ipc sockets live here: only the service user may open them
    (config.data_path / "wal").mkdir(parents=True, exist_ok=True)
    path = run / "config.json"
    raw = dump(config)
    raw["engine"]["shards"] = config.shard_count  # children must agree on one count
    path.write_text(json.dumps(raw, indent=2))
    return path


def run(config: Config, log_dir: Path | None = None, *, placement: dict[str, int] | None = None,
        usable: list[int] | None = None) -> int:
    usable = usable if usable is not None else affinity.usable_cores()  # before the supervisor pins itself
    placement = placement if placement is not None else affinity.plan(config, usable)
    config_json = prepare_run_dir(config)
    supervisor = Supervisor(config, config_json, log_dir, placement=placement, usable=usable)
    if "supervisor" in placement:
        affinity.apply(placement["supervisor"])  # before any thread (metrics) starts: they inherit it
    supervisor.install_signals()
    if config.metrics.enabled:
        metricsmod.serve(supervisor.registry, config.metrics.host, config.metrics.supervisor_port)
    return supervisor.run()
