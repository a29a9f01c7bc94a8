"""Gap detection and replay from the ME, with real processes: nothing lost between the ME and the store."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
import zmq

from engine.core.messages import ReplayChunk, ReplayEnd, encoder, replay_reply_decoder
from engine.verify.testbed import System
from tests.integration.test_pipeline import assert_exact

pytestmark = pytest.mark.integration


def shard_metric_sum(system: System, prefix: str) -> float:
    """The sum over every shard's /metrics of the samples whose line starts with ``prefix``."""
    total = 0.0
    for shard in range(system.config.shard_count):
        port = system.config.metrics.shard_port_base + shard
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))
    return total


def test_simulator_dropping_one_percent_of_trades_and_heartbeats(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"me.heartbeat_interval_ms": 200})
    try:
        system.start_engine()
        system.start_sim(30_000, rate=10_000, extra=["--drop", "0.01"])
        system.wait_settled()
        replay_lags = shard_metric_sum(system, "settle_replay_lag_seconds_count{")
        sim = system.stop_sim()
    finally:
        system.stop()
    assert_exact(system)
    assert sim is not None
    assert sim.dropped > 0, sim
    # every dropped trade reached the store by replay and its lag was observed (replayed ranges may
    # also cover trades that came live as well, hence >=)
    assert replay_lags >= sim.dropped, (replay_lags, sim)


def test_sigkill_the_router_mid_stream(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"me.heartbeat_interval_ms": 200})
    try:
        system.start_engine()
        system.start_sim(40_000, rate=8_000)
        system.wait_settled(5_000, at_least=True)
        old = system.kill("router")
        system.wait_respawned("router", old)
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


def test_sigkill_a_shard_and_wipe_its_wal(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"me.heartbeat_interval_ms": 200})
    try:
        system.start_engine()
        system.start_sim(40_000, rate=8_000)
        system.wait_settled(5_000, at_least=True)
        pid = system.kill("shard-0", signal.SIGSTOP)  # frozen: it cannot restart before the disk is gone
        shutil.rmtree(system.config.wal_path(0))
        system.kill("shard-0", signal.SIGKILL)
        system.wait_respawned("shard-0", pid)
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


def test_the_matching_engine_restarts_mid_stream(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"me.heartbeat_interval_ms": 200})
    try:
        system.start_engine()
        system.start_sim(40_000, rate=8_000)
        system.wait_settled(5_000, at_least=True)
        assert system.sim is not None
        system.sim.kill()
        system.sim.wait()
        time.sleep(0.5)
        system.start_sim(40_000, rate=8_000)  # continues its own log where it stopped
        system.wait_settled()
    finally:
        system.stop()
    assert_exact(system)


class ManglingProxy:
    """Sits between the shards and the ME's replay endpoint and spoils the first replies it relays."""

    def __init__(self, upstream: str, spoil: list[str]) -> None:
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.upstream = upstream
        self.spoil = list(spoil)
        self.spoiled: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        decoder = replay_reply_decoder()
        clients: dict[bytes, zmq.Socket[bytes]] = {}
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        while not self.stop.is_set():
            for sock, _ in poller.poll(50):
                if sock is self.front:
                    ident, body = self.front.recv_multipart()
                    dealer = clients.get(ident)
                    if dealer is None:
                        dealer = clients[ident] = self.ctx.socket(zmq.DEALER)
                        dealer.setsockopt(zmq.LINGER, 0)
                        dealer.connect(self.upstream)
                        poller.register(dealer, zmq.POLLIN)
                    dealer.send(body)
                else:
                    ident = next(i for i, d in clients.items() if d is sock)
                    body = sock.recv()
                    self.front.send_multipart([ident, self.mangle(decoder, body)])
        for dealer in clients.values():
            dealer.close(0)

    def mangle(self, decoder: msgspec.msgpack.Decoder, body: bytes) -> bytes:  # type: ignore[type-arg]
        reply = decoder.decode(body)
        if not self.spoil or not isinstance(reply, ReplayChunk) or not reply.trades:
            return body
        how = self.spoil.pop(0)
        self.spoiled.append(how)
        if how == "malformed":
            return b"\xc1" + body[1:]
        if how == "wrong_symbol":
            other = "ZZZ-USDT" if reply.symbol != "ZZZ-USDT" else "YYY-USDT"
            return encoder.encode(ReplayChunk(request_id=reply.request_id, symbol=other, trades=reply.trades))
        if how == "hole":
            trades = reply.trades[:1] + reply.trades[2:] if len(reply.trades) > 2 else reply.trades[1:]
            if not trades:
                return encoder.encode(ReplayEnd(request_id=reply.request_id, symbol=reply.symbol,
                                                last_seq=reply.trades[-1].seq))
            return encoder.encode(ReplayChunk(request_id=reply.request_id, symbol=reply.symbol, trades=trades))
        raise AssertionError(how)

    def __enter__(self) -> ManglingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.front.close(0)
        self.back.close(0)
        self.ctx.term()


def test_bad_replay_replies_are_rejected_counted_and_retried(tmp_path: Path) -> None:
    system = System(tmp_path, shards=2, overrides={"me.heartbeat_interval_ms": 200})
    real_replay = system.config.me.replay
    spoil = ["malformed", "wrong_symbol", "hole"] * 2
    with ManglingProxy(real_replay, spoil) as proxy:
        # The shards ask the proxy (the engine's config file); the simulator serves on the real endpoint.
        engine_raw = json.loads(json.dumps(system.raw))
        engine_raw["me"]["replay"] = proxy.endpoint
        system.config_path.write_text(json.dumps(engine_raw))
        try:
            system.start_engine()
            system.start_sim(20_000, rate=10_000, extra=["--drop", "0.02"])
            system.wait_settled()
            rejected = shard_metric_sum(system, "settle_replay_rejected_total{")
        finally:
            system.stop()
    assert sorted(set(proxy.spoiled)) == ["hole", "malformed", "wrong_symbol"]
    assert rejected >= len(proxy.spoiled)
    assert_exact(system)
