"""Settle on a 3-node Cassandra cluster as production runs it (RF 3, LOCAL_QUORUM, logins, TLS) against one
node (RF 1, ONE), in one run: the same 2 shards, the same trades published flat out, timed from the first
trade published to the last one settled, each run verified by the checker.

    python -m bench.store_cluster [--trades N]

Both clusters start here (``ops/cassandra/cassandra.sh`` and ``cluster.sh``, jars fetched once) and stop
at the end; on the 2-core machine the three JVMs share the cores with settle and the ME.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from engine.verify.servers import CassandraCluster, CassandraServer
from engine.verify.testbed import System


def run(root: Path, name: str, trades: int, overrides: dict[str, Any]) -> dict[str, Any]:
    system = System(root / name, shards=2, store="cassandra",
                    overrides={**overrides, "store.cassandra.keyspace": f"t_{uuid.uuid4().hex[:12]}"})
    try:
        system.start_engine()
        started = time.monotonic()
        system.start_sim(trades, rate=0)
        system.wait_settled(timeout_s=900)
        seconds = time.monotonic() - started
    finally:
        system.stop()
    return {"name": name, "trades": trades, "seconds": seconds, "trades_per_s": trades / seconds,
            "verified": system.check().ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--trades", type=int, default=150_000)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="settle-store-cluster-"))
    single = CassandraServer()
    single.start(root / "single")
    try:
        one = run(root, "one node, RF 1, ONE", args.trades,
                  {"store.cassandra.port": single.port, "store.cassandra.consistency": "ONE"})
    finally:
        single.stop()
    cluster = CassandraCluster()
    cluster.start(root / "cluster", nodes=3)
    try:
        three = run(root, "3 nodes, RF 3, LOCAL_QUORUM, TLS", args.trades, cluster.store_overrides())
    finally:
        cluster.stop()
    for r in (one, three):
        print(json.dumps(r))
    print(f"3-node cluster / one node: {three['trades_per_s'] / one['trades_per_s']:.2f}")
    return 0 if one["verified"] and three["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
