"""Record framing: round trip, every single-byte flip detected, torn tails told from damage in the middle."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.records import HEADER_BYTES, MAGIC_BYTES, PAYLOAD_BYTES_MAX, TYPE_TRADE, encode, iter_file, scan

MAGIC = b"TESTMAG1"
payloads = st.binary(min_size=1, max_size=300)
record_types = st.integers(min_value=0, max_value=255)


def build(payloads: list[bytes]) -> tuple[bytes, list[int]]:
    """A file of one record per payload; also the offset each record starts at."""
    data = bytearray(MAGIC)
    offsets = []
    for payload in payloads:
        offsets.append(len(data))
        data += encode(payload)
    return bytes(data), offsets


THREE = [b"first record payload", b"\x00" * 40, bytes(range(256)) * 2]


@given(st.lists(st.tuples(record_types, payloads), max_size=20))
def test_round_trip(items: list[tuple[int, bytes]]) -> None:
    data = MAGIC + b"".join(encode(payload, record_type) for record_type, payload in items)
    result = scan(data)
    assert result.damage is None
    assert result.end == len(data)
    assert [(t, p) for _, t, p in result.records] == items
    offsets = [offset for offset, _, _ in result.records]
    assert offsets == sorted(offsets)
    assert all(offset >= MAGIC_BYTES for offset in offsets)


def test_empty_file_after_magic() -> None:
    result = scan(MAGIC)
    assert result.records == []
    assert result.end == MAGIC_BYTES
    assert result.damage is None


def test_encode_rejects_empty_and_oversized_payloads() -> None:
    with pytest.raises(AssertionError):
        encode(b"")
    with pytest.raises(AssertionError):
        encode(b"x" * (PAYLOAD_BYTES_MAX + 1))


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_single_byte_flip_is_detected(mask: int) -> None:
    data, offsets = build(THREE)
    ends = [*offsets[1:], len(data)]
    for index, (start, end) in enumerate(zip(offsets, ends, strict=True)):
        for position in range(start, end):
            damaged = bytearray(data)
            damaged[position] ^= mask
            result = scan(bytes(damaged))
            assert result.damage is not None, (index, position)
            assert result.damage.offset == start, (index, position, result.damage)
            assert len(result.records) == index
            assert result.end == start
            # Records after the flipped one are intact, so anything but the last is damage in the middle.
            assert result.damage.sound_after == (index < len(THREE) - 1), (index, position, result.damage)


@given(st.lists(payloads, min_size=1, max_size=3), st.data())
def test_flip_anywhere_is_detected(items: list[bytes], data: st.DataObject) -> None:
    file, offsets = build(items)
    position = data.draw(st.integers(min_value=MAGIC_BYTES, max_value=len(file) - 1))
    mask = data.draw(st.integers(min_value=1, max_value=255))
    damaged = bytearray(file)
    damaged[position] ^= mask
    result = scan(bytes(damaged))
    assert result.damage is not None
    flipped = max(i for i, offset in enumerate(offsets) if offset <= position)
    assert result.damage.offset == offsets[flipped]
    assert [p for _, _, p in result.records] == items[:flipped]


def test_cut_at_every_offset_of_the_last_record_is_a_torn_tail() -> None:
    data, offsets = build(THREE)
    last = offsets[-1]
    for cut in range(last + 1, len(data)):
        result = scan(data[:cut])
        assert result.damage is not None, cut
        assert result.damage.sound_after is False, (cut, result.damage)
        assert result.damage.offset == last
        assert result.end == last
        assert [p for _, _, p in result.records] == THREE[:-1]
        short = "header" if cut - last < HEADER_BYTES else "payload"
        assert f"record {short} cut short" in result.damage.reason
    whole_records = scan(data[:last])
    assert whole_records.damage is None
    assert whole_records.end == last


def test_damage_in_the_first_of_three_records_is_in_the_middle() -> None:
    data, offsets = build(THREE)
    damaged = bytearray(data)
    damaged[offsets[0] + HEADER_BYTES + 3] ^= 0x20
    result = scan(bytes(damaged))
    assert result.damage is not None
    assert result.damage.offset == offsets[0]
    assert result.damage.reason == "CRC mismatch"
    assert result.damage.sound_after is True
    assert result.records == []


def test_zeroed_tail_is_torn() -> None:
    """A crash can leave the file longer than the data written (zeros): still a torn tail."""
    data, offsets = build(THREE)
    result = scan(data + bytes(100))
    assert result.damage is not None
    assert result.damage.offset == len(data)
    assert result.damage.sound_after is False
    assert len(result.records) == len(THREE)


def test_record_type_is_covered_by_the_checksum() -> None:
    record = bytearray(encode(b"payload", TYPE_TRADE))
    record[8] = TYPE_TRADE + 1
    result = scan(MAGIC + bytes(record))
    assert result.damage is not None
    assert result.damage.reason == "CRC mismatch"


def test_iter_file(tmp_path: Path) -> None:
    data, _ = build(THREE)
    path = tmp_path / "log"
    path.write_bytes(data)
    assert [p for _, _, p in iter_file(str(path), MAGIC)] == THREE
    path.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="cut short"):
        list(iter_file(str(path), MAGIC))
    with pytest.raises(ValueError, match="not a"):
        list(iter_file(str(path), b"OTHERMAG"))
