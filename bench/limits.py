"""The physical limits of this machine, measured in the same run as everything else.

- ``fdatasync`` calls per second on the WAL's disk: append one record-sized write, ``fdatasync``, repeat
  (also ``fsync``, which is what the design note's ``sync_all`` costs);
- group-commit write bandwidth on that disk: append a chunk (64 KiB, 1 MiB: a group commit of about 400
  and 6,000 WAL records) and ``fdatasync`` it, repeat; MB/s;
- raw pyzmq PUSH/PULL messages per second between two processes over ``ipc://`` (the router-to-shard
  transport), one real encoded trade per message (about 180 bytes), one ``send``/``recv`` call per
  message as the router and the shards make them; both ends are separate processes started here, the
  receiver times from the first message to the last;
- the Cassandra driver's ceiling for settle's rows: see :mod:`bench.store_write` (``raw rows`` and ``raw
  batches`` at several concurrencies, the best of them).

``python -m bench.limits [--quick] [--dir WAL_DISK_DIR]`` prints them; ``--zmq-pull``/``--zmq-push`` are
the two ends of the pyzmq measurement (internal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from engine.core.messages import encoder
from engine.sim.mesim import TradeGenerator, sim_config

RECORD_BYTES = 200  # a WAL record: 8-byte header + a msgpack trade of ~190 bytes


def sample_frame() -> bytes:
    trade, _ = TradeGenerator(sim_config(symbols=16, accounts=1000)).next()
    frame: bytes = encoder.encode(trade)
    return frame


def fsync_rate(directory: Path, calls: int, *, data_only: bool = True) -> float:
    """Calls/s of write(record) + fdatasync (or fsync) on a file in ``directory``."""
    sync = os.fdatasync if data_only else os.fsync
    record = b"x" * RECORD_BYTES
    with tempfile.TemporaryDirectory(prefix="settle-bench-fsync-", dir=directory) as tmp:
        fd = os.open(Path(tmp) / "probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for _ in range(10):  # allocate the first blocks before the clock starts
                os.write(fd, record)
                sync(fd)
            started = time.perf_counter()
            for _ in range(calls):
                os.write(fd, record)
                sync(fd)
            return calls / (time.perf_counter() - started)
        finally:
            os.close(fd)


def group_commit_bandwidth(directory: Path, chunk_bytes: int, total_bytes: int) -> dict[str, float]:
    """MB/s of append(chunk) + fdatasync, and the group commits per second that makes."""
    chunk = os.urandom(chunk_bytes)
    rounds = max(4, total_bytes // chunk_bytes)
    with tempfile.TemporaryDirectory(prefix="settle-bench-bw-", dir=directory) as tmp:
        fd = os.open(Path(tmp) / "probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            started = time.perf_counter()
            for _ in range(rounds):
                done = os.write(fd, chunk)
                while done < chunk_bytes:
                    done += os.write(fd, chunk[done:])
                os.fdatasync(fd)
            seconds = time.perf_counter() - started
        finally:
            os.close(fd)
    return {"chunk_bytes": chunk_bytes, "mb_per_s": rounds * chunk_bytes / seconds / 1e6,
            "commits_per_s": rounds / seconds, "records_per_s": rounds * chunk_bytes / RECORD_BYTES / seconds}


def zmq_rate(messages: int, directory: Path) -> dict[str, Any]:
    """Raw pyzmq PUSH/PULL between two fresh processes over ipc://; messages/s at the receiver."""
    with tempfile.TemporaryDirectory(prefix="settle-bench-zmq-", dir=directory) as tmp:
        endpoint = f"ipc://{tmp}/push-pull.sock"
        puller = subprocess.Popen([sys.executable, "-m", "bench.limits", "--zmq-pull", endpoint, str(messages)],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert puller.stdout is not None
            ready = puller.stdout.readline()  # bound: the pusher may connect
            if not ready.startswith(b"ready"):
                raise RuntimeError(f"zmq puller did not start: {ready!r}")
            pusher = subprocess.Popen([sys.executable, "-m", "bench.limits", "--zmq-push", endpoint, str(messages)],
                                      stdin=subprocess.DEVNULL)
            out, _ = puller.communicate(timeout=600)
            pusher.wait(60)
        finally:
            for proc in (puller,):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    result: dict[str, Any] = json.loads(out)
    return result


def _zmq_pull(endpoint: str, messages: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 100_000)  # as a shard's
    sock.bind(endpoint)
    print("ready", flush=True)
    recv = sock.recv
    size = len(recv())
    started = time.perf_counter()
    cpu = time.process_time()
    for _ in range(messages - 1):
        recv(copy=True)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    sock.close(0)
    ctx.term()
    print(json.dumps({"messages": messages, "frame_bytes": size, "seconds": seconds,
                      "msgs_per_s": (messages - 1) / seconds, "receiver_cpu_us_per_msg": cpu / (messages - 1) * 1e6}))


def _zmq_push(endpoint: str, messages: int) -> None:
    frame = sample_frame()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100_000)  # as the router's
    sock.connect(endpoint)
    send = sock.send
    for _ in range(messages):
        send(frame, copy=False)
    sock.close(linger=-1)
    ctx.term()


def measure(directory: Path, *, quick: bool = False) -> dict[str, Any]:
    fsync_calls = 300 if quick else 3000
    out: dict[str, Any] = {
        "wal_dir": str(directory),
        "fdatasync_per_s": fsync_rate(directory, fsync_calls),
        "fsync_per_s": fsync_rate(directory, fsync_calls, data_only=False),
        "group_commit": [group_commit_bandwidth(directory, size, (16 if quick else 256) << 20)
                         for size in (64 << 10, 1 << 20)],
    }
    out["group_commit_mb_per_s"] = max(g["mb_per_s"] for g in out["group_commit"])
    zmq_result = zmq_rate(200_000 if quick else 2_000_000, directory)
    out["zmq"] = zmq_result
    out["zmq_push_pull_msgs_per_s"] = zmq_result["msgs_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="a directory on the WAL's disk")
    p.add_argument("--zmq-pull", nargs=2, metavar=("ENDPOINT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--zmq-push", nargs=2, metavar=("ENDPOINT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.zmq_pull:
        _zmq_pull(args.zmq_pull[0], int(args.zmq_pull[1]))
        return 0
    if args.zmq_push:
        _zmq_push(args.zmq_push[0], int(args.zmq_push[1]))
        return 0
    print(json.dumps(measure(Path(args.dir), quick=args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
