"""The whole system as real processes on one box: for integration tests, chaos runs and benchmarks.

``System`` owns a data directory, a config on free loopback ports, the supervised engine (``settle
run``) and the ME simulator (``settle sim``), and stops all of them. Faults are injected with real
signals on real pids read from ``run/supervisor.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine import config as configmod
from engine.checker import CheckReport, check
from engine.demo import demo_config, spawn, start_engine, stop, wait_engine_ready
from engine.placement import shard_for
from engine.errors import StoreUnavailable
from engine.store import open_store

FDATASYNC_SYSCALL = 75  # x86_64
FSYNC_SYSCALL = 74


class System:
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
    ) -> None:
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
        self.sim = spawn(argv, self.root / "logs" / "simulator.log")

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / "run" / "supervisor.json").read_text())
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

    # ---------------------------------------------------------------- observing the store

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

    def wait_settled(
        self, total: int | None = None, timeout_s: float = 240.0, at_least: bool = False
    ) -> None:
        total = self.sim_trades if total is None else total
        deadline = time.monotonic() + timeout_s
        settled = 0
        while time.monotonic() < deadline:
            if self.engine is not None and self.engine.poll() is not None:
                raise AssertionError(f"the engine exited with {self.engine.returncode}; see {self.root}/logs")
            try:
                settled = self.settled()
            except StoreUnavailable:
                time.sleep(1.0)  # the store is restarting; the engine retries too
                continue
            if settled == total or (at_least and settled >= total):
                return
            time.sleep(0.2)
        raise AssertionError(f"settled {settled} of {total} within {timeout_s}s; see {self.root}/logs")

    def check(self, expect_complete: bool = True) -> CheckReport:
        async def run() -> CheckReport:
            store = await open_store(self.config.store, create_schema=False)
            try:
                return await check(
                    str(self.log_path), store, self.config.engine.fee_account, expect_complete=expect_complete
                )
            finally:
                await store.close()

        return asyncio.run(run())

    def shard_of(self, symbol: str) -> int:
        return shard_for(symbol, self.config.shard_count)

    def logs(self) -> str:
        out = []
        for path in sorted((self.root / "logs").glob("*.log")):
            out.append(f"==== {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


def _in_syscall(pid: int, tid: str, syscalls: tuple[int, ...]) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            first = f.read().split(maxsplit=1)
    except OSError:
        return False
    return bool(first) and first[0].lstrip("-").isdigit() and int(first[0]) in syscalls
