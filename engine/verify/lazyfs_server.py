"""The LazyFS file system process: the durable-image model, the FUSE operations and the control socket.

See :mod:`engine.verify.lazyfs` for what it does and how it is driven; this module runs inside
``python -m engine.verify.lazyfs_server serve`` only (it imports mfusepy when it starts serving).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import socketserver
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from engine.verify.lazyfs import MODES, PAGE_BYTES, ancestors, freeze, proc_table

POINT_OPS: Final = frozenset(
    {"create", "mkdir", "write", "truncate", "fsync", "fsyncdir", "unlink", "rmdir", "rename"}
)
ROOT: Final = 0
LIST_MAX: Final = 50

log = logging.getLogger("lazyfs")


# ------------------------------------------------------------------------------------------ processes


def _tgid(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# ------------------------------------------------------------------------------------------ the model


@dataclass(eq=False)
class _Node:
    """A file or directory, in the backing folder (``ino``) and/or in the durable image (``refs``)."""

    nid: int
    is_dir: bool
    mode: int
    ino: int | None
    path: str  # its last known path on the mount, for matching and reports
    durable: bytearray = field(default_factory=bytearray)  # a file's content on the disk
    pending: list[tuple[int, bytes | None]] = field(default_factory=list)  # (offset, data) or (size, None)
    entries: dict[str, int] = field(default_factory=dict)  # a directory's durable entries
    dirty: set[str] = field(default_factory=set)  # a directory's kinds of unsynced change
    refs: int = 0  # durable entries naming it
    linked: bool = True  # has a name in the backing folder
    handles: int = 0


@dataclass(eq=False)
class _Handle:
    fd: int
    nid: int
    append: bool


@dataclass(eq=False)
class _Trigger:
    ops: frozenset[str]
    path: re.Pattern[str]
    skip: int
    when: str
    dirty: str | None  # fsyncdir: only a directory holding an unsynced change of this kind
    pending: bool  # fsync: only a file holding unsynced writes
    min_bytes: int  # write: only one of at least this many bytes
    action: str  # "crash": lose power; "kill": SIGKILL the caller only (the page cache survives); "fail"
    errno: int  # for "fail": the error the operation fails with, changing nothing
    crash: dict[str, Any]
    then: dict[str, Any] | None  # a trigger armed the moment this one fires ("{dir}" in its path: this one's)
    done: threading.Event = field(default_factory=threading.Event)
    report: dict[str, Any] | None = None
    next: _Trigger | None = None


def _trigger(request: dict[str, Any]) -> _Trigger:
    unknown = set(request["ops"]) - POINT_OPS
    when, action = request.get("when", "before"), request.get("action", "crash")
    if unknown or when not in ("before", "after") or action not in ("crash", "kill", "fail"):
        raise ValueError(f"cannot arm {action} on {sorted(unknown)} / {when}")
    return _Trigger(
        ops=frozenset(request["ops"]), path=re.compile(request.get("path", "")), skip=int(request.get("skip", 0)),
        when=when, action=action, errno=int(request.get("errno", errno.EIO)), dirty=request.get("dirty"),
        pending=bool(request.get("pending", False)), min_bytes=int(request.get("min_bytes", 0)),
        crash=request.get("crash", {}), then=request.get("then"),
    )


def _apply(data: bytearray, offset: int, payload: bytes | None) -> None:
    if payload is None:  # a truncate to ``offset``
        if offset < len(data):
            del data[offset:]
        else:
            data.extend(bytes(offset - len(data)))
        return
    if offset > len(data):
        data.extend(bytes(offset - len(data)))
    data[offset : offset + len(payload)] = payload


def _survivor(node: _Node, mode: str, rng: random.Random, stats: Counter[str]) -> bytearray:
    """The content the disk holds for ``node`` after power loss in ``mode``."""
    data = bytearray(node.durable)
    ops = node.pending
    written = sum(len(p) for _, p in ops if p is not None)
    if not ops:
        return data
    stats["files_reverted"] += 1
    kept = 0
    if mode == "torn":
        cut_at = rng.randrange(len(ops))
        for offset, payload in ops[:cut_at]:
            _apply(data, offset, payload)
            kept += len(payload or b"")
        offset, payload = ops[cut_at]
        if payload is not None and len(payload) > 1:
            cut = rng.randrange(1, len(payload))
            _apply(data, offset, payload[:cut])
            kept += cut
            stats["writes_torn"] += 1
    elif mode == "pages":
        for offset, payload in ops:
            if payload is None:
                if rng.random() < 0.5:
                    _apply(data, offset, None)
                continue
            start = 0
            while start < len(payload):
                end = min(len(payload), (offset + start) // PAGE_BYTES * PAGE_BYTES + PAGE_BYTES - offset)
                if rng.random() < 0.5:
                    _apply(data, offset + start, payload[start:end])
                    kept += end - start
                    stats["pages_kept"] += 1
                else:
                    stats["pages_lost"] += 1
                start = end
    stats["bytes_dropped"] += written - kept
    return data


# ------------------------------------------------------------------------------------------ the file system


def serve(backing: Path, mount: Path, control: Path, protect: set[int]) -> int:
    from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context

    def fail(code: int = errno.EIO) -> FuseOSError:
        return FuseOSError(code)

    class LazyOps(Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.mutex = threading.RLock()
            self.nodes: dict[int, _Node] = {}
            self.by_ino: dict[int, int] = {}
            self.next_nid = ROOT
            self.handles: dict[int, _Handle] = {}
            self.next_fh = 1
            self.dead: set[int] = set()
            self.trigger: _Trigger | None = None
            self.counts: Counter[str] = Counter()
            self.crashes = 0
            self._load()

        # -- bookkeeping ----------------------------------------------------------------------------

        def _load(self) -> None:
            """Whatever the backing folder holds at mount time is on the disk."""
            def load(full: str, rel: str) -> int:
                st = os.lstat(full)
                node = self._new_node(st, rel)
                if node.is_dir:
                    for entry in sorted(os.listdir(full)):
                        child = load(os.path.join(full, entry), f"{rel.rstrip('/')}/{entry}")
                        node.entries[entry] = child
                        self.nodes[child].refs += 1
                else:
                    with open(full, "rb") as f:
                        node.durable = bytearray(f.read())
                return node.nid

            load(str(backing), "/")

        def _new_node(self, st: os.stat_result, path: str) -> _Node:
            node = _Node(self.next_nid, stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_ino, path)
            self.next_nid += 1
            self.nodes[node.nid] = node
            self.by_ino[st.st_ino] = node.nid
            return node

        def _full(self, path: str) -> str:
            return os.path.join(str(backing), path.lstrip("/"))

        def _node_at(self, path: str) -> _Node:
            st = os.lstat(self._full(path))
            nid = self.by_ino.get(st.st_ino)
            if nid is None:
                return self._new_node(st, path)  # nothing made it durable yet
            return self.nodes[nid]

        def _parent(self, path: str) -> _Node:
            return self._node_at(os.path.dirname(path.rstrip("/")) or "/")

        def _unlinked(self, node: _Node) -> None:
            node.linked = False
            if node.handles == 0:
                self._freed(node)

        def _freed(self, node: _Node) -> None:
            """The backing inode is gone; the node lives on while the durable image names it."""
            if node.ino is not None and self.by_ino.get(node.ino) == node.nid:
                del self.by_ino[node.ino]
            node.ino = None
            if node.refs == 0:
                self.nodes.pop(node.nid, None)

        def _handle(self, fh: int) -> tuple[_Handle, _Node]:
            handle = self.handles.get(fh)
            if handle is None:
                raise fail()  # opened before a power loss
            return handle, self.nodes[handle.nid]

        def _open_handle(self, fd: int, node: _Node, flags: int) -> int:
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = _Handle(fd, node.nid, bool(flags & os.O_APPEND))
            node.handles += 1
            return fh

        def _enter(self, op: str) -> None:
            """Called with the lock held: refuse requests from the processes the last power loss killed."""
            self.counts[op] += 1
            if self.dead:
                pid = fuse_get_context()[2]
                if pid and _tgid(pid) in self.dead | {None}:
                    raise fail()

        # -- power loss -----------------------------------------------------------------------------

        def _match(self, op: str, path: str | None, node: _Node | None, size: int) -> str | None:
            trigger = self.trigger
            if trigger is None or op not in trigger.ops or size < trigger.min_bytes:
                return None
            if not trigger.path.search(path or (node.path if node else "")):
                return None
            if trigger.dirty is not None and (node is None or trigger.dirty not in node.dirty):
                return None
            if trigger.pending and (node is None or not node.pending):
                return None
            if trigger.skip > 0:
                trigger.skip -= 1
                return None
            return trigger.when

        def _fire(self, op: str, path: str | None) -> FuseOSError:
            trigger = self.trigger
            assert trigger is not None
            self.trigger = None
            if trigger.then is not None:
                directory = (path or "") if op in ("fsyncdir", "mkdir", "rmdir") else os.path.dirname(path or "")
                directory = re.escape(directory.rstrip("/"))
                then = {**trigger.then, "path": trigger.then.get("path", "").replace("{dir}", directory)}
                self.trigger = trigger.next = _trigger(then)
            where = f"{trigger.when} {op} {path}"
            if trigger.action == "fail":
                trigger.report = {"action": "fail", "op": where, "errno": trigger.errno, "victims": [],
                                  "label": trigger.crash.get("label", "")}
                trigger.done.set()
                return fail(trigger.errno)
            if trigger.action == "kill":
                pid = _tgid(fuse_get_context()[2])
                victims = {pid} - set(protect) if pid else set()
                for victim in victims:
                    os.kill(victim, signal.SIGKILL)
                trigger.report = {"action": "kill", "op": where, "victims": sorted(victims),
                                  "label": trigger.crash.get("label", "")}
                threading.Thread(target=self._bury, args=(set(), trigger.done, victims), daemon=True).start()
            else:
                caller = _tgid(fuse_get_context()[2])
                roots = [*trigger.crash.get("roots", ()), *([caller] if caller else [])]
                trigger.report = self.crash(**{**trigger.crash, "roots": roots}, op=where, done=trigger.done)
            return fail()

        def _point(self, op: str, path: str | None, node: _Node | None, action,  # type: ignore[no-untyped-def]
                   size: int = 0):
            when = self._match(op, path, node, size)
            if when == "before" or (when is not None and self.trigger is not None and self.trigger.action == "fail"):
                raise self._fire(op, path)
            result = action()
            if when == "after":
                raise self._fire(op, path)
            return result

        def crash(self, *, mode: str = "drop", seed: int = 0, roots: list[int] | tuple[int, ...] = (),
                  label: str = "", op: str = "command",
                  done: threading.Event | None = None) -> dict[str, Any]:
            assert mode in MODES, mode
            with self.mutex:
                victims = self._freeze(set(roots))
                self.dead |= victims
                report = self._rebuild(mode, random.Random(seed))
                for pid in victims:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.crashes += 1
                report.update(label=label, mode=mode, seed=seed, op=op, victims=sorted(victims),
                              crash=self.crashes)
            done = done or threading.Event()
            threading.Thread(target=self._bury, args=(victims, done, victims), daemon=True).start()
            log.warning("power loss %d (%s, %s): %s", self.crashes, label, op, json.dumps(report)[:2000])
            return report

        def _freeze(self, roots: set[int]) -> set[int]:
            table = proc_table()
            spared = set(protect) | ancestors(os.getpid(), table)
            for pid in protect:
                spared |= ancestors(pid, table)
            return freeze(roots, [str(mount)], spared)

        def _bury(self, dead: set[int], done: threading.Event, victims: set[int]) -> None:
            while not all(_gone(pid) for pid in victims):
                time.sleep(0.01)
            with self.mutex:
                self.dead -= dead
            done.set()

        def _tree(self) -> set[str]:
            paths = set()
            for top, dirs, files in os.walk(backing):
                rel = os.path.relpath(top, backing)
                for name in dirs + files:
                    paths.add(os.path.normpath(os.path.join("/", rel, name)))
            return paths

        def _rebuild(self, mode: str, rng: random.Random) -> dict[str, Any]:
            """Replace the backing folder's contents with what the disk holds after power loss."""
            before = self._tree()
            for handle in self.handles.values():
                os.close(handle.fd)
            self.handles.clear()
            for entry in os.scandir(backing):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            stats: Counter[str] = Counter()
            kept: dict[int, _Node] = {}

            def build(nid: int, rel: str) -> None:
                node = self.nodes[nid]
                full = self._full(rel)
                node.path = rel
                if node.is_dir:
                    if nid != ROOT:
                        os.mkdir(full, node.mode)
                    entries = {}
                    for name, child in sorted(node.entries.items()):
                        if child in kept:  # two durable names for one directory: a rename, half synced
                            stats["aliases_dropped"] += 1
                            continue
                        entries[name] = child
                        kept[child] = self.nodes[child]
                        build(child, f"{rel.rstrip('/')}/{name}")
                    node.entries = entries
                    node.dirty.clear()
                else:
                    node.durable = _survivor(node, mode, rng, stats)
                    node.pending = []
                    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, node.mode)
                    try:
                        os.write(fd, node.durable)
                    finally:
                        os.close(fd)
                node.ino = os.lstat(full).st_ino
                node.linked, node.handles, node.refs = True, 0, 0

            kept[ROOT] = self.nodes[ROOT]
            build(ROOT, "/")
            for node in kept.values():
                for child in node.entries.values():
                    kept[child].refs += 1
            self.nodes = kept
            self.by_ino = {node.ino: nid for nid, node in kept.items() if node.ino is not None}
            after = self._tree()
            lost, revived = sorted(before - after), sorted(after - before)
            return dict(stats, lost=lost[:LIST_MAX], lost_count=len(lost), revived=revived[:LIST_MAX],
                        revived_count=len(revived))

        # -- operations -----------------------------------------------------------------------------

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with self.mutex:
                self._enter("getattr")
                st = os.fstat(self._handle(fh)[0].fd) if fh else os.lstat(self._full(path))
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns",
                    "st_ctime_ns", "st_blocks", "st_blksize", "st_ino")
            return {key.removesuffix("_ns"): getattr(st, key) for key in keys}

        def readdir(self, path: str, fh: int) -> list[str]:
            with self.mutex:
                self._enter("readdir")
                return [".", "..", *os.listdir(self._full(path))]

        def access(self, path: str, amode: int) -> int:
            with self.mutex:
                self._enter("access")
                if not os.access(self._full(path), amode):
                    raise fail(errno.EACCES)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(str(backing))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                    "f_frsize", "f_namemax")
            return {key: getattr(st, key) for key in keys}

        def chmod(self, path: str, mode: int) -> int:
            with self.mutex:
                self._enter("chmod")
                os.chmod(self._full(path), mode)
                self._node_at(path).mode = mode & 0o7777
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            with self.mutex:
                self._enter("chown")
                os.chown(self._full(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            with self.mutex:
                self._enter("utimens")
                os.utime(self._full(path), ns=times) if times else os.utime(self._full(path))
            return 0

        def link(self, target: str, source: str) -> int:
            raise fail(errno.EPERM)  # hard links are not modelled

        def symlink(self, target: str, source: str) -> int:
            raise fail(errno.EPERM)

        def mknod(self, path: str, mode: int, dev: int) -> int:
            raise fail(errno.EPERM)

        def mkdir(self, path: str, mode: int) -> int:
            with self.mutex:
                self._enter("mkdir")
                parent = self._parent(path)

                def action() -> int:
                    os.mkdir(self._full(path), mode)
                    self._new_node(os.lstat(self._full(path)), path)
                    parent.dirty.add("create")
                    return 0

                return int(self._point("mkdir", path, parent, action))

        def _remove(self, op: str, path: str) -> int:
            with self.mutex:
                self._enter(op)
                parent = self._parent(path)
                node = self._node_at(path)

                def action() -> int:
                    nlink = os.lstat(self._full(path)).st_nlink
                    (os.rmdir if op == "rmdir" else os.unlink)(self._full(path))
                    parent.dirty.add("unlink")
                    if node.is_dir or nlink <= 1:
                        self._unlinked(node)
                    return 0

                return int(self._point(op, path, parent, action))

        def unlink(self, path: str) -> int:
            return self._remove("unlink", path)

        def rmdir(self, path: str) -> int:
            return self._remove("rmdir", path)

        def rename(self, old: str, new: str) -> int:
            with self.mutex:
                self._enter("rename")
                node = self._node_at(old)
                old_parent, new_parent = self._parent(old), self._parent(new)
                try:
                    target: _Node | None = self._node_at(new)
                except FileNotFoundError:
                    target = None

                def action() -> int:
                    nlink = os.lstat(self._full(new)).st_nlink if target is not None else 0
                    os.rename(self._full(old), self._full(new))
                    old_parent.dirty.add("rename")
                    new_parent.dirty.add("rename")
                    node.path = new
                    if target is not None and target is not node and (target.is_dir or nlink <= 1):
                        self._unlinked(target)
                    return 0

                return int(self._point("rename", new, new_parent, action))

        def create(self, path: str, mode: int, flags: int) -> int:
            with self.mutex:
                self._enter("create")
                parent = self._parent(path)

                def action() -> int:
                    existed = os.path.lexists(self._full(path))
                    fd = os.open(self._full(path), flags | os.O_CREAT, mode)
                    st = os.fstat(fd)
                    nid = self.by_ino.get(st.st_ino)
                    node = self._new_node(st, path) if nid is None else self.nodes[nid]
                    if not existed:
                        parent.dirty.add("create")
                    elif flags & os.O_TRUNC:
                        node.pending.append((0, None))
                    return self._open_handle(fd, node, flags)

                return int(self._point("create", path, parent, action))

        def open(self, path: str, flags: int) -> int:
            with self.mutex:
                self._enter("open")
                fd = os.open(self._full(path), flags & ~(os.O_CREAT | os.O_EXCL))
                node = self._node_at(path)
                node.path = path
                if flags & os.O_TRUNC:
                    node.pending.append((0, None))
                return self._open_handle(fd, node, flags)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with self.mutex:
                self._enter("read")
                return os.pread(self._handle(fh)[0].fd, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self.mutex:
                self._enter("write")
                handle, node = self._handle(fh)

                def action() -> int:
                    at = os.fstat(handle.fd).st_size if handle.append else offset
                    done = os.pwrite(handle.fd, data, at)
                    node.pending.append((at, bytes(data[:done])))
                    return done

                return int(self._point("write", path, node, action, size=len(data)))

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            with self.mutex:
                self._enter("truncate")
                if fh:
                    handle, node = self._handle(fh)
                else:
                    handle, node = None, self._node_at(path)

                def action() -> int:
                    if handle is not None:
                        os.ftruncate(handle.fd, length)
                    else:
                        os.truncate(self._full(path), length)
                    node.pending.append((length, None))
                    return 0

                return int(self._point("truncate", path, node, action))

        def flush(self, path: str, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            with self.mutex:
                handle = self.handles.pop(fh, None)
                if handle is not None:
                    os.close(handle.fd)
                    node = self.nodes[handle.nid]
                    node.handles -= 1
                    if not node.linked and node.handles == 0:
                        self._freed(node)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            with self.mutex:
                self._enter("fsync")
                _, node = self._handle(fh)

                def action() -> int:
                    for offset, payload in node.pending:
                        _apply(node.durable, offset, payload)
                    node.pending.clear()
                    return 0

                return int(self._point("fsync", path, node, action))

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            with self.mutex:
                self._enter("fsyncdir")
                node = self._node_at(path)

                def action() -> int:
                    entries = {}
                    for entry in os.scandir(self._full(path)):
                        nid = self.by_ino.get(entry.inode())
                        if nid is None:
                            st = entry.stat(follow_symlinks=False)
                            nid = self._new_node(st, f"{path.rstrip('/')}/{entry.name}").nid
                        entries[entry.name] = nid
                    for nid in entries.values():
                        self.nodes[nid].refs += 1
                    for nid in node.entries.values():
                        child = self.nodes[nid]
                        child.refs -= 1
                        if child.refs == 0 and child.ino is None:
                            self.nodes.pop(nid, None)
                    node.entries = entries
                    node.dirty.clear()
                    return 0

                return int(self._point("fsyncdir", path, node, action))

    ops = LazyOps()
    server = _control_server(ops, control)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        FUSE(ops, str(mount), foreground=True, fsname="lazyfs", direct_io=True, hard_remove=True,
             entry_timeout=0, attr_timeout=0, negative_timeout=0)
    finally:
        server.shutdown()
        server.server_close()
    return 0


def _control_server(ops: Any, path: Path) -> socketserver.ThreadingUnixStreamServer:
    """One JSON request per line, one JSON answer per line."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                try:
                    answer = dispatch(json.loads(line))
                except Exception as e:  # the test wants to read what went wrong, not a hung socket
                    log.exception("control request failed")
                    answer = {"error": f"{type(e).__name__}: {e}"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")
                self.wfile.flush()

    armed: list[_Trigger] = []  # the last trigger armed (the head of its chain), kept after it fired for `wait`

    def dispatch(request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.pop("cmd")
        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "crash":
            done = threading.Event()
            report = ops.crash(**request, done=done)
            done.wait()
            return dict(report)
        trigger: _Trigger | None
        if cmd == "arm":
            trigger = _trigger(request)
            with ops.mutex:
                ops.trigger = trigger
            armed[:] = [trigger]
            return {"armed": True}
        if cmd == "wait":  # for the whole chain; the earlier reports come in "before"
            deadline = time.monotonic() + float(request.get("timeout_s", 60.0))
            trigger = armed[0] if armed else None
            before: list[dict[str, Any]] = []
            while trigger is not None and trigger.done.wait(max(0.0, deadline - time.monotonic())):
                assert trigger.report is not None
                if trigger.next is None:
                    return {"fired": True, **trigger.report, "before": before}
                before.append(trigger.report)
                trigger = trigger.next
            return {"fired": False}
        if cmd == "disarm":  # answers the report when the chain's last trigger fired after all
            with ops.mutex:
                ops.trigger = None
                trigger = armed.pop() if armed else None
                while trigger is not None and trigger.next is not None:
                    trigger = trigger.next
            if trigger is None or trigger.report is None:
                return {"fired": False}
            trigger.done.wait()
            return {"fired": True, **trigger.report}
        if cmd == "stats":
            with ops.mutex:
                return {"crashes": ops.crashes, "counts": dict(ops.counts), "nodes": len(ops.nodes)}
        return {"error": f"unknown command {cmd!r}"}

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return socketserver.ThreadingUnixStreamServer(str(path), Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lazyfs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="mount BACKING at MOUNT, controlled over the Unix socket CONTROL")
    p.add_argument("backing", type=Path)
    p.add_argument("mount", type=Path)
    p.add_argument("control", type=Path)
    p.add_argument("--protect", type=int, action="append", default=[], help="a pid power loss never kills")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s lazyfs %(levelname)s %(message)s")
    return serve(args.backing.resolve(), args.mount.resolve(), args.control, set(args.protect))


if __name__ == "__main__":
    raise SystemExit(main())
