"""Record framing shared by the WAL and the ME simulator's log, after RocksDB's log format.

A record is a 9-byte header then the payload::

    offset 0  u32 little-endian  payload length in bytes
    offset 4  u32 little-endian  CRC32 (zlib) of the type byte followed by the payload
    offset 8  u8                 record type
    offset 9  payload

A file starts with an 8-byte magic naming its format. A torn tail (the process or machine died in the
middle of a write) shows up as a header or payload running past the end of the file, or as a checksum
mismatch on the last record; :func:`scan` reports where the last sound record ends.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

HEADER: Final = struct.Struct("<IIB")
HEADER_BYTES: Final = HEADER.size
PAYLOAD_BYTES_MAX: Final = 1 << 20
MAGIC_BYTES: Final = 8

TYPE_TRADE: Final = 1


def encode(payload: bytes, record_type: int = TYPE_TRADE) -> bytes:
    assert 0 < len(payload) <= PAYLOAD_BYTES_MAX, len(payload)
    crc = zlib.crc32(payload, zlib.crc32(bytes((record_type,))))
    return HEADER.pack(len(payload), crc, record_type) + payload


@dataclass(frozen=True, slots=True)
class Damage:
    """The first unsound byte range in a file: where it starts and why."""

    offset: int
    reason: str
    sound_after: bool  # a sound record starts somewhere after `offset`: damage in the middle, not a torn tail


@dataclass(frozen=True, slots=True)
class Scan:
    records: list[tuple[int, int, bytes]]  # (offset, type, payload) of every sound record before any damage
    end: int  # offset just past the last sound record
    damage: Damage | None


def _record_at(data: bytes | memoryview, offset: int) -> tuple[int, bytes] | str:
    """Decode the record at ``offset``: ``(type, payload)`` or the reason it is unsound."""
    size = len(data)
    if offset + HEADER_BYTES > size:
        return f"record header cut short ({size - offset} of {HEADER_BYTES} bytes)"
    length, crc, record_type = HEADER.unpack_from(data, offset)
    if length == 0 or length > PAYLOAD_BYTES_MAX:
        return f"implausible record length {length}"
    end = offset + HEADER_BYTES + length
    if end > size:
        return f"record payload cut short ({size - offset - HEADER_BYTES} of {length} bytes)"
    view = memoryview(data)[offset + HEADER_BYTES : end]
    if zlib.crc32(view, zlib.crc32(bytes((record_type,)))) != crc:
        return "CRC mismatch"
    return record_type, bytes(view)


def _sound_record_after(data: bytes | memoryview, offset: int) -> bool:
    return any(not isinstance(_record_at(data, start), str) for start in range(offset + 1, len(data) - HEADER_BYTES))


def scan(data: bytes | memoryview, start: int = MAGIC_BYTES) -> Scan:
    """Walk the records of a file's contents from ``start``; stop at the first unsound one."""
    records: list[tuple[int, int, bytes]] = []
    offset = start
    size = len(data)
    while offset < size:
        decoded = _record_at(data, offset)
        if isinstance(decoded, str):
            return Scan(records, offset, Damage(offset, decoded, _sound_record_after(data, offset)))
        record_type, payload = decoded
        records.append((offset, record_type, payload))
        offset += HEADER_BYTES + len(payload)
    return Scan(records, offset, None)


def iter_file(path: str, magic: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Sound records of a whole file; raises ValueError at the first damage (for read-only tools)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:MAGIC_BYTES] != magic:
        raise ValueError(f"{path}: not a {magic!r} file (magic {data[:MAGIC_BYTES]!r})")
    result = scan(data)
    yield from result.records
    if result.damage is not None:
        raise ValueError(f"{path}: {result.damage.reason} at byte {result.damage.offset}")
