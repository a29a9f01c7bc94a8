"""The whole system as real processes on one box: for integration tests, chaos runs and benchmarks.

``System`` owns a data directory, a config on free loopback ports, the supervised engine (``settle
run``) and the ME simulator (``settle sim``), and stops all of them. Faults are injected with real
signals on real pids read from ``run/supervisor.json``.

For chaos runs (``engine/verify/chaos.py``) it also restarts the supervisor itself (:meth:`System.kill_engine`,
:meth:`System.restart_engine`), stops the simulator cleanly and reads its summary (:meth:`System.stop_sim`),
and watches settlement progress from a thread that keeps one store session open (:class:`ProgressWatch`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engine.core import config as configmod
from engine.core.errors import StoreUnavailable
from engine.core.placement import shard_for
from engine.core.store import open_store
from engine.core.supervisor import state_path
from engine.verify.checker import CheckReport, check
from engine.verify.demo import demo_config, spawn, start_engine, stop, wait_engine_ready

FDATASYNC_SYSCALL = 75  # x86_64
FSYNC_SYSCALL = 74
_SIM_SUMMARY: Final = re.compile(r"published (\d+) trades \((\d+) dropped, (\d+) hostile frames\)")


@dataclass(frozen=True, slots=True)
class SimRun:
    """What one simulator process said in its summary line (printed on a clean stop)."""

    trades: int  # logged by this run (dropped ones included)
    dropped: int
    hostile: int  # hostile frames sent, never logged


class StoreObserver:
    """What a test sees of a running system through its store and the ME's log. Subclasses set ``root``,
    ``config``, ``log_path`` and ``sim_trades``, and raise from :meth:`_check_processes` when one of their
    processes died."""

    root: Path
    config: configmod.Config
    log_path: Path
    sim_trades: int

    def _check_processes(self) -> None:
        raise NotImplementedError

    async def _watermarks(self) -> dict[str, int]:
        store = await open_store(self.config.store, create_schema=False)
        try:
            return await store.watermarks()
        finally:
            await store.close()

    def watermarks(self) -> dict[str, int]:
        return asyncio.run(self._watermarks())

    def settled(self) -> int:
        return sum(self.watermarks().values())

    def wait_settled(self, total: int | None = None, timeout_s: float = 240.0, at_least: bool = False) -> None:
        """Until the store holds ``total`` trades (the simulator's count by default); fails as soon as a
        process died, naming it."""
        total = self.sim_trades if total is None else total
        deadline = time.monotonic() + timeout_s
        settled = 0
        while time.monotonic() < deadline:
            self._check_processes()
            try:
                settled = self.settled()
            except StoreUnavailable:
                time.sleep(1.0)  # the store is restarting; the engine retries too
                continue
            if settled == total or (at_least and settled >= total):
                return
            time.sleep(0.2)
        raise AssertionError(f"settled {settled} of {total} within {timeout_s}s; see {self.root}/logs\n"
                             f"{self.logs()}")

    def check(self, expect_complete: bool = True) -> CheckReport:
        """The checker's verdict: the store against the ME's log."""

        async def run() -> CheckReport:
            store = await open_store(self.config.store, create_schema=False)
            try:
                return await check(str(self.log_path), store, self.config.engine.fee_account,
                                   expect_complete=expect_complete)
            finally:
                await store.close()

        return asyncio.run(run())

    def logs(self) -> str:
        return "\n".join(f"==== {path.name}\n{path.read_text(errors='replace')[-4000:]}"
                         for path in sorted((self.root / "logs").glob("*.log")))


class System(StoreObserver):
    def __init__(
        self, root: Path, *, shards: int = 2, store: str = "embedded", overrides: dict[str, Any] | None = None
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        base: dict[str, Any] = {}
        for dotted, value in (overrides or {}).items():
            configmod.set_dotted(base, dotted, value)
        self.raw = demo_config(root, shards, store, base)
        self.config = configmod.from_dict(self.raw, "test")
        self.config_path = root / "config.json"
        self.config_path.write_text(json.dumps(self.raw, indent=2))
        self.engine: subprocess.Popen[bytes] | None = None
        self.sim: subprocess.Popen[bytes] | None = None
        self.sim_trades = 0
        self.sim_log: Path | None = None  # stderr of the current simulator
        self.log_path = root / "me.log"

    # ---------------------------------------------------------------- processes

    def start_engine(self, timeout_s: float = 120.0) -> None:
        self.engine = start_engine(self.config_path, self.root)
        wait_engine_ready(self.engine, self.root, timeout_s)

    def start_sim(
        self,
        trades: int,
        *,
        rate: int = 0,
        seed: int = 1,
        symbols: int = 8,
        accounts: int = 200,
        extra: list[str] | None = None,
        log_name: str = "simulator.log",
    ) -> None:
        """Start ``settle sim`` on this system's ME endpoints; it continues ``me.log`` if there is one."""
        self.sim_trades = trades
        argv = [
            sys.executable,
            "-m",
            "engine.cli",
            "sim",
            "--publish",
            self.config.me.publish,
            "--replay",
            self.config.me.replay,
            "--log",
            str(self.log_path),
            "--trades",
            str(trades),
            "--rate",
            str(rate),
            "--seed",
            str(seed),
            "--symbols",
            str(symbols),
            "--accounts",
            str(accounts),
            "--heartbeat-ms",
            str(self.config.me.heartbeat_interval_ms),
            "--wait-subscribers",
            "1",
            "--timestamps",
            "wall",
            "--quiet",
            *(extra or []),
        ]
        self.sim_log = self.root / "logs" / log_name
        self.sim = spawn(argv, self.sim_log)

    def stop_sim(self, timeout_s: float = 60.0) -> SimRun | None:
        """Stop the simulator cleanly (SIGTERM) and return its summary; None if it printed none."""
        if self.sim is None:
            return None
        stop(self.sim, timeout_s)
        self.sim = None
        assert self.sim_log is not None
        matches = _SIM_SUMMARY.findall(self.sim_log.read_text(errors="replace"))
        if not matches:
            return None
        trades, dropped, hostile = (int(x) for x in matches[-1])
        return SimRun(trades, dropped, hostile)

    # ---------------------------------------------------------------- the supervisor itself

    @property
    def engine_pid(self) -> int | None:
        """The running supervisor's pid (None when it is not running)."""
        if self.engine is None or self.engine.poll() is not None:
            return None
        return self.engine.pid

    def kill_engine(self, sig: int = signal.SIGKILL) -> int:
        """Signal the supervisor (not its children: they get SIGTERM from the kernel when it dies) and
        reap it. Returns its pid."""
        assert self.engine is not None
        pid = self.engine.pid
        self.engine.send_signal(sig)
        self.engine.wait()
        return pid

    def stop_engine(self, timeout_s: float = 120.0) -> int:
        """SIGTERM the supervisor (it stops the router, then drains the shards) and return its exit code."""
        assert self.engine is not None
        return stop(self.engine, timeout_s)

    def restart_engine(self) -> None:
        """Start ``settle run`` again on the same config without waiting (see :meth:`engine_ready`)."""
        assert self.engine is None or self.engine.poll() is not None, "the engine is still running"
        self.engine = start_engine(self.config_path, self.root)

    def engine_ready(self) -> bool:
        """The running supervisor has written its state and every slot is ready."""
        pid = self.engine_pid
        if pid is None:
            return False
        try:
            state = self.state()
        except (OSError, ValueError):
            return False
        return state.get("pid") == pid and all(s["ready"] for s in state["slots"].values())

    def child_pid(self, slot: str) -> int | None:
        """``slot``'s pid if it is alive and a child of the running supervisor, else None.

        ``run/supervisor.json`` outlives the supervisor that wrote it: a stale pid may have been reused.
        """
        supervisor = self.engine_pid
        if supervisor is None:
            return None
        try:
            state = self.state()
        except (OSError, ValueError):
            return None
        pid = state["slots"].get(slot, {}).get("pid") if state.get("pid") == supervisor else None
        if not pid or _parent_of(int(pid)) != supervisor:
            return None
        return int(pid)

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(state_path(self.root).read_text())
        return data

    def pid(self, slot: str) -> int:
        pid = self.state()["slots"][slot]["pid"]
        assert pid, f"{slot} has no pid"
        return int(pid)

    def kill(self, slot: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(slot)
        os.kill(pid, sig)
        return pid

    def wait_respawned(self, slot: str, old_pid: int, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.state()["slots"][slot]
            if st["pid"] and st["pid"] != old_pid and st["ready"]:
                return int(st["pid"])
            time.sleep(0.05)
        raise AssertionError(f"{slot} was not respawned and ready within {timeout_s}s; see {self.root}/logs")

    def kill_in_syscall(
        self,
        slot: str,
        syscalls: tuple[int, ...] = (FDATASYNC_SYSCALL, FSYNC_SYSCALL),
        timeout_s: float = 30.0,
    ) -> bool:
        """SIGKILL ``slot`` while one of its threads is blocked inside one of ``syscalls``.

        Polls ``/proc/PID/task/*/syscall`` (a blocked thread shows its syscall number there) and kills the
        moment one shows up. Returns True when the kill landed during the syscall, False on timeout (the
        process is killed anyway).
        """
        pid = self.pid(slot)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                return False
            if any(_in_syscall(pid, tid, syscalls) for tid in tids):
                os.kill(pid, signal.SIGKILL)
                return True
        os.kill(pid, signal.SIGKILL)
        return False

    def stop(self) -> None:
        for proc in (self.engine, self.sim):
            if proc is not None:
                stop(proc, 90.0)

    def _check_processes(self) -> None:
        if self.engine is not None and self.engine.poll() is not None:
            raise AssertionError(f"the engine exited with {self.engine.returncode}; see {self.root}/logs")
        check_simulator(self.sim, self.sim_log)

    def shard_of(self, symbol: str) -> int:
        return shard_for(symbol, self.config.shard_count)



class ProgressWatch:
    """Reads the store's watermarks every ``interval_s`` on its own thread, through one long-lived
    session (a Cassandra connection costs a second of CPU; a down store only delays the next reading).

    ``settled`` is the latest sum of watermarks; ``error`` the last failure, None after a good read.
    """

    def __init__(self, system: StoreObserver, interval_s: float = 2.0) -> None:
        self._system = system
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._fresh = threading.Event()
        self.settled = 0
        self.watermarks: dict[str, int] = {}
        self.error: str | None = None
        self._thread = threading.Thread(target=self._main, name="progress-watch", daemon=True)

    def __enter__(self) -> ProgressWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def refresh(self, timeout_s: float = 60.0) -> bool:
        """Wait for a reading taken after this call; False when none came within ``timeout_s``."""
        self._fresh.clear()
        return self._fresh.wait(timeout_s)

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        store = None
        try:
            while not self._stop.is_set():
                try:
                    if store is None:
                        store = await open_store(self._system.config.store, create_schema=False)
                    marks = await store.watermarks()
                    self.watermarks, self.settled, self.error = marks, sum(marks.values()), None
                    self._fresh.set()
                except Exception as e:  # noqa: BLE001 - a down store is expected here; say why and go on
                    self.error = f"{type(e).__name__}: {e}"
                    if store is not None and self._system.config.store.kind == "embedded":
                        await store.close()
                        store = None
                await asyncio.to_thread(self._stop.wait, self._interval_s)
        finally:
            if store is not None:
                await store.close()


def check_simulator(sim: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    """Raise when the simulator failed (exited with an error: it cannot bind its ports, say). Once it has
    published everything it goes on serving replays, so only a kill (a test's own) or a failure ends it."""
    if sim is None or (code := sim.poll()) is None or code <= 0:
        return
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise AssertionError(f"the ME simulator exited with {code}; see {log}\n{tail}")


def _parent_of(pid: int) -> int | None:
    """The parent pid of a live, non-zombie process; None otherwise."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[1])


def _in_syscall(pid: int, tid: str, syscalls: tuple[int, ...]) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            first = f.read().split(maxsplit=1)
    except OSError:
        return False
    return bool(first) and first[0].lstrip("-").isdigit() and int(first[0]) in syscalls
