"""One shard: PULL trades for its symbols, write them to per-symbol WALs, settle them in the store.

Three stages run on one event loop, each bounded:

1. **intake** drains the PULL socket, drops duplicates, holds trades past a gap, and appends the rest to
   the WAL buffer;
2. **group commit** writes the buffered records and fdatasyncs each dirty WAL once, when
   ``batch_trades_max`` trades are buffered or ``fsync_wait_us_max`` has passed since the first one
   (0: as soon as intake has drained its queue);
3. **settle** hands fsynced trades to the store, in batches, and advances the watermarks; WAL segments
   the store already holds are deleted.

No store write for a trade happens before its WAL record is fsynced. While the store is down the WAL
keeps accepting up to ``pending_trades_max`` trades, then intake pauses and the router's queues fill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import zmq
import zmq.asyncio

from engine.core import metrics as metricsmod
from engine.core import security, wire
from engine.core.child import Lifeline, child_main, wait_event
from engine.core.config import Config
from engine.core.errors import (
    ReplayError,
    SettleError,
    WalError,
    WalInUse,
)
from engine.core.messages import Heartbeat, StreamMessage, Trade, stream_decoder
from engine.core.placement import shard_for
from engine.core.progress import Progress
from engine.core.quarantine import Quarantine
from engine.core.retry import Backoff
from engine.core.settlement import Settler
from engine.core.store import Store, open_store
from engine.core.store.base import Batch
from engine.core.wal import RecoveryReport, ShardWal
from shards.gaps import GapFiller
from shards.settling import RETRY_BACKOFF_S_MAX, SettleStage
from shards.state import Sequencer

STORE_BATCH_TRADES_MAX: Final = 20_000
# Positions are read ahead (Settler.read_ahead) only while fewer trades than this wait for the store: behind
# a longer backlog a trade waits for earlier batches longer than a read takes, and the fold reads the keys of
# a whole batch at once, in fewer requests than reads ahead of each group commit (flat out, reading ahead
# cost a tenth more CPU per trade).
READ_AHEAD_BACKLOG_MAX: Final = 2_000
# As plain ints: a flag enum's ``&`` runs in Python, and intake tests these for nearly every message below capacity.
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)


class _Readable:
    """Wakes intake when its ZeroMQ socket may hold a message, or when told to (a replay was delivered).

    A reader on the socket's descriptor, registered once, and per wait one future and one timer. Polling
    through pyzmq's asyncio futures cost a task, several futures and a reader registration per wait, and
    below capacity intake waits for nearly every message (at 2,500 trades/s on Cassandra the event loop
    used a seventh more CPU that way)."""

    __slots__ = ("_loop", "_socket", "_fd", "_waiter")

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self._loop = asyncio.get_running_loop()
        self._socket = socket
        self._fd = int(socket.getsockopt(zmq.FD))
        self._waiter: asyncio.Future[None] | None = None
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        # The descriptor only says that the socket's state may have changed, and stays readable until that
        # state is read: read here, or a busy intake (not waiting) would have the loop woken over and over.
        self._socket.getsockopt(_EVENTS)
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float) -> bool:
        """Whether a message is ready, after waiting up to ``timeout_s`` for one or for :meth:`wake`."""
        if int(self._socket.getsockopt(_EVENTS)) & _POLLIN:
            return True
        if timeout_s <= 0:
            return False
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, self.wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return bool(int(self._socket.getsockopt(_EVENTS)) & _POLLIN)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)


@dataclass(slots=True)
class _Writing:
    """A store batch being written by the settle loop."""

    trades: list[Trade]
    batch: Batch  # with its watermarks, which ``sent`` may have gone without
    carries_watermarks: bool
    started: float  # time.perf_counter()
    task: asyncio.Future[None]
RECOVERY_BATCH_TRADES: Final = 20_000
CHECKPOINT_INTERVAL_S: Final = 1.0
WAL_LOCK_WAIT_S: Final = 60.0
WAL_RETRY_S_FIRST: Final = 0.01
# The hot path allocates containers by the million, nearly all short-lived; at CPython's default
# thresholds (700, 10, 10) the cyclic collector took a third of a shard's CPU (bench/, py-spy).
# Reference cycles are rare here, so collect less often; start-up objects are frozen out of it.
GC_THRESHOLDS: Final = (50_000, 20, 100)

log = logging.getLogger("settle.shard")


class Shard(SettleStage):
    def __init__(self, config: Config, shard: int, lifeline: Lifeline | None = None) -> None:
        self.config = config
        self.shard = shard
        self.lifeline = lifeline or Lifeline(None)
        self.registry = metricsmod.new_registry(config.metrics.enabled)
        self.m = metricsmod.ShardMetrics(self.registry, shard, wal_dir=config.wal_path(shard),
                                         lag_budget_s=config.metrics.lag_budget_ms / 1000)
        self.sequencer = Sequencer(config.wal.gap_buffer_max)
        self.unsettled: deque[Trade] = deque()  # fsynced, in WAL order, not yet acknowledged by the store
        self._buffered: list[Trade] = []  # appended to the WAL buffer, not yet fsynced
        # (monotonic ns, count): the trades of ``_buffered`` accepted at that time, in order (settle_stage_seconds)
        self._buffered_runs: list[tuple[int, int]] = []
        # [trades, monotonic ns they became durable] per group commit, covering ``unsettled`` in order
        self._durable_runs: deque[list[int]] = deque()
        self._wal_lock = asyncio.Lock()  # the WAL's commit and checkpoint run on executor threads
        self._replayed: deque[list[Trade]] = deque()  # replies from the ME, accepted by intake
        self._replay_delivered = asyncio.Event()  # a replay came (start-up replay waits on it)
        self._input: _Readable | None = None  # intake's socket, waited on; a replay delivery wakes it too
        # symbol -> (first, last) sequence ranges that arrived by replay and are not settled yet: their trades
        # are also observed into settle_replay_lag_seconds (how long a lost trade took to reach the store)
        self._replay_ranges: dict[str, list[tuple[int, int]]] = {}
        self._settle_wakeup = asyncio.Event()
        self._intake_space = asyncio.Event()
        self._stopping = asyncio.Event()
        self._intake_done = asyncio.Event()
        self.wal: ShardWal | None = None
        self.store: Store | None = None
        self.settler: Settler | None = None
        # SQLite takes one write transaction at a time; Cassandra's latency is hidden by several.
        cassandra = config.store.kind == "cassandra" and not config.store.factory
        self._batches_in_flight = config.store.cassandra.batches_in_flight_max if cassandra else 1
        self.gaps: GapFiller | None = None
        self.recovery: RecoveryReport | None = None
        self.recovered_count = 0

    # ---------------------------------------------------------------- start-up and recovery

    async def start(self, *, repair_corruption: bool = False, progress: Progress | None = None) -> None:
        """Open the store and the WAL, re-settle every WAL record above the store's watermark."""
        cfg = self.config
        self.store = await self._retry("connect to the store", lambda: open_store(cfg.store, shard=self.shard))
        store = self.store
        self.m.track_store_requests(lambda: float(getattr(store, "requests_in_flight", 0)))
        self.settler = Settler(self.store, cfg.engine.fee_account)
        self.wal = await self._open_wal()
        report = self.wal.recover(repair_corruption=repair_corruption,
                                  progress=progress.update if progress else None)
        self.recovery = report
        for path, offset, dropped in report.torn_tails:
            log.warning("shard %d: torn WAL tail truncated: %s at byte %d (%d bytes dropped)",
                        self.shard, path, offset, dropped)
        store = self.store
        watermarks = await self._retry("read watermarks", store.watermarks)
        for symbol, seq in watermarks.items():
            st = self.sequencer.state(symbol)
            st.settled = st.accepted = seq
        recovered = await self._resettle_wal(watermarks, progress)
        for symbol in self.wal.symbols():
            st = self.sequencer.state(symbol)
            st.accepted = max(st.accepted, self.wal.last_seq(symbol))
        self._drop_foreign_symbols()
        for symbol, st in self.sequencer.symbols.items():
            if self.wal.last_seq(symbol) < st.settled:
                self.wal.start_after(symbol, st.settled)  # a lost or new WAL continues at the store's watermark
        await self._checkpoint()
        self._publish_watermarks()
        self.m.recovered.inc(recovered)
        self.recovered_count = recovered
        log.info("shard %d: recovered %d WAL records over %d segments, %d re-settled; ready",
                 self.shard, report.records, report.segments, recovered)

    async def _open_wal(self) -> ShardWal:
        """Take the WAL; a predecessor that is still draining holds its lock for a moment, so wait."""
        cfg = self.config
        deadline = time.monotonic() + WAL_LOCK_WAIT_S
        while True:
            try:
                return ShardWal(cfg.wal_path(self.shard), segment_bytes_max=cfg.wal.segment_bytes_max,
                                fsync=cfg.wal.fsync, shard=self.shard)
            except WalInUse:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _resettle_wal(self, watermarks: dict[str, int], progress: Progress | None = None) -> int:
        """Settle every WAL record above the store's watermark, in batches.

        Pipelined: while the store writes one batch (on its own thread, or the driver's), the next one is
        read from the WAL and prepared; batches still reach the store one after the other, in order.
        """
        assert self.wal is not None
        total = 0
        pending = sum(max(0, self.wal.last_seq(s) - watermarks.get(s, 0)) for s in self.wal.symbols())
        if progress is not None:
            progress.restart("re-settle", pending)
        writing: asyncio.Future[None] | None = None  # the previous batch's write
        writing_count = 0

        async def written() -> None:
            nonlocal writing, total
            if writing is not None:
                done, writing = writing, None
                await done
                total += writing_count
                if progress is not None:
                    progress.update(total, pending)

        async def settle(chunk: list[Trade]) -> None:
            nonlocal writing, writing_count
            batch = await self._prepare_batch(chunk)
            await written()
            writing, writing_count = asyncio.ensure_future(self._store_batch(chunk, batch)), len(chunk)

        try:
            for symbol in self.wal.symbols():
                chunk: list[Trade] = []
                for trade in self.wal.read_after(symbol, watermarks.get(symbol, 0)):
                    chunk.append(trade)
                    if len(chunk) >= RECOVERY_BATCH_TRADES:
                        await settle(chunk)
                        chunk = []
                if chunk:
                    await settle(chunk)
            await written()
        finally:
            if writing is not None:  # an error on the way: do not leave a write behind
                writing.cancel()
                await asyncio.gather(writing, return_exceptions=True)
        if progress is not None:
            progress.update(total, pending)
        return total

    async def catch_up_from_me(self, progress: Progress | None = None, idle_timeout_s: float = 30.0) -> int:
        """Offline (``recover --from-store``): replay from the ME everything past what we hold, settle it."""
        assert self.wal is not None
        gaps = self.gaps = GapFiller(self.config, self.shard, self.sequencer, self.m, self._deliver_replay)
        task = asyncio.create_task(gaps.run())
        total = 0
        last_progress = time.monotonic()
        try:
            while gaps.tail_wanted or self.sequencer.open_gaps() or self._replayed:
                await wait_event(self._replay_delivered, 0.05)
                self._replay_delivered.clear()
                while self._replayed:
                    replayed = self._replayed.popleft()
                    self._accept_batch(replayed, [None] * len(replayed))
                if self.wal.buffered:
                    total += self.wal.buffered
                    await self._group_commit()
                    chunk = list(self.unsettled)
                    self.unsettled.clear()
                    await self._settle_batch(chunk)
                    last_progress = time.monotonic()
                    if progress is not None:
                        if total == len(chunk):
                            progress.restart("replay from the ME", 0)
                        progress.update(total)
                elif time.monotonic() - last_progress > idle_timeout_s:
                    missing = ", ".join(sorted(gaps.tail_wanted | {st.symbol for st in self.sequencer.open_gaps()}))
                    raise ReplayError(f"shard {self.shard}: the ME at {self.config.me.replay} answered nothing for "
                                      f"{idle_timeout_s:.0f}s; still missing: {missing}")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return total

    def _drop_foreign_symbols(self) -> None:
        """Symbols this shard does not own under the current placement are not tracked (another shard is)."""
        count = self.config.shard_count
        for symbol in list(self.sequencer.symbols):
            if shard_for(symbol, count) != self.shard:
                del self.sequencer.symbols[symbol]

    # ---------------------------------------------------------------- the three stages

    async def run(self) -> None:
        await self.start()
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, wire.HWM_MESSAGES)
        sock.setsockopt(zmq.LINGER, 0)
        endpoint = self.config.shard_endpoint(self.shard)
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://"):]
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        # Over tcp:// the PULL is a CURVE server that accepts only security.allowed_clients (the router).
        guard = security.load_keyring(self.config, "shard").guard(
            ctx, sock, endpoint, f"shard-{self.shard}",
            on_reject=lambda name, reason: self.m.auth_rejected.labels(name, reason).inc())
        sock.bind(endpoint)
        self.gaps = GapFiller(self.config, self.shard, self.sequencer, self.m, self._deliver_replay)
        self.m.ready.set(1)
        self.lifeline.ready()
        tasks = [
            asyncio.create_task(self._intake(sock), name="intake"),
            asyncio.create_task(self._settle_loop(), name="settle"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self.gaps.run(), name="gaps"),
        ]
        try:
            await self._until_stopped_or_failed(tasks)
            await self._shutdown(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sock.close(0)
            if guard is not None:
                guard.close()
            await self.close()

    async def _until_stopped_or_failed(self, tasks: list[asyncio.Task[None]]) -> None:
        """Until :meth:`stop`; a stage that ends before it (a refused store write, a router of another wire
        version) stops the shard with its error instead of leaving the other stages running without it."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((stopping, *tasks), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        for task in tasks:
            if task.done() and not self._stopping.is_set():
                error = task.exception()
                raise error if error is not None else SettleError(f"shard {self.shard}: {task.get_name()} ended")

    def stop(self) -> None:
        self._stopping.set()
        self._intake_space.set()  # a paused intake wakes up to drain and stop

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        """Stop intake after draining what already arrived, fsync, flush to the store, close."""
        await asyncio.wait_for(self._intake_done.wait(), timeout=self.config.supervisor.drain_timeout_s)
        deadline = time.monotonic() + self.config.supervisor.drain_timeout_s
        while self.unsettled and time.monotonic() < deadline:
            self._settle_wakeup.set()
            await asyncio.sleep(0.01)
        if self.unsettled:
            log.warning("shard %d: %d fsynced trades not yet in the store at exit; the next start settles them",
                        self.shard, len(self.unsettled))

    async def _intake(self, sock: zmq.asyncio.Socket) -> None:
        assert self.wal is not None
        wal, cfg = self.wal, self.config.wal
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        self._input = _Readable(raw)
        decoder = wire.batch_decoder()
        frame_decoder = stream_decoder()
        quarantine = Quarantine(self.config.quarantine_path, f"shard-{self.shard}", self.m.quarantined)
        batch_max = cfg.batch_trades_max
        wait_s = cfg.fsync_wait_us_max / 1e6
        pending_max = cfg.pending_trades_max
        received = self.m.received
        # A group commit holds its first trade up to ``wait_s`` for others, unless the previous one ended a
        # whole window before that trade came: after a quiet spell nothing else is on its way, so it goes at
        # once. Under load every window is held, and the fsyncs stay as few as with a fixed window.
        first_at = committed_at = 0.0

        def window_start() -> float:
            now = time.monotonic()
            return now - wait_s if now - committed_at >= wait_s else now

        try:
            while True:
                stopping = self._stopping.is_set()
                if wal.buffered and (wal.buffered >= batch_max or time.monotonic() - first_at >= wait_s or stopping):
                    await self._group_commit()
                    committed_at = time.monotonic()
                while self._replayed:
                    replayed = self._replayed.popleft()
                    if replayed:
                        if not wal.buffered:
                            first_at = window_start()
                        self._replay_ranges.setdefault(replayed[0].symbol, []).append(
                            (replayed[0].seq, replayed[-1].seq))
                    self._accept_batch(replayed, [None] * len(replayed))
                if len(self.unsettled) + wal.buffered >= pending_max and not stopping:
                    self._intake_space.clear()
                    await self._intake_space.wait()
                    continue
                # In float ms: rounded down to whole ms, the last millisecond of every group-commit window
                # was spent polling with a timeout of 0, over and over, taking a core from the others.
                timeout_ms = 100.0 if not wal.buffered else max(0.0, (first_at + wait_s - time.monotonic()) * 1000)
                if stopping:
                    timeout_ms = 50.0  # drain what is already queued, then stop
                if not await self._wait_for_input(timeout_ms):
                    if stopping and not wal.buffered:
                        return
                    continue
                # At most batch_max frames before the loop looks up again: trades that do not reach the
                # WAL buffer (duplicates, trades held past a gap) must not let one turn take a whole backlog.
                taken = 0
                while taken < batch_max and wal.buffered < batch_max:
                    try:
                        data = raw.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    try:
                        batch = wire.decode_batch(data, decoder, frame_decoder)
                    except wire.WireError as e:
                        quarantine.put("malformed", str(e), data)
                        taken += 1
                        continue
                    for frame, reason in batch.rejected:
                        quarantine.put("malformed", reason, frame)
                    if not wal.buffered:
                        first_at = window_start()
                    received.inc(self._accept_batch(batch.messages, batch.frames))
                    taken += len(batch.messages) + len(batch.rejected)
        finally:
            quarantine.close()
            self._input.close()
            self._input = None
            self._intake_done.set()

    def _deliver_replay(self, trades: list[Trade]) -> None:
        """The gap filler's trades: intake takes them between group commits, woken now if it is idle."""
        self._replayed.append(trades)
        self._replay_delivered.set()
        if self._input is not None:
            self._input.wake()

    async def _wait_for_input(self, timeout_ms: float) -> bool:
        """Whether a frame is ready, after waiting up to ``timeout_ms`` for one or for a replay delivery."""
        assert self._input is not None
        if self._replayed:
            return False
        return await self._input.wait(timeout_ms / 1000)

    def _accept_batch(self, messages: Sequence[StreamMessage], frames: Sequence[bytes | None]) -> int:
        """Take the trades and heartbeats of a batch from the router (checked there) or of a replay, each with
        its bytes as the ME sent them (None: encoded again for the WAL); the trades among them."""
        assert self.wal is not None
        offer, append, buffered = self.sequencer.offer, self.wal.append, self._buffered
        now_ns = time.monotonic_ns()
        first = len(buffered)
        trades = 0
        for msg, frame in zip(messages, frames, strict=True):
            if type(msg) is Heartbeat:
                self._on_heartbeat(msg)
                continue
            trades += 1
            assert type(msg) is Trade
            ready = offer(msg, now_ns)
            if ready is None:
                self.m.duplicates.inc()
                continue
            if not ready and self.gaps is not None:
                self.gaps.wake()  # held past a gap: ask the ME now
            for t in ready:
                append(t, frame if t is msg else None)  # held trades come back without their frame: encoded again
                buffered.append(t)
        if len(buffered) > first:
            self._buffered_runs.append((now_ns, len(buffered) - first))
            self.m.stage["intake"].observe_since(time.time_ns(), [t.ts_ns for t in buffered[first:]])
        return trades

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        if shard_for(hb.symbol, self.config.shard_count) != self.shard:
            return
        st = self.sequencer.heartbeat(hb.symbol, hb.seq, time.monotonic_ns())
        if st.gap is not None and self.gaps is not None and not self.gaps.in_flight(hb.symbol):
            self.gaps.wake()

    async def _group_commit(self) -> None:
        """Write and fdatasync every dirty WAL, then hand the trades to the settle stage."""
        assert self.wal is not None
        wal = self.wal
        trades, self._buffered = self._buffered, []
        runs, self._buffered_runs = self._buffered_runs, []
        count = len(trades)
        assert count == wal.buffered, (count, wal.buffered)
        started = time.perf_counter()
        started_ns = time.monotonic_ns()
        commit_wait = self.m.stage["commit_wait"]
        for accepted_ns, accepted in runs:
            commit_wait.observe_many((started_ns - accepted_ns) / 1e9, accepted)
        if self.store is not None and self.store.read_ahead and self.settler is not None \
                and len(self.unsettled) < READ_AHEAD_BACKLOG_MAX:
            self.settler.read_ahead(trades)  # their positions, read while the WAL commits
        backoff = Backoff(WAL_RETRY_S_FIRST, RETRY_BACKOFF_S_MAX)
        while True:
            try:
                async with self._wal_lock:  # ShardWal is not thread-safe: commit and checkpoint never overlap
                    await asyncio.get_running_loop().run_in_executor(None, wal.commit)
                break
            except WalError as e:
                # A full disk or an I/O error: nothing was acknowledged; keep the records and retry.
                wait_s = backoff.next_s()
                log.error("shard %d: WAL commit failed, retrying in %.2fs: %s", self.shard, wait_s, e)
                await asyncio.sleep(wait_s)
        took = time.perf_counter() - started
        self.m.fsync.observe(took)
        self.m.stage["fsync"].observe_many(took, count)
        self.m.group_commit.observe(count)
        self.unsettled.extend(trades)
        self._durable_runs.append([count, time.monotonic_ns()])
        self.m.wal_pending.set(len(self.unsettled))
        self._settle_wakeup.set()

    async def _settle_loop(self) -> None:
        """Hand the durable trades to the store in batches, up to ``batches_in_flight`` of them at once.

        Batches are prepared in WAL order, so each one's positions already hold every earlier batch's
        trades, and a position write carries its trade's sequence: the store keeps the newest whichever
        write lands last. Only the watermarks need order, and they move over the written prefix only: a
        batch sent while none is in flight carries its own; the others go without, and once every batch
        before them is in the store one watermark write covers them. A crash with batches in flight loses
        nothing: the WAL re-settles everything past the watermarks, and rows already in are idempotent.
        """
        inflight: deque[_Writing] = deque()
        dispatched = 0  # trades at the front of ``unsettled`` that are in a batch of ``inflight``
        while True:
            while dispatched < len(self.unsettled) and len(inflight) < self._batches_in_flight:
                n = min(len(self.unsettled) - dispatched, STORE_BATCH_TRADES_MAX)
                chunk = list(itertools.islice(self.unsettled, dispatched, dispatched + n))  # no deque[i]: O(i)
                self._observe_store_wait(n)
                batch = await self._prepare_batch(chunk)
                carries_watermarks = not inflight
                sent = batch if carries_watermarks else Batch(batch.trades, batch.positions, {})
                writing = asyncio.ensure_future(self._retry("write a batch", functools.partial(self._write, sent)))
                inflight.append(_Writing(chunk, batch, carries_watermarks, time.perf_counter(), writing))
                dispatched += n
                self.m.store_inflight.set(len(inflight))
            if not inflight:
                await self._settle_wakeup.wait()
                self._settle_wakeup.clear()
                continue
            oldest = inflight[0].task
            if len(inflight) < self._batches_in_flight:  # a free slot: new trades may go out meanwhile
                self._settle_wakeup.clear()
                woken = asyncio.ensure_future(self._settle_wakeup.wait())
                try:
                    await asyncio.wait((oldest, woken), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
            else:
                await asyncio.wait((oldest,))
            written: list[_Writing] = []
            while inflight and inflight[0].task.done():
                inflight[0].task.result()  # a refused batch stops the shard, as a refused write always did
                written.append(inflight.popleft())
            if not written:
                continue
            marks: dict[str, int] = {}
            for w in written:
                if not w.carries_watermarks:
                    marks.update(w.batch.watermarks)  # later batches' sequences are higher
            if marks:
                await self._retry("write watermarks", functools.partial(self._advance_watermarks, marks))
            for w in written:
                self._batch_settled(w.trades, w.batch, w.started)
                for _ in range(len(w.trades)):
                    self.unsettled.popleft()
                dispatched -= len(w.trades)
            self.m.store_inflight.set(len(inflight))
            self.m.wal_pending.set(len(self.unsettled))
            self._intake_space.set()

    async def _advance_watermarks(self, marks: dict[str, int]) -> None:
        assert self.store is not None
        await self.store.advance_watermarks(marks)

    async def _settle_batch(self, trades: list[Trade]) -> None:
        """Settle trades that are already durable in the WAL; retries until the store has them."""
        self._observe_store_wait(len(trades))
        batch = await self._prepare_batch(trades)
        await self._store_batch(trades, batch)

    def _observe_store_wait(self, count: int) -> None:
        """The wait since the oldest ``count`` trades of ``unsettled`` became durable, per trade."""
        runs, now_ns = self._durable_runs, time.monotonic_ns()
        store_wait = self.m.stage["store_wait"]
        while count and runs:
            run = runs[0]
            taken = min(count, run[0])
            store_wait.observe_many((now_ns - run[1]) / 1e9, taken)
            count -= taken
            run[0] -= taken
            if not run[0]:
                runs.popleft()

    def _settled(self, trades: list[Trade], now_ns: int) -> None:
        if self._replay_ranges:
            self._observe_replayed(trades, now_ns)

    def _observe_replayed(self, trades: list[Trade], now_ns: int) -> None:
        """The lag of the trades of ``trades`` that came by replay; forget the ranges now settled."""
        ranges = self._replay_ranges
        lag = self.m.replay_lag
        for trade in trades:
            spans = ranges.get(trade.symbol)
            if spans and any(first <= trade.seq <= last for first, last in spans):
                lag.observe(max(0, now_ns - trade.ts_ns) / 1e9)
        for symbol in [sym for sym in ranges if sym in self.sequencer.symbols]:
            settled = self.sequencer.symbols[symbol].settled
            kept = [(first, last) for first, last in ranges[symbol] if last > settled]
            if kept:
                ranges[symbol] = kept
            else:
                del ranges[symbol]

    async def _housekeeping(self) -> None:
        """Every CHECKPOINT_INTERVAL_S: the heartbeat, a checkpoint, the watermark gauges. A checkpoint waits
        for the store (its sync retries while the store is down) in a task of its own: the heartbeat goes on,
        or the supervisor would kill the shard as hung whenever the store is away."""
        assert self.wal is not None
        checkpoint: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_INTERVAL_S)
                self.lifeline.beat()
                if checkpoint is not None and checkpoint.done():
                    checkpoint.result()  # a refused sync stops the shard, as a refused write does
                    checkpoint = None
                if checkpoint is None:
                    checkpoint = asyncio.ensure_future(self._checkpoint())
                self._publish_watermarks()
        finally:
            if checkpoint is not None:
                checkpoint.cancel()

    async def _checkpoint(self) -> None:
        """Delete the WAL segments the store holds, once the store has made them durable: its commits are
        visible at once but survive a power cut only after ``sync`` (the embedded store's SQLite)."""
        assert self.wal is not None
        assert self.store is not None
        wal, store = self.wal, self.store
        settled = {s: st.settled for s, st in self.sequencer.symbols.items()}  # before the sync: all written
        await self._retry("make the store durable", store.sync)
        async with self._wal_lock:
            await asyncio.get_running_loop().run_in_executor(None, wal.checkpoint, settled)

    def _publish_watermarks(self) -> None:
        assert self.wal is not None
        shard = str(self.shard)
        for symbol, st in self.sequencer.symbols.items():
            self.m.watermark.labels(shard, symbol).set(st.settled)
            self.m.me_latest.labels(shard, symbol).set(max(st.me_latest, st.settled))
        stats = self.wal.stats()
        self.m.wal_bytes.set(sum(s.bytes for s in stats.values()))
        self.m.wal_segments.set(sum(s.segments for s in stats.values()))
        gaps = self.sequencer.open_gaps()
        now_ns = time.monotonic_ns()
        self.m.gaps_open.set(len(gaps))
        self.m.gap_oldest.set(max(((now_ns - st.gap_since_ns) / 1e9 for st in gaps if st.gap_since_ns), default=0.0))
        self.m.gap_held.set(self.sequencer.held_total)

    async def close(self) -> None:
        if self.gaps is not None:
            self.gaps.close()
        if self.settler is not None:
            self.settler.forget()  # and its reads ahead
        if self.store is not None:
            await self.store.close()
        if self.wal is not None:
            self.wal.close()


def tune_gc() -> None:
    """For a process that settles: collect cycles less often (:data:`GC_THRESHOLDS`), freeze what exists."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    def start(config: Config, args: argparse.Namespace, lifeline: Lifeline) -> Shard:
        tune_gc()
        return Shard(config, args.shard, lifeline)

    return child_main(argv, "settle shard process (started by the supervisor)", "shard", start,
                      lambda config, args: config.metrics.shard_port_base + args.shard, shard=True)
