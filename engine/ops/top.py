"""``settle top``: a live terminal view of the engine's metrics, for an operator with no Grafana at hand.

Every ``interval_s`` it scrapes each process's ``/metrics`` (the ports in ``[metrics]``; the shard count the
running supervisor wrote to ``<data_dir>/run/config.json`` when there is one) and redraws one screen:

- per shard: ready, trades/s settled, trades behind the ME, open gaps, WAL bytes, fsync and store write p99,
  quarantined messages, the router's fan-out to it and its queue there, restarts, CPU and RSS;
- per shard, where a trade's time goes: the settle lag's p50 and p99, and the mean time per trade in each
  stage of ``settle_stage_seconds`` (they add up to the mean lag);
- the router's intake and drops, the supervisor's restarts, and the simulator when one is serving.

Rates and percentiles are taken over the last ``WINDOW_S`` seconds of scrapes, the way Prometheus's
``rate()`` and ``histogram_quantile()`` do it. A process that does not answer shows as DOWN.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, TextIO

from prometheus_client.parser import text_string_to_metric_families

from engine.core.config import Config
from engine.core.errors import EXIT_FAILURE, EXIT_OK
from engine.core.metrics import STAGES
from engine.ops.table import text_table

WINDOW_S: Final = 10.0
SCRAPE_TIMEOUT_S: Final = 0.8
CLEAR: Final = "\x1b[H\x1b[2J"

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, list[tuple[Labels, float]]]  # sample name -> [(labels, value)]


@dataclass(frozen=True)
class Target:
    name: str  # "supervisor", "router", "simulator", "shard-N"
    url: str


@dataclass(frozen=True)
class Scrape:
    at: float  # monotonic seconds
    samples: dict[str, Samples | None]  # by target name; None when it did not answer


def shard_count(config: Config) -> int:
    """The running engine's shard count (it fixes "auto" in run/config.json), else the config's."""
    try:
        raw = json.loads((config.data_path / "run" / "config.json").read_text())
        return int(raw["engine"]["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return config.shard_count


def targets(config: Config, shards: int | None = None) -> list[Target]:
    m = config.metrics
    host = "127.0.0.1" if m.host in ("0.0.0.0", "", "::") else m.host
    out = [Target("supervisor", f"http://{host}:{m.supervisor_port}/metrics"),
           Target("router", f"http://{host}:{m.router_port}/metrics")]
    if m.simulator_port:
        out.append(Target("simulator", f"http://{host}:{m.simulator_port}/metrics"))
    count = shard_count(config) if shards is None else shards
    out.extend(Target(f"shard-{i}", f"http://{host}:{m.shard_port_base + i}/metrics") for i in range(count))
    return out


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, []).append((labels, float(sample.value)))
    return samples


def _fetch(target: Target, timeout_s: float) -> Samples | None:
    try:
        with urllib.request.urlopen(target.url, timeout=timeout_s) as response:
            return parse(response.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def scrape(targets_: list[Target], pool: ThreadPoolExecutor, timeout_s: float = SCRAPE_TIMEOUT_S) -> Scrape:
    """Scrape every target at once: a hung process costs one timeout, not one per target."""
    at = time.monotonic()
    results = pool.map(lambda t: _fetch(t, timeout_s), targets_)
    return Scrape(at, dict(zip((t.name for t in targets_), results, strict=True)))


# ------------------------------------------------------------------------------ reading samples


def _match(labels: Labels, want: dict[str, str]) -> bool:
    have = dict(labels)
    return all(have.get(k) == v for k, v in want.items())


def total(samples: Samples | None, name: str, **want: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``want``; None when there are none."""
    if samples is None:
        return None
    values = [v for labels, v in samples.get(name, []) if _match(labels, want)]
    return sum(values) if values else None


def by_label(samples: Samples | None, name: str, label: str, **want: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in (samples or {}).get(name, []):
        if _match(labels, want):
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def rate(old: Samples | None, new: Samples | None, seconds: float, name: str, **want: str) -> float | None:
    """Per-second increase of a counter between two scrapes; a reset (restart) counts from zero."""
    a, b = total(old, name, **want), total(new, name, **want)
    if a is None or b is None or seconds <= 0:
        return None
    return (b - a if b >= a else b) / seconds


def quantile(q: float, old: Samples | None, new: Samples | None, name: str, **want: str) -> float | None:
    """``histogram_quantile`` over the observations made between two scrapes; None when there were none."""
    if old is None or new is None:
        return None
    before = by_label(old, f"{name}_bucket", "le", **want)
    after = by_label(new, f"{name}_bucket", "le", **want)
    if not after:
        return None
    reset = any(after[le] < before.get(le, 0.0) for le in after)
    buckets = sorted((float(le), after[le] - (0.0 if reset else before.get(le, 0.0))) for le in after)
    count = buckets[-1][1]
    if count <= 0:
        return None
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower_bound  # above the highest finite bucket: its bound, as Prometheus does
            span = cumulative - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1.0)
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def mean(old: Samples | None, new: Samples | None, name: str, **want: str) -> float | None:
    """The mean of the observations histogram ``name`` made between two scrapes; None when there were none."""
    if old is None or new is None:
        return None
    total_new, count_new = total(new, f"{name}_sum", **want), total(new, f"{name}_count", **want)
    if total_new is None or not count_new:
        return None
    total_old, count_old = total(old, f"{name}_sum", **want) or 0.0, total(old, f"{name}_count", **want) or 0.0
    if count_new < count_old:  # the process restarted: everything since its start
        total_old, count_old = 0.0, 0.0
    count = count_new - count_old
    return (total_new - total_old) / count if count > 0 else None


# ------------------------------------------------------------------------------ the screen


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "s":
        if v < 0.01:
            return f"{v * 1e3:.2f}ms"
        return f"{v * 1e3:.1f}ms" if v < 1 else f"{v:.2f}s"
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024 or suffix == "TiB":
                return f"{v:.0f}{suffix}" if suffix == "B" else f"{v:.1f}{suffix}"
            v /= 1024
    if unit == "%":
        return f"{v * 100:.0f}%"
    return f"{v:,.0f}"


def frame(old: Scrape, new: Scrape, shards: int, where: str) -> str:
    """One screen from two scrapes ``old`` (the start of the window) and ``new``."""
    seconds = new.at - old.at
    o, n = old.samples, new.samples
    sup, router, sim = n.get("supervisor"), n.get("router"), n.get("simulator")
    lines = [f"settle top  {time.strftime('%H:%M:%S')}  {shards} shards  {where}  "
             f"(rates over {seconds:.1f}s; Ctrl-C quits)", ""]
    restarts = by_label(sup, "settle_supervisor_restarts_total", "slot")
    rows = []
    for i in range(shards):
        name = f"shard-{i}"
        s, so = n.get(name), o.get(name)
        shard = str(i)
        if s is None:
            state = "DOWN"
        else:
            state = "ready" if (total(s, "settle_shard_ready") or 0) >= 1 else "recovering"
        behind = None
        if s is not None:
            latest = by_label(s, "settle_me_latest_seq", "symbol")
            marks = by_label(s, "settle_watermark_seq", "symbol")
            behind = sum(max(0.0, latest.get(sym, 0.0) - marks.get(sym, 0.0)) for sym in latest)
        gaps = total(s, "settle_gaps_open")
        oldest = total(s, "settle_gap_oldest_open_seconds")
        gap_text = _num(gaps) + (f" ({oldest:.0f}s)" if gaps and oldest else "")
        cpu = rate(so, s, seconds, "process_cpu_seconds_total")
        rows.append([
            shard, state,
            _num(rate(so, s, seconds, "settle_trades_settled_total")),
            _num(behind),
            gap_text,
            _num(total(s, "settle_wal_bytes"), "B"),
            _num(quantile(0.99, so, s, "settle_wal_fsync_seconds"), "s"),
            _num(quantile(0.99, so, s, "settle_store_write_seconds"), "s"),
            _num(total(s, "settle_quarantined_total")),
            _num(rate(o.get("router"), router, seconds, "settle_router_forwarded_total", shard=shard)),
            _num(total(router, "settle_router_queue_depth", shard=shard)),
            _num(restarts.get(name)) if sup is not None else "-",
            _num(cpu, "%"),
            _num(total(s, "process_resident_memory_bytes"), "B"),
        ])
    lines += text_table(["shard", "state", "settled/s", "behind ME", "gaps", "WAL", "fsync p99", "store p99",
                     "quarantined", "routed/s", "queue", "restarts", "cpu", "rss"], rows)
    lines += ["", "time per trade: settle lag, and its mean in each stage (the stages add up to the lag mean)"]
    stage_rows = []
    for i in range(shards):
        s, so = n.get(f"shard-{i}"), o.get(f"shard-{i}")
        stage_rows.append([
            str(i),
            _num(quantile(0.50, so, s, "settle_lag_seconds"), "s"),
            _num(quantile(0.99, so, s, "settle_lag_seconds"), "s"),
            _num(mean(so, s, "settle_lag_seconds"), "s"),
            *(_num(mean(so, s, "settle_stage_seconds", stage=stage), "s") for stage in STAGES),
        ])
    lines += text_table(["shard", "lag p50", "lag p99", "lag mean", *STAGES], stage_rows)
    lines.append("")
    if router is None:
        lines.append("router      DOWN")
    else:
        received = rate(o.get("router"), router, seconds, "settle_router_received_total")
        lines.append(f"router      received {_num(received)}/s"
                     f"  dropped {_num(total(router, 'settle_router_dropped_total'))}"
                     f"  quarantined {_num(total(router, 'settle_quarantined_total'))}"
                     f"  restarts {_num(restarts.get('router')) if sup is not None else '-'}"
                     f"  cpu {_num(rate(o.get('router'), router, seconds, 'process_cpu_seconds_total'), '%')}"
                     f"  rss {_num(total(router, 'process_resident_memory_bytes'), 'B')}")
    if sup is None:
        lines.append("supervisor  DOWN")
    else:
        up = by_label(sup, "settle_supervisor_child_up", "slot")
        lines.append(f"supervisor  children up {_num(sum(up.values()))}/{len(up)}"
                     f"  restarts {_num(sum(restarts.values()))}")
    if sim is not None:
        lines.append(f"simulator   published {_num(total(sim, 'settle_sim_trades_published_total'))}"
                     f" ({_num(rate(o.get('simulator'), sim, seconds, 'settle_sim_trades_published_total'))}/s)")
    return "\n".join(lines)


def top(config: Config, *, once: bool = False, interval_s: float = 1.0, out: TextIO | None = None) -> int:
    """Redraw every ``interval_s`` until Ctrl-C; ``once`` prints one frame (two scrapes, ``interval_s``
    apart, for the rates) and returns. Exit code 1 when no settle process answered."""
    stream = out or sys.stdout
    shards = shard_count(config)
    targets_ = targets(config, shards)
    where = f"metrics at {config.metrics.host}"
    history: deque[Scrape] = deque()
    with ThreadPoolExecutor(max_workers=min(32, len(targets_))) as pool:
        try:
            while True:
                history.append(scrape(targets_, pool))
                while len(history) > 2 and history[-1].at - history[1].at >= WINDOW_S:
                    history.popleft()
                if len(history) >= 2:
                    text = frame(history[0], history[-1], shards, where)
                    if once:
                        stream.write(text + "\n")
                        stream.flush()
                        return EXIT_OK if _anyone(history[-1]) else _nobody(stream, targets_)
                    stream.write((CLEAR if stream.isatty() else "\n") + text + "\n")
                    stream.flush()
                time.sleep(interval_s)
        except KeyboardInterrupt:
            return EXIT_OK


def _anyone(s: Scrape) -> bool:
    return any(v is not None for k, v in s.samples.items() if k != "simulator")


def _nobody(stream: TextIO, targets_: list[Target]) -> int:
    stream.write(f"settle top: no settle process answered (tried {targets_[0].url} and "
                 f"{len(targets_) - 1} more); is the engine running with this config?\n")
    return EXIT_FAILURE
