"""``settle bench --quick`` runs every scenario on the embedded store and writes well-formed results.

No speed is asserted anywhere: the figures of a quick run on a shared machine mean nothing. What is
checked is that each scenario ran, that every settled run verified, and that the JSON has the shape
``docs/performance.md`` and the charts are built from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import busy_ticks
from bench.latency import STAGES

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("machine", "limits", "baseline", "throughput", "demo", "sustained", "latency", "recovery", "replay",
            "memory", "targets", "summary", "errors", "scenario_seconds")


def _finite_numbers(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def test_busy_ticks_leave_out_idle_and_io_wait() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    assert busy_ticks("cpu  100 2 30 5000 70 4 5 6 50 0") == 100 + 2 + 30 + 4 + 5 + 6


def test_quick_bench_writes_well_formed_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))  # short: the shards' unix sockets live under it
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--store", "embedded", "--out", str(out), "--work-dir", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    shutil.rmtree(work, ignore_errors=True)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads((out / "bench.json").read_text())  # strict JSON: NaN would not parse back out
    assert set(SECTIONS) <= set(results), sorted(set(SECTIONS) - set(results))
    assert results["errors"] == {}
    assert results["quick"] is True
    assert _finite_numbers(results)

    limits = results["limits"]
    for key in ("fdatasync_per_s", "fsync_per_s", "group_commit_mb_per_s", "zmq_push_pull_msgs_per_s"):
        assert limits[key] > 0, key

    runs = results["baseline"]["runs"] + results["throughput"]["runs"] + results["demo"]["runs"]
    assert {r["store"] for r in runs} == {"embedded", "null"}
    for run in runs:
        assert run["trades_per_s"] > 0, run
        assert run["verified"] is (None if run["store"] == "null" else True), run
    assert results["demo"]["group_commit_vs_fsync_per_trade"] > 0

    sustained = results["sustained"]
    assert [r["rate"] > 0 and r["verified"] is True for r in sustained["runs"]] == [True]
    assert len(sustained["runs"][0]["per_minute"]) == 2
    assert sustained["capacity"]["embedded"]["burst_trades_per_s"] > 0

    for level in results["latency"]["runs"]:
        assert level["verified"] is True
        assert level["count"] > 0
        assert level["p50_ms"] <= level["p99_ms"] <= level["p999_ms"]
        assert level["buckets"][-1][0] is None  # +Inf, written as null
        assert [s["stage"] for s in level["stages"]] == ["lag", *STAGES]
        cores = level["cores"]  # where the machine's cores went: each part was busy, all within the machine
        assert cores["shards"] > 0
        assert cores["router"] > 0
        assert cores["simulator"] > 0
        assert cores["shards"] + cores["router"] + cores["simulator"] <= cores["machine"] + 0.1
        assert cores["machine"] <= (os.cpu_count() or 1) + 0.1
    assert {level["fraction"] for level in results["latency"]["runs"]} == {0.5, 0.9}

    (resettle,) = results["recovery"]["resettle"]
    assert resettle["complete"] is True
    assert resettle["recovered"] == resettle["records"]
    (kill,) = results["recovery"]["kill"]
    assert kill["verified"] is True
    assert kill["settling_again_s"] is not None

    replay = results["replay"]
    assert {r["heartbeat_ms"] for r in replay["lost"]} == {100, 500}
    for run in replay["lost"]:
        assert run["verified"] is True, run
        assert run["lost"] > 0, run
        assert run["replay_lag_count"] >= run["lost"], run  # every lost trade came by replay
    assert replay["catch_up"]["verified"] is True
    assert replay["catch_up"]["replayed"] == replay["catch_up"]["trades"]  # each asked for once

    memory = results["memory"]
    assert memory["verified"] is True
    assert {"router", "shard-0", "shard-1", "supervisor"} <= set(memory["processes"])

    names = {t["target"] for t in results["targets"]}
    assert any(n.startswith("throughput vs design note") for n in names)
    assert "router + WAL path vs raw pyzmq" in names
    assert all(t["met"] in (True, False) for t in results["targets"])
    for chart in ("throughput.png", "latency.png", "latency-vs-rate.png", "memory.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
