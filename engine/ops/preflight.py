"""Checks of a validated config against the host, before ``settle run`` starts anything.

The config's own types already refused bad values; this finds what only the host can tell: two sockets
on one port, more shards than cores, a data directory that cannot be written, a nearly full disk, key or
password files that are missing or readable by others. Each finding names the config key it is about.
Errors stop the start (exit ``EXIT_CONFIG``); warnings are printed and the engine starts.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.core import affinity
from engine.core.config import Config
from engine.core.errors import ConfigError

WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})


@dataclass(frozen=True, slots=True)
class Finding:
    level: Literal["error", "warning"]
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.key}: {self.message}"


def error(key: str, message: str) -> Finding:
    return Finding("error", key, message)


def warning(key: str, message: str) -> Finding:
    return Finding("warning", key, message)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


def check(config: Config, *, usable: list[int] | None = None) -> list[Finding]:
    """Every finding for ``config`` on this host; errors first."""
    cores = usable if usable is not None else affinity.usable_cores()
    findings = [*check_ports(config), *check_cores(config, cores), *check_paths(config), *check_keys(config),
                *check_store_secrets(config), *check_exposure(config)]
    return sorted(findings, key=lambda f: f.level != "error")


# ----------------------------------------------------------------------------------------------- ports


@dataclass(frozen=True, slots=True)
class _Socket:
    key: str
    host: str
    port: int


def _tcp(key: str, endpoint: str) -> _Socket | None:
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        return _Socket(key, host, int(port))
    except ValueError:
        return None  # a port name or "*": nothing to compare


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _overlap(a: str, b: str) -> bool:
    """Could a socket bound on ``a`` and one bound on ``b`` share a port number? (same host or a wildcard)"""
    if a in WILDCARD_HOSTS or b in WILDCARD_HOSTS or a == b:
        return True
    return _loopback(a) and _loopback(b) and (a == "localhost" or b == "localhost")


def configured_sockets(config: Config) -> tuple[list[_Socket], list[Finding]]:
    """Every TCP port the config names, each with the key it comes from."""
    sockets: list[_Socket] = []
    findings: list[Finding] = []
    for key, endpoint in (("me.publish", config.me.publish), ("me.replay", config.me.replay)):
        sock = _tcp(key, endpoint)
        if sock is not None:
            sockets.append(sock)
    shards = config.shard_count
    if config.router.transport == "tcp":
        last = config.router.tcp_base_port + shards - 1
        if last > 65535:
            findings.append(error("router.tcp_base_port", f"{config.router.tcp_base_port} + {shards} shards "
                                                          f"runs past port 65535"))
        sockets.extend(_Socket(f"router.tcp_base_port (shard-{n})", config.router.tcp_host,
                               config.router.tcp_base_port + n) for n in range(shards) if
                       config.router.tcp_base_port + n <= 65535)
    m = config.metrics
    if m.enabled:
        for key, port in (("metrics.supervisor_port", m.supervisor_port), ("metrics.router_port", m.router_port),
                          ("metrics.simulator_port", m.simulator_port)):
            if port:  # 0 turns that endpoint off
                sockets.append(_Socket(key, m.host, port))
        if m.shard_port_base:
            last = m.shard_port_base + shards - 1
            if last > 65535:
                findings.append(error("metrics.shard_port_base", f"{m.shard_port_base} + {shards} shards runs "
                                                                 f"past port 65535"))
            sockets.extend(_Socket(f"metrics.shard_port_base (shard-{n})", m.host, m.shard_port_base + n)
                           for n in range(shards) if m.shard_port_base + n <= 65535)
    return sockets, findings


def check_ports(config: Config) -> list[Finding]:
    sockets, findings = configured_sockets(config)
    for i, a in enumerate(sockets):
        for b in sockets[i + 1:]:
            if a.port == b.port and _overlap(a.host, b.host):
                findings.append(error(a.key, f"port {a.port} is also used by {b.key} "
                                             f"({a.host or '*'} and {b.host or '*'}); give each its own port"))
    return findings


# ----------------------------------------------------------------------------------------------- cores


def check_cores(config: Config, usable: list[int]) -> list[Finding]:
    findings: list[Finding] = []
    shards = config.shard_count
    if shards > len(usable):
        findings.append(warning("engine.shards", f"{shards} shards but this process may use {len(usable)} cores "
                                                 f"({affinity.format_cores(usable)}); shards will share cores "
                                                 f"and each one's latency suffers"))
    findings.extend(error(key, message) for key, message in affinity.problems(config.cpu, shards, usable))
    if has_errors(findings):
        return findings
    placement = affinity.plan(config, usable)
    hot = {slot: core for slot, core in placement.items() if slot != "supervisor"}
    by_core: dict[int, list[str]] = {}
    for slot, core in hot.items():
        by_core.setdefault(core, []).append(slot)
    for core, slots in sorted(by_core.items()):
        if len(slots) > 1 and not (config.cpu.shards == "auto" and shards > len(usable)):
            findings.append(warning("cpu", f"core {core} runs {', '.join(slots)}; one core each is what "
                                           f"pinning is for"))
    return findings


# ----------------------------------------------------------------------------------------------- paths


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> str | None:
    """None if a directory at ``path`` exists and takes files or can be created; else why not.

    Probes for real (creates and removes a temporary file or directory): ``os.access`` is wrong for root
    and on read-only mounts (systemd ProtectSystem=).
    """
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        if existing == path.absolute():
            with tempfile.TemporaryFile(dir=existing):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".settle-preflight-"))
    except OSError as e:
        what = "write in" if existing == path.absolute() else f"create {path} under"
        return f"cannot {what} {existing}: {e.strerror}"
    return None


def data_paths(config: Config) -> list[tuple[str, Path]]:
    """(key, directory) of everything ``settle run`` writes."""
    paths = [("engine.data_dir", config.data_path), ("engine.data_dir", config.data_path / "run"),
             ("engine.data_dir", config.data_path / "wal"), ("engine.data_dir", config.quarantine_path)]
    paths.extend((f"engine.data_dir (WAL of shard-{n})", config.wal_path(n)) for n in range(config.shard_count)
                 if config.wal_path(n).exists())  # a WAL may be a mount point of its own
    if config.store.kind == "embedded":
        paths.append(("store.path", Path(config.store.path).absolute().parent))
    return paths


def check_paths(config: Config) -> list[Finding]:
    findings: list[Finding] = []
    seen_dirs: set[Path] = set()
    devices: dict[int, tuple[str, Path]] = {}
    for key, path in data_paths(config):
        resolved = path.absolute()
        if resolved in seen_dirs:
            continue
        seen_dirs.add(resolved)
        problem = _writable(path)
        if problem is not None:
            findings.append(error(key, f"{path} is not writable: {problem}"))
            continue
        existing = _nearest_existing(path)
        devices.setdefault(existing.stat().st_dev, (key, existing))
    threshold = config.engine.disk_free_bytes_min
    if threshold:
        for key, path in devices.values():
            free = shutil.disk_usage(path).free
            if free < threshold:
                findings.append(error(key, f"{path} has {_size(free)} free, below engine.disk_free_bytes_min "
                                           f"({_size(threshold)}); free space, or start with --set "
                                           f"engine.disk_free_bytes_min=0 to drain the WAL into the store"))
    return findings


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------- secrets


def _private_file(key: str, path: Path, what: str) -> list[Finding]:
    """The file must exist and be readable; group/other access is a warning."""
    try:
        st = path.stat()
        with open(path, "rb"):
            pass
    except OSError as e:
        return [error(key, f"{what} {path} cannot be read: {e.strerror}")]
    if not stat.S_ISREG(st.st_mode):
        return [error(key, f"{what} {path} is not a regular file")]
    if st.st_mode & 0o077:
        return [warning(key, f"{what} {path} is mode {st.st_mode & 0o777:o}; others on this host can read it "
                             f"(chmod 600 {path})")]
    return []


def check_keys(config: Config) -> list[Finding]:
    from engine.core import security

    sec = config.security
    if not sec.curve:
        return []
    keys_dir = Path(sec.keys_dir)
    if not keys_dir.is_dir():
        return [error("security.keys_dir", f"{keys_dir} is not a directory; make the keys with "
                                           f"`settle keys generate --dir {keys_dir}`")]
    findings: list[Finding] = []
    shards_tcp = config.router.transport == "tcp"
    me_tcp = config.me.publish.startswith("tcp://") or config.me.replay.startswith("tcp://")
    for key, name in (("security.router_key", sec.router_key), ("security.shard_key", sec.shard_key)):
        path = sec.secret_path(name)
        found = _private_file(key, path, "secret key file")
        findings.extend(found)
        if not any(f.level == "error" for f in found):
            try:
                security.load_secret(path, key)
            except ConfigError as e:
                findings.append(error(key, str(e)))
    publics: list[tuple[str, Path]] = []
    if me_tcp:
        publics.append(("security.me_key", sec.public_path(sec.me_key)))
    if shards_tcp:
        publics.append(("security.shard_key", sec.public_path(sec.shard_key)))
        publics.extend(sec.allowed_paths())
    for key, path in publics:
        try:
            security.load_public(path, key)
        except ConfigError as e:
            findings.append(error(key, str(e)))
    return findings


def check_store_secrets(config: Config) -> list[Finding]:
    """Store credentials: the files exist, are private; the environment variable is set. Never the value."""
    if config.store.kind != "cassandra":
        return []
    c = config.store.cassandra
    findings: list[Finding] = []
    if c.username is not None:
        if c.password_file is not None:
            findings.extend(_private_file("store.cassandra.password_file", Path(c.password_file), "password file"))
        elif c.password_env is not None:
            if c.password_env not in os.environ:
                findings.append(error("store.cassandra.password_env", f"names {c.password_env!r}, which is not set "
                                                                      f"in the environment"))
        else:
            findings.append(error("store.cassandra.username", "is set but neither password_file nor password_env "
                                                              "is"))
    if c.tls_ca_file is not None and not Path(c.tls_ca_file).is_file():
        findings.append(error("store.cassandra.tls_ca_file", f"{c.tls_ca_file} is not a readable file"))
    return findings


def check_exposure(config: Config) -> list[Finding]:
    """What listens beyond this host, and what travels in the clear."""
    findings: list[Finding] = []
    if config.metrics.enabled and not _loopback(config.metrics.host):
        findings.append(warning("metrics.host", f"{config.metrics.host} serves /metrics beyond this host; "
                                                f"keep it on 127.0.0.1 behind a scraper you trust"))
    if not config.security.curve:
        sockets, _ = configured_sockets(config)
        findings.extend(warning(sock.key, f"tcp on {sock.host}:{sock.port} without security.curve: anyone who "
                                          "reaches it can inject or read trades")
                        for sock in sockets if not sock.key.startswith("metrics.") and not _loopback(sock.host))
    return findings
