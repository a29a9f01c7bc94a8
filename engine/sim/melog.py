"""The matching engine's own log: every trade it published, in output order, replayable by symbol.

One append-only file in :mod:`engine.core.records` framing (magic ``SETLMEL1``); each record's payload is
one msgpack-encoded :class:`~engine.core.messages.Trade`, exactly the bytes sent on the PUB socket. The ME
appends a batch, flushes it, and only then publishes it, so the log always covers what subscribers
may have seen.

Opening a log scans it once: a torn tail (a crash mid-write) is truncated; damage in the middle stops
with :class:`~engine.core.errors.WalError`. The scan rebuilds an index: per symbol, the file offset and
length of every record, indexed by ``seq - 1`` (12 bytes a trade), so any range is replayable with one
``pread`` a trade and its CRC checked again on the way out.
"""

from __future__ import annotations

import os
import zlib
from array import array
from collections.abc import Generator, Iterator
from typing import BinaryIO, Final

from engine.core import records
from engine.core.errors import ClosedError, WalError
from engine.core.messages import Trade, trade_decoder

MAGIC: Final = b"SETLMEL1"
SCAN_CHUNK_BYTES: Final = 16 << 20
JUDGE_BYTES: Final = 4 << 20

_CUT_SHORT: Final = "cut short"  # records' wording for a record running past the data it was given


def _walk(f: BinaryIO) -> Generator[tuple[int, bytes], None, tuple[int, records.Damage | None]]:
    """Yield ``(offset, payload)`` of each sound trade record after the magic, reading in chunks.

    Returns where the sound records end and the first damage (``sound_after`` judged over the next
    ``JUDGE_BYTES`` of the file), or None.
    """
    f.seek(records.MAGIC_BYTES)
    base = records.MAGIC_BYTES  # file offset of data[0]
    data = b""
    while True:
        chunk = f.read(SCAN_CHUNK_BYTES)
        data = data + chunk if data else chunk
        result = records.scan(data, 0)
        for offset, record_type, payload in result.records:
            if record_type != records.TYPE_TRADE:
                unknown = records.Damage(base + offset, f"unknown record type {record_type}", True)
                return base + offset, unknown
            yield base + offset, payload
        damage = result.damage
        if damage is not None and chunk and _CUT_SHORT in damage.reason:
            data = data[result.end :]  # a record straddles the chunk boundary: read on
            base += result.end
            continue
        if damage is None:
            if not chunk:
                return base + result.end, None
            data = b""
            base += result.end
            continue
        # Real damage: a torn tail, or damage in the middle when a sound record follows it. Judged over
        # the next JUDGE_BYTES (the byte-by-byte search is slow; a torn batch is far shorter than that).
        f.seek(base + damage.offset)
        rest = f.read(JUDGE_BYTES)
        tail = records.scan(rest, 0)
        assert tail.damage is not None
        assert tail.damage.offset == 0
        start = base + damage.offset
        return start, records.Damage(start, damage.reason, tail.damage.sound_after)


def read_all(path: str) -> Iterator[Trade]:
    """Every trade of the log at ``path``, read-only, for audits. A torn tail ends the iteration (a log
    being written looks torn at its end); damage in the middle raises :class:`WalError`."""
    decode = trade_decoder().decode
    with open(path, "rb") as f:
        magic = f.read(records.MAGIC_BYTES)
        if magic != MAGIC:
            if len(magic) < records.MAGIC_BYTES and MAGIC.startswith(magic):
                return  # created and torn before its magic was complete: empty
            raise WalError(f"ME log {path}: not a {MAGIC!r} file (magic {magic!r})")
        walk = _walk(f)
        while True:
            try:
                _, payload = next(walk)
            except StopIteration as done:
                _, damage = done.value
                if damage is not None and damage.sound_after:
                    raise WalError(
                        f"ME log {path}: {damage.reason} at byte {damage.offset}, with sound records after it"
                    ) from None
                return
            yield decode(payload)


class MeLog:
    """The ME log, open for appending and replay. Single-threaded: one owner calls every method.

    ``output_sequence`` and ``latest`` count every appended trade, flushed or not; :meth:`read` flushes
    first, so it sees everything appended.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # symbol -> (file offset, length) of the record of each seq, at [seq - 1]
        self._index: dict[str, tuple[array[int], array[int]]] = {}
        self._latest: dict[str, int] = {}
        self._output_sequence = 0
        self._buffer = bytearray()  # appended, not yet written
        self._decode = trade_decoder().decode
        self._torn: tuple[int, str, int] | None = None
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._end = self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    # -- opening ------------------------------------------------------------------------------------

    def _recover(self) -> int:
        size = os.fstat(self._fd).st_size
        magic = os.pread(self._fd, records.MAGIC_BYTES, 0)
        if size < records.MAGIC_BYTES and MAGIC.startswith(magic):
            os.ftruncate(self._fd, 0)  # new, or torn before its magic was complete
            os.pwrite(self._fd, MAGIC, 0)
            os.fsync(self._fd)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            return records.MAGIC_BYTES
        if magic != MAGIC:
            raise WalError(f"ME log {self.path}: not a {MAGIC!r} file (magic {magic!r}); move it away")
        with open(self._fd, "rb", closefd=False) as f:
            walk = _walk(f)
            while True:
                try:
                    offset, payload = next(walk)
                except StopIteration as done:
                    end: int = done.value[0]
                    damage: records.Damage | None = done.value[1]
                    break
                self._add_recovered(offset, payload)
        if damage is not None:
            if damage.sound_after:
                raise WalError(
                    f"ME log {self.path}: {damage.reason} at byte {damage.offset}, with sound records after "
                    "it; the log is damaged in the middle and cannot be continued"
                )
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            self._torn = (damage.offset, damage.reason, size - end)
        return end

    def _add_recovered(self, offset: int, payload: bytes) -> None:
        trade = self._decode(payload)
        self._check_next(trade)
        symbol = trade.symbol
        index = self._index.get(symbol)
        if index is None:
            index = self._index[symbol] = (array("q"), array("i"))
        index[0].append(offset)
        index[1].append(records.HEADER_BYTES + len(payload))
        self._latest[symbol] = trade.seq
        self._output_sequence = trade.output_sequence

    def _check_next(self, trade: Trade) -> None:
        expected = (self._output_sequence + 1, self._latest.get(trade.symbol, 0) + 1)
        if (trade.output_sequence, trade.seq) != expected:
            raise WalError(
                f"ME log {self.path}: trade output_sequence {trade.output_sequence} {trade.symbol} seq "
                f"{trade.seq} does not follow output_sequence {expected[0] - 1}, seq {expected[1] - 1}"
            )

    # -- state --------------------------------------------------------------------------------------

    @property
    def output_sequence(self) -> int:
        """The last appended trade's ``output_sequence`` (0 for an empty log)."""
        return self._output_sequence

    @property
    def latest(self) -> dict[str, int]:
        """Symbol -> its last appended ``seq`` (a copy)."""
        return dict(self._latest)

    def latest_seq(self, symbol: str) -> int:
        return self._latest.get(symbol, 0)

    def symbols(self) -> list[str]:
        return list(self._latest)

    @property
    def torn(self) -> tuple[int, str, int] | None:
        """``(offset, reason, bytes dropped)`` when opening truncated a torn tail, else None."""
        return self._torn

    # -- writing ------------------------------------------------------------------------------------

    def append(self, trade_bytes: bytes, trade: Trade) -> None:
        """Buffer one trade; ``trade_bytes`` is its msgpack encoding (what goes on the wire)."""
        symbol, seq, latest = trade.symbol, trade.seq, self._latest
        if trade.output_sequence != self._output_sequence + 1 or seq != latest.get(symbol, 0) + 1:
            self._check_next(trade)  # raises, naming both
        if self._fd < 0:
            raise ClosedError(f"ME log {self.path} is closed")
        index = self._index.get(symbol)
        if index is None:
            index = self._index[symbol] = (array("q"), array("i"))
        buffer = self._buffer
        index[0].append(self._end + len(buffer))
        index[1].append(records.HEADER_BYTES + len(trade_bytes))
        buffer += _frame_header(trade_bytes)
        buffer += trade_bytes
        latest[symbol] = seq
        self._output_sequence = trade.output_sequence

    def flush(self, fsync: bool = False) -> None:
        """Write what :meth:`append` buffered; ``fsync`` makes it durable against power loss too."""
        if self._buffer:
            data = memoryview(self._buffer)
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], self._end + written)
            data.release()
            self._end += written
            self._buffer.clear()
        if fsync:
            os.fsync(self._fd)

    # -- replay -------------------------------------------------------------------------------------

    def read(self, symbol: str, from_seq: int, to_seq: int) -> list[bytes]:
        """Encoded trades of ``symbol`` with ``from_seq <= seq <= to_seq`` (clamped to the latest)."""
        if self._buffer:
            self.flush()
        index = self._index.get(symbol)
        if index is None:
            return []
        offsets, lengths = index
        start, stop = max(from_seq, 1) - 1, min(to_seq, len(offsets))
        if start >= stop:
            return []
        fd = self._fd
        blob = b"".join([os.pread(fd, lengths[i], offsets[i]) for i in range(start, stop)])
        result = records.scan(blob, 0)
        if result.damage is not None or len(result.records) != stop - start:
            reason = result.damage.reason if result.damage else "short read"
            raise WalError(f"ME log {self.path}: {symbol} seq {start + 1}..{stop}: {reason} reading it back")
        return [payload for _, _, payload in result.records]

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> MeLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TYPE_TRADE_CRC: Final = zlib.crc32(bytes((records.TYPE_TRADE,)))
_pack_header: Final = records.HEADER.pack


def _frame_header(payload: bytes) -> bytes:
    """``records.encode(payload)`` minus the payload, without its per-call CRC of the type byte
    (the append path's hot spot); a unit test holds the two equal."""
    assert 0 < len(payload) <= records.PAYLOAD_BYTES_MAX, len(payload)
    return _pack_header(len(payload), zlib.crc32(payload, _TYPE_TRADE_CRC), records.TYPE_TRADE)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
