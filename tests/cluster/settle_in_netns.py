"""Run settle (engine and ME simulator) inside the network namespace this process was started in, for
tests/cluster/test_cassandra_netem.py: settle, then wait for the parent to impair the link, settle on.

    python -m tests.cluster.settle_in_netns ROOT OVERRIDES_JSON TRADES RATE

Prints ``baseline`` once a third of the trades are settled (the baseline lag is that of the second
sixth, after the start-up backlog), reads one line from stdin (the parent has
impaired the link), and prints a JSON summary at the end: the checker's verdict and the mean settle lag
before and after the impairment (from the shards' ``settle_lag_seconds`` sum and count).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from engine.verify.testbed import System


def lag_totals(system: System) -> tuple[float, float]:
    """Sum and count of ``settle_lag_seconds`` over the shards."""
    total, count = 0.0, 0.0
    for shard in range(system.config.shard_count):
        port = system.config.metrics.shard_port_base + shard
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("settle_lag_seconds_sum"):
                    total += float(line.rsplit(" ", 1)[1])
                elif line.startswith("settle_lag_seconds_count"):
                    count += float(line.rsplit(" ", 1)[1])
    return total, count


def main(root: str, overrides_json: str, trades: int, rate: int) -> int:
    system = System(Path(root), shards=2, store="cassandra", overrides=json.loads(overrides_json))
    try:
        system.start_engine()
        system.start_sim(trades, rate=rate)
        system.wait_settled(trades // 6, at_least=True)
        warm = lag_totals(system)  # the start-up backlog is behind us: the baseline is measured from here
        system.wait_settled(trades // 3, at_least=True)
        before = lag_totals(system)
        print("baseline", flush=True)
        sys.stdin.readline()
        impaired_from = lag_totals(system)
        system.wait_settled(timeout_s=600)
        end = lag_totals(system)
    finally:
        system.stop()
    report = system.check()
    errors = [line for path in sorted((system.root / "logs").glob("*.log"))
              for line in path.read_text(errors="replace").splitlines() if " ERROR " in line or "CRITICAL" in line]
    print(json.dumps({
        "ok": report.ok, "published": report.published, "settled": report.settled, "report": report.format(),
        "baseline_lag_ms": 1000 * (before[0] - warm[0]) / max(before[1] - warm[1], 1),
        "impaired_lag_ms": 1000 * (end[0] - impaired_from[0]) / max(end[1] - impaired_from[1], 1),
        "impaired_trades": end[1] - impaired_from[1], "errors": errors[:20],
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
