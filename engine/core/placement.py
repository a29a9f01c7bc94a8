"""Symbol-to-shard placement: CRC32 of the symbol's UTF-8 bytes, modulo the shard count.

Deterministic across processes, hosts and restarts (Python's built-in ``hash()`` of str is salted per
process and must never be used for this). The Kafka mode partitions its topic with the same function.
"""

from __future__ import annotations

import zlib


def shard_for(symbol: str, shard_count: int) -> int:
    assert shard_count >= 1, shard_count
    return zlib.crc32(symbol.encode()) % shard_count
