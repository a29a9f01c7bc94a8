"""Recovery: re-settling a big pending WAL, and a killed shard settling again under load.

1. **Re-settle 1M pending WAL records**: trades from the simulator's generator are written into shard 0's
   WAL with :class:`engine.core.wal.ShardWal` directly (group commits of 4096, fsync on), the store is empty,
   then a fresh process times ``Shard.start()`` -- what a shard does before it reports ready, and what
   ``settle recover --shard 0`` runs: open the store, verify every segment, re-settle every record above
   the store's watermark, checkpoint. The store's schema exists beforehand (creating a Cassandra keyspace
   takes seconds and is no part of recovery). The same process sets the shard's GC thresholds (as
   ``settle run``'s shards do). The WAL scan alone (``ShardWal.recover``) is timed too, in the same process
   before, on the same files. The store is then checked: every symbol's watermark is its last seq.
2. **A killed shard settling again**: the engine (2 shards) settles trades the simulator publishes at a
   steady rate; shard 0 is SIGKILLed; the time until the supervisor has it ready again and until the
   store's watermarks of shard 0's symbols move again (read every 50 ms). Every trade is then checked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.settlerun import Bench, CassandraTarget, keyspace_name
from engine.core import config as configmod
from engine.core.placement import shard_for
from engine.core.wal import ShardWal
from engine.sim.mesim import TradeGenerator, sim_config
from engine.verify.demo import demo_config

WAL_COMMIT_TRADES = 4096


def write_wal(config: configmod.Config, records: int, symbols: int, accounts: int) -> dict[str, int]:
    """``records`` trades into shard 0's WAL; returns each symbol's last seq."""
    generator = TradeGenerator(sim_config(symbols=symbols, accounts=accounts, seed=11))
    wal = ShardWal(config.wal_path(0), segment_bytes_max=config.wal.segment_bytes_max, fsync=True, shard=0)
    try:
        wal.recover()
        last: dict[str, int] = {}
        for i in range(1, records + 1):
            trade, _ = generator.next()
            wal.append(trade)
            last[trade.symbol] = trade.seq
            if i % WAL_COMMIT_TRADES == 0:
                wal.commit()
        wal.commit()
    finally:
        wal.close()
    return last


def resettle(records: int, *, store: str = "embedded", cassandra: CassandraTarget | None = None,
             symbols: int = 16, accounts: int = 1000, work_dir: Path | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="settle-bench-recovery-", dir=work_dir))
    keyspace = keyspace_name("recovery")
    try:
        base: dict[str, Any] = {}
        if store == "cassandra":
            assert cassandra is not None
            for dotted, value in cassandra.overrides(keyspace).items():
                configmod.set_dotted(base, dotted, value)
        raw = demo_config(root, 1, store, base)
        config = configmod.from_dict(raw, "bench-recovery")
        config_path = root / "config.json"
        config_path.write_text(json.dumps(raw))
        started = time.perf_counter()
        last = write_wal(config, records, symbols, accounts)
        write_s = time.perf_counter() - started
        subprocess.run([sys.executable, "-m", "bench.recovery", "--schema", str(config_path)], check=True,
                       capture_output=True, timeout=600)
        done = subprocess.run([sys.executable, "-m", "bench.recovery", "--worker", str(config_path)],
                              capture_output=True, text=True, timeout=3600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"recovery worker failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        watermarks = result.pop("watermarks")
        complete = watermarks == last
        return {"store": store, "records": records, "write_wal_s": write_s, **result,
                "records_per_s": result["recovered"] / result["start_s"], "complete": complete}
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if cassandra is not None:
            cassandra.drop(keyspace)


async def _worker(config: configmod.Config) -> dict[str, Any]:
    from engine.core.store import open_store
    from shards.shard import Shard

    started = time.perf_counter()
    with ShardWal(config.wal_path(0), segment_bytes_max=config.wal.segment_bytes_max, shard=0) as wal:
        report = wal.recover()
    scan_s = time.perf_counter() - started
    shard = Shard(config, 0)
    started = time.perf_counter()
    try:
        await shard.start()
        start_s = time.perf_counter() - started
    finally:
        await shard.close()
    store = await open_store(config.store, create_schema=False)
    try:
        watermarks = await store.watermarks()
    finally:
        await store.close()
    return {"scan_s": scan_s, "scan_records_per_s": report.records / scan_s, "segments": report.segments,
            "wal_bytes": report.bytes, "start_s": start_s, "recovered": shard.recovered_count,
            "watermarks": watermarks}


def worker_main(config_path: str) -> int:
    import uvloop

    from shards.shard import tune_gc

    tune_gc()  # as the shard process does
    config = configmod.from_dict(json.loads(Path(config_path).read_text()), config_path)
    print(json.dumps(uvloop.run(_worker(config))), flush=True)
    return 0


async def _create_schema(config: configmod.Config) -> None:
    """The store as a recovering shard finds it: schema in place (its creation is not recovery's cost)."""
    from engine.core.store import open_store

    store = await open_store(config.store, create_schema=True)
    await store.close()


def schema_main(config_path: str) -> int:
    import uvloop

    config = configmod.from_dict(json.loads(Path(config_path).read_text()), config_path)
    uvloop.run(_create_schema(config))
    return 0


# ---------------------------------------------------------------------------------- a killed shard


def kill_shard(*, rate: float, seconds: float, store: str = "embedded", cassandra: CassandraTarget | None = None,
               symbols: int = 16, accounts: int = 1000, work_dir: Path | None = None) -> dict[str, Any]:
    """SIGKILL shard 0 of 2 under ``rate`` trades/s; seconds until it is ready and settling again."""
    trades = max(2000, int(rate * seconds))
    with Bench("kill-shard", shards=2, store=store, cassandra=cassandra, work_dir=work_dir) as bench:
        bench.start()
        progress = bench.progress
        assert progress is not None
        bench.start_publisher("sim", trades, rate=rate, symbols=symbols, accounts=accounts)
        progress.wait_for(trades // 3)
        mine = [s for s in progress.watermarks if shard_for(s, bench.shards) == 0]
        if not mine:
            raise RuntimeError("kill-shard: shard 0 owns no symbol yet")
        old_pid = bench.system.kill("shard-0", signal.SIGKILL)
        killed_at = time.monotonic()
        while progress.watermarks_at <= killed_at:  # the first reading taken after the kill: where it stopped
            time.sleep(0.005)
        before = sum(progress.watermarks.get(s, 0) for s in mine)
        ready_s = moved_s = -1.0
        deadline = killed_at + 120.0
        while time.monotonic() < deadline and (ready_s < 0 or moved_s < 0):
            now = time.monotonic()
            if ready_s < 0:
                slot = bench.system.state()["slots"]["shard-0"]
                if slot["pid"] and slot["pid"] != old_pid and slot["ready"]:
                    ready_s = now - killed_at
            if moved_s < 0 and sum(progress.watermarks.get(s, 0) for s in mine) > before:
                moved_s = progress.watermarks_at - killed_at
            time.sleep(0.01)
        progress.wait_for(trades)
        report = bench.verify()
    return {"store": store, "rate": rate, "trades": trades, "ready_again_s": ready_s if ready_s >= 0 else None,
            "settling_again_s": moved_s if moved_s >= 0 else None, "verified": report.ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--schema", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.schema:
        return schema_main(args.schema)
    print(json.dumps(resettle(args.records), indent=2))
    print(json.dumps(kill_shard(rate=5000, seconds=20), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
