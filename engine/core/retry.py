"""The one retry policy: exponential backoff with full jitter, capped.

The n-th wait (counting from 0) is drawn uniformly from ``[first_s, min(max_s, first_s * 2**n)]``. Without
the jitter, every shard that lost the store at the same moment (a Cassandra restart) would retry in step and
hit the restarted node together, again and again; drawn at random, their retries spread over the window.
The floor of ``first_s`` keeps a retry from going out at once: where there is a driver (Cassandra, Kafka),
it has already re-sent at once to the other nodes, so waiting is the only thing a retry here adds.

Every waiting retry in settle uses :class:`Backoff`: the shard's store and WAL retries, the store's own
request retries, the Kafka bridge, replay requests, CURVE reconnects and the supervisor's respawns. Loops
that only retry until success use :func:`retry`.

Not tenacity: the loops here differ in what they retry (a whole call, only a batch's failed statements, a
respawn timed by the supervisor's poll loop, a reconnect from a socket's own thread), so most need the
delay alone, which is these few lines; tenacity would be a dependency for a decorator most callers cannot
use, and its ``wait_random_exponential`` starts from zero (a retry at once) and draws from the global
``random`` state, where a test wants one seeded generator per caller.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine.core.errors import SettleError

T = TypeVar("T")


class Backoff:
    """The waits between the attempts of one thing; :meth:`reset` once it succeeded."""

    def __init__(self, first_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError(f"backoff needs 0 < first_s <= max_s, got first_s={first_s}, max_s={max_s}")
        self.first_s = first_s
        self.max_s = max_s
        self._rng = rng  # made at the first wait: seeding from os.urandom is a syscall, and most never wait
        self._ceiling_s = first_s

    @property
    def ceiling_s(self) -> float:
        """The longest the next wait may be."""
        return self._ceiling_s

    def next_s(self) -> float:
        """The next wait, in seconds; each call doubles the ceiling of the following one, up to ``max_s``."""
        if self._rng is None:
            self._rng = random.Random()
        wait_s = self._rng.uniform(self.first_s, self._ceiling_s)
        self._ceiling_s = min(self.max_s, self._ceiling_s * 2)
        return wait_s

    def reset(self) -> None:
        self._ceiling_s = self.first_s


def retriable(error: BaseException) -> bool:
    """Whether ``error`` says a later attempt may succeed (see :mod:`engine.core.errors`)."""
    return isinstance(error, SettleError) and error.retriable


async def retry(
    op: Callable[[], Awaitable[T]],
    backoff: Backoff,
    on_retry: Callable[[Exception, float], None],
    is_retriable: Callable[[Exception], bool] = retriable,
) -> T:
    """``await op()`` until it succeeds. An error ``is_retriable`` rejects propagates at once; for any other,
    ``on_retry(error, wait_s)`` is called (to log and count it, or to give up by raising) before the wait."""
    while True:
        try:
            return await op()
        except Exception as e:
            if not is_retriable(e):
                raise
            wait_s = backoff.next_s()
            on_retry(e, wait_s)
        await asyncio.sleep(wait_s)
