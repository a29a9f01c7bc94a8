"""What every supervised child shares: loading the config the supervisor handed it, and the lifeline.

The lifeline is a pipe to the supervisor: the child writes ``R`` once it is ready (after recovery) and
``.`` every second while its loop is alive. A silent child is hung; the supervisor kills and respawns it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from engine.core import config as configmod
from engine.core.errors import EXIT_CONFIG, EXIT_FAILURE, ConfigError


class Lifeline:
    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, byte: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, byte)
        except (BrokenPipeError, BlockingIOError):
            pass  # the supervisor is gone or not reading; the child keeps settling

    def ready(self) -> None:
        self._send(b"R")

    def beat(self) -> None:
        self._send(b".")


def child_args(description: str, argv: list[str] | None, shard: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--config-json", help="validated config written by the supervisor")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    parser.add_argument("--ready-fd", type=int, help="lifeline pipe to the supervisor")
    if shard:
        parser.add_argument("--shard", type=int, required=True, help="shard slot (finds its own WAL)")
    return parser.parse_args(argv)


def load_child_config(args: argparse.Namespace) -> configmod.Config:
    """The child's config; a bad one exits with EXIT_CONFIG so the supervisor halts instead of looping."""
    try:
        if args.config_json:
            raw = json.loads(Path(args.config_json).read_text())
            for override in args.set:
                configmod.set_dotted(raw, *configmod.parse_override(override))
            return configmod.from_dict(raw, args.config_json)
        return configmod.load(args.config, args.set)
    except ConfigError as e:
        print(f"settle: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("SETTLE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger(name)


def stoppable_loop(stop: Callable[[], None]) -> asyncio.AbstractEventLoop:
    """A new event loop on which the first SIGTERM (or SIGINT) calls ``stop`` (drain, flush, close) and a
    second one exits at once: every child keeps what it acknowledged durable (a WAL, a Kafka commit, the
    ME's log), so an operator in a hurry loses nothing by it."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    terms = 0

    def on_term() -> None:
        nonlocal terms
        terms += 1
        if terms > 1:
            os._exit(EXIT_FAILURE)
        stop()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    return loop


T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on uvloop (the stdlib loop where uvloop is missing)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` has passed; whether it is set.

    Not ``asyncio.wait_for(event.wait(), ...)``: on Python 3.11 that swallows a cancellation arriving as the
    event is set, and a task stopped that way keeps running (a shard's shutdown would hang on it)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()
