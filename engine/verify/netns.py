"""Several "hosts" on this machine: Linux network namespaces on one virtual LAN, for multi-host tests.

    with Lan() as lan:                         # a /24 of its own, torn down on exit (also on failure)
        broker = lan.host_address(2)           # "10.213.K.2": on the machine's side; servers bind it
        a = lan.add_host("a")                  # namespace with address 10.213.K.11, default route
        proc = a.popen([sys.executable, "-m", "engine.kafka.shard", ...])   # runs inside "a"
        a.impair(delay_ms=50, loss=0.01)       # a's packets out: 50 ms later, 1 % dropped
        a.block([broker])                      # drop everything between a and the broker (partition)
        a.unblock(); a.link_down(); a.link_up() # a's cable pulled at the switch, and back
        a.kill_all()                           # SIGKILL every process inside a (a host dies)

The LAN is a bridge inside a namespace of its own (the "switch"). Each host namespace has one veth whose
other end is a port of that bridge; the machine itself has one more port, whose end on the host side
holds the addresses servers bind (``host_address``), after ``.1``, its first address, which the
machine's own connections into the LAN come from (so blocking a server's address never blocks
them). Nothing routes: every address is on one /24, so
the machine's own forwarding settings are never touched, and deleting the namespaces deletes every
interface, rule and route the LAN made.

Faults:
- ``link_down`` takes the host's port on the switch down: the host's own interface stays up with its
  address, and what it sends is silently lost, as when a cable is pulled or a switch port dies.
- ``block(addresses)`` drops, inside the host, every packet to and from those addresses (iptables
  ``DROP``, both directions, silent): a partition from some servers only.
- ``impair(delay_ms, loss)`` delays and drops the host's outgoing packets. This kernel is built without
  ``sch_netem`` (``tc qdisc add ... netem`` answers "Specified qdisc kind is unknown"), so the delay is
  made with netfilter instead: an iptables ``NFQUEUE`` rule hands each outgoing packet to a small
  process inside the namespace (``python -m engine.verify.netns delay``) that accepts it ``delay_ms`` later, in
  order, through raw netlink; loss is the ``statistic`` match with ``DROP``, in the kernel.

Teardown (``close``, the context manager's exit) SIGKILLs every process inside the namespaces, then
deletes them. A LAN left behind by a test process that was itself SIGKILLed is removed by the next
``Lan()`` on the machine: the subnet's lock file names the owner's pid, and a dead owner's namespaces
are deleted before the subnet is reused.

Needs root, ``ip`` (iproute2) and ``iptables``; :func:`missing` says which is missing. Used by the
multi-host tests (``tests/cluster``) and by ``settle chaos --cluster``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from engine.verify.servers import alive

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = Path("/run/settle-netns")  # one lock file per subnet in use: its owner's pid
SUBNET_PREFIX = "10.213"  # LAN k is 10.213.k.0/24; not routed anywhere on this machine
SUBNETS = 256
HOST_OFFSET = 10  # the n-th host namespace gets .(10 + n); host_address(n) is .n for 2 <= n < 10
NAME_PREFIX = "stl"  # namespaces "stl<k>-sw", "stl<k>-<host>"; the host's port "stl<k>h"


class NetnsError(RuntimeError):
    """A namespace, link or rule could not be made; the message carries the command's output."""


def missing() -> str | None:
    """Why these LANs cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install iproute2 iptables)"
    return None


def sh(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done


def _namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace_processes(ns: str, timeout_s: float = 10.0) -> None:
    """SIGKILL every process inside NS and wait until they are gone (a namespace outlives nothing it runs:
    ``ip netns del`` would leave them running, holding ports and files)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {pids} in namespace {ns} survived SIGKILL for {timeout_s} s")
        time.sleep(0.05)


def _remove_lan(index: int, names: Iterable[str] | None = None) -> None:
    """Delete every namespace of LAN INDEX (its interfaces go with them), killing what runs inside."""
    prefix = f"{NAME_PREFIX}{index}-"
    mine = [n for n in (_namespaces() if names is None else names) if n.startswith(prefix)]
    # Host namespaces first, the switch last: their processes die before the LAN under them.
    mine.sort(key=lambda n: n.endswith("-sw"))
    for ns in mine:
        _kill_namespace_processes(ns)
        sh("ip", "netns", "del", ns, check=False)
    if names is None or mine:
        sh("ip", "link", "del", f"{NAME_PREFIX}{index}h", check=False)  # only if its switch never existed


@contextlib.contextmanager
def _allocation_lock() -> Any:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _claim_subnet() -> int:
    """A subnet index no live process uses. Every LAN whose owner died is removed on the way."""
    chosen = None
    with _allocation_lock():
        names = _namespaces()
        for index in range(SUBNETS):
            lock = STATE_DIR / f"{index}.pid"
            try:
                owner = int(lock.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                owner = 0
            if owner and alive(owner):
                continue
            _remove_lan(index, names)
            lock.unlink(missing_ok=True)
            if chosen is not None:
                continue
            # A subnet some other tool routes on this machine is not ours to take.
            route = sh("ip", "-4", "route", "show", "to", "match", f"{SUBNET_PREFIX}.{index}.1", check=False).stdout
            if any(not line.startswith("default") for line in route.splitlines() if line.strip()):
                continue
            lock.write_text(f"{os.getpid()}\n")
            chosen = index
    if chosen is None:
        raise NetnsError(f"all {SUBNETS} test subnets {SUBNET_PREFIX}.0-255.0/24 are in use")
    return chosen


class Host:
    """One namespace on the LAN: a machine of its own with one interface (``eth0``) and ``address``."""

    def __init__(self, lan: Lan, name: str, ns: str, address: str, port: str) -> None:
        self.lan = lan
        self.name = name
        self.ns = ns  # the namespace's name, for ``ip netns exec``
        self.address = address
        self._port = port  # its port on the switch (inside the switch namespace)
        self._delayer: subprocess.Popen[bytes] | None = None
        self._blocked: list[str] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"

    # -- processes -------------------------------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """ARGV run inside this host (``ip netns exec`` execs it: the pid is the program's own)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ARGV inside this host; returns once it runs there (``ip`` enters the namespace after it
        started, and a ``kill_all`` before that would miss it). Everything started here dies with the LAN."""
        proc = subprocess.Popen(self.command(argv), **kwargs)
        inode = os.stat(f"/run/netns/{self.ns}").st_ino
        deadline = time.monotonic() + 10.0
        while proc.poll() is None:
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == inode:
                    break
            except FileNotFoundError:
                break
            if time.monotonic() > deadline:
                with proc:  # reaps it and closes any pipes it was given
                    proc.kill()
                raise NetnsError(f"{argv[0]} did not enter namespace {self.ns} within 10 s")
            time.sleep(0.002)
        return proc

    def run(self, argv: Sequence[str], *, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return sh(*self.command(argv), check=check, timeout=timeout)

    def pids(self) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns, check=False).stdout.split() if p.isdigit()]

    def kill_all(self) -> list[int]:
        """SIGKILL every process inside this host at once (the machine dies) and wait until they are gone.
        The host's network stays; returns the pids killed."""
        pids = self.pids()
        _kill_namespace_processes(self.ns)
        self._stop_delayer()
        return pids

    # -- faults ----------------------------------------------------------------------------------

    def link_down(self) -> None:
        """Pull the cable: the host's port on the switch goes down; every packet either way is lost."""
        sh("ip", "-n", self.lan.switch_ns, "link", "set", self._port, "down")

    def link_up(self) -> None:
        sh("ip", "-n", self.lan.switch_ns, "link", "set", self._port, "up")

    def block(self, addresses: Iterable[str]) -> None:
        """Drop every packet between this host and ADDRESSES, both ways, without a word (a partition)."""
        for address in addresses:
            if address in self._blocked:
                continue
            self._iptables("-I", "OUTPUT", "-d", address, "-j", "DROP")
            self._iptables("-I", "INPUT", "-s", address, "-j", "DROP")
            self._blocked.append(address)

    def unblock(self) -> None:
        for address in self._blocked:
            self._iptables("-D", "OUTPUT", "-d", address, "-j", "DROP")
            self._iptables("-D", "INPUT", "-s", address, "-j", "DROP")
        self._blocked.clear()

    def impair(self, *, delay_ms: float = 0.0, loss: float = 0.0, to: Iterable[str] | None = None) -> None:
        """Delay this host's outgoing packets by DELAY_MS and drop a fraction LOSS of them (0.01 = 1 %),
        all of them or only those to the addresses TO. Replaces an earlier impairment."""
        if not 0.0 <= loss < 1.0 or delay_ms < 0:
            raise ValueError(f"impair: need 0 <= loss < 1 and delay_ms >= 0 (got {loss}, {delay_ms})")
        self.clear_impairment()
        sh(*self.command(["iptables", "-N", "SETTLE_IMPAIR"]))
        targets = list(to) if to is not None else [None]
        for address in targets:
            match = ["-d", address] if address else ["-o", "eth0"]
            self._iptables("-A", "OUTPUT", *match, "-j", "SETTLE_IMPAIR")
        if loss > 0:
            self._iptables("-A", "SETTLE_IMPAIR", "-m", "statistic", "--mode", "random",
                           "--probability", f"{loss:.6f}", "-j", "DROP")
        if delay_ms > 0:
            self._delayer = self.popen([sys.executable, "-m", "engine.verify.netns", "delay", "--queue", "0",
                                        "--delay-ms", str(delay_ms)],
                                       cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            ready = self._delayer.stdout.readline() if self._delayer.stdout else b""  # "bound" once listening
            if ready.strip() != b"bound":
                self._delayer.kill()
                _, err = self._delayer.communicate()
                self._delayer = None
                raise NetnsError(f"the packet delayer in {self.ns} did not start: {ready!r} {err.decode()}")
            # No --queue-bypass: with the delayer gone the packets wait (are lost), as a stuck link would.
            self._iptables("-A", "SETTLE_IMPAIR", "-j", "NFQUEUE", "--queue-num", "0")

    def clear_impairment(self) -> None:
        rules = sh(*self.command(["iptables", "-S", "OUTPUT"]), check=False).stdout.splitlines()
        for rule in rules:
            if "SETTLE_IMPAIR" in rule and rule.startswith("-A "):
                self._iptables("-D", *rule.split()[1:])
        sh(*self.command(["iptables", "-F", "SETTLE_IMPAIR"]), check=False)
        sh(*self.command(["iptables", "-X", "SETTLE_IMPAIR"]), check=False)
        self._stop_delayer()

    def _stop_delayer(self) -> None:
        delayer, self._delayer = self._delayer, None
        if delayer is not None:
            with delayer:  # closes its pipes and reaps it, even if it already died with its namespace
                delayer.kill()
                delayer.communicate(timeout=30)

    def _iptables(self, *args: str) -> None:
        sh(*self.command(["iptables", "-w", *args]))


class Lan:
    """A /24 of namespaces on one bridge; the machine has addresses on it too. See the module docstring."""

    def __init__(self) -> None:
        self.index = _claim_subnet()
        self.prefix = f"{SUBNET_PREFIX}.{self.index}"
        self.switch_ns = f"{NAME_PREFIX}{self.index}-sw"
        self.host_link = f"{NAME_PREFIX}{self.index}h"
        self.hosts: dict[str, Host] = {}
        self._host_addresses: list[str] = []
        try:
            sh("ip", "netns", "add", self.switch_ns)
            self._in_switch("link", "add", "br0", "type", "bridge")
            self._in_switch("link", "set", "br0", "up")
            # The machine's port: the host end stays here, its peer joins the bridge.
            sh("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "up0",
               "netns", self.switch_ns)
            self._in_switch("link", "set", "up0", "master", "br0", "up")
            sh("ip", "link", "set", self.host_link, "up")
            self.machine_address = f"{self.prefix}.1"
            sh("ip", "addr", "add", f"{self.machine_address}/24", "dev", self.host_link)
        except BaseException:
            self.close()
            raise

    def host_address(self, n: int) -> str:
        """The machine's address ``.N`` on this LAN (2 <= N < 10), added on first use. Servers bind it."""
        if not 2 <= n < HOST_OFFSET:
            raise ValueError(f"host_address: n must be in [2, {HOST_OFFSET}) (got {n})")
        address = f"{self.prefix}.{n}"
        if address not in self._host_addresses:
            sh("ip", "addr", "add", f"{address}/24", "dev", self.host_link)
            self._host_addresses.append(address)
        return address

    def add_host(self, name: str) -> Host:
        """A new namespace on the LAN with address ``.(10 + n)``, loopback up and a default route."""
        if name in self.hosts or not name.isalnum() or len(name) > 8:
            raise ValueError(f"add_host: need a new alphanumeric name of at most 8 characters (got {name!r})")
        n = len(self.hosts) + 1
        ns = f"{NAME_PREFIX}{self.index}-{name}"
        address = f"{self.prefix}.{HOST_OFFSET + n}"
        port = f"p{n}"
        sh("ip", "netns", "add", ns)
        host = Host(self, name, ns, address, port)
        self.hosts[name] = host
        self._in_switch("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._in_switch("link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return host

    def wait_reachable(self, host: Host, address: str, port: int, timeout_s: float = 10.0) -> None:
        """Poll until HOST can open a TCP connection to ADDRESS:PORT (the LAN is up: ARP, bridge ports)."""
        probe = ("import socket, sys\n"
                 "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()")
        deadline = time.monotonic() + timeout_s
        while True:
            done = host.run([sys.executable, "-c", probe, address, str(port)], check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"{host} cannot reach {address}:{port}: {done.stderr.strip()[-300:]}")
            time.sleep(0.1)

    def close(self) -> None:
        """Kill everything running inside the LAN's namespaces and delete them. Idempotent."""
        try:
            _remove_lan(self.index)
        finally:
            for host in self.hosts.values():
                host._stop_delayer()  # killed with its namespace above: reap it and close its pipes
        with _allocation_lock(), contextlib.suppress(FileNotFoundError):
            lock = STATE_DIR / f"{self.index}.pid"
            if lock.read_text().strip() == str(os.getpid()):
                lock.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _in_switch(self, *args: str) -> None:
        sh("ip", "-n", self.switch_ns, *args)


# ------------------------------------------------------------------------------------ packet delayer

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
QUEUE_MAXLEN = 65536


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


def _expect_ack(sock: socket.socket) -> None:
    data = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, 16)
        if code != 0:
            raise OSError(-code, f"nfqueue config: {os.strerror(-code)}")


def delay_packets(queue: int, delay_s: float) -> None:
    """Accept every packet of nfqueue QUEUE DELAY_S after it was queued, in order (the ids grow, so one
    batch verdict releases every packet up to the newest one due)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: bursts while packets wait
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    sock.bind((0, 0))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)),
                       NLM_F_REQUEST | NLM_F_ACK, 1))
    _expect_ack(sock)
    params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)) \
        + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, params, NLM_F_REQUEST | NLM_F_ACK, 2))
    _expect_ack(sock)
    print("bound", flush=True)
    waiting: deque[tuple[float, int]] = deque()  # (due, packet id)
    while True:
        now = time.monotonic()
        due_id = None
        while waiting and waiting[0][0] <= now:
            due_id = waiting.popleft()[1]
        if due_id is not None:
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, due_id))
            sock.send(_message(NFQNL_MSG_VERDICT_BATCH, queue, verdict))
        timeout = max(0.0, waiting[0][0] - now) if waiting else 1.0
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            continue
        try:
            data = sock.recv(1 << 20)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                continue
            raise
        arrived = time.monotonic()
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                at = offset + 20  # nlmsghdr (16) + nfgenmsg (4)
                while at + 4 <= offset + length:
                    alen, atype = struct.unpack_from("=HH", data, at)
                    if alen < 4:
                        break
                    if atype & 0x7FFF == NFQA_PACKET_HDR:
                        (packet_id,) = struct.unpack_from("!I", data, at + 4)
                        waiting.append((arrived + delay_s, packet_id))
                        break
                    at += (alen + 3) & ~3
            offset += (length + 3) & ~3


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.verify.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    delay = sub.add_parser("delay", help="accept the packets of an nfqueue after a fixed delay")
    delay.add_argument("--queue", type=int, default=0)
    delay.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    delay_packets(args.queue, args.delay_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
