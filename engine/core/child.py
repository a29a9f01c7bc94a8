"""What every supervised child shares: one ``main`` (:func:`child_main`), and the lifeline.

The lifeline is a pipe to the supervisor: the child writes ``R`` once it is ready (after recovery) and
``.`` every second while its loop is alive. A silent child is hung; the supervisor kills and respawns it.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry

from engine.core import config as configmod
from engine.core import metrics as metricsmod
from engine.core.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_WAL_CORRUPT,
    ConfigError,
    SettleError,
    WalCorruption,
)


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
    """The child's config: the supervisor's validated JSON (or a TOML file), with ``--set`` overrides."""
    if args.config_json:
        raw = json.loads(Path(args.config_json).read_text())
        for override in args.set:
            configmod.set_dotted(raw, *configmod.parse_override(override))
        return configmod.from_dict(raw, args.config_json)
    return configmod.load(args.config, args.set)


class Child(Protocol):
    """A supervised process's work: ``run`` until done or stopped (a coroutine, or a blocking call)."""

    registry: CollectorRegistry

    def run(self) -> Awaitable[None] | None: ...

    def stop(self) -> None:
        """Begin the orderly stop: stop intake, drain, flush, close; ``run`` then returns."""


def child_main(
    argv: list[str] | None,
    description: str,
    kind: str,
    start: Callable[[configmod.Config, argparse.Namespace, Lifeline], Child],
    metrics_port: Callable[[configmod.Config, argparse.Namespace], int],
    *,
    shard: bool = False,
) -> int:
    """The ``main`` of every process the supervisor starts (a shard, a Kafka shard, the bridge, the router).

    Parses the arguments, loads the config, sets up logging, builds the child with ``start``, serves its
    metrics, runs it until it returns, and turns the way it ended into the exit code the supervisor acts on:
    a config error (at start-up or later: a key file that is not there) is ``EXIT_CONFIG``, which halts the
    engine instead of respawning into the same error; a WAL damaged in the middle is ``EXIT_WAL_CORRUPT``;
    any other settle error is ``EXIT_FAILURE`` (respawned). Each is reported on stderr as
    ``settle <kind> [<shard>]: ...``. The first SIGTERM (or SIGINT) calls the child's ``stop``; a second one
    exits at once with ``EXIT_FAILURE``.
    """
    args = child_args(description, argv, shard)
    name = f"{kind} {args.shard}" if shard else kind
    log = setup_logging(name.replace(" ", "-"))
    try:
        config = load_child_config(args)
        child = start(config, args, Lifeline(args.ready_fd))
        if config.metrics.enabled:
            # wait_for_port: a predecessor still draining may hold the port; never crash-loop over metrics
            metricsmod.serve(child.registry, config.metrics.host, metrics_port(config, args), wait_for_port=True)
        if inspect.iscoroutinefunction(child.run):
            loop = stoppable_loop(child.stop, new_loop=_fast_loop)
            try:
                running = child.run()
                assert running is not None
                loop.run_until_complete(running)
            finally:
                loop.close()
        else:
            _stop_on_signals(child.stop)
            child.run()
    except ConfigError as e:
        print(f"settle {name}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except WalCorruption as e:
        log.error("%s", e)
        print(f"settle {name}: {e}", file=sys.stderr)
        return EXIT_WAL_CORRUPT
    except SettleError as e:
        log.error("%s stopped: %s", name, e)
        print(f"settle {name}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("SETTLE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger(name)


def _fast_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop (the stdlib one where uvloop is missing)."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency; this only guards odd platforms
        return asyncio.new_event_loop()


def _on_stop_signal(stop: Callable[[], None]) -> Callable[[], None]:
    terms = 0

    def on_term() -> None:
        nonlocal terms
        terms += 1
        if terms > 1:
            os._exit(EXIT_FAILURE)
        stop()

    return on_term


def stoppable_loop(
    stop: Callable[[], None], new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
) -> asyncio.AbstractEventLoop:
    """A new event loop on which the first SIGTERM (or SIGINT) calls ``stop`` (drain, flush, close) and a
    second one exits at once: every child keeps what it acknowledged durable (a WAL, a Kafka commit, the
    ME's log), so an operator in a hurry loses nothing by it."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    on_term = _on_stop_signal(stop)
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    return loop


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """:func:`stoppable_loop`'s signal handling for a child that runs without an event loop."""
    on_term = _on_stop_signal(stop)
    signal.signal(signal.SIGTERM, lambda signum, frame: on_term())
    signal.signal(signal.SIGINT, lambda signum, frame: on_term())


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
