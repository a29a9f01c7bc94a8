"""The reference ME simulator and its log: determinism, soundness, heartbeats, replay, drops, restarts."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest

from engine.core import records
from engine.core.errors import WalError
from engine.core.messages import (
    Heartbeat,
    ReplayChunk,
    ReplayEnd,
    ReplayFailed,
    ReplayRequest,
    Trade,
    check_trade,
    encoder,
    replay_reply_decoder,
    stream_decoder,
    trade_decoder,
)
from engine.sim.melog import MAGIC, MeLog, _frame_header, read_all
from engine.sim.mesim import (
    FEE_ACCOUNT,
    SimConfig,
    Simulator,
    SubscriberTimeout,
    TradeGenerator,
    _SimCollector,
    main,
    sim_config,
    symbol_names,
)

ANY_PORT = "tcp://127.0.0.1:*"
DEADLINE_S = 20.0  # generous: only a hang reaches it, no assertion is about time


def config(tmp_path: Path, name: str = "me.log", **values: Any) -> SimConfig:
    values.setdefault("wait_subscribers", 0)
    values.setdefault("heartbeat_interval_ms", 50)
    return sim_config(publish=ANY_PORT, replay=ANY_PORT, log_path=str(tmp_path / name), **values)


@contextlib.contextmanager
def running(sim: Simulator) -> Iterator[Simulator]:
    """Run ``sim`` in a thread (it owns its sockets there); stop, join and close it afterwards."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            sim.run(stop)
        except BaseException as e:  # handed to the test thread below
            failure.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield sim
    finally:
        stop.set()
        thread.join(DEADLINE_S)
        sim.close()
    assert not thread.is_alive()
    if failure:
        raise failure[0]


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def subscriber(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket[bytes]) -> bytes:
    if not sock.poll(int(DEADLINE_S * 1000)):
        raise AssertionError("nothing received before the deadline")
    return sock.recv()


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def trades_of(path: Path) -> list[Trade]:
    return list(read_all(str(path)))


# -- the generator ------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_trades(tmp_path: Path) -> None:
    def first(seed: int, n: int = 3000) -> list[bytes]:
        generator = TradeGenerator(config(tmp_path, seed=seed, skew=1.2))
        return [encoder.encode(generator.next()[0]) for _ in range(n)]

    assert first(7) == first(7)
    assert first(7) != first(8)


def test_every_generated_trade_is_sound() -> None:
    cfg = sim_config(seed=3, symbols=40, accounts=50, skew=0.8, taker_fee_bps=10, maker_fee_bps=5)
    generator = TradeGenerator(cfg)
    decode = trade_decoder().decode
    seqs: Counter[str] = Counter()
    for i in range(1, 30_001):
        trade, _ = generator.next()
        assert check_trade(trade) is None, trade
        assert decode(encoder.encode(trade)) == trade  # passes every msgspec constraint
        assert trade.output_sequence == i
        assert trade.seq == seqs[trade.symbol] + 1
        seqs[trade.symbol] = trade.seq
        assert trade.buyer != trade.seller
        assert 1 <= trade.buyer <= 50
        assert 1 <= trade.seller <= 50
        assert FEE_ACCOUNT not in (trade.buyer, trade.seller)
        value = trade.price * trade.qty // 10**trade.qty_scale
        taker, maker = value * 10 // 10_000, value * 5 // 10_000
        fees = (trade.buyer_fee, trade.seller_fee)
        assert fees == ((taker, maker) if trade.taker_side == "buy" else (maker, taker))
    assert set(seqs) == set(symbol_names(40))  # every symbol trades, the skewed tail too
    assert seqs["BTC-USDT"] > seqs["A017-USDT"]


def test_symbols_and_scales_are_consistent_per_asset() -> None:
    names = symbol_names(30)
    assert names[:5] == ["BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "ETH-BTC"]
    assert names[-1] == "A007-USDT"
    generator = TradeGenerator(sim_config(symbols=30))
    decimals: dict[str, int] = {}
    for market in generator.markets:
        base, quote = market.symbol.split("-")
        assert decimals.setdefault(base, market.qty_scale) == market.qty_scale
        assert decimals.setdefault(quote, market.price_scale) == market.price_scale
    assert decimals["BTC"] == 8
    assert decimals["USDT"] == 6


def test_bad_config_is_refused_by_name() -> None:
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match="accounts"):
        sim_config(accounts=1)
    with pytest.raises(ConfigError, match="drop_fraction"):
        sim_config(drop_fraction=1.5)


# -- the log ------------------------------------------------------------------------------------------


def test_log_framing_matches_records_encode() -> None:
    trade, _ = TradeGenerator(sim_config()).next()
    payload = encoder.encode(trade)
    assert _frame_header(payload) + payload == records.encode(payload)


def test_log_reopens_truncates_a_torn_tail_and_replays_any_range(tmp_path: Path) -> None:
    path = str(tmp_path / "me.log")
    generator = TradeGenerator(sim_config(symbols=3))
    written: list[Trade] = []
    with MeLog(path) as log:
        for _ in range(500):
            trade, _ = generator.next()
            log.append(encoder.encode(trade), trade)
            written.append(trade)
        log.flush(fsync=True)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(records.encode(b"\x81\xa4kind")[:7])  # a record torn mid-header
    assert [t.output_sequence for t in read_all(path)] == list(range(1, 501))  # tolerated read-only
    with MeLog(path) as log:
        assert log.torn is not None
        assert os.path.getsize(path) == size
        assert log.output_sequence == 500
        symbol = written[0].symbol
        mine = [t for t in written if t.symbol == symbol]
        assert log.latest[symbol] == len(mine)
        got = [trade_decoder().decode(b) for b in log.read(symbol, 2, 5)]
        assert got == mine[1:5]
        assert log.read(symbol, len(mine) + 1, len(mine) + 10) == []
        assert log.read("NOPE-USDT", 1, 10) == []


def test_log_damaged_in_the_middle_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "me.log")
    generator = TradeGenerator(sim_config())
    with MeLog(path) as log:
        for _ in range(50):
            trade, _ = generator.next()
            log.append(encoder.encode(trade), trade)
    with open(path, "r+b") as f:
        f.seek(len(MAGIC) + 100)
        f.write(b"\xff\xff")
    with pytest.raises(WalError, match="middle"):
        MeLog(path)
    with pytest.raises(WalError):
        list(read_all(path))


def test_log_refuses_a_trade_out_of_sequence(tmp_path: Path) -> None:
    generator = TradeGenerator(sim_config())
    first, _ = generator.next()
    second, _ = generator.next()
    with MeLog(str(tmp_path / "me.log")) as log, pytest.raises(WalError, match="does not follow"):
        log.append(encoder.encode(second), second)
    assert first.output_sequence == 1


# -- running: log, restart, publish ------------------------------------------------------------------


def test_restarted_simulator_continues_the_same_stream(tmp_path: Path) -> None:
    with Simulator(config(tmp_path, "straight.log", seed=11, trades=3000, linger_s=0)) as sim:
        summary = sim.run()
    assert summary.trades == 3000
    assert summary.output_sequence == 3000
    with Simulator(config(tmp_path, "restarted.log", seed=11, trades=1234, linger_s=0)) as sim:
        sim.run()
    with Simulator(config(tmp_path, "restarted.log", seed=11, trades=3000, linger_s=0)) as sim:
        assert sim.output_sequence == 1234
        summary = sim.run()
    assert summary.trades == 3000 - 1234
    straight, restarted = (tmp_path / "straight.log").read_bytes(), (tmp_path / "restarted.log").read_bytes()
    assert straight == restarted
    assert summary.latest == dict(Counter(t.symbol for t in trades_of(tmp_path / "straight.log")))


def test_subscribers_receive_exactly_the_logged_trades_then_heartbeats_with_the_latest(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = Simulator(config(tmp_path, seed=5, symbols=5, trades=2000, wait_subscribers=2))
    subs = [subscriber(ctx, sim.publish_endpoint) for _ in range(2)]
    decode = stream_decoder().decode
    with running(sim):
        for sub in subs:
            got: list[Trade] = []
            while len(got) < 2000:
                message = decode(receive(sub))
                if isinstance(message, Trade):
                    got.append(message)
            assert got == trades_of(tmp_path / "me.log")
            latest = sim.latest
            assert sum(latest.values()) == 2000
            heard: dict[str, int] = {}
            while heard != latest:  # heartbeats after the last trade carry every symbol's last seq
                message = decode(receive(sub))
                assert isinstance(message, Heartbeat)
                assert message.seq <= latest[message.symbol]
                heard[message.symbol] = message.seq
        assert sim.subscribers >= 2
    for sub in subs:
        sub.close()


def test_heartbeats_before_any_trade_carry_zero(tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    sim = Simulator(config(tmp_path, symbols=3, trades=1, rate=0.001))  # the one trade is far off
    sub = subscriber(ctx, sim.publish_endpoint)
    decode = stream_decoder().decode
    with running(sim):
        heard: dict[str, int] = {}
        while len(heard) < 3:
            message = decode(receive(sub))
            assert isinstance(message, Heartbeat)
            heard[message.symbol] = message.seq
    assert heard == {"BTC-USDT": 0, "ETH-USDT": 0, "SOL-USDT": 0}
    sub.close()


def test_drop_fraction_drops_from_the_stream_but_logs_everything(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    cfg = config(
        tmp_path, seed=9, trades=5000, drop_fraction=0.3, wait_subscribers=1, heartbeat_interval_ms=60_000
    )
    sim = Simulator(cfg)
    sub = subscriber(ctx, sim.publish_endpoint)
    decode = stream_decoder().decode
    with running(sim):
        wait_for(lambda: sim.published == 5000, "the simulator to publish")
        sent = 5000 - sim.dropped
        got: list[Trade] = []
        while len(got) < sent:
            message = decode(receive(sub))
            if isinstance(message, Trade):
                got.append(message)
    logged = trades_of(tmp_path / "me.log")
    assert len(logged) == 5000
    assert 0.25 < sim.dropped / 5000 < 0.35
    assert [t.output_sequence for t in got] == sorted(t.output_sequence for t in got)
    assert set(got) < set(logged)
    sub.close()


def test_waiting_for_subscribers_times_out(tmp_path: Path) -> None:
    cfg = config(tmp_path, trades=10, wait_subscribers=1, wait_subscribers_timeout_s=0.1)
    with Simulator(cfg) as sim, pytest.raises(SubscriberTimeout, match="0 of 1 subscribers"):
        sim.run()


# -- replay -------------------------------------------------------------------------------------------


def ask(dealer: zmq.Socket[bytes], request: bytes) -> list[Any]:
    """Send one request; collect replies up to the one that ends it."""
    dealer.send(request)
    decode = replay_reply_decoder().decode
    replies: list[Any] = []
    while True:
        reply = decode(receive(dealer))
        replies.append(reply)
        if isinstance(reply, ReplayEnd | ReplayFailed):
            return replies


def request(request_id: int, symbol: str, from_seq: int, to_seq: int) -> bytes:
    return encoder.encode(
        ReplayRequest(request_id=request_id, symbol=symbol, from_seq=from_seq, to_seq=to_seq)
    )


def test_replay_ranges_errors_and_the_past_the_latest_case(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = Simulator(config(tmp_path, seed=2, symbols=2, trades=3000))
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(sim.replay_endpoint)
    with running(sim):
        wait_for(lambda: sim.published == 3000, "the simulator to publish")
        logged = [t for t in trades_of(tmp_path / "me.log") if t.symbol == "ETH-USDT"]
        assert len(logged) > 1000  # more than one chunk

        replies = ask(dealer, request(1, "ETH-USDT", 1, 0))
        *chunks, end = replies
        assert all(isinstance(c, ReplayChunk) and c.request_id == 1 for c in chunks)
        assert [len(c.trades) for c in chunks] == [1000, len(logged) - 1000]
        assert [t for c in chunks for t in c.trades] == logged
        assert end == ReplayEnd(request_id=1, symbol="ETH-USDT", last_seq=len(logged))

        *chunks, end = ask(dealer, request(2, "ETH-USDT", 10, 20))
        assert [t for c in chunks for t in c.trades] == logged[9:20]
        assert end.last_seq == 20

        *chunks, end = ask(dealer, request(3, "ETH-USDT", len(logged) - 2, len(logged) + 50))
        assert [t for c in chunks for t in c.trades] == logged[-3:]  # clamped to the latest
        assert end.last_seq == len(logged)

        assert ask(dealer, request(4, "ETH-USDT", len(logged) + 5, 0)) == [
            ReplayEnd(request_id=4, symbol="ETH-USDT", last_seq=len(logged) + 4)
        ]

        (failed,) = ask(dealer, request(5, "DOGE-EUR", 1, 0))
        assert (failed.request_id, failed.symbol, failed.code) == (5, "DOGE-EUR", "unknown_symbol")

        (failed,) = ask(dealer, b"\xc1 not msgpack")
        assert (failed.request_id, failed.code) == (0, "bad_request")

        loose = msgspec.msgpack.encode({"kind": "replay_req", "request_id": 6, "symbol": "ETH-USDT"})
        (failed,) = ask(dealer, loose)
        assert (failed.request_id, failed.code) == (6, "bad_request")  # the id survives a bad request

        (failed,) = ask(dealer, request(7, "ETH-USDT", 9, 3))
        assert (failed.request_id, failed.code) == (7, "bad_request")
        assert sim.replay_requests == 8
    dealer.close()


def test_replay_chunk_bytes_are_a_replay_chunk(tmp_path: Path) -> None:
    from engine.sim.mesim import _RawChunk

    trades = [TradeGenerator(sim_config()).next()[0]]
    raw = encoder.encode(
        _RawChunk(request_id=3, symbol="BTC-USDT", trades=[msgspec.Raw(encoder.encode(trades[0]))])
    )
    assert raw == encoder.encode(ReplayChunk(request_id=3, symbol="BTC-USDT", trades=trades))


def test_replay_and_heartbeats_are_served_while_publishing_flat_out(
    tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sim = Simulator(config(tmp_path, symbols=4, trades=0))  # publishes until stopped
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(sim.replay_endpoint)
    with running(sim):
        wait_for(lambda: sim.published >= 20_000, "trades")
        *chunks, end = ask(dealer, request(1, "BTC-USDT", 1, 2500))
        assert sum(len(c.trades) for c in chunks) == 2500
        assert end.last_seq == 2500
        heartbeats = sim.heartbeats
        wait_for(lambda: sim.heartbeats > heartbeats, "a heartbeat round")
        assert sim.published > 20_000
    dealer.close()


# -- the command line and metrics ---------------------------------------------------------------------


def test_main_publishes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = str(tmp_path / "cli.log")
    argv = ["--publish", ANY_PORT, "--replay", ANY_PORT, "--log", log, "--trades", "250", "--linger", "0"]
    assert main([*argv, "--wait-subscribers", "0", "--seed", "4", "--symbols", "3", "--quiet"]) == 0
    assert len(list(read_all(log))) == 250
    assert "published 250 trades" in capsys.readouterr().err
    assert main(["--accounts", "1", "--log", log]) == 78  # EXIT_CONFIG, naming the key
    assert "accounts" in capsys.readouterr().err


def test_metrics_collector_reads_the_counters(tmp_path: Path) -> None:
    with Simulator(config(tmp_path, symbols=2, trades=100, linger_s=0)) as sim:
        sim.run()
        registry = CollectorRegistry()
        registry.register(_SimCollector(sim))
        text = generate_latest(registry).decode()
    assert "settle_sim_trades_published_total 100.0" in text
    assert "settle_sim_trades_dropped_total 0.0" in text
    assert "settle_sim_replay_requests_total 0.0" in text
    assert 'settle_sim_latest_seq{symbol="BTC-USDT"}' in text
