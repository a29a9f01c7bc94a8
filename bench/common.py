"""Shared pieces: the machine, processes seen through /proc, /metrics scrapes, tables and JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import urllib.request
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from engine.ops.table import text_table

# Relative: results go under the directory settle bench runs in (never into the installed source tree);
# --out names another.
RESULTS = Path("bench-results")


# ------------------------------------------------------------------------------------------ the machine


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(total_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


def disk_of(path: Path) -> str:
    """The device and file system holding ``path`` (from /proc/mounts: the longest matching mount)."""
    target = str(Path(path).resolve())
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                    best = (mount, device, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}) mounted on {best[0] or '?'}"


# ----------------------------------------------------------------------------------------- /proc/PID


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0.0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_ticks(cpu_line: str) -> int:
    """Busy clock ticks in a ``/proc/stat`` ``cpu`` line: user, nice, system, irq, softirq and steal; not idle
    or I/O wait (guest time is already counted in user)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in cpu_line.split()[1:9])
    return user + nice + system + irq + softirq + steal


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process, the kernel) since boot."""
    with open("/proc/stat") as f:
        return busy_ticks(f.readline()) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a live process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -------------------------------------------------------------------------------------------- /metrics


def scrape(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text: str = response.read().decode()
        return text


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def histogram_buckets(text: str, name: str, where: str = "") -> dict[float, float]:
    """``le`` -> cumulative count of histogram ``name``, summed over the label sets that hold ``where``
    (one ``label="value"`` pair, e.g. ``stage="fsync"``; every label set when empty)."""
    buckets: dict[float, float] = {}
    prefix = f"{name}_bucket{{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, value = line[len(prefix) :].rsplit("} ", 1)
        if where and where not in labels.split(","):
            continue
        le = next(part.split("=", 1)[1].strip('"') for part in labels.split(",") if part.startswith("le="))
        bound = math.inf if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return buckets


def histogram_sum(text: str, name: str, where: str = "") -> float:
    """The ``_sum`` of histogram ``name`` over the label sets that hold ``where`` (as :func:`histogram_buckets`)."""
    total = 0.0
    prefix = f"{name}_sum{{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix) :].rsplit("} ", 1)
            if not where or where in labels.split(","):
                total += float(value)
    return total


def subtract(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: count - before.get(le, 0.0) for le, count in after.items()}


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket the rank falls in."""
    bounds = sorted(buckets)
    if not bounds or not buckets[bounds[-1]]:
        return math.nan
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # past the last finite bucket: its upper bound is all we know
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return bounds[-1]


def fraction_at_most(bound: float, buckets: dict[float, float]) -> float:
    """Exact share of observations ``<= bound`` when ``bound`` is a bucket bound."""
    total = buckets.get(math.inf) or max(buckets.values(), default=0.0)
    return buckets.get(bound, math.nan) / total if total else math.nan


# ---------------------------------------------------------------------------------------- presentation


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` (dicts) as a text table of ``columns`` (:func:`engine.ops.table.text_table`)."""
    return "\n".join(text_table(columns, ([r.get(c) for c in columns] for r in rows)))


def _default(o: Any) -> Any:
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean_json(value: Any) -> Any:
    """NaN and infinities as None (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    directory = out_dir or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = clean_json(json.loads(json.dumps({"machine": machine(), **payload}, default=_default)))
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path
