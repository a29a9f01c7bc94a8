"""Run settle (engine and ME simulator) inside the network namespace this process was started in, for
tests/cluster/test_cassandra_netem.py: settle a first batch on a clean link, wait for the parent to
impair the link, then publish and settle a second batch through the impaired path.

    python -m tests.cluster.settle_in_netns ROOT OVERRIDES_JSON BEFORE AFTER RATE

Publishes BEFORE trades at RATE/s and waits until every one of them is settled (the baseline lag is that
of the second half, after the start-up backlog, when the polls could tell the halves apart), prints
``baseline``, reads one line from stdin (the parent has impaired the link), and only then restarts the
simulator on its log to publish AFTER more trades: every one of those is published, and so settled,
through the impaired link, however far behind settle was before. Prints a JSON summary at the end: the
checker's verdict and the mean settle lag before and after the impairment (from the shards'
``settle_lag_seconds`` sum and count).
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


def main(root: str, overrides_json: str, before_trades: int, after_trades: int, rate: int) -> int:
    system = System(Path(root), shards=2, store="cassandra", overrides=json.loads(overrides_json))
    total = before_trades + after_trades
    try:
        system.start_engine()
        system.start_sim(before_trades, rate=rate)
        system.wait_settled(before_trades // 2, at_least=True, timeout_s=600)
        warm = lag_totals(system)  # the start-up backlog is behind us: the baseline is measured from here
        system.wait_settled(before_trades, timeout_s=600)
        before = lag_totals(system)
        # The second half of the batch; all of it when the first poll came too late to split it (each poll
        # of the store is a new TLS session through the namespace: slow on a loaded machine).
        baseline = (before[0] - warm[0], before[1] - warm[1]) if before[1] > warm[1] else before
        first = system.stop_sim()  # it has published all of the first batch; the second is not yet made
        print("baseline", flush=True)
        if sys.stdin.readline().strip() != "impaired":
            raise SystemExit("settle_in_netns: the parent went away before impairing the link")
        impaired_from = lag_totals(system)
        system.start_sim(total, rate=rate, log_name="simulator-impaired.log")  # continues me.log to TOTAL
        system.wait_settled(total, timeout_s=900)
        end = lag_totals(system)
        second = system.stop_sim()
    finally:
        system.stop()
    report = system.check()
    errors = [line for path in sorted((system.root / "logs").glob("*.log"))
              for line in path.read_text(errors="replace").splitlines() if " ERROR " in line or "CRITICAL" in line]
    print(json.dumps({
        "ok": report.ok, "published": report.published, "settled": report.settled, "report": report.format(),
        "published_before": first.trades if first else None, "published_after": second.trades if second else None,
        "baseline_lag_ms": 1000 * baseline[0] / max(baseline[1], 1), "baseline_trades": baseline[1],
        "impaired_lag_ms": 1000 * (end[0] - impaired_from[0]) / max(end[1] - impaired_from[1], 1),
        "impaired_trades": end[1] - impaired_from[1], "errors": errors[:20],
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
