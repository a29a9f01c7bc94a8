"""A shard running in this process, on its own event loop thread, fed through a PUSH socket.

For unit tests that need the shard's real intake, group commit and settle stages but want to wrap or
read its parts directly (the WAL, the store, the metrics registry) instead of going through processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import zmq

from engine.core.config import Config
from shards.shard import Shard


@contextmanager
def running_shard(config: Config, data_dir: Path, *, batches_in_flight: int | None = None
                  ) -> Iterator[tuple[Shard, zmq.Socket[bytes]]]:
    """Start shard 0 of ``config``; yield it and a PUSH socket connected to its intake; stop it on exit.
    ``batches_in_flight`` overrides the store batches it writes at once (a store patched in for one)."""
    shard = Shard(config, 0)
    if batches_in_flight is not None:
        shard._batches_in_flight = batches_in_flight
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_until_complete, args=(shard.run(),))
    (data_dir / "run").mkdir(mode=0o700, exist_ok=True)
    runner.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(config.shard_endpoint(0))
    try:
        yield shard, push
    finally:
        loop.call_soon_threadsafe(shard.stop)
        runner.join(60)
        push.close()
        ctx.term()
        loop.close()


def wait_until(done: Callable[[], bool], timeout_s: float = 60.0, poll_s: float = 0.02) -> bool:
    """Poll ``done`` until it is true or ``timeout_s`` has passed; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
