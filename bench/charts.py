"""PNG charts of a ``settle bench`` result (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

STORE_COLOURS = {"embedded": "#1f77b4", "cassandra": "#ff7f0e", "null": "#2ca02c"}


def draw(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every chart the results have data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, fn in (("throughput.png", _throughput), ("latency.png", _latency),
                     ("latency-vs-rate.png", _latency_vs_rate), ("memory.png", _memory)):
        path = out_dir / name
        if fn(results, path):
            written.append(path)
    return written


def _throughput(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = [r for r in results.get("throughput", {}).get("runs", []) if r.get("trades_per_s")]
    baselines = {r["store"]: r for r in results.get("baseline", {}).get("runs", []) if r.get("trades_per_s")}
    if not runs:
        return False
    stores = [s for s in ("embedded", "cassandra", "null") if any(r["store"] == s for r in runs)]
    shard_counts = sorted({r["shards"] for r in runs})
    categories = ["design note\n(baseline)"] + [f"{n} shard{'s' if n > 1 else ''}" for n in shard_counts]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(stores)
    for i, store in enumerate(stores):
        values = [baselines[store]["trades_per_s"] if store in baselines else math.nan]
        for n in shard_counts:
            match = [r["trades_per_s"] for r in runs if r["store"] == store and r["shards"] == n]
            values.append(max(match) if match else math.nan)
        xs = [x + (i - (len(stores) - 1) / 2) * width for x in range(len(categories))]
        label = {"null": "no store writes (router + WAL path)"}.get(store, f"{store} store")
        bars = ax.bar(xs, values, width, label=label, color=STORE_COLOURS.get(store))
        for bar, value in zip(bars, values, strict=True):
            if value == value:
                ax.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                            va="bottom", fontsize=7)
    zmq = results.get("limits", {}).get("zmq_push_pull_msgs_per_s")
    if zmq:
        ax.axhline(zmq, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"raw pyzmq PUSH/PULL {zmq:,.0f} msgs/s", (len(categories) - 0.5, zmq), ha="right",
                    va="bottom", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel("trades settled per second (log scale)")
    ax.set_title("settle throughput against shard count, durability on (fsync before every store write)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _latency(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    levels = [r for r in results.get("latency", {}).get("runs", []) if r.get("count")]
    if not levels:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in levels:
        buckets = [(le, count) for le, count in r["buckets"] if le is not None and math.isfinite(le)]
        total = r["count"]
        xs = [le * 1e3 for le, _ in buckets]
        ys = [count / total for _, count in buckets]
        label = f"{r['store']}, {r['fraction']:.0%} of max ({r['rate']:,.0f}/s): p99 {r['p99_ms']:.1f} ms"
        ax.step(xs, ys, where="post", marker="o", markersize=3, label=label)
    ax.axvline(25, color="grey", linestyle="--", linewidth=1)
    ax.annotate("25 ms", (25, 0.02), fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("ME execution to store commit, ms (histogram bucket bounds, log scale)")
    ax.set_ylabel("share of trades settled within")
    ax.set_title("Latency distribution (settle_lag_seconds, cumulative)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _latency_vs_rate(results: dict[str, Any], path: Path) -> bool:
    """p50 and p99 of the lag against the publish rate, per store: the latency runs and, as crosses, the
    last minute of each sustained run."""
    import matplotlib.pyplot as plt

    levels = [r for r in results.get("latency", {}).get("runs", []) if r.get("count")]
    sustained = results.get("sustained", {}).get("runs", [])
    if not levels and not sustained:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for store in sorted({r["store"] for r in levels} | {r["store"] for r in sustained}):
        runs = sorted((r for r in levels if r["store"] == store), key=lambda r: r["rate"])
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            if runs:
                ax.plot([r["rate"] for r in runs], [r[key] for r in runs], style, marker="o", markersize=4,
                        label=f"{store} {key[:3]}")
        held = [r for r in sustained if r["store"] == store]
        if held:
            ax.plot([r["rate"] for r in held], [r["last_minute_p99_ms"] for r in held], "x", markersize=8,
                    label=f"{store} p99, last minute of {held[0]['minutes']} sustained")
    ax.axhline(25, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("publish rate, trades/s (the ME generating live on the same cores)")
    ax.set_ylabel("ME execution to store commit, ms (log scale)")
    ax.set_title("Latency against rate (settle_lag_seconds)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _memory(results: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    processes = results.get("memory", {}).get("processes", {})
    if not processes:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for slot, p in sorted(processes.items()):
        series = p.get("series") or []
        if series:
            ax.plot([t for t, _ in series], [m for _, m in series], label=slot)
    memory = results["memory"]
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Resident memory over {memory.get('trades', 0):,} trades at {memory.get('rate', 0):,.0f}/s")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
