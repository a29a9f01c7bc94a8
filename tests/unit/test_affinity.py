"""CPU pinning: the plan from ``[cpu]``, and real processes read back from /proc."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.core import affinity
from engine.core import config as configmod
from engine.core.errors import ConfigError

USABLE = affinity.usable_cores()


def config(shards: int, cpu: dict[str, Any]) -> configmod.Config:
    return configmod.from_dict({"engine": {"shards": shards}, "cpu": cpu})


def test_nothing_pinned_by_default() -> None:
    assert affinity.plan(configmod.load(None), [0, 1, 2, 3]) == {}


def test_auto_spreads_router_then_shards_over_the_usable_cores() -> None:
    placement = affinity.plan(config(3, {"router": "auto", "shards": "auto"}), [2, 3, 4, 5])
    assert placement == {"router": 2, "shard-0": 3, "shard-1": 4, "shard-2": 5}


def test_auto_skips_explicit_cores_and_wraps_when_short() -> None:
    placement = affinity.plan(config(4, {"supervisor": 0, "router": 1, "shards": "auto"}), [0, 1, 2, 3])
    assert placement == {"supervisor": 0, "router": 1, "shard-0": 2, "shard-1": 3, "shard-2": 2, "shard-3": 3}


def test_explicit_cores() -> None:
    placement = affinity.plan(config(2, {"router": 3, "shards": [1, 2]}), [0, 1, 2, 3])
    assert placement == {"router": 3, "shard-0": 1, "shard-1": 2}


@pytest.mark.parametrize(
    ("shards", "cpu", "expected"),
    [
        (2, {"router": 9}, "key 'cpu.router': core 9 is not available: this process may use cores 0-3"),
        (2, {"shards": [0, 9]}, "key 'cpu.shards[1]': core 9 is not available"),
        (3, {"shards": [0, 1]}, "key 'cpu.shards': lists 2 cores but the engine runs 3 shards"),
        (2, {"supervisor": 7}, "key 'cpu.supervisor': core 7"),
    ],
)
def test_impossible_placements_name_the_key(shards: int, cpu: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        affinity.plan(config(shards, cpu), [0, 1, 2, 3])
    assert expected in str(err.value)


def test_bad_values_fail_config_validation() -> None:
    with pytest.raises(ConfigError, match="key 'cpu.router' has value 'some'"):
        config(2, {"router": "some"})
    with pytest.raises(ConfigError, match="cpu.shards"):
        config(2, {"shards": [-1, 0]})


def test_describe_shows_every_slot_and_shared_cores() -> None:
    text = affinity.describe({"router": 0, "shard-0": 1, "shard-1": 0}, 2, [0, 1])
    assert text.splitlines() == [
        "CPU placement (this process may use cores 0-1):",
        "  supervisor  not pinned",
        "  router      core 0  (shared with shard-1)",
        "  shard-0     core 1",
        "  shard-1     core 0  (shared with router)",
    ]


@pytest.mark.parametrize(("text", "cores"), [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-2,5,7-8", {0, 1, 2, 5, 7, 8})])
def test_core_list_format(text: str, cores: set[int]) -> None:
    assert affinity.parse_cores(text) == cores
    assert affinity.format_cores(cores) == text


# ----------------------------------------------------------------------------------------------- real processes

# Starts a thread after the pin (as the ZMQ and metrics threads do), then says so and waits for stdin.
CHILD = """
import sys, threading
{pin}
t = threading.Thread(target=sys.stdin.read, daemon=True)
t.start()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def start(children: list[subprocess.Popen[str]], pin: str, **popen: Any) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(pin=pin)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2], **popen)
    children.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def thread_affinities(pid: int) -> dict[int, set[int]]:
    """Every thread's allowed cores: /proc/PID/task/TID/status."""
    return {int(t.name): affinity.read_affinity(pid, int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}


@pytest.mark.parametrize("core", USABLE[:2])
def test_apply_pins_the_process_and_the_threads_it_starts(children: list[subprocess.Popen[str]], core: int) -> None:
    proc = start(children, f"from engine.core.affinity import apply; apply({core})")
    assert affinity.read_affinity(proc.pid) == {core}
    threads = thread_affinities(proc.pid)
    assert len(threads) >= 2
    assert all(cores == {core} for cores in threads.values()), threads


@pytest.mark.parametrize("core", USABLE[-2:])
def test_pin_before_exec_pins_the_child_from_its_first_instruction(children: list[subprocess.Popen[str]],
                                                                    core: int) -> None:
    proc = start(children, "", preexec_fn=affinity.pin_before_exec({core}))
    threads = thread_affinities(proc.pid)
    assert len(threads) >= 2
    assert all(cores == {core} for cores in threads.values()), threads
    assert affinity.read_affinity(proc.pid) == {core}


def test_an_unpinned_slot_gets_every_usable_core_back(children: list[subprocess.Popen[str]]) -> None:
    """The supervisor may be pinned itself; a child without a core must not inherit that one core."""
    cpus = affinity.cpus_for({"router": USABLE[0]}, "shard-0", USABLE)
    proc = start(children, f"import os; os.sched_setaffinity(0, {{{USABLE[0]}}})",
                 preexec_fn=affinity.pin_before_exec(cpus))
    assert affinity.read_affinity(proc.pid) == {USABLE[0]}  # the child narrowed itself after the exec
    proc2 = start(children, "", preexec_fn=affinity.pin_before_exec(cpus))
    assert affinity.read_affinity(proc2.pid) == set(USABLE)


def test_apply_to_a_core_this_process_cannot_use() -> None:
    missing = max(USABLE) + 1
    result = subprocess.run([sys.executable, "-c", f"from engine.core.affinity import apply; apply({missing})"],
                            capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=60)
    assert result.returncode != 0
    assert f"cannot pin to core {missing}" in result.stderr
