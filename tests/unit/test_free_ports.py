"""Free ports are picked in SETTLE_PORT_RANGE, so processes picking side by side can be kept apart."""

from __future__ import annotations

import os
import subprocess

import pytest

from engine.verify.demo import PORT_RANGE_ENV, free_port, port_range, port_slice


def test_free_ports_come_from_the_given_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_RANGE_ENV, "21000-21200")
    assert port_range() == (21000, 21200)
    picked = {free_port() for _ in range(50)}
    assert all(21000 <= port < 21200 for port in picked), picked
    assert len(picked) > 10  # picked at random within the range, not one port over and over


def test_a_malformed_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_RANGE_ENV, "21000:21200")
    with pytest.raises(ValueError, match="expected LOW-HIGH"):
        port_range()
    monkeypatch.setenv(PORT_RANGE_ENV, "21200-21000")
    with pytest.raises(ValueError, match="LOW < HIGH"):
        port_range()


def test_the_server_scripts_pick_in_the_same_range() -> None:
    """ops/lib/jvm-service.sh's free_ports (Cassandra's and Kafka's ports) honours the same variable."""
    script = 'source ops/lib/jvm-service.sh && HOST=127.0.0.1 PYTHON=python3 free_ports 5'
    env = {**os.environ, PORT_RANGE_ENV: "23000-23200"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    ports = [int(p) for p in out.split()]
    assert len(ports) == 5
    assert all(23000 <= p < 23200 for p in ports), ports


def test_test_workers_get_disjoint_slices_that_cover_the_range() -> None:
    slices = [port_slice(index, 4, (10000, 32768)) for index in range(4)]
    assert slices[0][0] == 10000
    assert slices[-1][1] <= 32768
    assert all(a[1] <= b[0] for a, b in zip(slices, slices[1:], strict=False)), slices
    assert all(high - low >= 5000 for low, high in slices)
