"""Shared pieces: run the real pipeline (simulator + supervised engine) and time it; tables and JSON."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine import config as configmod
from engine.demo import demo_config, spawn, start_engine, stop, wait_engine_ready
from engine.store import open_store

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class PipelineRun:
    name: str
    shards: int
    trades: int
    seconds: float
    trades_per_s: float
    verified: bool


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


async def _settled(config: configmod.Config) -> int:
    store = await open_store(config.store, create_schema=False)
    try:
        return sum((await store.watermarks()).values())
    finally:
        await store.close()


def run_pipeline(name: str, trades: int, shards: int, overrides: dict[str, Any] | None = None,
                 store: str = "embedded", rate: int = 0, verify: bool = True, symbols: int = 16) -> PipelineRun:
    """Start engine and simulator on free ports, publish ``trades``, time until the store holds them all."""
    root = Path(tempfile.mkdtemp(prefix=f"settle-bench-{name}-"))
    (root / "logs").mkdir()
    base: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        configmod.set_dotted(base, dotted, value)
    raw = demo_config(root, shards, store, base)
    if store == "cassandra":
        raw["store"].setdefault("cassandra", {})["keyspace"] = f"bench_{name.replace('-', '_')}_{os.getpid()}"
    config = configmod.from_dict(raw, name)
    (root / "config.json").write_text(json.dumps(raw))
    engine = start_engine(root / "config.json", root)
    sim: subprocess.Popen[bytes] | None = None
    try:
        wait_engine_ready(engine, root, 300)
        sim = spawn([sys.executable, "-m", "engine.cli", "sim", "--publish", config.me.publish, "--replay",
                     config.me.replay, "--log", str(root / "me.log"), "--trades", str(trades), "--rate", str(rate),
                     "--symbols", str(symbols), "--wait-subscribers", "1", "--timestamps", "wall", "--quiet"],
                    root / "logs" / "simulator.log")
        settled, first_at, last_change = 0, 0.0, time.monotonic()
        while settled < trades:
            time.sleep(0.05)
            now = time.monotonic()
            value = asyncio.run(_settled(config))
            if value and not first_at:
                first_at = now
            if value != settled:
                settled, last_change = value, now
            if now - last_change > 120:
                raise RuntimeError(f"{name}: stalled at {settled}/{trades}; see {root}/logs")
        seconds = time.monotonic() - (first_at or time.monotonic())
    finally:
        stop(engine)
        if sim is not None:
            stop(sim)
    ok = True
    if verify:
        from engine.checker import check

        async def verify_run() -> bool:
            st = await open_store(config.store, create_schema=False)
            try:
                return (await check(str(root / "me.log"), st, 0)).ok
            finally:
                await st.close()

        ok = asyncio.run(verify_run())
    shutil.rmtree(root, ignore_errors=True)
    return PipelineRun(name, shards, trades, seconds, trades / max(seconds, 1e-9), ok)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)))
    return path
