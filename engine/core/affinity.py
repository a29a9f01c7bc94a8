"""Per-core placement: which CPU core the supervisor, the router and each shard run on.

``[cpu]`` maps each slot to a core. ``"auto"`` spreads the router and the shards, in that order, over the
cores this process may use (``os.sched_getaffinity(0)``: the cgroup/cpuset and systemd ``CPUAffinity=``
already narrowed it) that no explicit entry took, wrapping around when there are more slots than cores.
With ``isolcpus=`` the isolated cores are not in that set: list them explicitly or give the service
``CPUAffinity=`` (see docs/operations.md).

The supervisor computes the plan once, before it pins itself, and pins each child between fork and exec
(:func:`pin_before_exec`), so every thread the child ever starts (ZMQ I/O threads, executor threads,
the metrics server) inherits the core. A slot with no core gets the full set the supervisor started with,
not the supervisor's own core.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from engine.core.errors import ConfigError

if TYPE_CHECKING:
    from engine.core.config import Config

Core = Annotated[int, msgspec.Meta(ge=0, le=4095)]


class CpuConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[cpu]``: pin processes to cores. None (the default) leaves a process to the scheduler."""

    supervisor: Core | None = None  # mostly idle: put it with the IRQs on a housekeeping core
    router: Core | Literal["auto"] | None = None  # the intake process: the router (or the bridge in Kafka mode)
    shards: list[Core] | Literal["auto"] | None = None  # one core per shard, in shard order, or "auto"


def usable_cores() -> list[int]:
    """The cores this process may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def format_cores(cores: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the kernel's list format, as in /proc/PID/status)."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cores(text: str) -> set[int]:
    """The kernel's list format (``"0-2,5"``) -> ``{0, 1, 2, 5}``."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def problems(cpu: CpuConfig, shard_count: int, usable: Iterable[int]) -> list[tuple[str, str]]:
    """(key, message) for every ``[cpu]`` entry that cannot be applied on this host."""
    allowed = set(usable)
    where = f"this process may use cores {format_cores(allowed)}"
    found: list[tuple[str, str]] = []
    explicit: list[tuple[str, int]] = []
    if cpu.supervisor is not None:
        explicit.append(("cpu.supervisor", cpu.supervisor))
    if isinstance(cpu.router, int):
        explicit.append(("cpu.router", cpu.router))
    if isinstance(cpu.shards, list):
        if len(cpu.shards) != shard_count:
            found.append(("cpu.shards", f"lists {len(cpu.shards)} cores but the engine runs {shard_count} shards "
                                        f"(engine.shards); give one core per shard, or \"auto\""))
        explicit.extend((f"cpu.shards[{i}]", core) for i, core in enumerate(cpu.shards))
    for key, core in explicit:
        if core not in allowed:
            found.append((key, f"core {core} is not available: {where}"))
    return found


def intake_slot(config: Config) -> str:
    """The supervisor's slot for the intake process that ``cpu.router`` places."""
    return "bridge" if config.engine.source == "kafka" else "router"


def plan(config: Config, usable: Iterable[int] | None = None) -> dict[str, int]:
    """Slot name (``supervisor``, ``router`` or ``bridge``, ``shard-N``) -> core, for the pinned slots."""
    cpu: CpuConfig = config.cpu
    intake = intake_slot(config)
    cores = sorted(set(usable if usable is not None else usable_cores()))
    shard_count = config.shard_count
    found = problems(cpu, shard_count, cores)
    if found:
        key, message = found[0]
        raise ConfigError(f"key {key!r}: {message}")
    placement: dict[str, int] = {}
    if cpu.supervisor is not None:
        placement["supervisor"] = cpu.supervisor
    if isinstance(cpu.router, int):
        placement[intake] = cpu.router
    if isinstance(cpu.shards, list):
        placement.update((f"shard-{i}", core) for i, core in enumerate(cpu.shards))
    auto: list[str] = []
    if cpu.router == "auto":
        auto.append(intake)
    if cpu.shards == "auto":
        auto.extend(f"shard-{i}" for i in range(shard_count))
    taken = set(placement.values())
    free = [c for c in cores if c not in taken] or cores
    for i, slot in enumerate(auto):
        placement[slot] = free[i % len(free)]
    return placement


def describe(placement: dict[str, int], shard_count: int, usable: Iterable[int], intake: str = "router") -> str:
    """The placement as ``settle run`` prints it, one slot a line; shared cores are pointed out."""
    slots = ["supervisor", intake, *(f"shard-{i}" for i in range(shard_count))]
    width = max(len(s) for s in slots)
    by_core: dict[int, list[str]] = {}
    for slot, core in placement.items():
        by_core.setdefault(core, []).append(slot)
    lines = [f"CPU placement (this process may use cores {format_cores(usable)}):"]
    for slot in slots:
        pinned = placement.get(slot)
        if pinned is None:
            lines.append(f"  {slot:<{width}}  not pinned")
            continue
        shared = [s for s in by_core[pinned] if s != slot]
        note = f"  (shared with {', '.join(shared)})" if shared else ""
        lines.append(f"  {slot:<{width}}  core {pinned}{note}")
    return "\n".join(lines)


def apply(core: int) -> None:
    """Pin the calling thread (at start-up: the process) to ``core``; threads started later inherit it."""
    try:
        os.sched_setaffinity(0, {core})
    except OSError as e:
        raise ConfigError(f"cannot pin to core {core}: {e.strerror}; see `[cpu]` and the cores this process "
                          f"may use ({format_cores(usable_cores())})") from None


def pin_before_exec(cpus: set[int], then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for subprocess: run ``then`` and pin the child to ``cpus`` between fork and exec.

    Only async-signal-safe work belongs there: ``os.sched_setaffinity`` is one system call.
    """
    frozen = frozenset(cpus)

    def preexec() -> None:
        if then is not None:
            then()
        os.sched_setaffinity(0, frozen)

    return preexec


def cpus_for(placement: dict[str, int], slot: str, usable: Iterable[int]) -> set[int]:
    """The CPU set a child in ``slot`` gets: its core, or every usable core when it is not pinned."""
    core = placement.get(slot)
    return {core} if core is not None else set(usable)


def read_affinity(pid: int, tid: int | None = None) -> set[int]:
    """A process's (or one of its threads') allowed cores, from ``/proc`` (``Cpus_allowed_list``)."""
    path = f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return parse_cores(line.split(":", 1)[1])
    raise ValueError(f"{path}: no Cpus_allowed_list line")
