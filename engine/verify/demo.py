"""``settle demo``: the ME simulator, the supervised engine and a verdict, on one box, in one command.

It starts the engine (supervisor, shards, router) on the embedded store, waits until every shard has
recovered and the router is up, starts the simulator, shows live progress, and when every published
trade is settled it stops everything in order and verifies the store against the simulator's own log:
every trade settled exactly once, every balance equal to the one computed from the log, every asset's
total conserved. Exit code 0 only if all of that holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from engine.core import config as configmod
from engine.core.errors import EXIT_FAILURE, EXIT_VERIFY_FAILED
from engine.core.placement import shard_for
from engine.core.supervisor import state_path

POLL_S = 1.0


PORTS_LOW: Final = 10_000  # free_port() picks from here up to the kernel's ephemeral range
PORT_RANGE_ENV: Final = "SETTLE_PORT_RANGE"  # "LOW-HIGH": pick free ports in this range only (HIGH excluded)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections take their local port there)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_range() -> tuple[int, int]:
    """Where free ports are picked: ``SETTLE_PORT_RANGE`` when set, so that processes picking side by side
    (a port is free when picked but bound only later, by its process) can be given disjoint ranges; else
    from PORTS_LOW up to the kernel's ephemeral range."""
    given = os.environ.get(PORT_RANGE_ENV)
    if given:
        try:
            low, high = (int(part) for part in given.split("-"))
        except ValueError:
            raise ValueError(f"{PORT_RANGE_ENV}={given!r}: expected LOW-HIGH, e.g. 10000-15000") from None
        if not 1024 <= low < high <= 65536:
            raise ValueError(f"{PORT_RANGE_ENV}={given!r}: expected 1024 <= LOW < HIGH <= 65536")
        return low, high
    return PORTS_LOW, _ephemeral_low()


def port_slice(index: int, count: int, whole: tuple[int, int]) -> tuple[int, int]:
    """Slice INDEX of COUNT equal, disjoint slices of the port range WHOLE (one per process picking)."""
    width = (whole[1] - whole[0]) // count
    return whole[0] + index * width, whole[0] + (index + 1) * width


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A free port of ``host`` in ``port_range()``, below the kernel's ephemeral range. The port is only
    bound later, by the process it is for; a port from the ephemeral range (what binding port 0 gives)
    could meanwhile become the local end of any outgoing connection on the machine, or of a client's own
    connect to it while the server is not up yet (TCP connects to itself), and the server's bind would
    fail: address in use."""
    low, high = port_range()
    if high > low + 100:
        for _ in range(1000):
            port = random.randrange(low, high)
            if _bindable(port, host):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # an odd port range: the kernel's pick
        s.bind((host, 0))
        picked: int = s.getsockname()[1]
        return picked


def demo_config(data_dir: Path, shards: int, store: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config on free loopback ports with everything under ``data_dir``."""
    raw: dict[str, Any] = json.loads(json.dumps(base or {}))
    raw.setdefault("engine", {}).update({"data_dir": str(data_dir)})
    if shards:
        raw["engine"]["shards"] = shards
    # Each port is free when picked but bound only later, by its process: keep the picks apart from each
    # other, or two of them (the supervisor's and a shard's metrics port) may come out the same.
    taken: set[int] = set()

    def pick() -> int:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        return port

    raw.setdefault("me", {}).update({"publish": f"tcp://127.0.0.1:{pick()}", "replay": f"tcp://127.0.0.1:{pick()}"})
    raw.setdefault("store", {}).update({"kind": store})
    if store == "embedded":
        raw["store"]["path"] = str(data_dir / "settle.db")
    raw.setdefault("metrics", {}).update({
        "supervisor_port": pick(), "router_port": pick(), "simulator_port": pick(),
        "shard_port_base": _free_port_range(configmod.from_dict(raw).shard_count, taken),
    })
    return raw


def _free_port_range(count: int, taken: set[int] | None = None) -> int:
    for _ in range(50):
        base = free_port()
        if base + count >= 65535 or (taken and taken.intersection(range(base, base + count))):
            continue
        try:
            socks = []
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free range of ports for shard metrics")


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a process with its stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log)


def start_engine(config_path: Path, data_dir: Path) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-m", "engine.cli", "run", "--config", str(config_path), "--log-dir",
                  str(data_dir / "logs")], data_dir / "logs" / "supervisor.log")


def start_simulator(config: configmod.Config, data_dir: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "engine.cli", "sim", "--publish", config.me.publish, "--replay", config.me.replay,
            "--log", str(data_dir / "me.log"), "--trades", str(args.trades), "--rate", str(args.rate),
            "--seed", str(args.seed), "--symbols", str(args.symbols), "--accounts", str(args.accounts),
            "--heartbeat-ms", str(config.me.heartbeat_interval_ms), "--wait-subscribers", "1",
            "--metrics-port", str(config.metrics.simulator_port), "--timestamps", "wall"]
    return spawn(argv, data_dir / "logs" / "simulator.log")


def wait_engine_ready(engine: subprocess.Popen[bytes], data_dir: Path, timeout_s: float) -> None:
    state = state_path(data_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine.poll() is not None:
            raise RuntimeError(f"the engine exited with {engine.returncode} while starting; "
                               f"see {data_dir / 'logs'}")
        if state.exists():
            try:
                slots = json.loads(state.read_text())["slots"]
            except (ValueError, KeyError):
                slots = {}
            if slots and all(s["ready"] for s in slots.values()):
                return
        time.sleep(0.1)
    raise RuntimeError(f"the engine was not ready within {timeout_s:.0f}s; see {data_dir / 'logs'}")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def _watermarks(config: configmod.Config) -> dict[str, int]:
    from engine.core.store import open_store

    store = await open_store(config.store, create_schema=False)
    try:
        return await store.watermarks()
    finally:
        await store.close()


def demo(args: argparse.Namespace) -> int:
    from engine.core.child import run_async

    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="settle-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    base: dict[str, Any] = {}
    if args.config:
        import tomllib

        with open(args.config, "rb") as f:
            base = tomllib.load(f)
    for override in args.set:
        configmod.set_dotted(base, *configmod.parse_override(override))
    raw = demo_config(data_dir, args.shards, args.store, base)
    config = configmod.from_dict(raw, "demo")
    config_path = data_dir / "config.json"
    config_path.write_text(json.dumps(raw, indent=2))
    shards = config.shard_count
    print(f"settle demo: {args.trades} trades over {args.symbols} symbols and {args.accounts} accounts, "
          f"{shards} shards, {config.store.kind} store, data in {data_dir}")

    engine = start_engine(config_path, data_dir)
    sim: subprocess.Popen[bytes] | None = None
    try:
        wait_engine_ready(engine, data_dir, config.supervisor.ready_timeout_s)
        print("engine ready: shards recovered, router subscribed; starting the simulator")
        sim = start_simulator(config, data_dir, args)
        started = time.monotonic()
        first_settled_at: float | None = None
        last_progress = time.monotonic()
        settled = prev = 0
        while settled < args.trades:
            time.sleep(POLL_S)
            if engine.poll() is not None:
                print(f"settle demo: the engine exited with {engine.returncode}; see {data_dir / 'logs'}",
                      file=sys.stderr)
                return EXIT_FAILURE
            if sim.poll() not in (None, 0):
                print(f"settle demo: the simulator exited with {sim.returncode}; see {data_dir / 'logs'}",
                      file=sys.stderr)
                return EXIT_FAILURE
            watermarks = run_async(_watermarks(config))
            settled = sum(watermarks.values())
            now = time.monotonic()
            if settled and first_settled_at is None:
                first_settled_at = now - POLL_S
            if settled != prev:
                last_progress = now
            elif now - last_progress > args.timeout:
                print(f"settle demo: nothing settled for {args.timeout:.0f}s at {settled}/{args.trades}; "
                      f"see {data_dir / 'logs'}", file=sys.stderr)
                return EXIT_FAILURE
            per_shard = [0] * shards
            for symbol, seq in watermarks.items():
                per_shard[shard_for(symbol, shards)] += seq
            shard_text = " ".join(f"s{i}={n}" for i, n in enumerate(per_shard))
            print(f"  {now - started:6.1f}s settled {settled:>9}/{args.trades}  "
                  f"{(settled - prev) / POLL_S:>9,.0f} trades/s  watermarks by shard: {shard_text}", flush=True)
            prev = settled
        elapsed = time.monotonic() - (first_settled_at or started)
        print(f"all {args.trades} trades settled in {elapsed:.1f}s: {args.trades / elapsed:,.0f} trades/s "
              f"end to end (publish, route, WAL fsync, store)")
    finally:
        code = stop(engine)
        if sim is not None:
            stop(sim)
        if code not in (0, None):
            print(f"settle demo: the engine stopped with exit code {code}", file=sys.stderr)

    from engine.core.store import open_store
    from engine.verify.checker import check

    async def verify() -> Any:
        store = await open_store(config.store, create_schema=False)
        try:
            return await check(str(data_dir / "me.log"), store, config.engine.fee_account)
        finally:
            await store.close()

    report = run_async(verify())
    print(report.format())
    if not report.ok:
        print("settle demo: VERIFICATION FAILED", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print("verified: every published trade settled exactly once, balances exact, every asset conserved")
    if not args.data_dir and not os.environ.get("SETTLE_KEEP_DEMO"):
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)
    return 0

