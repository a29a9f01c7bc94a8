"""A shard's write-ahead log: one log per symbol, group-committed.

Layout of a shard's WAL root (``var/wal/shard-2/``)::

    LOCK                                  flock-ed by the one process that owns the WAL; holds its pid
    BTC-USDT/00000000000000000001.seg     segments named after the seq of their first record
    BTC-USDT/00000000000000004097.seg
    ETH-USDT/...

A segment is the 8-byte magic ``SETLWAL1`` then records framed by :mod:`engine.core.records`, each one
trade (payload the trade's MessagePack frame, :class:`~engine.core.messages.Trade`, as the ME sent it). The
first record a commit writes to a segment has type ``TYPE_COMMIT_START``, the others ``TYPE_TRADE``. A
symbol's seqs are contiguous across its segments; a segment that holds no record still says, by its name,
where the symbol's log continues (``last_seq = first_seq - 1``).

:meth:`ShardWal.append` only buffers; :meth:`ShardWal.commit` writes each dirty symbol's buffer with
one ``write`` and then ``fdatasync``-s every dirty file once, in parallel. Nothing a caller appended is
durable before ``commit`` returns. Memory holds per-symbol bookkeeping only, never the records.

Power loss. A commit is appended to a segment only once every byte before it is durable: after the
previous commit's fdatasync, after recovery's fdatasync of the segment it found, or after the records
of a failed commit were synced. So after a power loss only the last commit of the last segment can be
damaged, and any of its pages may be missing (a disk may write them in any order): a hole followed by
sound records is still a torn tail when no commit starts after it. Damage followed by the start of a
later commit can only be real corruption, and stops recovery. (A segment written before commits were
marked has none: damage in it counts as torn when it is the last one.) Recovery fsyncs the segments and
directories it found before acting on them: a shard killed before its fdatasync leaves records in the
page cache that are not on the disk yet.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from engine.core.errors import ClosedError, WalCorruption, WalError, WalFull, WalInUse
from engine.core.messages import SYMBOL_PATTERN, Trade, encoder, trade_decoder
from engine.core.records import HEADER, HEADER_BYTES, MAGIC_BYTES, PAYLOAD_BYTES_MAX, TYPE_TRADE, Damage, scan

MAGIC: Final = b"SETLWAL1"
TYPE_COMMIT_START: Final = 2  # a trade record that is the first one a commit wrote to its segment
LOCK_NAME: Final = "LOCK"
SEGMENT_SUFFIX: Final = ".seg"
FSYNC_THREADS_MAX: Final = 8

_SEGMENT_RE: Final = re.compile(r"(\d{20})\.seg")
_SYMBOL_RE: Final = re.compile(SYMBOL_PATTERN)
_SHARD_DIR_RE: Final = re.compile(r"shard-(\d+)")
_TRADE_CRC_SEED: Final = zlib.crc32(bytes((TYPE_TRADE,)))
_COMMIT_START_CRC_SEED: Final = zlib.crc32(bytes((TYPE_COMMIT_START,)))
_TRADE_TYPES: Final = (TYPE_TRADE, TYPE_COMMIT_START)

assert len(MAGIC) == MAGIC_BYTES


@dataclass(frozen=True, slots=True)
class SymbolStats:
    """``first_seq`` is 0 when the symbol holds no record; ``last_seq`` is the last seq ever logged."""

    bytes: int
    segments: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    symbols: int
    segments: int
    records: int
    bytes: int
    torn_tails: list[tuple[str, int, int]]  # (segment path, offset truncated at, bytes dropped)


class _Segment:
    __slots__ = ("first_seq", "path", "size")

    def __init__(self, first_seq: int, path: Path, size: int) -> None:
        self.first_seq = first_seq
        self.path = path
        self.size = size


class _Symbol:
    """Bookkeeping for one symbol's log. ``last_seq`` counts buffered records, ``written_seq`` does not."""

    __slots__ = (
        "name",
        "directory",
        "dir_exists",
        "segments",
        "fd",
        "last_seq",
        "written_seq",
        "buffer",
        "tail",
    )

    def __init__(self, name: str, directory: Path, *, dir_exists: bool) -> None:
        self.name = name
        self.directory = directory
        self.dir_exists = dir_exists
        self.segments: list[_Segment] = []
        self.fd = -1  # the last segment, opened for appends on first use
        self.last_seq = 0
        self.written_seq = 0
        self.buffer = bytearray()  # encoded records written_seq+1..last_seq
        self.tail = 0  # offset of the last record in ``buffer``

    @property
    def buffered(self) -> int:
        return self.last_seq - self.written_seq


class _Corrupt(Exception):
    """Internal: where a segment stops being sound and why, before it becomes a WalCorruption."""

    def __init__(self, segment: _Segment, offset: int, reason: str, count: int) -> None:
        super().__init__(reason)
        self.segment = segment
        self.offset = offset
        self.reason = reason
        self.count = count  # sound records of the segment before ``offset``


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _commit_start_after(data: bytes, damage: int) -> int | None:
    """Offset of the first sound ``TYPE_COMMIT_START`` record that begins after ``damage``, or None."""
    type_at = HEADER_BYTES - 1
    position = data.find(TYPE_COMMIT_START, damage + 1 + type_at)
    while position >= 0:
        offset = position - type_at
        length, crc, _ = HEADER.unpack_from(data, offset)
        end = offset + HEADER_BYTES + length
        sound = 0 < length <= PAYLOAD_BYTES_MAX and end <= len(data)
        if sound and zlib.crc32(memoryview(data)[offset + HEADER_BYTES : end], _COMMIT_START_CRC_SEED) == crc:
            return offset
        position = data.find(TYPE_COMMIT_START, position + 1)
    return None


def _list_segments(directory: Path) -> list[_Segment]:
    segments = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _SEGMENT_RE.fullmatch(entry.name)
            if match is not None and entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                segments.append(_Segment(int(match.group(1)), Path(entry.path), size))
    segments.sort(key=lambda s: s.first_seq)
    return segments


def _list_symbols(root: Path) -> list[str]:
    """Symbol directories under ``root``; anything else (``LOCK``, ``lost+found``) is not ours."""
    with os.scandir(root) as entries:
        return sorted(
            e.name for e in entries if _SYMBOL_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        )


def _makedirs_durably(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(directory.parent)
    if not missing:
        _fsync_dir(path.parent)  # a predecessor may have died between its mkdir and that fsync


class ShardWal:
    """The per-symbol WALs of one shard. Not thread-safe: the shard's event loop owns it."""

    def __init__(
        self, root: Path, *, segment_bytes_max: int, fsync: bool = True, shard: int | None = None
    ) -> None:
        assert segment_bytes_max > MAGIC_BYTES, segment_bytes_max
        self.root = Path(root)
        self.segment_bytes_max = segment_bytes_max
        self.fsync = fsync
        if shard is None:
            match = _SHARD_DIR_RE.fullmatch(self.root.name)
            shard = int(match.group(1)) if match else None
        self.shard = shard
        self._fix = (
            f"run `settle recover --shard {'?' if shard is None else shard}` to truncate the segment at "
            "the damage and refetch the rest from the matching engine"
        )
        self._symbols: dict[str, _Symbol] = {}
        self._dirty: dict[str, _Symbol] = {}  # symbols with buffered records
        self._unsynced: dict[str, _Symbol] = {}  # written by a commit that failed before its fdatasync
        self._buffered = 0
        self._recovered = False
        self._closed = False
        self._broken: str | None = None  # set when an fsync failed: the page cache can no longer be trusted
        self._executor: ThreadPoolExecutor | None = None
        self._decoder = trade_decoder()
        _makedirs_durably(self.root)
        self._lock_fd = self._lock()

    # -- life cycle --------------------------------------------------------------------------------

    def _lock(self) -> int:
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WalInUse(
                f"WAL directory {self.root} is in use by another process (pid {holder}, per {path}); "
                "stop that process first, or point this one at its own shard's WAL"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:  # the pid only names the holder in the message above: a full disk must not stop us
            if e.errno != errno.ENOSPC:
                os.close(fd)
                raise
        return fd

    def close(self) -> None:
        """Close every file and release the lock. Records appended since the last commit are dropped."""
        if self._closed:
            return
        self._closed = True
        for state in self._symbols.values():
            if state.fd >= 0:
                os.close(state.fd)
                state.fd = -1
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        os.close(self._lock_fd)  # closing the only descriptor of the open file releases the flock

    def __enter__(self) -> ShardWal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(f"WAL {self.root} is closed")
        if self._broken is not None:
            raise WalError(f"WAL {self.root} is unusable after {self._broken}; restart the shard to recover")
        if not self._recovered:
            raise WalError(f"WAL {self.root}: call recover() before using it")

    # -- recovery ----------------------------------------------------------------------------------

    def recover(
        self,
        *,
        repair_corruption: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> RecoveryReport:
        """Verify every segment, truncate a torn tail, and open the WAL for appends.

        Damage in the middle raises :class:`WalCorruption` unless ``repair_corruption``, which truncates
        the symbol's log at the damage instead (its later records must then come from the ME's replay).
        """
        if self._closed:
            raise ClosedError(f"WAL {self.root} is closed")
        if self._recovered:
            assert self._buffered == 0, "recover() again with uncommitted records"
            assert not self._unsynced, "recover() again with unsynced records"
            for state in self._symbols.values():
                if state.fd >= 0:
                    os.close(state.fd)
            self._symbols.clear()
        listing = [(symbol, _list_segments(self.root / symbol)) for symbol in _list_symbols(self.root)]
        bytes_total = sum(seg.size for _, segments in listing for seg in segments)
        bytes_done = 0
        records = 0
        torn: list[tuple[str, int, int]] = []
        if progress is not None:
            progress(0, bytes_total)
        self._sync_dir(self.root)
        for symbol, segments in listing:
            state = _Symbol(symbol, self.root / symbol, dir_exists=True)
            size_before = sum(seg.size for seg in segments)
            records += self._recover_symbol(state, segments, repair_corruption, torn)
            # What a killed predecessor wrote may sit in the page cache only: make it durable before it
            # is settled, and before a commit is appended after it. Earlier segments were synced before
            # their successor was created.
            self._sync_dir(state.directory)
            if state.segments and self.fsync:
                _fsync_file(state.segments[-1].path)
            self._symbols[symbol] = state
            bytes_done += size_before
            if progress is not None:
                progress(bytes_done, bytes_total)
        self._recovered = True
        return RecoveryReport(
            symbols=len(self._symbols),
            segments=sum(len(s.segments) for s in self._symbols.values()),
            records=records,
            bytes=sum(seg.size for s in self._symbols.values() for seg in s.segments),
            torn_tails=torn,
        )

    def _recover_symbol(
        self, state: _Symbol, segments: list[_Segment], repair: bool, torn: list[tuple[str, int, int]]
    ) -> int:
        records = 0
        expected = segments[0].first_seq if segments else 1
        for index, segment in enumerate(segments):
            is_last = index == len(segments) - 1
            stop: _Corrupt | None = None
            count = 0
            try:
                if segment.first_seq != expected:
                    raise _Corrupt(
                        segment,
                        0,
                        f"segment starts at seq {segment.first_seq} but the previous one ends at seq "
                        f"{expected - 1}",
                        0,
                    )
                count, damage, next_commit = self._verify_segment(state.name, segment)
            except _Corrupt as e:
                stop = e
            else:
                if damage is not None and is_last and next_commit is None:
                    self._truncate(segment, damage.offset, torn)  # a torn tail: the commit never completed
                elif damage is not None:
                    where = (
                        f"in the middle of the segment (a later commit starts at byte {next_commit})"
                        if is_last
                        else "in a non-last segment"
                    )
                    stop = _Corrupt(segment, damage.offset, f"{damage.reason} {where}", count)
            if stop is None:
                state.segments.append(segment)
                records += count
                expected += count
                continue
            if not repair:
                raise WalCorruption(str(segment.path), stop.offset, stop.reason, self._fix)
            doomed = segments[index + 1 :]
            if stop.offset == 0 and index > 0:
                doomed = segments[index:]  # nothing of it survives, and the previous segment keeps the place
            else:
                self._truncate(segment, stop.offset, torn)
                state.segments.append(segment)
                records += stop.count
                expected += stop.count
            for later in doomed:
                later.path.unlink()
                torn.append((str(later.path), 0, later.size))
            if doomed:
                self._sync_dir(state.directory)
            break
        state.last_seq = state.written_seq = expected - 1
        assert state.last_seq >= 0, (state.name, state.last_seq)
        return records

    def _verify_segment(self, symbol: str, segment: _Segment) -> tuple[int, Damage | None, int | None]:
        """Check magic, framing, symbol and seq of every record. Returns (sound records, first damage,
        offset of a commit that starts after the damage).

        Raises ``_Corrupt`` for what cannot be a torn write: a bad magic, or a checksummed record
        that does not decode or breaks the seq chain.
        """
        with open(segment.path, "rb") as f:
            data = f.read()
        assert len(data) == segment.size, (segment.path, len(data), segment.size)
        if len(data) < MAGIC_BYTES and MAGIC.startswith(data):
            return 0, Damage(0, f"segment magic cut short ({len(data)} of {MAGIC_BYTES} bytes)", False), None
        if data[:MAGIC_BYTES] != MAGIC:
            raise _Corrupt(segment, 0, f"bad magic {data[:MAGIC_BYTES]!r} (expected {MAGIC!r})", 0)
        result = scan(data)
        seq = segment.first_seq
        for offset, record_type, payload in result.records:
            count = seq - segment.first_seq
            if record_type not in _TRADE_TYPES:
                raise _Corrupt(segment, offset, f"unknown record type {record_type}", count)
            try:
                trade = self._decoder.decode(payload)
            except msgspec.DecodeError as e:
                raise _Corrupt(segment, offset, f"record does not decode as a trade ({e})", count) from None
            if trade.symbol != symbol:
                reason = f"record of symbol {trade.symbol!r} in the {symbol} log"
                raise _Corrupt(segment, offset, reason, count)
            if trade.seq != seq:
                raise _Corrupt(segment, offset, f"record has seq {trade.seq} where seq {seq} belongs", count)
            seq += 1
        damage = result.damage
        later = None if damage is None or not damage.sound_after else _commit_start_after(data, damage.offset)
        return seq - segment.first_seq, damage, later

    def _truncate(self, segment: _Segment, offset: int, torn: list[tuple[str, int, int]]) -> None:
        """Cut ``segment`` at ``offset`` (a segment cut inside its magic gets a fresh magic)."""
        dropped = segment.size - offset
        keep = offset if offset >= MAGIC_BYTES else 0
        fd = os.open(segment.path, os.O_RDWR)
        try:
            os.ftruncate(fd, keep)
            if keep == 0:
                os.pwrite(fd, MAGIC, 0)
            self._sync(fd)
        finally:
            os.close(fd)
        segment.size = max(keep, MAGIC_BYTES)
        torn.append((str(segment.path), offset, dropped))

    # -- reading -----------------------------------------------------------------------------------

    def last_seq(self, symbol: str) -> int:
        """The last seq appended to ``symbol``'s log, buffered or committed; 0 when there is none."""
        state = self._symbols.get(symbol)
        return 0 if state is None else state.last_seq

    def symbols(self) -> list[str]:
        return sorted(self._symbols)

    def read_after(self, symbol: str, seq: int) -> Iterator[Trade]:
        """Committed records of ``symbol`` with a seq above ``seq``, in order, read back from disk.

        Raises :class:`WalError` at once when some of those records were already checkpointed away.
        Segments are read one at a time as the iterator advances; do not checkpoint meanwhile.
        """
        self._check_usable()
        state = self._symbols.get(symbol)
        if state is None or seq >= state.written_seq:
            return iter(())
        if not state.segments or seq + 1 < state.segments[0].first_seq:
            first = state.segments[0].first_seq if state.segments else state.written_seq + 1
            raise WalError(
                f"WAL of {symbol} in {self.root} starts at seq {first}: records {seq + 1}..{first - 1} "
                "were checkpointed away; refetch them from the matching engine"
            )
        start = max(i for i, segment in enumerate(state.segments) if segment.first_seq <= seq + 1)
        return self._read(symbol, state.segments[start:], seq + 1, state.written_seq)

    def _read(self, symbol: str, segments: list[_Segment], first: int, last: int) -> Iterator[Trade]:
        expected = first
        for segment in segments:
            assert segment.first_seq <= expected, (segment.path, expected)
            with open(segment.path, "rb") as f:
                data = f.read()
            if data[:MAGIC_BYTES] != MAGIC:
                raise WalCorruption(str(segment.path), 0, "bad magic", self._fix)
            result = scan(data)
            if result.damage is not None:
                raise WalCorruption(str(segment.path), result.damage.offset, result.damage.reason, self._fix)
            for offset, _, payload in result.records[expected - segment.first_seq :]:
                trade = self._decoder.decode(payload)
                if trade.seq != expected or trade.symbol != symbol:
                    reason = f"read back {trade.symbol} seq {trade.seq} where {symbol} seq {expected} belongs"
                    raise WalCorruption(str(segment.path), offset, reason, self._fix)
                expected += 1
                yield trade
        assert expected > last, (symbol, expected, last)  # every record committed when asked for

    # -- writing -----------------------------------------------------------------------------------

    def start_after(self, symbol: str, seq: int) -> None:
        """Begin ``symbol``'s log after ``seq``; only when its log holds nothing past ``seq``.

        For a shard that lost its disk: the store's watermark says where the log continues.
        """
        self._check_usable()
        assert seq >= 0, (symbol, seq)
        state = self._symbols.get(symbol)
        if state is None:
            self._new_symbol(symbol, seq + 1)
            return
        if state.last_seq > seq or state.buffered:
            raise WalError(
                f"WAL of {symbol}: cannot start after seq {seq}, it already holds seq {state.last_seq}"
            )
        if state.segments:
            # Every record is at or below ``seq``, which the store already holds: the log restarts after it.
            if state.fd >= 0:
                os.close(state.fd)
                state.fd = -1
            for segment in state.segments:
                segment.path.unlink()
            state.segments.clear()
            self._sync_dir(state.directory)
        state.last_seq = state.written_seq = seq

    def _new_symbol(self, symbol: str, first_seq: int) -> _Symbol:
        """Register a symbol the WAL has not seen, once its name and first seq pass the checks."""
        self._check_usable()
        if not isinstance(symbol, str) or _SYMBOL_RE.fullmatch(symbol) is None:
            raise ValueError(f"symbol {symbol!r} does not match {SYMBOL_PATTERN}")
        assert first_seq >= 1, (symbol, first_seq)
        state = _Symbol(symbol, self.root / symbol, dir_exists=False)
        state.last_seq = state.written_seq = first_seq - 1
        self._symbols[symbol] = state
        return state

    def append(self, trade: Trade, frame: bytes | memoryview | None = None) -> None:
        """Buffer ``trade`` for the next :meth:`commit`; its seq must follow the symbol's last one.

        ``frame``: the trade as the ME encoded it, kept as it came (any MessagePack encoding of the trade
        decodes to the same :class:`Trade`); None encodes it here."""
        if self._closed:
            raise ClosedError(f"WAL {self.root} is closed")
        state = self._symbols.get(trade.symbol)
        if state is None:
            assert trade.seq == 1, (trade.symbol, trade.seq)  # or start_after() the store's watermark
            state = self._new_symbol(trade.symbol, 1)
        assert trade.seq == state.last_seq + 1, (trade.symbol, trade.seq, state.last_seq)
        payload = encoder.encode(trade) if frame is None else frame
        assert 0 < len(payload) <= PAYLOAD_BYTES_MAX, len(payload)
        buffer = state.buffer
        state.tail = len(buffer)
        if buffer:
            buffer += HEADER.pack(len(payload), zlib.crc32(payload, _TRADE_CRC_SEED), TYPE_TRADE)
        else:  # the buffer is written whole by one commit, into one segment: this record starts it
            buffer += HEADER.pack(len(payload), zlib.crc32(payload, _COMMIT_START_CRC_SEED), TYPE_COMMIT_START)
        buffer += payload
        state.last_seq = trade.seq
        self._dirty[trade.symbol] = state
        self._buffered += 1

    @property
    def buffered(self) -> int:
        """Records appended and not yet written by a commit."""
        return self._buffered

    def commit(self) -> int:
        """Write every buffered record and make it durable. Returns the record bytes written.

        On a write error the segment is cut back to its size before this commit and the records
        stay buffered, so calling ``commit`` again retries; ENOSPC raises the retriable :class:`WalFull`.
        """
        self._check_usable()
        written = 0
        for state in list(self._dirty.values()):
            written += self._write(state)
            del self._dirty[state.name]
            self._unsynced[state.name] = state
        if self._unsynced:
            self._sync_all([state.fd for state in self._unsynced.values()])
            self._unsynced.clear()
        return written

    def _write(self, state: _Symbol) -> int:
        if not state.dir_exists:
            try:
                state.directory.mkdir(exist_ok=True)
                self._sync_dir(self.root)
            except OSError as e:
                raise self._write_error(state.directory, 0, e) from e
            state.dir_exists = True
        if not state.segments or state.segments[-1].size >= self.segment_bytes_max:
            self._rotate(state)
        elif state.fd < 0:
            state.fd = os.open(state.segments[-1].path, os.O_WRONLY | os.O_APPEND)
        if state.name in self._unsynced:
            # Records of a commit that failed before its fdatasync: durable first, so that only the last
            # commit of a segment can ever be torn by a power loss.
            self._sync_all([state.fd])
            del self._unsynced[state.name]
        segment = state.segments[-1]
        buffer = state.buffer
        size_before = segment.size
        if __debug__:
            self._assert_buffer(state)
        try:
            # No memoryview over the buffer: an export held by a traceback would stop it from resizing.
            done = os.write(state.fd, buffer)
            while done < len(buffer):  # short only when the disk fills up midway: the next write says so
                done += os.write(state.fd, buffer[done:])
        except OSError as e:
            try:
                os.ftruncate(state.fd, size_before)
            except OSError as truncate_error:
                self._broken = f"failing to cut {segment.path} back to {size_before} bytes ({truncate_error})"
            raise self._write_error(segment.path, len(buffer), e) from e
        segment.size += done
        count = state.buffered
        state.written_seq = state.last_seq
        self._buffered -= count
        buffer.clear()
        return done

    def _assert_buffer(self, state: _Symbol) -> None:
        """Before writing: the buffer's first and last records are sound and carry written_seq+1 and
        last_seq, and the last one ends the buffer. With append's contiguity check, that is all of it."""
        buffer = state.buffer
        for offset, seq in ((0, state.written_seq + 1), (state.tail, state.last_seq)):
            length, crc, record_type = HEADER.unpack_from(buffer, offset)
            payload = bytes(buffer[offset + HEADER_BYTES : offset + HEADER_BYTES + length])
            assert len(payload) == length, (state.name, offset, length)
            assert record_type == (TYPE_TRADE if offset else TYPE_COMMIT_START), (state.name, offset, record_type)
            assert zlib.crc32(payload, zlib.crc32(bytes((record_type,)))) == crc, (state.name, offset)
            trade = self._decoder.decode(payload)
            assert trade.symbol == state.name, (state.name, trade.symbol)
            assert trade.seq == seq, (state.name, offset, trade.seq, seq)
        assert state.tail + HEADER_BYTES + length == len(buffer), (state.name, state.tail, len(buffer))

    def _write_error(self, path: Path, size: int, error: OSError) -> WalError:
        if error.errno == errno.ENOSPC:
            return WalFull(
                f"WAL segment {path}: no space left on the device writing {size} bytes; "
                f"the {self._buffered} uncommitted records are kept: free space on the WAL disk "
                "(a checkpoint deletes settled segments) and commit again"
            )
        return WalError(f"WAL segment {path}: writing {size} bytes failed ({error}); the records are kept")

    def _rotate(self, state: _Symbol) -> None:
        """Start a new segment named after the first buffered seq: create, magic, fsync file and dir."""
        if state.fd >= 0:
            if state.name in self._unsynced:  # records of a commit that failed before its fdatasync
                self._sync_all([state.fd])
                del self._unsynced[state.name]
            os.close(state.fd)
            state.fd = -1
        first_seq = state.written_seq + 1
        path = state.directory / segment_name(first_seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise self._write_error(path, MAGIC_BYTES, e) from e
        try:
            if os.write(fd, MAGIC) != MAGIC_BYTES:
                raise OSError(errno.ENOSPC, "short write of the segment magic")
            self._sync(fd)
            self._sync_dir(state.directory)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise self._write_error(path, MAGIC_BYTES, e) from e
        state.fd = fd
        state.segments.append(_Segment(first_seq, path, MAGIC_BYTES))

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fdatasync(fd)

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            _fsync_dir(path)

    def _sync_all(self, fds: list[int]) -> None:
        if not self.fsync:
            return
        try:
            futures: list[Future[None]] = []
            if len(fds) > 1:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(FSYNC_THREADS_MAX, thread_name_prefix="wal-fsync")
                futures = [self._executor.submit(os.fdatasync, fd) for fd in fds[1:]]
            # The calling thread syncs the first file itself: it would only wait, and a hand-off costs CPU.
            errors: list[BaseException] = []
            try:
                os.fdatasync(fds[0])
            except OSError as e:
                errors.append(e)
            errors += [e for e in (f.exception() for f in futures) if e is not None]
            if errors:
                raise errors[0]
        except OSError as e:
            # After a failed fsync the kernel may have dropped the dirty pages: retrying would "succeed"
            # without the data on disk (PostgreSQL's fsyncgate). Only a restart and recovery are safe.
            self._broken = f"fdatasync failing ({e})"
            raise WalError(f"WAL {self.root}: fdatasync failed ({e}); restart the shard to recover") from e

    # -- growth ------------------------------------------------------------------------------------

    def checkpoint(self, watermarks: Mapping[str, int]) -> int:
        """Delete every segment all of whose records are at or below ``watermarks[symbol]``.

        The last (active) segment is never deleted: its name keeps the symbol's place. Returns the
        number of segments deleted.
        """
        self._check_usable()
        deleted = 0
        for symbol, watermark in watermarks.items():
            state = self._symbols.get(symbol)
            if state is None:
                continue
            segments = state.segments
            doomed = 0
            while doomed + 1 < len(segments) and segments[doomed + 1].first_seq - 1 <= watermark:
                doomed += 1
            if doomed == 0:
                continue
            for segment in segments[:doomed]:
                segment.path.unlink()
            del segments[:doomed]
            self._sync_dir(state.directory)
            deleted += doomed
        return deleted

    def stats(self) -> dict[str, SymbolStats]:
        result = {}
        for symbol, state in sorted(self._symbols.items()):
            if not state.dir_exists:
                continue  # nothing committed yet: the file system does not know it either
            segments = state.segments
            first = segments[0].first_seq if segments else 0
            result[symbol] = SymbolStats(
                bytes=sum(seg.size for seg in segments),
                segments=len(segments),
                first_seq=first if first and state.written_seq >= first else 0,
                last_seq=state.written_seq if segments else 0,
            )
        return result


def scan_stats(root: Path) -> dict[str, SymbolStats]:
    """What ``ShardWal.stats`` would say, from the file system alone: no lock, safe while the shard runs."""
    result: dict[str, SymbolStats] = {}
    root = Path(root)
    if not root.is_dir():
        return result
    decoder = trade_decoder()
    for symbol in _list_symbols(root):
        for _attempt in range(5):  # a checkpoint may delete a segment under our feet: look again
            try:
                result[symbol] = _symbol_stats(root / symbol, decoder)
                break
            except FileNotFoundError:
                continue
    return result


def _symbol_stats(directory: Path, decoder: msgspec.msgpack.Decoder[Trade]) -> SymbolStats:
    segments = _list_segments(directory)
    if not segments:
        return SymbolStats(bytes=0, segments=0, first_seq=0, last_seq=0)
    last = segments[-1]
    with open(last.path, "rb") as f:
        data = f.read()
    records = scan(data).records if data[:MAGIC_BYTES] == MAGIC else []
    last_seq = decoder.decode(records[-1][2]).seq if records else last.first_seq - 1
    first_seq = segments[0].first_seq
    return SymbolStats(
        bytes=sum(seg.size for seg in segments),
        segments=len(segments),
        first_seq=first_seq if last_seq >= first_seq else 0,
        last_seq=last_seq,
    )
