"""LazyFS: a FUSE passthrough file system that loses power on command (for the power-loss tests and the
``power_loss`` fault of ``settle chaos``).

After Jepsen's LazyFS. Every operation goes straight through to a backing folder, which therefore plays
the page cache: it is what running programs see. Beside it the file system keeps the durable image,
what the disk holds:

- per file, its content as of its last ``fsync``/``fdatasync``, and the writes and truncates made since,
  in order;
- per directory, its entries (name -> file) as of the last fsync of that directory. A create, mkdir,
  rename, unlink or rmdir becomes durable only by an fsync of each directory it changed, so a file that
  was created and fsynced in a directory that never was can vanish.

**Power loss** freezes (SIGSTOP) every process of the machine, that is the process trees the test names
plus every process with a file or its working directory on the mount; rebuilds the backing folder from
the durable image; then SIGKILLs them. A request still in flight from one of them fails with EIO and
changes nothing. What survives of each file's unsynced writes depends on the mode:

``drop``   nothing (LazyFS' default);
``torn``   the unsynced writes in order up to a random one, which is cut at a random byte: a disk that
           wrote a prefix of its queue;
``pages``  each 4 KiB page of each unsynced write, and each unsynced truncate, kept or lost at random: a
           disk that reorders, so a hole can be followed by data written after it.

Directory entries are never torn: an unsynced create, rename or unlink is lost whole.

The file system runs in its own process (``python -m engine.verify.lazyfs_server serve ...``, on mfusepy and libfuse
3; the model and the FUSE operations are in :mod:`engine.verify.lazyfs_server`) and is driven over a Unix
socket by :class:`LazyFS`, a context manager that mounts it and always unmounts it. Power is cut on
command (:meth:`LazyFS.crash`) or at an armed point (:meth:`LazyFS.arm`): the Nth matching operation
(say an fsync of a ``.seg`` file, or an fsync of a directory that holds an unsynced unlink) cuts it just
before or just after the operation takes effect. An armed point can instead SIGKILL only the calling
process (a process crash: the page cache survives) or fail the operation with an errno (a full disk),
and can arm the next point the moment it fires.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

PAGE_BYTES: Final = 4096
MODES: Final = ("drop", "torn", "pages")
REPO: Final = Path(__file__).resolve().parents[2]


class LazyFSError(Exception):
    pass


# ------------------------------------------------------------------------------------------ processes


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        table[int(name)] = (int(fields[1]), fields[0])
    return table


def ancestors(pid: int, table: dict[int, tuple[int, str]]) -> set[int]:
    found = set()
    while pid in table and pid not in found and pid > 1:
        found.add(pid)
        pid = table[pid][0]
    return found


def descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def mount_users(mount: str, table: dict[int, tuple[int, str]]) -> set[int]:
    """Processes with an open file or their working directory on the mount."""
    inside = (mount, mount + "/")
    users = set()
    for pid in table:
        links = [f"/proc/{pid}/cwd"]
        with contextlib.suppress(OSError):
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == inside[0] or target.startswith(inside[1]):
                users.add(pid)
                break
    return users


def freeze(roots: set[int], mounts: list[str], spared: set[int]) -> set[int]:
    """SIGSTOP the machine: the process trees of ``roots`` and every process using one of ``mounts``, except
    ``spared``; again until no new one shows up (one may be forking). Returns the pids stopped."""
    stopped: set[int] = set()
    for _ in range(20):
        table = proc_table()
        machine = descendants(roots, table).union(*(mount_users(m, table) for m in mounts)) - spared
        new = {pid for pid in machine - stopped if table[pid][1] not in ("Z", "X")}
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    return stopped


# ------------------------------------------------------------------------------------------ the client


class LazyFS:
    """Mounts a LazyFS at ``mount`` (default ``root/mnt``) over ``backing`` (default ``root/backing``); the
    control socket and the server's log are in ``root``. A context manager that always unmounts.

    ``protect``: pids that a power loss never kills (the calling process and its ancestors always are).
    """

    def __init__(self, root: Path, *, backing: Path | None = None, mount: Path | None = None,
                 protect: tuple[int, ...] = ()) -> None:
        self.root = Path(root).resolve()
        self.backing = Path(backing).resolve() if backing is not None else self.root / "backing"
        self.mount = Path(mount).resolve() if mount is not None else self.root / "mnt"
        self.control = self.root / "control.sock"
        self.log_path = self.root / "lazyfs.log"
        self.protect = (os.getpid(), *protect)
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes: list[dict[str, Any]] = []

    def __enter__(self) -> LazyFS:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "engine.verify.lazyfs_server", "serve", str(self.backing), str(self.mount),
                str(self.control), *(f"--protect={pid}" for pid in self.protect)]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=log_file)
        deadline = time.monotonic() + timeout_s
        while not (self.control.exists() and self._mounted()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LazyFSError(f"LazyFS did not mount at {self.mount}:\n{self.log()}")
            time.sleep(0.02)
        self._call(cmd="ping")

    def stop(self) -> None:
        """Unmount (lazily when a process still holds a file) and stop the server, whatever state it is in."""
        if self.proc is None:
            return
        if self._mounted():
            done = subprocess.run(["fusermount3", "-u", str(self.mount)], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mount)], capture_output=True, check=False)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._mounted():  # the server died and left "transport endpoint is not connected" behind
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True, check=False)
        self.proc = None

    def _mounted(self) -> bool:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == str(self.mount) for line in f)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def _call(self, **request: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.control))
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as reader:
                line = reader.readline()
        if not line:
            raise LazyFSError(f"LazyFS closed the control socket on {request}:\n{self.log()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise LazyFSError(f"LazyFS: {answer['error']}")
        return answer

    def crash(self, *, roots: tuple[int, ...] | list[int] = (), mode: str = "drop", seed: int = 0,
              label: str = "command") -> dict[str, Any]:
        """Lose power now: kill the machine (``roots``' trees and the mount's users), keep what is durable.

        Returns once every killed process is dead, with what was lost (``lost``: paths, ``bytes_dropped``...).
        """
        report = self._call(cmd="crash", roots=list(roots), mode=mode, seed=seed, label=label)
        self.crashes.append(report)
        return report

    def arm(self, ops: set[str] | list[str], *, path: str = "", skip: int = 0, when: str = "before",
            dirty: str | None = None, pending: bool = False, min_bytes: int = 0, action: str = "crash",
            error: int = errno.EIO, roots: tuple[int, ...] | list[int] = (), mode: str = "drop", seed: int = 0,
            label: str = "armed", then: dict[str, Any] | None = None) -> None:
        """Lose power at the ``skip``+1-th operation in ``ops`` on a path matching ``path`` (a regex),
        ``when`` "before" or "after" it takes effect. ``dirty``: fsyncdir of a directory holding an
        unsynced "create", "unlink" or "rename"; ``pending``: fsync of a file holding unsynced writes;
        ``min_bytes``: a write of at least that many bytes.
        ``action="kill"``: SIGKILL only the process making that call, and lose nothing (a process crash).
        ``action="fail"``: the operation fails with ``error`` (say ENOSPC) and changes nothing.
        ``then``: the arguments of a trigger armed the moment this one fires, with no operation in between
        (in its ``path``, ``{dir}`` stands for the directory this one fired in); :meth:`wait` waits for the
        last one, and its report lists the earlier ones' in ``before``."""
        self._call(cmd="arm", **self._request(ops, path=path, skip=skip, when=when, dirty=dirty, pending=pending,
                                              min_bytes=min_bytes, action=action, error=error, roots=roots,
                                              mode=mode, seed=seed, label=label, then=then))

    @classmethod
    def _request(cls, ops: set[str] | list[str], *, path: str = "", skip: int = 0, when: str = "before",
                 dirty: str | None = None, pending: bool = False, min_bytes: int = 0, action: str = "crash",
                 error: int = errno.EIO, roots: tuple[int, ...] | list[int] = (), mode: str = "drop",
                 seed: int = 0, label: str = "armed", then: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"ops": sorted(ops), "path": path, "skip": skip, "when": when, "dirty": dirty, "pending": pending,
                "min_bytes": min_bytes, "action": action, "errno": error,
                "then": None if then is None else cls._request(**then),
                "crash": {"roots": list(roots), "mode": mode, "seed": seed, "label": label}}

    def wait(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """The report of the armed power loss once it happened and its victims are dead, else None."""
        answer = self._call(cmd="wait", timeout_s=timeout_s)
        if not answer.pop("fired"):
            return None
        self.crashes.append(answer)
        return answer

    def disarm(self) -> dict[str, Any] | None:
        """Disarm; returns the report when the armed power loss happened after all (a race), else None."""
        answer = self._call(cmd="disarm")
        if not answer.pop("fired"):
            return None
        self.crashes.append(answer)
        return answer

    def stats(self) -> dict[str, Any]:
        return self._call(cmd="stats")


def cut_power(filesystems: Sequence[LazyFS], *, roots: Iterable[int] = (), mode: str = "drop", seed: int = 0,
              label: str = "command") -> list[dict[str, Any]]:
    """One power loss over several mounts, the disks of one machine. Every process of the machine (the trees
    of ``roots`` and the users of any of the mounts) is frozen first, so that none writes to one disk while
    another one is rebuilt; then each file system keeps only what was durable (``mode``, seed ``seed + i``)
    and the first one SIGKILLs them all. Returns each file system's report, in order."""
    table = proc_table()
    spared = ancestors(os.getpid(), table) | {fs.proc.pid for fs in filesystems if fs.proc is not None}
    for fs in filesystems:
        for pid in fs.protect:
            spared |= ancestors(pid, table)
    stopped = freeze(set(roots), [str(fs.mount) for fs in filesystems], spared)
    try:
        return [fs.crash(roots=sorted(stopped), mode=mode, seed=seed + i, label=label)
                for i, fs in enumerate(filesystems)]  # fmt: skip
    except BaseException:
        for pid in stopped:  # never leave the machine frozen
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise


def unavailable() -> str | None:
    """Why a LazyFS cannot be mounted here (None when it can): what it needs is root, ``/dev/fuse``,
    ``fusermount3`` (Debian package fuse3, installed by ``ops/install.sh``), libfuse 3 and mfusepy."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (it mounts file systems and kills the processes using them)")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse (no FUSE in this kernel or container: run with --device /dev/fuse)")
    elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
        missing.append("read-write access to /dev/fuse")
    if shutil.which("fusermount3") is None:
        missing.append("fusermount3 (apt-get install fuse3, or run ops/install.sh)")
    if ctypes.util.find_library("fuse3") is None:
        missing.append("libfuse 3 (apt-get install fuse3)")
    if importlib.util.find_spec("mfusepy") is None:
        missing.append("the Python package mfusepy (pip install -e '.[chaos]')")
    return "missing " + "; ".join(missing) if missing else None
