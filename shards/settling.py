"""The store end of a shard, the same in both intake modes (ZMQ with a WAL, Kafka with offsets).

:class:`SettleStage` writes a prepared batch, retrying until the store has it, observes each trade's lag
(ME execution to store commit), then moves the symbols' watermarks. Only then is the batch settled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from engine.core.messages import Trade
from engine.core.metrics import ShardMetrics
from engine.core.retry import Backoff, retry
from engine.core.settlement import Settler
from engine.core.store import Store
from engine.core.store.base import Batch
from shards.state import Sequencer

RETRY_BACKOFF_S_MIN: Final = 0.05
RETRY_BACKOFF_S_MAX: Final = 2.0

log = logging.getLogger("settle.shard")

T = TypeVar("T")


class SettleStage:
    """Mixed into a shard, which provides ``shard``, ``m`` (its metrics), ``sequencer`` and ``store``."""

    shard: int
    m: ShardMetrics
    sequencer: Sequencer
    store: Store | None
    settler: Settler | None

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until it succeeds; retriable errors back off (:mod:`engine.core.retry`), others propagate."""

        def on_retry(error: Exception, wait_s: float) -> None:
            self.m.store_errors.inc()
            log.warning("shard %d: %s failed, retrying in %.2fs: %s", self.shard, what, wait_s, error)

        return await retry(op, Backoff(RETRY_BACKOFF_S_MIN, RETRY_BACKOFF_S_MAX), on_retry)

    async def _prepare_batch(self, trades: list[Trade]) -> Batch:
        """Fold ``trades`` into a store batch, reading the positions it touches first (retrying)."""
        settler = self.settler
        assert settler is not None
        started = time.perf_counter()
        batch = await self._retry("read positions", lambda: settler.prepare(trades))
        self.m.stage["read"].observe_many(time.perf_counter() - started, len(trades))
        return batch

    async def _write(self, batch: Batch) -> None:
        assert self.store is not None
        await self.store.write(batch)

    async def _store_batch(self, trades: list[Trade], batch: Batch) -> None:
        """Write a prepared batch (retrying until the store has it), then advance the watermarks."""
        started = time.perf_counter()
        self.m.store_inflight.set(1)
        await self._retry("write a batch", lambda: self._write(batch))
        self.m.store_inflight.set(0)
        self._batch_settled(trades, batch, started)

    def _batch_settled(self, trades: list[Trade], batch: Batch, started: float) -> None:
        """``batch`` (written from ``started``, ``time.perf_counter``) and its watermarks are in the store."""
        took = time.perf_counter() - started
        self.m.store_write.observe(took)
        self.m.stage["write"].observe_many(took, len(trades))
        self.m.store_batch.observe(len(trades))
        now_ns = time.time_ns()
        self.m.settle_lag.observe_since(now_ns, [trade.ts_ns for trade in trades])
        for symbol, seq in batch.watermarks.items():
            st = self.sequencer.state(symbol)
            st.settled = max(st.settled, seq)
            st.accepted = max(st.accepted, seq)
        self._settled(trades, now_ns)
        self.m.settled.inc(len(trades))

    def _settled(self, trades: list[Trade], now_ns: int) -> None:
        """Called once ``trades`` are in the store and the watermarks moved."""
