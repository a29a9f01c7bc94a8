"""engine.verify.netns, the LAN of namespaces the multi-host tests run on: hosts reach the machine's addresses,
each fault does what it says to one host and nothing to the others, and nothing is left behind: not
after a test that fails inside the LAN, not after a test process that was SIGKILLed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from engine.verify import netns
from tests.cluster.conftest import require_netns

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hosts")]

RTT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(9):
    t = time.monotonic(); s.sendall(b"x"); s.recv(1); times.append(time.monotonic() - t)
print(sorted(times)[4] * 1000)
"""


@pytest.fixture
def echo() -> Iterator[tuple[netns.Lan, str, int]]:
    """A LAN and a TCP echo server on the machine's address .2 of it."""
    require_netns()
    with netns.Lan() as lan:
        address = lan.host_address(2)
        server = socket.socket()
        server.bind((address, 0))
        server.listen(8)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return

                def answer(conn: socket.socket = conn) -> None:
                    with conn:
                        while data := conn.recv(64):
                            conn.sendall(data)

                threading.Thread(target=answer, daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        try:
            yield lan, address, server.getsockname()[1]
        finally:
            server.close()


def rtt_ms(host: netns.Host, address: str, port: int) -> float:
    return float(host.run([sys.executable, "-c", RTT, address, str(port)]).stdout)


def connects(host: netns.Host, address: str, port: int) -> bool:
    return host.run([sys.executable, "-c", RTT, address, str(port)], check=False).returncode == 0


def namespaces_of(lan_index: int) -> list[str]:
    return [n for n in netns._namespaces() if n.startswith(f"{netns.NAME_PREFIX}{lan_index}-")]


def test_faults_hit_one_host_only(echo: tuple[netns.Lan, str, int]) -> None:
    lan, address, port = echo
    a, b = lan.add_host("a"), lan.add_host("b")
    lan.wait_reachable(a, address, port)
    lan.wait_reachable(b, address, port)

    a.impair(delay_ms=150)
    assert rtt_ms(a, address, port) >= 150  # one way delayed: the round trip is at least that
    assert rtt_ms(b, address, port) < 150
    a.clear_impairment()
    assert rtt_ms(a, address, port) < 150

    a.block([address])
    assert not connects(a, address, port)
    assert connects(b, address, port)
    a.unblock()
    assert connects(a, address, port)

    a.link_down()
    assert not connects(a, address, port)
    assert connects(b, address, port)
    a.link_up()
    lan.wait_reachable(a, address, port)

    sleeper = a.popen(["sleep", "600"])
    other = b.popen(["sleep", "600"])
    assert sleeper.pid in a.kill_all()
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert other.poll() is None
    other.kill()
    other.wait()


def test_a_failing_test_leaves_nothing_behind() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="the test failed"), netns.Lan() as lan:  # noqa: PT012
        host = lan.add_host("a")
        survivor = host.popen(["sleep", "600"])
        index = lan.index
        raise RuntimeError("the test failed")
    assert survivor.wait(timeout=10) == -signal.SIGKILL
    assert namespaces_of(index) == []
    assert f"{netns.NAME_PREFIX}{index}h" not in subprocess.run(["ip", "link"], capture_output=True,
                                                               text=True).stdout


def test_a_killed_owners_lan_is_removed_by_the_next_one() -> None:
    require_netns()
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom engine.verify.netns import Lan\nlan = Lan()\nlan.add_host('a')\n"
                               "print(lan.index, flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    index = int(owner.stdout.readline())
    assert namespaces_of(index)
    owner.send_signal(signal.SIGKILL)
    owner.communicate()
    assert namespaces_of(index)  # nothing ran its teardown
    with netns.Lan() as lan:
        left = namespaces_of(index)
        assert left == ([lan.switch_ns] if lan.index == index else [])  # removed, perhaps reused
