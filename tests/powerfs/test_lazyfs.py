"""LazyFS itself: what survives a power loss is exactly what fsync and directory fsync made durable."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.verify.lazyfs import PAGE_BYTES, LazyFS


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[LazyFS]:
    with LazyFS(tmp_path / "lazyfs") as fs:
        yield fs
    assert not os.path.ismount(fs.mount)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def start(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python program that prints "ready" once it has done its writes, then waits to be killed."""
    program = textwrap.dedent(code) + "\nprint('ready', flush=True)\nimport time\nwhile True: time.sleep(1)\n"
    proc = subprocess.Popen([sys.executable, "-c", program, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline() != "ready\n":
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the program failed before its writes were done:\n{program}")
    return proc


def killed(proc: subprocess.Popen[str]) -> int:
    proc.communicate()
    return proc.returncode


WRITER = """
import os, sys
d = sys.argv[1]
def put(name, data, sync):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())
put("unsynced", b"lost" * 100, False)
put("synced", b"kept" * 100, True)
fd = os.open(d, os.O_RDONLY)
os.fsync(fd)  # every entry above is durable, not every content
os.close(fd)
put("synced", b"more", False)  # overwritten without fsync
put("late", b"late", True)  # fsynced, but its directory entry never was
"""


def test_a_program_loses_what_it_did_not_fsync_and_keeps_what_it_did(lazy: LazyFS) -> None:
    data = lazy.mount / "data"
    data.mkdir()
    fsync_dir(lazy.mount)
    proc = start(WRITER, str(data))
    assert (data / "synced").read_bytes() == b"more"  # the page cache: what running programs see
    report = lazy.crash(roots=[proc.pid], label="writer")
    assert killed(proc) == -9
    assert report["victims"] == [proc.pid]
    assert sorted(os.listdir(data)) == ["synced", "unsynced"]
    assert (data / "synced").read_bytes() == b"kept" * 100
    assert (data / "unsynced").read_bytes() == b""  # the entry was synced by the directory, the data never
    assert report["lost"] == ["/data/late"]


def test_a_file_fsynced_in_a_directory_that_never_was_vanishes(lazy: LazyFS) -> None:
    outer = lazy.mount / "outer"
    outer.mkdir()
    fsync_dir(lazy.mount)  # "outer" is durable; its entries are not
    write_file(outer / "file", b"x" * 1000, sync=True)
    (outer / "inner").mkdir()
    lazy.crash()
    assert outer.is_dir()
    assert os.listdir(outer) == []
    write_file(outer / "file", b"y" * 1000, sync=True)
    fsync_dir(outer)
    lazy.crash()
    assert (outer / "file").read_bytes() == b"y" * 1000


def test_rename_and_unlink_without_a_directory_fsync_revert(lazy: LazyFS) -> None:
    write_file(lazy.mount / "a", b"a" * 10, sync=True)
    write_file(lazy.mount / "gone", b"g" * 10, sync=True)
    fsync_dir(lazy.mount)
    os.rename(lazy.mount / "a", lazy.mount / "b")
    (lazy.mount / "gone").unlink()
    report = lazy.crash()
    assert sorted(os.listdir(lazy.mount)) == ["a", "gone"]
    assert (lazy.mount / "a").read_bytes() == b"a" * 10
    assert (lazy.mount / "gone").read_bytes() == b"g" * 10
    assert report["lost"] == ["/b"]
    assert report["revived"] == ["/a", "/gone"]
    os.rename(lazy.mount / "a", lazy.mount / "b")
    (lazy.mount / "gone").unlink()
    fsync_dir(lazy.mount)
    lazy.crash()
    assert os.listdir(lazy.mount) == ["b"]
    assert (lazy.mount / "b").read_bytes() == b"a" * 10


def test_truncate_is_lost_too_unless_synced(lazy: LazyFS) -> None:
    path = lazy.mount / "file"
    write_file(path, b"abcdef", sync=True)
    fsync_dir(lazy.mount)
    os.truncate(path, 2)
    lazy.crash()
    assert path.read_bytes() == b"abcdef"


def unsynced_writes(lazy: LazyFS, chunks: list[bytes]) -> bytes:
    """A durable file of 100 bytes, then ``chunks`` appended without fsync; returns the durable part."""
    durable = b"D" * 100
    path = lazy.mount / "file"
    write_file(path, durable, sync=True)
    fsync_dir(lazy.mount)
    with open(path, "ab") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
    return durable


def test_torn_mode_keeps_a_prefix_of_the_unsynced_writes_cut_at_a_random_byte(lazy: LazyFS) -> None:
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    stream = b"".join(chunks)
    survivors = {}
    for seed in range(12):
        durable = unsynced_writes(lazy, chunks)
        report = lazy.crash(mode="torn", seed=seed)
        content = (lazy.mount / "file").read_bytes()
        assert content[:100] == durable
        kept = content[100:]
        assert stream.startswith(kept), f"seed {seed}: not a prefix of the writes in order"
        assert report["bytes_dropped"] == len(stream) - len(kept)
        survivors[seed] = len(kept)
    assert any(n % 1000 for n in survivors.values()), "no write was ever torn"
    assert len(set(survivors.values())) > 3
    unsynced_writes(lazy, chunks)
    lazy.crash(mode="torn", seed=5)
    assert len((lazy.mount / "file").read_bytes()) - 100 == survivors[5]  # the seed decides


def test_pages_mode_can_leave_a_hole_before_data_written_after_it(lazy: LazyFS) -> None:
    new = bytes(range(256)) * (5 * PAGE_BYTES // 256)
    holes = 0
    for seed in range(10):
        durable = unsynced_writes(lazy, [new])
        lazy.crash(mode="pages", seed=seed)
        content = (lazy.mount / "file").read_bytes()
        assert content[:100] == durable
        assert len(content) <= 100 + len(new)
        pages = [(start, min(len(content), (start // PAGE_BYTES + 1) * PAGE_BYTES))
                 for start in [100, *range(PAGE_BYTES, len(content), PAGE_BYTES)]]
        written = [content[a:b] == new[a - 100 : b - 100] for a, b in pages]
        for (a, b), ok in zip(pages, written, strict=True):
            assert ok or content[a:b] == bytes(b - a), f"seed {seed}: page at {a} is neither new nor a hole"
        holes += any(not ok and any(written[i + 1 :]) for i, ok in enumerate(written))
    assert holes, "no seed left a hole followed by data written after it"


FSYNC_LOOP = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(1, 1000):
    os.write(fd, b"%04d" % i)
    os.fsync(fd)
"""


@pytest.mark.parametrize(("when", "durable"), [("before", 3), ("after", 4)])
def test_power_loss_armed_at_the_fourth_fsync(lazy: LazyFS, when: str, durable: int) -> None:
    path = lazy.mount / "log"
    write_file(path, b"", sync=True)
    fsync_dir(lazy.mount)
    lazy.arm({"fsync"}, path=r"/log$", skip=3, when=when, label=when)
    proc = subprocess.Popen([sys.executable, "-c", FSYNC_LOOP, str(path)])
    report = lazy.wait(60)
    assert report is not None, "the armed power loss never happened"
    assert report["op"] == f"{when} fsync /log"
    assert report["victims"] == [proc.pid]
    assert proc.wait() == -9
    assert path.read_bytes() == b"".join(b"%04d" % i for i in range(1, durable + 1))


def test_power_loss_kills_every_process_using_the_mount_and_spares_the_rest(lazy: LazyFS) -> None:
    write_file(lazy.mount / "held", b"h", sync=True)
    fsync_dir(lazy.mount)
    holder = start("import sys\nheld = open(sys.argv[1], 'rb')", str(lazy.mount / "held"))
    inside = start("import os, sys\nos.chdir(sys.argv[1])", str(lazy.mount))
    parent = start(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "time.sleep(0.2)\n"
    )
    bystander = start("pass")
    try:
        report = lazy.crash(roots=[parent.pid])
        assert {holder.pid, inside.pid, parent.pid} <= set(report["victims"])
        assert len(report["victims"]) == 4  # the parent's child too
        assert bystander.pid not in report["victims"]
        assert [killed(p) for p in (holder, inside, parent)] == [-9, -9, -9]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        killed(bystander)


def test_a_process_crash_keeps_the_page_cache(lazy: LazyFS) -> None:
    path = lazy.mount / "log"
    write_file(path, b"", sync=True)
    fsync_dir(lazy.mount)
    lazy.arm({"fsync"}, path=r"/log$", skip=2, action="kill")
    proc = subprocess.Popen([sys.executable, "-c", FSYNC_LOOP, str(path)])
    report = lazy.wait(60)
    assert report is not None
    assert report["action"] == "kill"
    assert proc.wait() == -9
    assert path.read_bytes() == b"000100020003"  # written, not synced: only a power loss drops it
    lazy.crash()
    assert path.read_bytes() == b"00010002"


def test_the_mount_is_released_when_the_test_fails(tmp_path: Path) -> None:
    fs = LazyFS(tmp_path / "lazyfs")

    def fail_inside() -> None:
        with fs:
            (fs.mount / "f").write_bytes(b"x")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert not os.path.ismount(fs.mount)
    assert fs.proc is None


FULL_DISK = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(fd, b"a")
os.fsync(fd)
try:
    os.write(fd, b"b")
except OSError as e:
    os.write(fd, b"[%d]" % e.errno)
os.fsync(fd)
"""


def test_a_failed_write_then_a_chained_power_loss(lazy: LazyFS) -> None:
    path = lazy.mount / "log"
    write_file(path, b"", sync=True)
    fsync_dir(lazy.mount)
    lazy.arm({"write"}, path=r"/log$", skip=1, action="fail", error=errno.ENOSPC,
             then={"ops": {"fsync"}, "path": r"{dir}/log$", "when": "after", "label": "chained"})
    proc = subprocess.Popen([sys.executable, "-c", FULL_DISK, str(path)])
    report = lazy.wait(60)
    assert report is not None
    assert [r["action"] for r in report["before"]] == ["fail"]
    assert report["label"] == "chained"
    assert report["op"] == "after fsync /log"
    assert proc.wait() == -9
    assert path.read_bytes() == b"a[%d]" % errno.ENOSPC  # the failed write changed nothing


def test_the_mount_is_released_when_the_server_dies(tmp_path: Path) -> None:
    fs = LazyFS(tmp_path / "lazyfs")
    with fs:
        assert fs.proc is not None
        fs.proc.kill()
        fs.proc.wait()
        with pytest.raises(OSError, match="not connected"):
            os.listdir(fs.mount)
    with open("/proc/self/mounts") as f:
        assert str(fs.mount) not in f.read()
