"""CURVE with the real engine and simulator: rogue peers inject nothing, read nothing, and are counted.

Every test runs the supervised engine (router -> shards over tcp, so every hop is a CURVE socket) and,
where it needs one, the ME simulator as a CURVE server. Absence is proven in order, not by a clock: the
server first counts the rogue's refused handshake, then legitimate traffic flows past it; whatever the
rogue could have sent or read would have gone with that traffic. A control test without CURVE shows
the same injection does get settled, so these tests can tell the difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.core import security
from engine.core.messages import ReplayRequest, Trade, check_trade, encoder
from engine.core.security import KeyPair
from engine.sim.mesim import SimConfig, TradeGenerator, symbol_names
from engine.verify.demo import _free_port_range
from engine.verify.testbed import System
from tests.factories import routed
from tests.integration.test_pipeline import assert_exact
from tests.servers.cassandra import CassandraServer

pytestmark = pytest.mark.integration

WAIT_S = 60.0
ROGUE_SYMBOL = "ROGUE-USDT"
ROGUE_ACCOUNT = 987_654


def wait_for(what: str, predicate: Callable[[], bool], system: System | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S}s" + (f"\n{system.logs()}" if system else ""))
        time.sleep(0.05)


def scrape(port: int, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``family``'s samples on 127.0.0.1:port/metrics, keyed by their sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[tuple[tuple[str, str], ...], float] = {}
    for line in text.splitlines():
        if not line.startswith(family + "{"):
            continue
        labels_text, value = line[len(family) + 1:].rsplit("} ", 1)
        labels = tuple(sorted((k, v.strip('"')) for k, v in (p.split("=", 1) for p in labels_text.split(","))))
        samples[labels] = float(value)
    return samples


# A peer without CURVE is refused at the greeting; when it hangs up first, libzmq reports no detail.
REASONS = {"no_curve": ("no_curve", "incomplete"), "unknown_key": ("unknown_key",)}


def rejected(port: int, family: str, socket: str, kind: str) -> float:
    try:
        samples = scrape(port, family)
    except OSError:
        return 0.0  # not serving yet
    return sum(samples.get((("reason", reason), ("socket", socket)), 0.0) for reason in REASONS[kind])


def rogue_trade(seq: int = 1) -> Trade:
    """A sound trade for a symbol the simulator never publishes: settled only if someone injected it."""
    trade, _ = TradeGenerator(SimConfig(seed=7)).next()
    rogue = msgspec.structs.replace(trade, symbol=ROGUE_SYMBOL, seq=seq, buyer=ROGUE_ACCOUNT, seller=ROGUE_ACCOUNT + 1,
                                    price_scale=6)
    assert check_trade(rogue) is None
    return rogue


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    assert security.keys_main(["generate", "--dir", str(directory)]) == 0  # me, router, shard
    security.generate_keypair(directory, "rogue")
    return directory


def tcp_system(root: Path, keys: Path, *, curve: bool) -> System:
    return System(root, shards=2, overrides={
        "security.curve": curve,
        "security.keys_dir": str(keys),
        "router.transport": "tcp",
        "router.tcp_base_port": _free_port_range(2),
        "me.heartbeat_interval_ms": 200,
    })


def sim_args(system: System, keys: Path) -> list[str]:
    return ["--curve-key", str(keys / "me.key"), "--curve-allow", str(keys / "router.key.pub"),
            "--curve-allow", str(keys / "shard.key.pub"), "--metrics-port", str(system.config.metrics.simulator_port)]


class Rogues:
    """Sockets of peers that do not hold an allowed key: one without CURVE, one with an unknown key."""

    def __init__(self, keys: Path) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.own = security.load_secret(keys / "rogue.key")
        self.keys = keys
        self.sockets: list[zmq.Socket[bytes]] = []

    def pair(self, kind: int, endpoint: str, server_key: str) -> list[zmq.Socket[bytes]]:
        """[no CURVE, unknown CURVE key] clients of ``endpoint``, whose server holds ``server_key``."""
        server_public = security.load_public(self.keys / f"{server_key}.key.pub")
        out = []
        for own in (None, self.own):
            sock = self.ctx.socket(kind)
            sock.linger = 0
            if own is not None:
                security.configure_client(sock, own, server_public)
            sock.connect(endpoint)
            self.sockets.append(sock)
            out.append(sock)
        return out

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(0)
        self.ctx.term()


@pytest.fixture
def rogues(keys: Path) -> Iterator[Rogues]:
    r = Rogues(keys)
    yield r
    r.close()


def test_rogue_clients_get_nothing_in_and_nothing_out(tmp_path: Path, keys: Path, rogues: Rogues) -> None:
    system = tcp_system(tmp_path / "run", keys, curve=True)
    config = system.config
    shard0_metrics = config.metrics.shard_port_base
    sim_metrics = config.metrics.simulator_port
    try:
        system.start_engine()
        system.start_sim(20_000, rate=4_000, extra=sim_args(system, keys))
        system.wait_settled(1_000, at_least=True)

        for i, push in enumerate(rogues.pair(zmq.PUSH, config.shard_endpoint(0), "shard")):
            push.send(routed(rogue_trade(seq=1 + i)))
        subs = rogues.pair(zmq.SUB, config.me.publish, "me")
        for sub in subs:
            sub.subscribe(b"")
        dealers = rogues.pair(zmq.DEALER, config.me.replay, "me")
        symbol = symbol_names(8)[0]
        for i, dealer in enumerate(dealers):
            dealer.send(encoder.encode(ReplayRequest(request_id=1 + i, symbol=symbol, from_seq=1, to_seq=0)))

        for reason in ("no_curve", "unknown_key"):
            def shard_counted(r: str = reason) -> bool:
                return rejected(shard0_metrics, "settle_auth_rejected_total", "shard-0", r) >= 1

            wait_for(f"shard-0 counted a rogue pusher ({reason})", shard_counted, system)
            for sock_name in ("publish", "replay"):
                def sim_counted(s: str = sock_name, r: str = reason) -> bool:
                    return rejected(sim_metrics, "settle_sim_auth_rejected_total", s, r) >= 1

                wait_for(f"the ME counted a rogue on {sock_name} ({reason})", sim_counted, system)
        settled_at_rejection = system.settled()
        system.wait_settled()  # legitimate trades kept flowing past the refused peers, all of them
        assert system.settled() > settled_at_rejection
    finally:
        system.stop()
    for sock in [*subs, *dealers]:
        assert sock.poll(0) == 0, "a rogue read something"
    assert ROGUE_SYMBOL not in system.watermarks()
    assert_exact(system)
    logs = {name: (system.root / "logs" / f"{name}.log").read_text() for name in ("shard-0", "simulator")}
    assert "shard-0: CURVE handshake refused (" in logs["shard-0"]
    assert rogues.own.public.decode() in logs["shard-0"]  # the refused key is named
    assert "publish: CURVE handshake refused" in logs["simulator"]
    assert "replay: CURVE handshake refused" in logs["simulator"]
    for text in logs.values():
        for name in ("me", "router", "shard", "rogue"):
            assert security.load_secret(keys / f"{name}.key").secret.decode() not in text


def test_a_rogue_publisher_in_the_mes_place_injects_nothing(tmp_path: Path, keys: Path) -> None:
    """The ME goes away and an impostor without the ME's secret key binds its address."""
    system = tcp_system(tmp_path / "run", keys, curve=True)
    try:
        system.start_engine()
        system.start_sim(10_000, rate=4_000, extra=sim_args(system, keys))
        system.wait_settled(1_000, at_least=True)
        assert system.sim is not None
        system.sim.kill()
        system.sim.wait()
        impostor_key = security.load_secret(keys / "rogue.key")
        for as_curve_server in (False, True):  # no CURVE at all; CURVE with its own key
            events = impersonate(system.config.me.publish, impostor_key if as_curve_server else None)
            assert "HANDSHAKE_SUCCEEDED" not in events, events
        system.start_sim(10_000, rate=4_000, extra=sim_args(system, keys))  # the real ME, on its own log
        system.wait_settled()
    finally:
        system.stop()
    assert ROGUE_SYMBOL not in system.watermarks()
    assert_exact(system)  # every real trade, so the router came back to the real ME by itself
    assert "router->me: CURVE handshake with" in (system.root / "logs" / "router.log").read_text()


def impersonate(endpoint: str, own: KeyPair | None) -> list[str]:
    """Bind the ME's publish endpoint and publish rogue trades until the router has tried and failed."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()  # terminated at the end: the port is free again
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    if own is not None:
        pub.curve_server = True
        pub.curve_secretkey = own.secret
    monitor = pub.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    events: list[str] = []
    try:
        deadline = time.monotonic() + WAIT_S
        while True:  # the ME's port was just released
            try:
                pub.bind(endpoint)
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline, f"cannot bind {endpoint}"
                time.sleep(0.05)
        while not any("FAILED" in e for e in events):  # the router connected to the impostor and gave up
            assert time.monotonic() < deadline, f"the router never tried the impostor; events {events}"
            if monitor.poll(100):
                events.append(zmq.Event(recv_monitor_message(monitor)["event"]).name or "?")
            for seq in range(1, 51):
                pub.send(encoder.encode(rogue_trade(seq)))
        assert pub.poll(0) == 0, "the impostor got a subscription"
        pub.disable_monitor()
    finally:
        monitor.close(0)
        pub.close(0)
        ctx.term()
    return events


def test_control_without_curve_a_rogue_push_is_settled(tmp_path: Path, keys: Path) -> None:
    """What the tests above rule out does happen when CURVE is off: the injection is real."""
    system = tcp_system(tmp_path / "run", keys, curve=False)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    try:
        system.start_engine()
        push.connect(system.config.shard_endpoint(0))
        push.send(routed(rogue_trade()))
        wait_for("the injected trade settled", lambda: system.watermarks().get(ROGUE_SYMBOL) == 1, system)
    finally:
        push.close(0)
        ctx.term()
        system.stop()


# ----------------------------------------------------------------------------------------------- secrets


@pytest.mark.xdist_group("cassandra")
def test_db_password_never_in_logs_status_or_files(tmp_path: Path, cassandra: CassandraServer) -> None:
    """A run on the real Cassandra with a password from a file: no log, output or state file shows it."""
    secret = "pw-" + uuid.uuid4().hex
    password_file = tmp_path / "db.password"
    password_file.write_text(secret + "\n")
    password_file.chmod(0o600)
    system = System(tmp_path / "run", shards=2, store="cassandra", overrides={
        "store.cassandra.port": cassandra.port,
        "store.cassandra.keyspace": f"t_{uuid.uuid4().hex[:12]}",
        "store.cassandra.consistency": "ONE",
        "store.cassandra.username": "settle",
        "store.cassandra.password_file": str(password_file),
    })
    env = {**os.environ, "SETTLE_LOG_LEVEL": "DEBUG"}
    outputs: list[tuple[str, str]] = []
    try:
        system.start_engine()
        system.start_sim(2_000, rate=2_000)
        system.wait_settled()
        for args in (["status"], ["status", "--json"], ["balances", "1"]):
            out = subprocess.run([sys.executable, "-m", "engine.cli", *args, "--config", str(system.config_path)],
                                 capture_output=True, text=True, timeout=300, env=env)
            assert out.returncode == 0, out.stdout + out.stderr
            outputs.append((out.stdout, out.stderr))
    finally:
        system.stop()
    status = json.loads(outputs[1][0])
    assert status["store"] == "cassandra"
    assert sum(r["watermark"] for shard in status["shards"] for r in shard["symbols"]) == 2_000
    files = [p for p in system.root.rglob("*") if p.is_file() and p.suffix in (".log", ".json", ".toml")]
    assert any(p.name == "shard-0.log" for p in files)
    for p in files:
        assert secret not in p.read_text(errors="replace"), p
    for stdout, stderr in outputs:
        assert secret not in stdout
        assert secret not in stderr
    assert str(password_file) in (system.root / "run" / "config.json").read_text()  # the path, not the value
