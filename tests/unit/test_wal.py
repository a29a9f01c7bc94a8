"""The shard WAL: group commit, recovery of torn tails, corruption in the middle, checkpoints, disk full."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import ClosedError, WalCorruption, WalError, WalFull
from engine.core.messages import Trade, encoder, trade_decoder
from engine.core.records import HEADER_BYTES, MAGIC_BYTES, encode
from engine.core.wal import MAGIC, ShardWal, SymbolStats, scan_stats, segment_name

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDC"]
ID_BASE = 2**40  # ids this large encode to a fixed width, so records differ in size only by seq and symbol


def make_trade(symbol: str = "BTC-USDT", seq: int = 1, **overrides: object) -> Trade:
    """A trade that passes the wire validation (checked by a round trip through the decoder)."""
    fields: dict[str, object] = {
        "output_sequence": ID_BASE + seq * 7,
        "symbol": symbol,
        "seq": seq,
        "trade_id": ID_BASE + seq,
        "price": 6_500_000,  # 65,000.00 quote per base unit
        "price_scale": 2,
        "qty": 1_500_000,  # 0.015 base
        "qty_scale": 8,
        "buyer": 11,
        "seller": 22,
        "buy_order_id": ID_BASE + 100 + seq,
        "sell_order_id": ID_BASE + 200 + seq,
        "taker_side": "buy",
        "buyer_fee": 97,
        "seller_fee": 48,
        "ts_ns": 1_700_000_000_000_000_000 + seq,
    }
    fields.update(overrides)
    trade = Trade(**fields)  # type: ignore[arg-type]
    payload = encoder.encode(trade)
    assert trade_decoder().decode(payload) == trade
    if seq < 128 and len(symbol) == 8 and not overrides:
        assert HEADER_BYTES + len(payload) == RECORD_BYTES
    return trade


RECORD_BYTES = 244  # of every make_trade() record with a seq below 128 and an 8-letter symbol


def open_wal(root: Path, *, segment_bytes_max: int = 1 << 20, fsync: bool = True,
             repair_corruption: bool = False) -> ShardWal:
    wal = ShardWal(root, segment_bytes_max=segment_bytes_max, fsync=fsync, shard=2)
    wal.recover(repair_corruption=repair_corruption)
    return wal


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "wal" / "shard-2"


def write(wal: ShardWal, symbol: str, seqs: range, *, commit_each: bool = False) -> list[Trade]:
    trades = [make_trade(symbol, seq) for seq in seqs]
    for trade in trades:
        wal.append(trade)
        if commit_each:
            wal.commit()
    wal.commit()
    return trades


def segments(root: Path, symbol: str = "BTC-USDT") -> list[Path]:
    return sorted((root / symbol).glob("*.seg"))


# -- round trip --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(st.sampled_from(SYMBOLS), max_size=12), min_size=1, max_size=8),
    reopen_after=st.sets(st.integers(min_value=0, max_value=7)),
    segment_bytes_max=st.integers(min_value=MAGIC_BYTES + 1, max_value=4 * RECORD_BYTES),
    data=st.data(),
)
def test_round_trip(
    batches: list[list[str]], reopen_after: set[int], segment_bytes_max: int, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shard-0"
        expected: dict[str, list[Trade]] = {s: [] for s in SYMBOLS}
        wal = open_wal(root, segment_bytes_max=segment_bytes_max, fsync=False)
        try:
            for index, batch in enumerate(batches):
                for symbol in batch:
                    trade = make_trade(symbol, len(expected[symbol]) + 1)
                    wal.append(trade)
                    expected[symbol].append(trade)
                assert wal.buffered == len(batch)
                written = wal.commit()
                assert written == len(batch) * RECORD_BYTES
                assert wal.buffered == 0
                if index in reopen_after:
                    wal.close()
                    wal = open_wal(root, segment_bytes_max=segment_bytes_max, fsync=False)
            wal.close()
            wal = open_wal(root, segment_bytes_max=segment_bytes_max, fsync=False)
            logged = [s for s in SYMBOLS if expected[s]]
            assert wal.symbols() == logged
            for symbol in SYMBOLS:
                trades = expected[symbol]
                assert wal.last_seq(symbol) == len(trades)
                assert list(wal.read_after(symbol, 0)) == trades
                after = data.draw(st.integers(min_value=0, max_value=len(trades)))
                assert list(wal.read_after(symbol, after)) == trades[after:]
            stats = wal.stats()
            assert stats == scan_stats(root)
            for symbol in logged:
                files = segments(root, symbol)
                assert stats[symbol].segments == len(files)
                assert stats[symbol].bytes == sum(f.stat().st_size for f in files)
                assert (stats[symbol].first_seq, stats[symbol].last_seq) == (1, len(expected[symbol]))
                for file in files:  # each segment was rotated away from only once it reached the size
                    assert file == files[-1] or file.stat().st_size >= segment_bytes_max
        finally:
            wal.close()


def test_group_commit_across_many_symbols_with_fsync(root: Path) -> None:
    symbols = [f"S{i:02d}-USDT" for i in range(10)]
    with open_wal(root, segment_bytes_max=3 * RECORD_BYTES) as wal:
        for seq in range(1, 8):
            for symbol in symbols:
                wal.append(make_trade(symbol, seq))
            assert wal.commit() == len(symbols) * RECORD_BYTES
    with open_wal(root) as wal:
        for symbol in symbols:
            assert [t.seq for t in wal.read_after(symbol, 0)] == list(range(1, 8))
            assert len(segments(root, symbol)) == 3  # 3 + 3 + 1 records


def test_commit_with_nothing_buffered_writes_nothing(root: Path) -> None:
    with open_wal(root) as wal:
        assert wal.commit() == 0
        assert wal.symbols() == []
        assert wal.stats() == {}


def test_recovery_report_and_progress(root: Path) -> None:
    with open_wal(root, segment_bytes_max=2 * RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 6), commit_each=True)
        write(wal, "ETH-USDT", range(1, 3))
    calls: list[tuple[int, int]] = []
    wal = ShardWal(root, segment_bytes_max=2 * RECORD_BYTES)
    with wal:
        report = wal.recover(progress=lambda done, total: calls.append((done, total)))
    total = sum(f.stat().st_size for f in root.glob("*/*.seg"))
    assert (report.symbols, report.segments, report.records, report.bytes) == (2, 4, 7, total)
    assert report.torn_tails == []
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


# -- torn tails --------------------------------------------------------------------------------------


def test_torn_tail_at_every_byte_of_the_last_record(tmp_path: Path) -> None:
    records = 4
    source = tmp_path / "source"
    with open_wal(source) as wal:
        write(wal, "BTC-USDT", range(1, records + 1))
    [segment] = segments(source)
    whole = segment.read_bytes()
    last = MAGIC_BYTES + (records - 1) * RECORD_BYTES
    assert len(whole) == last + RECORD_BYTES
    for cut in range(last + 1, len(whole)):
        root = tmp_path / f"cut-{cut}"
        (root / "BTC-USDT").mkdir(parents=True)
        path = root / "BTC-USDT" / segment.name
        path.write_bytes(whole[:cut])
        with ShardWal(root, segment_bytes_max=1 << 20) as wal:
            report = wal.recover()
            assert report.torn_tails == [(str(path), last, cut - last)]
            assert report.records == records - 1
            assert wal.last_seq("BTC-USDT") == records - 1
            assert path.stat().st_size == last
            wal.append(make_trade("BTC-USDT", records))
            wal.commit()
        rewritten = path.read_bytes()  # the same trade; its header now says it opens a commit
        assert len(rewritten) == len(whole)
        assert rewritten[:last] == whole[:last]
        assert rewritten[last + HEADER_BYTES :] == whole[last + HEADER_BYTES :]
        with ShardWal(root, segment_bytes_max=1 << 20) as wal:
            report = wal.recover()
            assert report.torn_tails == []
            assert [t.seq for t in wal.read_after("BTC-USDT", 0)] == list(range(1, records + 1))


def test_torn_magic_of_a_new_last_segment(root: Path) -> None:
    with open_wal(root, segment_bytes_max=2 * RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 3))
    new = root / "BTC-USDT" / segment_name(3)
    new.write_bytes(MAGIC[:3])  # the crash came between creating the segment and writing its magic
    with open_wal(root, segment_bytes_max=2 * RECORD_BYTES) as wal:
        assert wal.last_seq("BTC-USDT") == 2
        write(wal, "BTC-USDT", range(3, 5))
    assert new.read_bytes()[:MAGIC_BYTES] == MAGIC
    with open_wal(root) as wal:
        assert [t.seq for t in wal.read_after("BTC-USDT", 0)] == [1, 2, 3, 4]


def test_empty_last_segment_keeps_the_place(root: Path) -> None:
    """After a checkpoint the only segment may hold no record: its name still says where the log is."""
    with open_wal(root, segment_bytes_max=RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 3), commit_each=True)
    empty = root / "BTC-USDT" / segment_name(3)
    empty.write_bytes(MAGIC)
    for old in segments(root)[:-1]:
        old.unlink()
    with open_wal(root) as wal:
        assert wal.last_seq("BTC-USDT") == 2
        assert wal.stats() == {
            "BTC-USDT": SymbolStats(bytes=MAGIC_BYTES, segments=1, first_seq=0, last_seq=2)
        }
        assert wal.stats() == scan_stats(root)
        assert list(wal.read_after("BTC-USDT", 2)) == []
        with pytest.raises(WalError, match="checkpointed away"):
            list(wal.read_after("BTC-USDT", 1))
        wal.append(make_trade("BTC-USDT", 3))
        wal.commit()
    with open_wal(root) as wal:
        assert [t.seq for t in wal.read_after("BTC-USDT", 2)] == [3]


# -- damage in the middle ----------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x41
    path.write_bytes(bytes(data))


def test_corruption_in_the_middle_of_a_segment(root: Path) -> None:
    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 4), commit_each=True)
    [segment] = segments(root)
    flip(segment, MAGIC_BYTES + HEADER_BYTES + 5)
    size = segment.stat().st_size
    with ShardWal(root, segment_bytes_max=1 << 20, shard=2) as wal, pytest.raises(WalCorruption) as caught:
        wal.recover()
    message = str(caught.value)
    assert str(segment) in message
    assert f"at byte {MAGIC_BYTES}" in message
    assert "settle recover --shard 2" in message
    assert caught.value.offset == MAGIC_BYTES
    assert segment.stat().st_size == size  # recovery changed nothing


def test_shard_number_comes_from_the_directory_name_or_is_unknown(tmp_path: Path) -> None:
    for name, shard in [("shard-7", "7"), ("elsewhere", "?")]:
        root = tmp_path / name
        with open_wal(root) as wal:
            write(wal, "BTC-USDT", range(1, 3), commit_each=True)  # damage followed by a later commit
        flip(segments(root)[0], MAGIC_BYTES + 1)
        with ShardWal(root, segment_bytes_max=1 << 20) as wal, pytest.raises(WalCorruption) as caught:
            wal.recover()
        assert f"settle recover --shard {shard}`" in str(caught.value)


def test_torn_end_of_a_non_last_segment_is_corruption(root: Path) -> None:
    with open_wal(root, segment_bytes_max=RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 4), commit_each=True)
    first = segments(root)[0]
    os.truncate(first, first.stat().st_size - 3)
    with pytest.raises(WalCorruption, match="non-last segment") as caught:
        open_wal(root)
    assert caught.value.path == str(first)


def test_a_missing_segment_is_a_seq_break(root: Path) -> None:
    with open_wal(root, segment_bytes_max=RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 4), commit_each=True)
    segments(root)[1].unlink()
    with pytest.raises(WalCorruption, match="previous one ends at seq 1") as caught:
        open_wal(root)
    assert caught.value.path == str(root / "BTC-USDT" / segment_name(3))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"seq": 5}, "seq 5 where seq 2 belongs"),
        ({"symbol": "ETH-USDT"}, "symbol 'ETH-USDT' in the BTC-USDT log"),
    ],
)
def test_checksummed_records_are_checked_too(root: Path, bad: dict[str, object], reason: str) -> None:
    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 2))
    [segment] = segments(root)
    with segment.open("ab") as f:
        f.write(encode(encoder.encode(make_trade(**{"seq": 2, **bad}))))  # type: ignore[arg-type]
    with pytest.raises(WalCorruption, match=reason):
        open_wal(root)


def test_bad_magic(root: Path) -> None:
    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 2))
    flip(segments(root)[0], 0)
    with pytest.raises(WalCorruption, match="bad magic"):
        open_wal(root)


def test_repair_truncates_at_the_damage_and_drops_later_segments(root: Path) -> None:
    with open_wal(root, segment_bytes_max=3 * RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 4))
        write(wal, "BTC-USDT", range(4, 7))
        write(wal, "BTC-USDT", range(7, 9))
        write(wal, "ETH-USDT", range(1, 3))
    first, second, third = segments(root)
    sizes = [p.stat().st_size for p in (first, second, third)]
    damage = MAGIC_BYTES + RECORD_BYTES  # the second record of the first segment
    flip(first, damage + HEADER_BYTES + 10)
    with ShardWal(root, segment_bytes_max=3 * RECORD_BYTES) as wal:
        report = wal.recover(repair_corruption=True)
        assert report.torn_tails == [
            (str(first), damage, sizes[0] - damage),
            (str(second), 0, sizes[1]),
            (str(third), 0, sizes[2]),
        ]
        assert report.records == 1 + 2
        assert segments(root) == [first]
        assert first.stat().st_size == damage
        assert wal.last_seq("BTC-USDT") == 1
        assert wal.last_seq("ETH-USDT") == 2
        write(wal, "BTC-USDT", range(2, 4))
    with open_wal(root) as wal:
        assert [t.seq for t in wal.read_after("BTC-USDT", 0)] == [1, 2, 3]


def test_repair_of_a_seq_break_drops_the_segments_after_it(root: Path) -> None:
    with open_wal(root, segment_bytes_max=RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 5), commit_each=True)
    one, two, three, four = segments(root)
    two.unlink()
    sizes = [three.stat().st_size, four.stat().st_size]
    with ShardWal(root, segment_bytes_max=RECORD_BYTES) as wal:
        report = wal.recover(repair_corruption=True)
        assert report.torn_tails == [(str(three), 0, sizes[0]), (str(four), 0, sizes[1])]
        assert segments(root) == [one]
        assert wal.last_seq("BTC-USDT") == 1
    with ShardWal(root, segment_bytes_max=RECORD_BYTES) as wal:
        assert wal.recover().torn_tails == []


# -- checkpoints -------------------------------------------------------------------------------------


def test_checkpoint_deletes_exactly_the_settled_segments(root: Path) -> None:
    with open_wal(root, segment_bytes_max=2 * RECORD_BYTES) as wal:
        for first in (1, 3, 5, 7):
            write(wal, "BTC-USDT", range(first, first + 2))
        write(wal, "ETH-USDT", range(1, 3))
        names = [p.name for p in segments(root)]
        assert names == [segment_name(s) for s in (1, 3, 5, 7)]
        assert wal.checkpoint({"BTC-USDT": 1}) == 0  # segment 1 still holds seq 2
        assert wal.checkpoint({"BTC-USDT": 2}) == 1
        assert wal.checkpoint({"BTC-USDT": 3, "NEW-USDT": 9}) == 0
        assert [p.name for p in segments(root)] == names[1:]
        assert wal.checkpoint({"BTC-USDT": 10**6, "ETH-USDT": 10**6}) == 2  # never the active segment
        assert [p.name for p in segments(root)] == names[3:]
        assert [p.name for p in segments(root, "ETH-USDT")] == [segment_name(1)]
        assert wal.stats()["BTC-USDT"] == SymbolStats(
            bytes=MAGIC_BYTES + 2 * RECORD_BYTES, segments=1, first_seq=7, last_seq=8
        )
        assert wal.stats() == scan_stats(root)
        assert [t.seq for t in wal.read_after("BTC-USDT", 6)] == [7, 8]
        with pytest.raises(WalError, match=r"records 5\.\.6 were checkpointed away"):
            wal.read_after("BTC-USDT", 4)
        write(wal, "BTC-USDT", range(9, 10))
    with open_wal(root) as wal:
        assert [t.seq for t in wal.read_after("BTC-USDT", 6)] == [7, 8, 9]


# -- ownership and life cycle ------------------------------------------------------------------------


def test_a_second_wal_on_the_same_root_is_refused(root: Path) -> None:
    first = ShardWal(root, segment_bytes_max=1 << 20)
    with pytest.raises(WalError, match=rf"in use by another process \(pid {os.getpid()}"):
        ShardWal(root, segment_bytes_max=1 << 20)
    first.close()
    first.close()  # idempotent
    with ShardWal(root, segment_bytes_max=1 << 20) as second:
        second.recover()


def test_a_full_disk_does_not_stop_a_wal_from_taking_its_lock(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by `settle chaos` (power_loss on a full WAL disk): the lock file came back empty, writing the pid
    # into it needed a block the disk did not have, and the shard crash-looped at start until space returned.
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(root / "LOCK"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with ShardWal(root, segment_bytes_max=1 << 20) as wal:
        wal.recover()
        with pytest.raises(WalError, match=r"in use by another process \(pid unknown"):
            ShardWal(root, segment_bytes_max=1 << 20)


def test_use_before_recover_and_after_close(root: Path) -> None:
    wal = ShardWal(root, segment_bytes_max=1 << 20)
    with pytest.raises(WalError, match="recover"):
        wal.append(make_trade())
    wal.recover()
    wal.close()
    with pytest.raises(ClosedError):
        wal.append(make_trade())
    with pytest.raises(ClosedError):
        wal.commit()


def test_append_asserts_contiguous_seqs_and_valid_symbols(root: Path) -> None:
    with open_wal(root) as wal:
        wal.append(make_trade(seq=1))
        with pytest.raises(AssertionError):
            wal.append(make_trade(seq=3))
        with pytest.raises(AssertionError):
            wal.append(make_trade("ETH-USDT", 2))
        wal.append(make_trade(seq=2))
        for symbol in ["../../etc", "BTC-USDT\n", "btc-usdt", "LOCK"]:
            with pytest.raises(ValueError, match="does not match"):
                wal.append(msgspec.structs.replace(make_trade(seq=1), symbol=symbol))
        assert wal.buffered == 2
        assert wal.last_seq("BTC-USDT") == 2
        wal.commit()
        assert wal.symbols() == ["BTC-USDT"]


def test_start_after_a_store_watermark(root: Path) -> None:
    with open_wal(root) as wal:
        wal.start_after("BTC-USDT", 41)
        assert wal.last_seq("BTC-USDT") == 41
        assert list(wal.read_after("BTC-USDT", 41)) == []
        write(wal, "BTC-USDT", range(42, 44))
        with pytest.raises(WalError, match="already holds"):
            wal.start_after("BTC-USDT", 42)  # would forget seq 43
    assert [p.name for p in segments(root)] == [segment_name(42)]
    with open_wal(root) as wal:
        assert [t.seq for t in wal.read_after("BTC-USDT", 41)] == [42, 43]
        with pytest.raises(WalError, match="checkpointed away"):
            wal.read_after("BTC-USDT", 0)


def test_start_after_past_everything_the_wal_holds_restarts_the_log(root: Path) -> None:
    # A WAL behind the store (an old disk brought back): everything it holds is settled already.
    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 4))
        wal.start_after("BTC-USDT", 100)
        assert wal.last_seq("BTC-USDT") == 100
        write(wal, "BTC-USDT", range(101, 103))
    assert [p.name for p in segments(root)] == [segment_name(101)]
    with open_wal(root) as wal:
        wal.recover()
        assert [t.seq for t in wal.read_after("BTC-USDT", 100)] == [101, 102]


# -- disk full and write errors ----------------------------------------------------------------------


def failing_write(monkeypatch: pytest.MonkeyPatch, code: int, *, partial: bool) -> list[int]:
    """Make the next os.write write half its data (when ``partial``) and then fail with ``code``."""
    real_write = os.write
    calls: list[int] = []

    def write_once(fd: int, data: bytes | memoryview) -> int:
        calls.append(fd)
        if len(calls) > 1:
            return real_write(fd, data)
        if partial:
            real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", write_once)
    return calls


@pytest.mark.parametrize("partial", [False, True])
def test_disk_full_keeps_the_records_and_the_file_clean(
    root: Path, monkeypatch: pytest.MonkeyPatch, partial: bool
) -> None:
    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 3))
        [segment] = segments(root)
        size = segment.stat().st_size
        for seq in range(3, 6):
            wal.append(make_trade(seq=seq))
        calls = failing_write(monkeypatch, errno.ENOSPC, partial=partial)
        with pytest.raises(WalFull, match="no space left") as caught:
            wal.commit()
        assert caught.value.retriable
        assert str(segment) in str(caught.value)
        assert segment.stat().st_size == size
        assert wal.buffered == 3
        wal.append(make_trade(seq=6))
        assert wal.commit() == 4 * RECORD_BYTES
        assert len(calls) == 2
        assert wal.buffered == 0
    with open_wal(root) as wal:
        assert [t.seq for t in wal.read_after("BTC-USDT", 0)] == [1, 2, 3, 4, 5, 6]


def test_other_write_errors_are_not_retriable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 2))
        wal.append(make_trade(seq=2))
        failing_write(monkeypatch, errno.EIO, partial=True)
        with pytest.raises(WalError) as caught:
            wal.commit()
        assert type(caught.value) is WalError
        assert not caught.value.retriable
        wal.commit()
    with open_wal(root) as wal:
        assert wal.last_seq("BTC-USDT") == 2


def test_disk_full_while_rotating(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_wal(root, segment_bytes_max=RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 2))
        wal.append(make_trade(seq=2))
        failing_write(monkeypatch, errno.ENOSPC, partial=False)  # the magic of the new segment
        with pytest.raises(WalFull):
            wal.commit()
        assert [p.name for p in segments(root)] == [segment_name(1)]
        wal.commit()
        assert [p.name for p in segments(root)] == [segment_name(1), segment_name(2)]


def test_failure_in_one_symbol_does_not_write_another_twice(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 2))
        write(wal, "ETH-USDT", range(1, 2))
        wal.append(make_trade("ETH-USDT", 2))
        wal.append(make_trade("BTC-USDT", 2))
        real_write = os.write
        calls: list[int] = []

        def second_fails(fd: int, data: bytes | memoryview) -> int:
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "full")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", second_fails)
        with pytest.raises(WalFull):
            wal.commit()
        assert wal.buffered == 1
        wal.commit()
    with open_wal(root) as wal:
        assert [t.seq for t in wal.read_after("ETH-USDT", 0)] == [1, 2]
        assert [t.seq for t in wal.read_after("BTC-USDT", 0)] == [1, 2]


def test_records_written_by_a_failed_commit_are_synced_before_their_segment_is_left(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_wal(root, segment_bytes_max=RECORD_BYTES) as wal:
        write(wal, "ETH-USDT", range(1, 2))
        write(wal, "BTC-USDT", range(1, 2))
        wal.append(make_trade("ETH-USDT", 2))  # written to ETH's second segment ...
        wal.append(make_trade("BTC-USDT", 2))  # ... then this write fails: no fdatasync yet
        real_write, real_fdatasync = os.write, os.fdatasync
        writes: list[int] = []
        synced: list[str] = []

        def last_write_fails(fd: int, data: bytes | memoryview) -> int:
            writes.append(fd)
            if len(writes) == 4:  # ETH magic, ETH records, BTC magic, BTC records
                raise OSError(errno.ENOSPC, "full")
            return real_write(fd, data)

        def record_sync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fdatasync(fd)

        monkeypatch.setattr(os, "write", last_write_fails)
        monkeypatch.setattr(os, "fdatasync", record_sync)
        with pytest.raises(WalFull):
            wal.commit()
        synced.clear()
        wal.append(make_trade("ETH-USDT", 3))  # ETH's segment is full: the next commit leaves it
        wal.commit()
        assert str(root / "ETH-USDT" / segment_name(2)) in synced


def test_a_failed_fsync_makes_the_wal_unusable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    with open_wal(root) as wal:
        write(wal, "BTC-USDT", range(1, 2))
        wal.append(make_trade(seq=2))
        monkeypatch.setattr(os, "fdatasync", broken)
        with pytest.raises(WalError, match="fdatasync failed"):
            wal.commit()
        monkeypatch.undo()
        with pytest.raises(WalError, match="restart the shard"):
            wal.commit()


# -- status ------------------------------------------------------------------------------------------


def test_scan_stats_matches_stats_and_tolerates_a_torn_tail(root: Path) -> None:
    assert scan_stats(root) == {}
    with open_wal(root, segment_bytes_max=3 * RECORD_BYTES) as wal:
        write(wal, "BTC-USDT", range(1, 8), commit_each=True)
        write(wal, "ETH-USDT", range(1, 3))
        assert wal.stats() == scan_stats(root)
        assert wal.stats()["BTC-USDT"].last_seq == 7
        last = segments(root)[-1]
        with last.open("ab") as f:
            f.write(b"\x10\x00\x00\x00 half a record")  # a write in flight as the status tool reads
        stats = scan_stats(root)
        assert stats["BTC-USDT"].last_seq == 7
        assert stats["BTC-USDT"].first_seq == 1
        assert stats["BTC-USDT"].segments == 3
