"""ZMQ CURVE on every TCP endpoint: key files, authenticated servers, keyed clients, ``settle keys``.

Who is the server is fixed by who binds. The ME binds PUB and ROUTER, so it is a CURVE server and the
router and the shards are its clients; when the router reaches the shards over TCP each shard's PULL is
a server whose only allowed client is the router. A server knows its own keypair and an allow-list of
client public keys; a client knows its own keypair and the server's public key. ``ipc://`` sockets are
not encrypted: they live in ``<data_dir>/run``, a directory only the service user can open.

A peer without the right key gets nothing in and nothing out: the handshake fails before any message
passes. Every failed handshake on a server socket is counted (``CurveServer.rejected`` and the
``on_reject`` callback, which the processes turn into a Prometheus counter) and logged: the ZAP handler
logs the refused client key and address, the socket monitor logs the failures that never reach ZAP (a
peer without CURVE, a peer holding the wrong server key). Log lines are limited to one per socket and
reason every ``LOG_INTERVAL_S`` and carry how many were left out since, so a peer retrying every 100 ms
cannot fill the disk; the counters see every attempt.

Key files are the ZeroMQ certificate text format (``zmq.auth.load_certificate`` reads them):
``<name>.key`` holds both keys and is mode 0600, ``<name>.key.pub`` holds only the public key. Note that
this is not pyzmq's own naming (``.key`` public, ``.key_secret`` secret), so the allow-list is a list of
files, never ``Authenticator.configure_curve(location=<dir>)``, which would glob ``*.key``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec
import zmq
from zmq.auth.certs import load_certificate
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from engine.core.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError
from engine.core.retry import Backoff

if TYPE_CHECKING:
    from engine.core.config import Config

SECRET_SUFFIX: Final = ".key"
PUBLIC_SUFFIX: Final = ".key.pub"
DEFAULT_KEY_NAMES: Final = ("me", "router", "shard")
ZAP_DOMAIN_PREFIX: Final = "settle-"
LOG_INTERVAL_S: Final = 10.0
MONITOR_POLL_MS: Final = 100
# Reasons a handshake was refused (the ``reason`` label of the rejection counters).
REJECT_REASONS: Final = ("unknown_key", "no_curve", "bad_crypto", "protocol", "incomplete")

KeyName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]

log = logging.getLogger("settle.security")


class SecurityConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[security]``: CURVE on every tcp:// endpoint. Keys are made by ``settle keys generate``."""

    curve: bool = False  # encrypt and authenticate ME -> router, replay, and router -> shards over tcp
    keys_dir: str = "/etc/settle/keys"  # <name>.key (secret, 0600) and <name>.key.pub per keypair
    me_key: KeyName = "me"  # the ME's public key: <keys_dir>/me.key.pub (the simulator also reads me.key)
    router_key: KeyName = "router"  # the router's keypair
    shard_key: KeyName = "shard"  # the keypair every shard uses (replay client; PULL server over tcp)
    # Public key files the shards' tcp PULL sockets accept; relative paths are under keys_dir.
    # Empty: the router's public key only.
    allowed_clients: list[str] = []

    def secret_path(self, name: str) -> Path:
        return Path(self.keys_dir) / f"{name}{SECRET_SUFFIX}"

    def public_path(self, name: str) -> Path:
        return Path(self.keys_dir) / f"{name}{PUBLIC_SUFFIX}"

    def allowed_paths(self) -> list[tuple[str, Path]]:
        """(config key, file) of every public key the shards accept."""
        if not self.allowed_clients:
            return [("security.router_key", self.public_path(self.router_key))]
        return [(f"security.allowed_clients[{i}]", Path(self.keys_dir) / p)  # an absolute p wins the join
                for i, p in enumerate(self.allowed_clients)]


# ----------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes = field(repr=False)  # z85, 40 bytes; never printed or logged


def _check_z85(key: bytes, what: str) -> bytes:
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"{what}: not a 40-character z85 CURVE key")
    return key


def _banner(kind: str, name: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"#   ****  Generated on {now} by settle keys generate  ****\n#   ZeroMQ CURVE {kind} Certificate: {name}\n"


def _certificate(name: str, public: bytes, secret: bytes | None) -> str:
    kind = "**Secret**" if secret is not None else "Public"
    text = _banner(kind, name)
    if secret is not None:
        text += "#   Keep it private: mode 0600, readable only by the service user.\n"
    text += f'\nmetadata\n    name = "{name}"\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def _write(path: Path, text: str, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` from the first byte (no window with looser permissions)."""
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    target = tmp if force else path
    if force:
        tmp.unlink(missing_ok=True)
    fd = os.open(target, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; the public file should be readable by peers
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(tmp, path)


def generate_keypair(directory: str | os.PathLike[str], name: str, *, force: bool = False) -> KeyPair:
    """Write ``<name>.key`` (both keys, mode 0600) and ``<name>.key.pub`` (public, 0644) in ``directory``.

    Refuses to overwrite an existing key unless ``force``: a replaced key locks out every peer that knows
    the old one.
    """
    msgspec.convert(name, KeyName)  # same rule as the config keys that name keypairs
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.curve_keypair()
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    if not force:
        for path in (secret_path, public_path):
            if path.exists():
                raise FileExistsError(f"{path} exists; pass --force to replace it (its peers must then "
                                      f"be given the new public key)")
    _write(secret_path, _certificate(name, public, secret), 0o600, force)
    _write(public_path, _certificate(name, public, None), 0o644, force)
    return KeyPair(public=public, secret=secret)


def _read(path: str | os.PathLike[str], what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = load_certificate(path)
    except OSError:
        raise ConfigError(f"{what}: key file {os.fspath(path)} does not exist or cannot be read; make one "
                          f"with `settle keys generate --dir DIR --name NAME`") from None
    except ValueError:
        raise ConfigError(f"{what}: {os.fspath(path)} holds no CURVE public key") from None
    return public, secret


def load_public(path: str | os.PathLike[str], what: str = "public key") -> bytes:
    """The z85 public key in ``path`` (a ``.key.pub`` file). A secret key file is refused."""
    public, secret = _read(path, what)
    if secret is not None:
        raise ConfigError(f"{what}: {os.fspath(path)} holds a secret key; give the {PUBLIC_SUFFIX} file")
    return _check_z85(public, f"{what}: {os.fspath(path)}")


def load_secret(path: str | os.PathLike[str], what: str = "secret key") -> KeyPair:
    """The keypair in ``path`` (a ``.key`` file), checked: the public key must belong to the secret."""
    public, secret = _read(path, what)
    if secret is None:
        raise ConfigError(f"{what}: {os.fspath(path)} holds no secret key; give the {SECRET_SUFFIX} file")
    _check_z85(public, f"{what}: {os.fspath(path)}")
    _check_z85(secret, f"{what}: {os.fspath(path)}")
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{what}: {os.fspath(path)}: its public key does not belong to its secret key")
    return KeyPair(public=public, secret=secret)


def load_allowed(paths: Iterable[tuple[str, str | os.PathLike[str]]]) -> dict[bytes, str]:
    """Public key -> a label for logs (the file's stem), from ``(config key, file)`` pairs."""
    allowed: dict[bytes, str] = {}
    for what, path in paths:
        allowed[load_public(path, what)] = Path(path).name.removesuffix(PUBLIC_SUFFIX)
    if not allowed:
        raise ConfigError("CURVE server: the allow-list of client public keys is empty; nobody could connect")
    return allowed


def configure_client(sock: zmq.Socket[Any], own: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server holding ``server_public``. Before connect()."""
    sock.curve_secretkey = own.secret
    sock.curve_publickey = own.public
    sock.curve_serverkey = server_public


# ----------------------------------------------------------------------------------------------- server


class _LogLimiter:
    """At most one line per key every ``interval_s``; says how many were left out in between."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._next_at: dict[tuple[str, ...], float] = {}
        self._left_out: collections.Counter[tuple[str, ...]] = collections.Counter()
        self._lock = threading.Lock()

    def admit(self, key: tuple[str, ...]) -> int | None:
        """None: leave this line out. An int: log it, mentioning that many left out before it."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_at.get(key, 0.0):
                self._left_out[key] += 1
                return None
            self._next_at[key] = now + self._interval_s
            return self._left_out.pop(key, 0)

    def flush(self) -> dict[tuple[str, ...], int]:
        with self._lock:
            left, self._left_out = dict(self._left_out), collections.Counter()
            return left


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler in its thread; remembers the peer address of the request it is deciding."""

    peer_address = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.peer_address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)


class _AllowList:
    """The ZAP credentials provider of one server socket: its allowed client keys."""

    def __init__(self, server: CurveServer, name: str, allowed: dict[bytes, str]) -> None:
        self._server = server
        self._name = name
        self._allowed = dict(allowed)

    def callback(self, domain: str, key: bytes) -> bool:
        label = self._allowed.get(key)
        address = self._server._auth.peer_address
        if label is None:
            self._server._log_refusal(self._name, "unknown_key",
                                      f"client key {key.decode()} from {address} is not in the allow-list")
            return False
        log.debug("%s: CURVE client %r accepted from %s", self._name, label, address)
        return True


_EVENTS: Final = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _classify(event: int, value: int) -> str | None:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "unknown_key"  # ZAP refused it; the ZAP handler logged the key
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "no_curve"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "bad_crypto"
        return "protocol"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "incomplete"
    return None


_REASON_TEXT: Final = {
    "no_curve": "a peer without CURVE was refused",
    "bad_crypto": "a CURVE handshake failed (the peer holds the wrong server key, or sent garbage)",
    "protocol": "a handshake broke the protocol",
    "incomplete": "the peer hung up during the handshake (a peer without CURVE often does)",
}


class _Monitor(threading.Thread):
    """Reads one socket's monitor events in a thread and hands each to ``on_event(event, value)``."""

    def __init__(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], name: str, events: int,
                 on_event: Callable[[int, int], None]) -> None:
        super().__init__(name=f"curve-monitor-{name}", daemon=True)
        self._on_event = on_event
        self._stop_event = threading.Event()
        address = f"inproc://settle-curve-monitor-{id(self)}"
        sock.monitor(address, events | zmq.EVENT_MONITOR_STOPPED)
        self._pair: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self._pair.connect(address)  # before the socket binds or connects: no event is missed

    def run(self) -> None:
        pair = self._pair
        try:
            while not self._stop_event.is_set():
                if not pair.poll(MONITOR_POLL_MS):
                    continue
                message = recv_monitor_message(pair)
                event, value = int(message["event"]), int(message["value"])
                if event == zmq.EVENT_MONITOR_STOPPED:
                    return
                self._on_event(event, value)
        finally:
            pair.close(linger=0)

    def stop(self, sock: zmq.Socket[Any]) -> None:
        """From the thread that owns ``sock``; then join()."""
        if not sock.closed:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self._stop_event.set()


class CurveServer:
    """CURVE for the server sockets of one ZMQ context: one ZAP handler, one allow-list per socket.

    Create it before binding, call :meth:`secure` on each server socket before ``bind``, and
    :meth:`close` before the context is terminated. ``on_reject(socket_name, reason)`` is called from a
    monitor thread for every refused handshake (prometheus counters may be incremented there).
    """

    def __init__(self, ctx: zmq.Context[Any], own: KeyPair,
                 on_reject: Callable[[str, str], None] | None = None) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(ctx.underlying)  # sync, also for asyncio
        self._own = own
        self._on_reject = on_reject
        self._lock = threading.Lock()
        self.rejected: collections.Counter[tuple[str, str]] = collections.Counter()  # (socket, reason)
        self._limiter = _LogLimiter()
        self._monitors: list[tuple[zmq.Socket[Any], _Monitor]] = []
        self._auth = _Authenticator(self._ctx, log=logging.getLogger("settle.security.zap"))
        self._auth.start()
        self._closed = False

    def secure(self, sock: zmq.Socket[Any], name: str, allowed: dict[bytes, str]) -> None:
        """Make ``sock`` a CURVE server that accepts only the ``allowed`` client keys. Before bind()."""
        if not allowed:
            raise ConfigError(f"{name}: the allow-list of client public keys is empty; nobody could connect")
        domain = f"{ZAP_DOMAIN_PREFIX}{name}"
        self._auth.configure_curve_callback(domain=domain, credentials_provider=_AllowList(self, name, allowed))
        sock.curve_server = True
        sock.curve_secretkey = self._own.secret
        sock.curve_publickey = self._own.public
        sock.zap_domain = domain.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler answering: refuse, never accept all
        monitor = _Monitor(self._ctx, sock, name, _EVENTS, lambda event, value: self._on_event(name, event, value))
        self._monitors.append((sock, monitor))
        monitor.start()

    def rejected_total(self, socket: str | None = None) -> int:
        with self._lock:
            return sum(n for (s, _), n in self.rejected.items() if socket is None or s == socket)

    def _on_event(self, name: str, event: int, value: int) -> None:
        reason = _classify(event, value)
        if reason is not None:
            self._count(name, reason)

    def _count(self, name: str, reason: str) -> None:
        with self._lock:
            self.rejected[(name, reason)] += 1
        if self._on_reject is not None:
            self._on_reject(name, reason)
        if reason != "unknown_key":  # the ZAP handler logs those, with the key and the address
            self._log_refusal(name, reason, _REASON_TEXT[reason])

    def _log_refusal(self, name: str, reason: str, text: str) -> None:
        left_out = self._limiter.admit((name, reason))
        if left_out is None:
            return
        more = f" ({left_out} more like it since the last report)" if left_out else ""
        log.warning("%s: CURVE handshake refused (%s): %s%s", name, reason, text, more)

    def close(self) -> None:
        """Stop the monitors and the ZAP handler. From the thread that owns the sockets."""
        if self._closed:
            return
        self._closed = True
        for sock, monitor in self._monitors:
            monitor.stop(sock)
        for _, monitor in self._monitors:
            monitor.join()
        self._auth.stop()
        for (name, reason), count in self._limiter.flush().items():
            log.warning("%s: CURVE handshake refused (%s) %d more times since the last report", name, reason,
                        count)


# ----------------------------------------------------------------------------------------------- client


class ClientWatch:
    """Watches the handshakes of one CURVE client socket and brings it back after a fatal one.

    libzmq gives up on an endpoint for good after a handshake *protocol* error: the server refused our key
    (ZAP), or whoever listens there does not speak CURVE (an impostor, or an ME started without keys).
    Without this, one such encounter would leave the router deaf to the real ME until restarted. The
    monitor thread only notes the failure; the owner calls :meth:`reconnect_if_due` from its own loop (a
    ZMQ socket belongs to one thread), which reconnects with backoff. A peer holding another server key
    hangs up mid-handshake; libzmq retries that by itself, so it is only logged.
    """

    BACKOFF_S_MIN: Final = 0.5
    BACKOFF_S_MAX: Final = 10.0

    def __init__(self, sock: zmq.Socket[Any], endpoint: str, name: str) -> None:
        self._sock = sock
        self._endpoint = endpoint
        self._name = name
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(sock.context.underlying)
        self._lock = threading.Lock()
        self._dead = False  # libzmq stopped reconnecting
        self._backoff = Backoff(self.BACKOFF_S_MIN, self.BACKOFF_S_MAX)
        self._wait_s = 0.0  # before the pending reconnect; 0 once a handshake succeeded
        self._next_at = 0.0
        self._limiter = _LogLimiter()
        self.failures: collections.Counter[str] = collections.Counter()
        self.reconnects = 0
        self._monitor = _Monitor(self._ctx, sock, name, _EVENTS | zmq.EVENT_HANDSHAKE_SUCCEEDED, self._on_event)
        self._monitor.start()

    def _on_event(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            with self._lock:
                failed_before, self._wait_s = self._wait_s > 0 or bool(self.failures), 0.0
                self._backoff.reset()
            if failed_before:
                log.info("%s: CURVE handshake with %s succeeded", self._name, self._endpoint)
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason, text = "refused", "the server refused our key: is our .key.pub in its allow-list?"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            reason, text = "no_curve", "the peer does not speak CURVE (not the configured server, or it has no keys)"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            reason, text = "protocol", "the handshake broke the protocol"
        else:
            reason, text = "hung_up", "the peer hung up during the handshake: do we hold its right public key?"
        fatal = event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        with self._lock:
            self.failures[reason] += 1
            if fatal and not self._dead:
                self._dead = True
                self._wait_s = self._backoff.next_s()
                self._next_at = time.monotonic() + self._wait_s
        left_out = self._limiter.admit((reason,))
        if left_out is not None:
            more = f" ({left_out} more like it since the last report)" if left_out else ""
            retry = f"; reconnecting in {self._wait_s:.1f}s" if fatal else ""
            log.log(logging.ERROR if fatal else logging.WARNING, "%s: CURVE handshake with %s failed (%s): %s%s%s",
                    self._name, self._endpoint, reason, text, retry, more)

    def reconnect_if_due(self) -> bool:
        """From the socket's own thread, often (every loop turn): reconnect after a fatal failure."""
        with self._lock:
            if not self._dead or time.monotonic() < self._next_at:
                return False
            self._dead = False
        try:
            self._sock.disconnect(self._endpoint)
        except zmq.ZMQError:
            pass  # libzmq may have dropped the endpoint already
        self._sock.connect(self._endpoint)
        self.reconnects += 1
        return True

    async def run(self, interval_s: float = 0.25) -> None:
        """For an asyncio owner: call :meth:`reconnect_if_due` every ``interval_s`` until cancelled."""
        while True:
            self.reconnect_if_due()
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        """From the socket's own thread, before the socket is closed or right after."""
        self._monitor.stop(self._sock)
        self._monitor.join()


# ----------------------------------------------------------------------------------------------- keyring


@dataclass(frozen=True, slots=True)
class Keyring:
    """The keys one engine process holds, loaded once at start-up. Disabled: every method does nothing."""

    enabled: bool
    own: KeyPair | None = None
    me_public: bytes | None = None
    shard_public: bytes | None = None
    allowed: dict[bytes, str] = field(default_factory=dict)

    def client(self, sock: zmq.Socket[Any], endpoint: str, server: Literal["me", "shard"],
               name: str) -> ClientWatch | None:
        """Before ``sock.connect(endpoint)``: CURVE client of the ME or of a shard, on tcp:// only.

        Returns the :class:`ClientWatch` whose ``reconnect_if_due()`` the owner calls from its loop and
        ``close()`` at the end; None when nothing was needed.
        """
        if not self.enabled or not endpoint.startswith("tcp://"):
            return None
        server_public = self.me_public if server == "me" else self.shard_public
        assert self.own is not None, endpoint
        assert server_public is not None, (server, endpoint)
        configure_client(sock, self.own, server_public)
        return ClientWatch(sock, endpoint, name)

    def guard(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], endpoint: str, name: str,
              on_reject: Callable[[str, str], None] | None = None) -> CurveServer | None:
        """Before ``sock.bind(endpoint)``: CURVE server accepting ``allowed``, on tcp:// only.

        Returns the :class:`CurveServer` to close before the context, or None when nothing was needed.
        """
        if not self.enabled or not endpoint.startswith("tcp://"):
            return None
        assert self.own is not None
        server = CurveServer(ctx, self.own, on_reject)
        try:
            server.secure(sock, name, self.allowed)
        except BaseException:
            server.close()
            raise
        return server


def load_keyring(config: Config, role: Literal["router", "shard"]) -> Keyring:
    """The keys ``role`` needs under ``config``; a missing or bad file raises ConfigError naming its key."""
    sec: SecurityConfig = config.security
    if not sec.curve:
        return Keyring(enabled=False)
    me_tcp = config.me.publish.startswith("tcp://") or config.me.replay.startswith("tcp://")
    shards_tcp = config.router.transport == "tcp"
    own_name = sec.router_key if role == "router" else sec.shard_key
    own = load_secret(sec.secret_path(own_name), f"security.{role}_key")
    me_public = load_public(sec.public_path(sec.me_key), "security.me_key") if me_tcp else None
    shard_public = None
    allowed: dict[bytes, str] = {}
    if shards_tcp and role == "router":
        shard_public = load_public(sec.public_path(sec.shard_key), "security.shard_key")
    if shards_tcp and role == "shard":
        allowed = load_allowed(sec.allowed_paths())
    return Keyring(enabled=True, own=own, me_public=me_public, shard_public=shard_public, allowed=allowed)


# ----------------------------------------------------------------------------------------------- CLI


def _keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="settle keys", description="CURVE keys for the engine's ZMQ sockets.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    gen = sub.add_parser("generate", help="write <name>.key (secret, 0600) and <name>.key.pub per name")
    gen.add_argument("--dir", required=True, help="the keys directory (security.keys_dir); made 0700")
    gen.add_argument("--name", action="append", default=[], metavar="NAME",
                     help=f"a keypair to make (repeatable; default: {' '.join(DEFAULT_KEY_NAMES)})")
    gen.add_argument("--force", action="store_true", help="replace existing keys (their peers need the new "
                     "public keys)")
    return parser


def keys_main(argv: list[str]) -> int:
    """``settle keys generate --dir D [--name N ...] [--force]``."""
    try:
        args = _keys_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help is 0, a usage error 2
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    names: list[str] = args.name or list(DEFAULT_KEY_NAMES)
    directory = Path(args.dir)
    try:
        for name in dict.fromkeys(names):
            pair = generate_keypair(directory, name, force=args.force)
            print(f"{directory / (name + SECRET_SUFFIX)}: secret key (mode 0600; keep it on this host)")
            print(f"{directory / (name + PUBLIC_SUFFIX)}: public key {pair.public.decode()}")
    except (msgspec.ValidationError, ConfigError) as e:
        print(f"settle keys: --name: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except FileExistsError as e:
        print(f"settle keys: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"settle keys: cannot write to {directory}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    mode = directory.stat().st_mode & 0o777
    if mode & 0o022:
        print(f"settle keys: warning: {directory} is mode {mode:o}; others can replace keys in it "
              f"(chmod 700 {directory})", file=sys.stderr)
    return EXIT_OK
