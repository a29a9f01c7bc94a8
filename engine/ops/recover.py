"""``settle recover --shard N``: offline repair of one shard's WAL, then re-settlement of what is pending.

It takes the shard's WAL lock, so it refuses to run while that shard is running. It truncates torn
tails (and, with ``--repair-corruption``, a segment damaged in the middle), re-settles every record above
the store's watermark with a progress bar, and deletes the segments the store holds. With
``--from-store`` (the WAL directory was lost) it starts from the store's watermarks and asks the ME to
replay everything past them.
"""

from __future__ import annotations

import sys

from engine.core.config import Config
from engine.core.errors import EXIT_OK, EXIT_USAGE, EXIT_WAL_CORRUPT, WalCorruption
from engine.core.progress import Progress


async def recover(config: Config, shard: int, *, from_store: bool = False, repair_corruption: bool = False) -> int:
    from shards.shard import Shard, tune_gc

    if not 0 <= shard < config.shard_count:
        print(f"settle recover: --shard {shard} is not a slot of this engine (0..{config.shard_count - 1})",
              file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(f"shard {shard}: scan WAL")
    tune_gc()  # it settles like a shard process, with the same collector settings
    worker = Shard(config, shard)
    try:
        await worker.start(repair_corruption=repair_corruption, progress=progress)
        replayed = 0
        if from_store:
            replayed = await worker.catch_up_from_me(progress)
    except WalCorruption as e:
        print(f"settle recover: {e}", file=sys.stderr)
        print("settle recover: rerun with --repair-corruption to truncate at the damage; the trades after it "
              "are replayed from the matching engine when the shard starts", file=sys.stderr)
        return EXIT_WAL_CORRUPT
    finally:
        await worker.close()
    report = worker.recovery
    assert report is not None
    for path, offset, dropped in report.torn_tails:
        print(f"truncated {path} at byte {offset} ({dropped} bytes dropped)")
    print(f"shard {shard}: {report.symbols} symbols, {report.segments} segments, {report.records} records "
          f"scanned; {worker.recovered_count} re-settled; {replayed} replayed from the ME")
    return EXIT_OK
