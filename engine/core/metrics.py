"""Prometheus metrics. Each process builds the families it serves in its own registry.

Names follow Prometheus conventions: base units, ``_total`` for counters, ``_seconds`` and ``_bytes``.
Label cardinality is bounded: ``shard`` (one per process), ``symbol`` (the symbols a shard owns), ``slot``
(the supervisor's children) and small fixed sets of ``reason`` values. Every label combination that is
known up front is created at zero, so ``rate()`` and ``increase()`` see the first event and every
dashboard query has a series to show from the first scrape.

Events that happen once per trade (received, duplicate, settle lag, the router's fan-out) are counted by
:class:`HotCounter` and :class:`HotHistogram`: one writing thread (the process's event loop), no lock, read
by the scrape thread through a collector; about 5x cheaper than prometheus_client's locked values. The rest
use prometheus_client's families.

``new_registry(enabled=False)`` turns metrics off for real: the families become no-ops (nothing counted,
nothing observed, nothing served) with the same attributes and types, so call sites do not change.

What the shard publishes and where (``shards/shard.py``):

=====================================  =========================================================
``settle_trades_*_total``              intake and the settle stage
``settle_watermark_seq``               per symbol, the highest sequence the store holds
``settle_me_latest_seq``               per symbol, the ME's latest sequence (heartbeats, trades);
                                       lag in trades is ``settle_me_latest_seq - settle_watermark_seq``
``settle_lag_seconds``                 ME execution time to store commit, per trade
``settle_replay_lag_seconds``          the same, for the trades that came by replay (lost on the way)
``settle_stage_seconds``               the lag split by stage (:data:`STAGES`), per trade: where the time goes
``settle_wal_*``                       group commit, WAL size, the WAL disk (read at scrape time)
``settle_store_*``                     store batches: latency, size, in flight, errors
``settle_gap*``, ``settle_replay*``    gap detection and replay from the ME
=====================================  =========================================================
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_log = logging.getLogger("settle.metrics")

# Fine under 100 ms, where the latency targets sit (p50 of a few ms, p99 of 10 to 50 ms); 25 ms stays a bound
# because the "settled within 25 ms" share is read off it exactly.
LATENCY_BUCKETS_S = (0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015,
                     0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

# The reason labels known up front (created at zero). Others may appear (a signal's name, an ME error code).
ROUTER_QUARANTINE_REASONS: Final = ("oversize", "malformed", "unknown_kind", "invalid", "unsound")
SHARD_QUARANTINE_REASONS: Final = ("malformed", "unsound")
AUTH_REJECT_REASONS: Final = ("unknown_key", "no_curve", "bad_crypto", "protocol", "incomplete")  # security.py
REPLAY_REJECT_REASONS: Final = ("timeout", "unreachable", "malformed", "stale", "wrong_symbol", "hole")
# The stages of a trade's way from the ME to the store, in order; per trade, the stage times add up to its
# ``settle_lag_seconds``.
STAGES: Final = {
    "intake": "ME execution to the shard's intake (the ME's publishing, the router, the hop to the shard)",
    "commit_wait": "intake to the start of the WAL group commit holding the trade",
    "fsync": "the group commit: WAL write and fdatasync",
    "store_wait": "durable in the WAL to the start of the store batch holding the trade",
    "read": "the store batch's position reads and fold",
    "write": "the store batch's write, until the store acknowledged it",
}
RESTART_REASONS: Final = ("exit", "hung", "signal_SIGKILL", "signal_SIGSEGV", "signal_SIGABRT",
                          "signal_SIGTERM")


class _DisabledRegistry(CollectorRegistry):
    """Marks ``metrics.enabled = false``: families built on it are no-ops and nothing is registered."""


def new_registry(enabled: bool = True) -> CollectorRegistry:
    """The process's registry: process CPU, RSS and fds, the Python version, and the settle families."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` series: half the exposition, nothing a query here uses
    if not enabled:
        return _DisabledRegistry(auto_describe=False)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    PlatformCollector(registry=registry)
    return registry


def serve(registry: CollectorRegistry, host: str, port: int, *, wait_for_port: bool = False) -> None:
    """Serve ``/metrics`` on ``host:port`` (127.0.0.1 unless configured otherwise). Port 0 disables.

    ``wait_for_port``: while another process holds the port (a predecessor still draining after its
    supervisor died), serve from a background thread once it is free instead of failing: a child must not
    crash, and crash-loop the engine, over its metrics port.
    """
    if not port or isinstance(registry, _DisabledRegistry):
        return
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        if e.errno != errno.EADDRINUSE or not wait_for_port:
            raise
        _log.warning("metrics port %s:%d is in use (a predecessor still draining?); serving once it is free",
                     host, port)
        threading.Thread(target=_serve_when_free, args=(registry, host, port), name="metrics-bind",
                         daemon=True).start()


def _serve_when_free(registry: CollectorRegistry, host: str, port: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            _log.error("metrics on %s:%d: %s; not serving metrics", host, port, e)
            return
        _log.info("metrics served on %s:%d", host, port)
        return


# ------------------------------------------------------------------------------- no-op families


class _OffCounter(Counter):
    def labels(self, *labelvalues: object, **labelkwargs: object) -> _OffCounter:
        return self

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        pass


class _OffGauge(Gauge):
    def labels(self, *labelvalues: object, **labelkwargs: object) -> _OffGauge:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def set_function(self, f: Callable[[], float]) -> None:
        pass


class _OffHistogram(Histogram):
    def labels(self, *labelvalues: object, **labelkwargs: object) -> _OffHistogram:
        return self

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        pass


# ------------------------------------------------------------------------------- hot-path families


class HotCounter:
    """A counter for one writing thread (the process's event loop), for per-trade events.

    prometheus_client takes a lock on every ``inc``; this adds to a float (about 5x cheaper). The scrape
    thread only reads it. ``_value.get()`` reads like a prometheus_client child's, for tests.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def get(self) -> float:
        return self.value

    @property
    def _value(self) -> HotCounter:
        return self


class HotHistogram:
    """A histogram for one writing thread, for per-trade observations: a bisect and two additions, or, for the
    trades of a batch, a sort and a bisection per bucket (:meth:`observe_since`)."""

    __slots__ = ("bounds", "bounds_ns", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.bounds_ns = tuple(math.floor(bound * 1e9) for bound in bounds)  # a whole ns d fits bound iff d <= this
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def observe_many(self, amount: float, times: int) -> None:
        """``times`` observations of the same ``amount`` (the trades of one batch share a stage's time)."""
        self.counts[bisect_left(self.bounds, amount)] += times
        self.sum += amount * times

    def observe_since(self, now_ns: int, stamps_ns: list[int]) -> None:
        """One observation per stamp: the seconds from it to ``now_ns`` (0 for a stamp after ``now_ns``), as
        :meth:`observe` would make them. The stamps are sorted once, in C (a batch's come nearly in order), and
        each bucket takes the stamps between two bisections: per trade far less than a bisect of its own."""
        count = len(stamps_ns)
        if count <= len(self.bounds) // 2:  # a bisection per bucket costs more than a bisect per stamp
            for stamp in stamps_ns:
                self.observe(max(0, now_ns - stamp) / 1e9)
            return
        stamps = sorted(stamps_ns)
        counts = self.counts
        below = 0  # stamps in the buckets so far: those whose wait is at most the previous bound
        for i, bound_ns in enumerate(self.bounds_ns):
            within = count - bisect_left(stamps, now_ns - bound_ns)  # waits of at most this bound
            counts[i] += within - below
            below = within
        counts[-1] += count - below
        past = bisect_left(stamps, now_ns)  # the stamps before now_ns: the rest waited 0
        self.sum += (past * now_ns - sum(stamps[:past])) / 1e9


class _OffHotCounter(HotCounter):
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass


class _OffHotHistogram(HotHistogram):
    __slots__ = ()

    def observe(self, amount: float) -> None:
        pass

    def observe_many(self, amount: float, times: int) -> None:
        pass

    def observe_since(self, now_ns: int, stamps_ns: list[int]) -> None:
        pass


class HotCounterFamily:
    """Labelled :class:`HotCounter` children, created at first use (or up front, to start at zero)."""

    def __init__(self, name: str, doc: str, labelnames: Iterable[str], off: bool = False) -> None:
        self.name = name.removesuffix("_total")
        self.doc = doc
        self.labelnames = list(labelnames)
        self.children: dict[tuple[str, ...], HotCounter] = {}
        self._off = off

    def labels(self, *values: str) -> HotCounter:
        child = self.children.get(values)
        if child is None:
            assert len(values) == len(self.labelnames), (self.name, values)
            child = self.children[values] = _OffHotCounter() if self._off else HotCounter()
        return child


class _HotCollector(Collector):
    """Exposes the hot-path families of one registry at scrape time."""

    def __init__(self) -> None:
        self.counters: list[HotCounterFamily] = []
        self.histograms: list[tuple[str, str, list[str], list[str], HotHistogram]] = []

    def collect(self) -> Iterable[Metric]:
        for family in self.counters:
            counter = CounterMetricFamily(family.name, family.doc, labels=family.labelnames)
            for values, child in list(family.children.items()):
                counter.add_metric(list(values), child.value)
            yield counter
        families: dict[str, HistogramMetricFamily] = {}  # one family per name, one sample set per label set
        for name, doc, labelnames, labelvalues, hist in self.histograms:
            out = families.get(name)
            if out is None:
                out = families[name] = HistogramMetricFamily(name, doc, labels=labelnames)
            counts = list(hist.counts)  # one copy: buckets consistent with each other
            cumulative, buckets = 0, list[tuple[str, float]]()
            for bound, count in zip((*hist.bounds, math.inf), counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            out.add_metric(labelvalues, buckets, hist.sum)
        yield from families.values()


class Families:
    """Builds families on a registry, or no-op ones when the registry is disabled."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.off = isinstance(registry, _DisabledRegistry)
        self._hot: _HotCollector | None = None

    def _hot_collector(self) -> _HotCollector:
        if self._hot is None:
            self._hot = _HotCollector()
            self.collector(self._hot)
        return self._hot

    def hot_counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> HotCounterFamily:
        family = HotCounterFamily(name, doc, labels, off=self.off)
        self._hot_collector().counters.append(family)
        return family

    def hot_histogram(self, name: str, doc: str, labels: dict[str, str], buckets: Iterable[float]) -> HotHistogram:
        bounds = tuple(sorted(float(b) for b in buckets))
        hist = _OffHotHistogram(bounds) if self.off else HotHistogram(bounds)
        self._hot_collector().histograms.append((name, doc, list(labels), list(labels.values()), hist))
        return hist

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        if self.off:
            return _OffCounter(name, doc, labels, registry=None)
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
        if self.off:
            return _OffGauge(name, doc, labels, registry=None)
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(self, name: str, doc: str, labels: Iterable[str], buckets: Iterable[float]) -> Histogram:
        if self.off:
            return _OffHistogram(name, doc, labels, buckets=tuple(buckets), registry=None)
        return Histogram(name, doc, labels, buckets=tuple(buckets), registry=self.registry)

    def collector(self, collector: Collector) -> None:
        if not self.off:
            self.registry.register(collector)


class _WalDiskCollector(Collector):
    """``settle_wal_disk_free_bytes`` / ``_size_bytes`` of the WAL's filesystem, read at scrape time.

    Nothing on the hot path, and it keeps answering while the shard's loop is busy. A WAL directory that
    does not exist yet is measured at its nearest existing parent (the same filesystem in practice).
    """

    def __init__(self, shard: str, wal_dir: Path) -> None:
        self._shard = shard
        self._dir = wal_dir

    def collect(self) -> Iterable[Metric]:
        path = self._dir.absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            st = os.statvfs(path)
        except OSError:
            return
        free = GaugeMetricFamily("settle_wal_disk_free_bytes",
                                 "Bytes available to settle on the WAL's filesystem", labels=["shard"])
        free.add_metric([self._shard], st.f_bavail * st.f_frsize)
        size = GaugeMetricFamily("settle_wal_disk_size_bytes", "Size of the WAL's filesystem",
                                 labels=["shard"])
        size.add_metric([self._shard], st.f_blocks * st.f_frsize)
        yield free
        yield size


# ------------------------------------------------------------------------------- per process


class ShardMetrics:
    def __init__(self, registry: CollectorRegistry, shard: int, *, wal_dir: str | Path | None = None,
                 lag_budget_s: float = 0.025) -> None:
        s = str(shard)
        f = Families(registry)
        by_shard = ["shard"]

        def counter(name: str, doc: str) -> Counter:
            return f.counter(name, doc, by_shard).labels(s)

        def gauge(name: str, doc: str) -> Gauge:
            return f.gauge(name, doc, by_shard).labels(s)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> HotHistogram:
            # Observed on the event loop once per batch: below capacity, nearly once per trade.
            return f.hot_histogram(name, doc, {"shard": s}, buckets)

        # Per-trade events are counted by the hot-path families; the rest by prometheus_client's.
        self.received = f.hot_counter("settle_trades_received_total", "Trades received from the router",
                                      by_shard).labels(s)
        self.settled = counter("settle_trades_settled_total", "Trades the store acknowledged")
        self.duplicates = f.hot_counter("settle_trades_duplicate_total", "Trades at or below the accepted sequence",
                                        by_shard).labels(s)
        self.quarantined = f.counter("settle_quarantined_total", "Messages quarantined, by reason",
                                     ["process", "reason"])
        for reason in SHARD_QUARANTINE_REASONS:
            self.quarantined.labels(f"shard-{shard}", reason)
        self.watermark = f.gauge("settle_watermark_seq", "Highest sequence the store holds, per symbol",
                                 ["shard", "symbol"])
        self.me_latest = f.gauge("settle_me_latest_seq",
                                 "The ME's latest sequence per symbol, from heartbeats and trades",
                                 ["shard", "symbol"])
        self.settle_lag = f.hot_histogram("settle_lag_seconds", "ME execution time to store commit, per trade",
                                          {"shard": s}, LATENCY_BUCKETS_S)
        self.replay_lag = f.hot_histogram("settle_replay_lag_seconds",
                                          "ME execution time to store commit, for trades that came by replay",
                                          {"shard": s}, LATENCY_BUCKETS_S)
        self.stage = {stage: f.hot_histogram("settle_stage_seconds",
                                             "Per trade, the time spent in each stage from ME execution to "
                                             "store commit", {"shard": s, "stage": stage}, LATENCY_BUCKETS_S)
                      for stage in STAGES}
        # The alert SettleLagOverBudget compares the lag's p99 with this, so the budget is set in one place.
        gauge("settle_lag_budget_seconds", "metrics.lag_budget_ms: the settle lag p99 operators hold this shard to"
              ).set(lag_budget_s)
        self.fsync = histogram("settle_wal_fsync_seconds", "WAL group commit: write and fdatasync",
                               FSYNC_BUCKETS_S)
        self.group_commit = histogram("settle_wal_group_commit_trades", "Trades per WAL group commit",
                                      BATCH_BUCKETS)
        self.wal_bytes = gauge("settle_wal_bytes", "Bytes in WAL segments")
        self.wal_segments = gauge("settle_wal_segments", "WAL segment files")
        self.wal_pending = gauge("settle_wal_pending_trades",
                                 "Trades fsynced to the WAL, not yet in the store")
        self.store_write = histogram("settle_store_write_seconds", "Store batch write latency",
                                     LATENCY_BUCKETS_S)
        self.store_batch = histogram("settle_store_batch_trades", "Trades per store batch", BATCH_BUCKETS)
        self.store_inflight = gauge("settle_store_inflight_batches", "Store batches being written")
        self.store_requests = gauge("settle_store_inflight_requests",
                                    "Requests the store has in flight (Cassandra: statements)")
        self.store_errors = counter("settle_store_errors_total", "Failed store writes (retried)")
        self.gaps_open = gauge("settle_gaps_open", "Symbols with a sequence gap open")
        self.gap_oldest = gauge("settle_gap_oldest_open_seconds",
                                "How long the oldest open sequence gap has been open; 0 when none")
        self.gap_held = gauge("settle_gap_held_trades", "Trades held behind open gaps")
        self.replay_requests = counter("settle_replay_requests_total", "Replay requests sent to the ME")
        self.replayed = counter("settle_replayed_trades_total", "Trades received by replay")
        self.replay_rejected = f.counter("settle_replay_rejected_total", "Replay replies rejected, by reason",
                                         ["shard", "reason"])
        for reason in REPLAY_REJECT_REASONS:
            self.replay_rejected.labels(s, reason)
        self.auth_rejected = f.counter("settle_auth_rejected_total",
                                       "Handshakes refused on a CURVE server socket, by socket and reason",
                                       ["socket", "reason"])
        for reason in AUTH_REJECT_REASONS:
            self.auth_rejected.labels(f"shard-{shard}", reason)
        self.ready = gauge("settle_shard_ready", "1 once recovery is done and the shard takes trades")
        self.recovered = counter("settle_recovered_trades_total", "WAL records re-settled at start-up")
        if wal_dir is not None:
            f.collector(_WalDiskCollector(s, Path(wal_dir)))

    def track_store_requests(self, in_flight: Callable[[], float]) -> None:
        """Read the store's in-flight request count at scrape time (nothing on the write path)."""
        self.store_requests.set_function(in_flight)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        f = Families(registry)
        self.received = f.counter("settle_router_received_total", "Messages received from the ME")
        by_shard = ["shard"]
        self.forwarded = f.hot_counter("settle_router_forwarded_total", "Messages forwarded, per shard", by_shard)
        self.dropped = f.counter("settle_router_dropped_total",
                                 "Messages dropped because a shard's queue was full (replay refills)",
                                 by_shard)
        self.queue_depth = f.gauge("settle_router_queue_depth", "Messages waiting for a busy shard", by_shard)
        self.quarantined = f.counter("settle_quarantined_total", "Messages quarantined, by reason",
                                     ["process", "reason"])
        for reason in ROUTER_QUARANTINE_REASONS:
            self.quarantined.labels("router", reason)


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry, slots: Iterable[str] = ()) -> None:
        f = Families(registry)
        self.restarts = f.counter("settle_supervisor_restarts_total", "Child restarts, by slot and reason",
                                  ["slot", "reason"])
        self.up = f.gauge("settle_supervisor_child_up", "1 when the slot's process is running and ready",
                          ["slot"])
        self.init_slots(slots)

    def init_slots(self, slots: Iterable[str]) -> None:
        """Create each slot's series at zero, so the first restart shows in ``increase()``."""
        for slot in slots:
            self.up.labels(slot)
            for reason in RESTART_REASONS:
                self.restarts.labels(slot, reason)

