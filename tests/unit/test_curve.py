"""CURVE helpers with real ZMQ sockets in one process: allowed clients talk, everyone else gets nothing.

Absence is never judged by a clock alone: a test first waits until the server has counted the rogue's
refused handshake, then pushes a marker through an allowed client and reads up to it; whatever the
rogue could have sent or received would be in front of the marker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from engine.core import config as configmod
from engine.core import security
from engine.core.errors import ConfigError
from engine.core.security import CurveServer, KeyPair

WAIT_S = 20.0


def wait_for(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S}s")
        time.sleep(0.01)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, KeyPair]:
    return {name: security.generate_keypair(tmp_path / "keys", name) for name in ("server", "good", "rogue")}


def socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.linger = 0
    return sock


def client(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str, own: KeyPair | None,
           server_public: bytes | None) -> zmq.Socket[bytes]:
    sock = socket(ctx, kind)
    if own is not None:
        assert server_public is not None
        security.configure_client(sock, own, server_public)
    sock.connect(endpoint)
    return sock


class Served:
    """A CURVE server socket on a free loopback port, allowing only the ``good`` key."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], kind: int, keys: dict[str, KeyPair]) -> None:
        self.server = CurveServer(ctx, keys["server"])
        self.sock = socket(ctx, kind)
        self.server.secure(self.sock, "test", {keys["good"].public: "good"})
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def close(self) -> None:
        self.sock.close(0)
        self.server.close()


@pytest.fixture
def served(ctx: zmq.Context[zmq.Socket[bytes]], keys: dict[str, KeyPair],
           request: pytest.FixtureRequest) -> Iterator[Served]:
    s = Served(ctx, request.param, keys)
    yield s
    s.close()


def drain_until(sock: zmq.Socket[bytes], marker: bytes) -> list[bytes]:
    got: list[bytes] = []
    while True:
        assert sock.poll(int(WAIT_S * 1000)), f"{marker!r} never arrived; got {got}"
        frames = sock.recv_multipart()
        got.append(frames[-1])
        if frames[-1] == marker:
            return got


ROGUES = [
    pytest.param("no_curve", id="without-curve"),
    pytest.param("unknown_key", id="unknown-client-key"),
    pytest.param("bad_crypto", id="wrong-server-key"),
]


# A peer without CURVE is refused at the greeting; when it hangs up first, libzmq reports no detail.
REASONS = {"no_curve": {"no_curve", "incomplete"}, "unknown_key": {"unknown_key"}, "bad_crypto": {"bad_crypto"}}


def refused(served: Served, kind: str) -> int:
    return sum(n for (_, reason), n in served.server.rejected.items() if reason in REASONS[kind])


def rogue_keys(kind: str, keys: dict[str, KeyPair]) -> tuple[KeyPair | None, bytes | None]:
    if kind == "no_curve":
        return None, None
    if kind == "unknown_key":
        return keys["rogue"], keys["server"].public
    return keys["good"], keys["rogue"].public  # an allowed key, but it trusts the wrong server


def offer(rogue: zmq.Socket[bytes], data: bytes, kind: str) -> None:
    """Queue ``data`` on the rogue's socket. A CURVE client whose handshake the server has already refused has
    no pipe left to queue into (EAGAIN): nothing goes out, which is the point. A client without CURVE waits
    for its pipe, a few seconds at most: the server may refuse its greeting before one exists, and a send
    that waits for ever would hang the test instead."""
    rogue.setsockopt(zmq.SNDTIMEO, 5000 if kind == "no_curve" else 0)
    try:
        rogue.send(data)
    except zmq.Again:
        pass


@pytest.mark.parametrize("served", [zmq.PULL], indirect=True, ids=["pull"])
@pytest.mark.parametrize("kind", ROGUES)
def test_rogue_pusher_is_refused_counted_and_logged(ctx: zmq.Context[zmq.Socket[bytes]], keys: dict[str, KeyPair],
                                                    served: Served, kind: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="settle.security")
    rogue = client(ctx, zmq.PUSH, served.endpoint, *rogue_keys(kind, keys))
    offer(rogue, b"injected", kind)
    wait_for("the rogue's handshake refused", lambda: refused(served, kind) >= 1)
    good = client(ctx, zmq.PUSH, served.endpoint, keys["good"], keys["server"].public)
    good.send(b"hello")
    good.send(b"marker")
    assert drain_until(served.sock, b"marker") == [b"hello", b"marker"]
    assert served.sock.poll(0) == 0
    assert served.server.rejected_total("test") >= 1
    assert {reason for (_, reason) in served.server.rejected} <= REASONS[kind], served.server.rejected
    messages = [r.getMessage() for r in caplog.records]
    assert any("test: CURVE handshake refused" in m and any(r in m for r in REASONS[kind]) for m in messages), \
        messages
    if kind == "unknown_key":
        assert any(keys["rogue"].public.decode() in m and "127.0.0.1" in m for m in messages), messages
    for m in messages:
        for pair in keys.values():
            assert pair.secret.decode() not in m
    good.close()
    rogue.close()


@pytest.mark.parametrize("served", [zmq.XPUB], indirect=True, ids=["xpub"])
@pytest.mark.parametrize("kind", ROGUES)
def test_rogue_subscriber_reads_nothing(ctx: zmq.Context[zmq.Socket[bytes]], keys: dict[str, KeyPair],
                                        served: Served, kind: str) -> None:
    rogue = client(ctx, zmq.SUB, served.endpoint, *rogue_keys(kind, keys))
    rogue.subscribe(b"")
    good = client(ctx, zmq.SUB, served.endpoint, keys["good"], keys["server"].public)
    good.subscribe(b"")
    wait_for("the rogue's handshake refused", lambda: refused(served, kind) >= 1)
    assert served.sock.poll(int(WAIT_S * 1000)), "the allowed subscriber's subscription never arrived"
    assert served.sock.recv() == b"\x01"  # exactly one subscription: the allowed client's
    for i in range(100):
        served.sock.send(b"trade %d" % i)
    served.sock.send(b"marker")
    assert drain_until(good, b"marker")[-1] == b"marker"
    assert served.sock.poll(0) == 0, "a second subscription arrived"
    assert rogue.poll(0) == 0
    good.close()
    rogue.close()


@pytest.mark.parametrize("served", [zmq.ROUTER], indirect=True, ids=["router"])
@pytest.mark.parametrize("kind", ROGUES)
def test_rogue_replay_client_gets_no_answer(ctx: zmq.Context[zmq.Socket[bytes]], keys: dict[str, KeyPair],
                                            served: Served, kind: str) -> None:
    rogue = client(ctx, zmq.DEALER, served.endpoint, *rogue_keys(kind, keys))
    offer(rogue, b"replay BTC-USDT from 1", kind)
    wait_for("the rogue's handshake refused", lambda: refused(served, kind) >= 1)
    good = client(ctx, zmq.DEALER, served.endpoint, keys["good"], keys["server"].public)
    good.send(b"marker")
    requests = []
    while True:  # the server answers whatever reaches it: only the allowed client's request does
        assert served.sock.poll(int(WAIT_S * 1000))
        envelope, body = served.sock.recv_multipart()
        requests.append(body)
        served.sock.send_multipart([envelope, b"reply to " + body])
        if body == b"marker":
            break
    assert requests == [b"marker"]
    assert good.poll(int(WAIT_S * 1000))
    assert good.recv() == b"reply to marker"
    assert rogue.poll(0) == 0
    good.close()
    rogue.close()


def test_without_a_zap_handler_even_an_allowed_key_is_refused(ctx: zmq.Context[zmq.Socket[bytes]],
                                                              keys: dict[str, KeyPair],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """ZAP_ENFORCE_DOMAIN: were the handler missing, libzmq would otherwise let every CURVE client in."""
    monkeypatch.setattr(security._Authenticator, "start", lambda self: None)  # no handler in this context
    served = Served(ctx, zmq.PULL, keys)
    try:
        assert served.sock.getsockopt(zmq.ZAP_ENFORCE_DOMAIN) == 1
        good = client(ctx, zmq.PUSH, served.endpoint, keys["good"], keys["server"].public)
        good.send(b"hello")
        wait_for("the handshake refused", lambda: served.server.rejected_total("test") >= 1)
        assert served.sock.poll(0) == 0
        good.close()
    finally:
        served.close()


def test_asyncio_context_server(keys: dict[str, KeyPair]) -> None:
    """The shard's sockets live in a zmq.asyncio context; the guard shadows it."""

    async def main() -> None:
        actx = zmq.asyncio.Context()
        sctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        server = CurveServer(actx, keys["server"])
        pull = actx.socket(zmq.PULL)
        pull.linger = 0
        server.secure(pull, "async", {keys["good"].public: "good"})
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        rogue = client(sctx, zmq.PUSH, f"tcp://127.0.0.1:{port}", keys["rogue"], keys["server"].public)
        offer(rogue, b"injected", "unknown_key")
        deadline = time.monotonic() + WAIT_S
        while server.rejected_total() == 0:
            assert time.monotonic() < deadline, "the rogue's handshake was not refused"
            await asyncio.sleep(0.01)
        good = client(sctx, zmq.PUSH, f"tcp://127.0.0.1:{port}", keys["good"], keys["server"].public)
        good.send(b"hello")
        assert await asyncio.wait_for(pull.recv(), WAIT_S) == b"hello"
        assert not await pull.poll(0)  # nothing else arrived
        good.close()
        rogue.close()
        pull.close()
        server.close()
        sctx.term()
        actx.term()

    asyncio.run(main())


# ----------------------------------------------------------------------------------------------- key files


def test_generated_files_modes_and_round_trip(tmp_path: Path) -> None:
    pair = security.generate_keypair(tmp_path / "k", "router")
    secret_file, public_file = tmp_path / "k" / "router.key", tmp_path / "k" / "router.key.pub"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_file.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert security.load_secret(secret_file) == pair
    assert security.load_public(public_file) == pair.public
    assert pair.secret.decode() not in public_file.read_text()
    assert pair.secret.decode() not in repr(pair)
    with pytest.raises(FileExistsError, match="--force"):
        security.generate_keypair(tmp_path / "k", "router")
    assert security.generate_keypair(tmp_path / "k", "router", force=True) != pair


def test_bad_key_files_are_refused_with_the_key_named(tmp_path: Path) -> None:
    a = security.generate_keypair(tmp_path, "a")
    security.generate_keypair(tmp_path, "b")
    with pytest.raises(ConfigError, match="security.me_key: .*a.key holds a secret key"):
        security.load_public(tmp_path / "a.key", "security.me_key")
    with pytest.raises(ConfigError, match="holds no secret key"):
        security.load_secret(tmp_path / "a.key.pub", "security.router_key")
    with pytest.raises(ConfigError, match="does not exist.*settle keys generate"):
        security.load_public(tmp_path / "nope.key.pub", "security.me_key")
    mixed = tmp_path / "mixed.key"
    b_secret = security.load_secret(tmp_path / "b.key").secret.decode()
    mixed.write_text(f'curve\n    public-key = "{a.public.decode()}"\n    secret-key = "{b_secret}"\n')
    with pytest.raises(ConfigError, match="does not belong to its secret key"):
        security.load_secret(mixed)
    short = tmp_path / "short.key.pub"
    short.write_text('curve\n    public-key = "abc"\n')
    with pytest.raises(ConfigError, match="not a 40-character z85"):
        security.load_public(short)


def test_keys_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert security.keys_main(["generate", "--dir", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert names == ["me.key", "me.key.pub", "router.key", "router.key.pub", "shard.key", "shard.key.pub"]
    for name in ("me", "router", "shard"):
        pair = security.load_secret(tmp_path / "keys" / f"{name}.key")
        assert pair.public.decode() in out
        assert pair.secret.decode() not in out
    assert security.keys_main(["generate", "--dir", str(tmp_path / "keys"), "--name", "me"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert security.keys_main(["generate", "--dir", str(tmp_path / "keys"), "--name", "../evil"]) == 78
    assert security.keys_main(["generate"]) == 64
    assert security.keys_main(["generate", "--dir", str(tmp_path / "k2"), "--name", "bridge"]) == 0
    assert sorted(p.name for p in (tmp_path / "k2").iterdir()) == ["bridge.key", "bridge.key.pub"]


# ----------------------------------------------------------------------------------------------- keyring


def curve_config(tmp_path: Path, overrides: dict[str, object] | None = None) -> configmod.Config:
    raw: dict[str, object] = {}
    for key, value in {"security.curve": True, "security.keys_dir": str(tmp_path / "keys"),
                       "router.transport": "tcp", **(overrides or {})}.items():
        configmod.set_dotted(raw, key, value)
    return configmod.from_dict(raw)


def test_keyring_per_role(tmp_path: Path) -> None:
    assert security.keys_main(["generate", "--dir", str(tmp_path / "keys")]) == 0
    config = curve_config(tmp_path)
    router = security.load_keyring(config, "router")
    shard = security.load_keyring(config, "shard")
    public = {n: security.load_public(tmp_path / "keys" / f"{n}.key.pub") for n in ("me", "router", "shard")}
    assert router.own is not None
    assert router.own.public == public["router"]
    assert router.me_public == public["me"]
    assert router.shard_public == public["shard"]
    assert shard.own is not None
    assert shard.own.public == public["shard"]
    assert shard.allowed == {public["router"]: "router"}
    ipc = security.load_keyring(curve_config(tmp_path, {"router.transport": "ipc"}), "shard")
    assert ipc.allowed == {}
    assert ipc.me_public == public["me"]
    assert not security.load_keyring(configmod.load(None), "router").enabled


def test_keyring_names_the_missing_key(tmp_path: Path) -> None:
    security.generate_keypair(tmp_path / "keys", "router")
    security.generate_keypair(tmp_path / "keys", "shard")
    with pytest.raises(ConfigError, match=r"security.me_key: key file .*me.key.pub does not exist"):
        security.load_keyring(curve_config(tmp_path), "router")
    security.generate_keypair(tmp_path / "keys", "me")
    os.unlink(tmp_path / "keys" / "router.key.pub")
    with pytest.raises(ConfigError, match=r"security.router_key: key file .*router.key.pub"):
        security.load_keyring(curve_config(tmp_path), "shard")


def test_keyring_does_nothing_for_ipc_or_when_off(ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path) -> None:
    assert security.keys_main(["generate", "--dir", str(tmp_path / "keys")]) == 0
    keyring = security.load_keyring(curve_config(tmp_path), "shard")
    sock = socket(ctx, zmq.PULL)
    assert keyring.guard(ctx, sock, f"ipc://{tmp_path}/s.sock", "shard-0") is None
    assert sock.curve_server == 0
    off = security.Keyring(enabled=False)
    assert off.guard(ctx, sock, "tcp://127.0.0.1:1", "shard-0") is None
    assert off.client(sock, "tcp://127.0.0.1:1", "me", "router->me") is None
    assert sock.mechanism == zmq.NULL
    sock.close()


def test_log_limiter_counts_what_it_leaves_out() -> None:
    limiter = security._LogLimiter(interval_s=3600)
    assert limiter.admit(("s", "no_curve")) == 0
    assert limiter.admit(("s", "no_curve")) is None
    assert limiter.admit(("s", "no_curve")) is None
    assert limiter.admit(("s", "bad_crypto")) == 0
    assert limiter.flush() == {("s", "no_curve"): 2}


@pytest.mark.parametrize("first", ["no_curve", "refused"])
def test_client_watch_reconnects_after_a_fatal_handshake(ctx: zmq.Context[zmq.Socket[bytes]],
                                                         keys: dict[str, KeyPair], first: str) -> None:
    """libzmq drops an endpoint for good after a handshake protocol error; the watch brings it back.

    ``no_curve``: an impostor without CURVE sat on the ME's address. ``refused``: the ME's allow-list
    lacked our key, and the ME was restarted with it.
    """
    first_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    first_server = CurveServer(first_ctx, keys["server"])
    impostor = socket(first_ctx, zmq.XPUB)
    if first == "refused":
        first_server.secure(impostor, "publish", {keys["rogue"].public: "someone else"})
    port = impostor.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    sub = socket(ctx, zmq.SUB)
    sub.subscribe(b"")
    keyring = security.Keyring(enabled=True, own=keys["good"], me_public=keys["server"].public)
    watch = keyring.client(sub, endpoint, "me", "router->me")
    assert watch is not None
    sub.connect(endpoint)
    real = socket(ctx, zmq.XPUB)
    server = CurveServer(ctx, keys["server"])
    try:
        # A peer without CURVE may hang up first (libzmq retries that by itself); wait for the fatal one.
        wait_for(f"a fatal {first} handshake", lambda: watch.failures[first] >= 1)
        impostor.close(0)
        first_server.close()
        first_ctx.term()
        server.secure(real, "publish", {keys["good"].public: "good"})
        deadline = time.monotonic() + WAIT_S
        while True:  # the first server's port is free once its context is gone; bind may still race the kernel
            try:
                real.bind(endpoint)
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        while not sub.poll(10):
            assert time.monotonic() < deadline, f"never reconnected: {watch.failures}"
            watch.reconnect_if_due()
            real.send(b"trade")
        assert sub.recv() == b"trade"
        assert watch.reconnects >= 1
    finally:
        watch.close()
        sub.close(0)
        real.close(0)
        server.close()
        if not impostor.closed:
            impostor.close(0)
            first_server.close()
            first_ctx.term()


def test_metric_reasons_match_the_classifier() -> None:
    from engine.core.metrics import AUTH_REJECT_REASONS

    assert tuple(AUTH_REJECT_REASONS) == security.REJECT_REASONS
    assert set(security._REASON_TEXT) | {"unknown_key"} == set(security.REJECT_REASONS)
