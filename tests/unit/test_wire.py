"""The router-to-shard hop: many frames per message, cut back into the ME's own bytes; other wires refused."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from engine.core import config as configmod
from engine.core import wire
from engine.core.messages import Heartbeat, encoder, stream_decoder
from engine.core.placement import shard_for
from engine.core.store import open_store
from engine.core.store.base import Position, PositionKey
from router import router as routermod
from router.router import Router
from tests.factories import routed, trade
from tests.inprocess import running_shard, wait_until

SYMBOLS = ("BTC-USDT", "ETH-USDT", "SOL-USDT")


def decode(data: bytes) -> wire.FrameBatch:
    return wire.decode_batch(data, wire.batch_decoder(), stream_decoder())


def test_a_batch_gives_back_each_frame_as_the_me_sent_it() -> None:
    frames = [encoder.encode(trade(SYMBOLS[i % 3], seq=i + 1)) for i in range(50)]
    frames.insert(7, encoder.encode(Heartbeat(symbol="BTC-USDT", seq=3, ts_ns=1)))
    frames[3] = frames[3][:1] + frames[3][1:]  # any valid MessagePack map, not only ours
    batch = decode(wire.encode_batch(frames))
    assert [bytes(f) for f in batch.frames] == frames
    assert batch.messages == [stream_decoder().decode(f) for f in frames]
    assert batch.rejected == []


def test_a_frame_that_does_not_decode_is_the_only_one_rejected() -> None:
    good = [encoder.encode(trade(seq=i)) for i in (1, 2, 3)]
    bad = b"\x81\xa4kind\xa5trade"  # a trade with none of its fields
    batch = decode(wire.encode_batch([good[0], bad, good[1], good[2]]))
    assert [m.seq for m in batch.messages] == [1, 2, 3]
    assert [bytes(f) for f in batch.frames] == good
    assert [frame for frame, _ in batch.rejected] == [bad]
    assert "missing required field" in batch.rejected[0][1]


@pytest.mark.parametrize("cut", [0, 4, 7, 8, 12, -1])
def test_a_cut_or_padded_batch_is_rejected_whole(cut: int) -> None:
    data = wire.encode_batch([encoder.encode(trade(seq=i)) for i in (1, 2)])
    damaged = data[:cut] if cut > 0 else data + b"\x00" if cut else data[:4]
    with pytest.raises(wire.WireError):
        decode(damaged)


def test_a_router_of_the_old_wire_is_refused_by_name() -> None:
    with pytest.raises(wire.WireVersionError, match="one ME frame per message"):
        decode(encoder.encode(trade()))
    with pytest.raises(wire.WireVersionError, match="wire version 3"):
        decode(b"STB\x03" + wire.encode_batch([encoder.encode(trade())])[4:])
    with pytest.raises(wire.WireError) as garbage:  # garbage is not a version: it is quarantined, not fatal
        decode(b"\xc1 nothing of the kind")
    assert not isinstance(garbage.value, wire.WireVersionError)


def test_batches_split_at_every_boundary_settle_each_trade_once(tmp_path: Path) -> None:
    """One stream of trades of three symbols, cut into batches at every boundary (each size from 1 up) and
    sent again in other cuts: the store holds each trade once, each symbol's watermark at its last."""
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1", "metrics.enabled=true",
                                   f'store.path="{tmp_path / "s.db"}"', "wal.batch_trades_max=32"])
    stream = [trade(SYMBOLS[i % 3], seq=i // 3 + 1, output_sequence=i + 1) for i in range(600)]
    with running_shard(config, tmp_path) as (shard, push):
        at, size = 0, 1
        while at < len(stream):  # sizes 1, 2, 3, ...: every boundary of a batch falls somewhere new
            push.send(routed(*stream[at : at + size]))
            at, size = at + size, size + 1
        rng = random.Random(3)
        at = 0
        while at < len(stream):  # the same trades again, cut elsewhere: every one a duplicate now
            size = rng.randint(1, 70)
            push.send(routed(*stream[at : at + size]))
            at += size
        last = {symbol: max(t.seq for t in stream if t.symbol == symbol) for symbol in SYMBOLS}
        assert wait_until(lambda: {s: st.settled for s, st in shard.sequencer.symbols.items()} == last)
        assert wait_until(lambda: shard.m.duplicates.value == len(stream))

    async def stored() -> tuple[dict[str, int], dict[PositionKey, Position]]:
        store = await open_store(config.store)
        try:
            return await store.watermarks(), await store.positions()
        finally:
            await store.close()

    marks, positions = asyncio.run(stored())
    assert marks == last
    for symbol in SYMBOLS:  # the buyer (account 1) got the base asset of each trade once
        base = symbol.split("-")[0]
        assert positions[(1, base, symbol)].amount == last[symbol] * stream[0].qty


def test_a_batch_with_one_bad_frame_quarantines_that_frame_only(tmp_path: Path) -> None:
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1", "metrics.enabled=false",
                                   f'store.path="{tmp_path / "s.db"}"'])
    frames = [encoder.encode(trade("BTC-USDT", seq=i)) for i in range(1, 6)]
    bad = b"\x81\xa4kind\xa5trade"
    with running_shard(config, tmp_path) as (shard, push):
        push.send(wire.encode_batch([*frames[:2], bad, *frames[2:]]))
        assert wait_until(lambda: shard.sequencer.state("BTC-USDT").settled == 5)
    records = [json.loads(line) for line in
               (config.quarantine_path / "shard-0.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["bytes"]) for r in records] == [("malformed", len(bad))]


class _Sub:
    """The ME's socket as the router drains it: ``frames``, then nothing."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    def recv(self, flags: int = 0) -> bytes:
        if not self.frames:
            raise zmq.Again()
        return self.frames.pop(0)


@pytest.fixture
def router(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=2"])
    r = Router(config)
    sent: list[tuple[int, bytes, int]] = []
    r.send = lambda shard, batch, frames: sent.append((shard, batch, frames))  # type: ignore[method-assign]
    yield r, sent
    r.drain()


def test_a_lone_trade_is_sent_at_once(router) -> None:  # type: ignore[no-untyped-def]
    r, sent = router
    frame = encoder.encode(trade("BTC-USDT", seq=1))
    assert r.receive(_Sub([frame]), stream_decoder()) == 1
    assert sent == [(shard_for("BTC-USDT", 2), wire.encode_batch([frame]), 1)]
    assert r.pending == [[], []]


def test_a_busy_drain_sends_by_count_and_by_the_flush_bound(router, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    r, sent = router
    frames = [encoder.encode(trade("BTC-USDT", seq=i)) for i in range(1, routermod.BATCH_FRAMES_MAX * 2 + 101)]
    clock = iter(range(10**9))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock) * 1e-6)  # 1 us a call: never the bound
    r.receive(_Sub(list(frames)), stream_decoder())
    assert [n for _, _, n in sent] == [routermod.BATCH_FRAMES_MAX, routermod.BATCH_FRAMES_MAX, 100]
    sent.clear()
    clock2 = iter(range(10**9))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock2) * 1e-3)  # 1 ms a call: past it at once
    r.receive(_Sub(list(frames[:300])), stream_decoder())
    sizes = [n for _, _, n in sent]
    assert sum(sizes) == 300
    assert max(sizes) <= routermod.FLUSH_CHECK_FRAMES, sizes  # sent at the first look at the clock, each time
    assert b"".join(bytes(f) for _, batch, _ in sent for f in decode(batch).frames) == b"".join(frames[:300])


def test_the_router_forwards_a_lone_trade_over_real_sockets(tmp_path: Path) -> None:
    """ME PUB -> router -> a PULL bound where shard 0 listens: one trade, nothing after it, arrives."""
    config = configmod.load(None, [f'engine.data_dir="{tmp_path}"', "engine.shards=1", "metrics.enabled=false",
                                   'me.publish="ipc://' + str(tmp_path / "me.sock") + '"'])
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, pull = ctx.socket(zmq.PUB), ctx.socket(zmq.PULL)
    pub.bind(config.me.publish)
    pull.bind(config.shard_endpoint(0))
    r = Router(config)
    runner = threading.Thread(target=r.run)
    runner.start()
    try:
        frame = encoder.encode(trade("BTC-USDT", seq=1))
        got = None
        for _ in range(100):  # a SUB joins late: publish until the router has it (no sleep: poll's timeout)
            pub.send(frame)
            if pull.poll(100):
                got = pull.recv()
                break
        assert got is not None, "the router never forwarded the trade"
        batch = decode(got)
        assert [bytes(f) for f in batch.frames] == [frame] * len(batch.frames)
    finally:
        r.stopping = True
        runner.join(30)
        pub.close(0)
        pull.close(0)
        ctx.term()


def test_the_batch_decoder_is_bound_to_the_stream_union() -> None:
    with pytest.raises(msgspec.DecodeError):
        wire.batch_decoder().decode(msgspec.msgpack.encode([{"kind": "replay_req"}]))
