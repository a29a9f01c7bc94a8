"""``settle status``: per shard and symbol, the store's watermark, WAL bytes and segments, and pending trades."""

from __future__ import annotations

import json
from typing import Any

from engine.core.config import Config
from engine.core.errors import EXIT_OK
from engine.core.placement import shard_for
from engine.core.store import open_store
from engine.core.supervisor import state_path
from engine.core.wal import scan_stats


async def gather(config: Config) -> dict[str, Any]:
    store = await open_store(config.store, create_schema=False)
    try:
        watermarks = await store.watermarks()
    finally:
        await store.close()
    supervisor: dict[str, Any] = {}
    state_file = state_path(config.data_path)
    if state_file.exists():
        supervisor = json.loads(state_file.read_text())
    shards: list[dict[str, Any]] = []
    count = config.shard_count
    for shard in range(count):
        wal = scan_stats(config.wal_path(shard)) if config.wal_path(shard).exists() else {}
        symbols = sorted({s for s in watermarks if shard_for(s, count) == shard} | set(wal))
        rows = []
        for symbol in symbols:
            stats = wal.get(symbol)
            wm = watermarks.get(symbol, 0)
            last = stats.last_seq if stats else 0
            rows.append({
                "symbol": symbol,
                "watermark": wm,
                "wal_last_seq": last,
                "pending": max(0, last - wm),
                "wal_bytes": stats.bytes if stats else 0,
                "wal_segments": stats.segments if stats else 0,
            })
        slot = supervisor.get("slots", {}).get(f"shard-{shard}", {})
        shards.append({"shard": shard, "pid": slot.get("pid"), "ready": slot.get("ready"), "symbols": rows})
    return {"store": config.store.kind, "shards": shards, "supervisor_pid": supervisor.get("pid")}


async def status(config: Config, as_json: bool = False) -> int:
    data = await gather(config)
    if as_json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"store: {data['store']}")
    for shard in data["shards"]:
        state = "ready" if shard["ready"] else ("starting" if shard["pid"] else "not running")
        pending = sum(r["pending"] for r in shard["symbols"])
        wal_bytes = sum(r["wal_bytes"] for r in shard["symbols"])
        print(f"shard {shard['shard']}: {state}, pid {shard['pid']}, {len(shard['symbols'])} symbols, "
              f"pending {pending}, WAL {wal_bytes} bytes")
        for r in shard["symbols"]:
            print(f"  {r['symbol']:<16} watermark {r['watermark']:>12}  wal_last {r['wal_last_seq']:>12}  "
                  f"pending {r['pending']:>8}  wal {r['wal_bytes']:>12} B in {r['wal_segments']} segments")
    return EXIT_OK
