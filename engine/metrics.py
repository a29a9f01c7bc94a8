"""Prometheus metrics. Each process builds the families it serves in its own registry.

Names follow Prometheus conventions: base units, ``_total`` for counters, ``_seconds`` and ``_bytes``.
Label cardinality is bounded: ``shard`` (one per process), ``symbol`` (the symbols a shard owns) and
small fixed sets of ``reason`` values.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    PlatformCollector(registry=registry)
    return registry


def serve(registry: CollectorRegistry, host: str, port: int) -> None:
    """Serve ``/metrics`` on ``host:port`` (127.0.0.1 unless configured otherwise). Port 0 disables."""
    if port:
        start_http_server(port, addr=host, registry=registry)


class ShardMetrics:
    def __init__(self, registry: CollectorRegistry, shard: int) -> None:
        s = str(shard)
        labels = ["shard"]
        self.received = Counter("settle_trades_received_total", "Trades received from the router", labels,
                                registry=registry).labels(s)
        self.settled = Counter("settle_trades_settled_total", "Trades the store acknowledged", labels,
                               registry=registry).labels(s)
        self.duplicates = Counter("settle_trades_duplicate_total", "Trades at or below the accepted sequence",
                                  labels, registry=registry).labels(s)
        self.quarantined = Counter("settle_quarantined_total", "Messages quarantined, by reason",
                                   ["process", "reason"], registry=registry)
        self.watermark = Gauge("settle_watermark_seq", "Highest sequence the store holds, per symbol",
                               ["shard", "symbol"], registry=registry)
        self.me_latest = Gauge("settle_me_latest_seq", "The ME's latest sequence per symbol (heartbeats)",
                               ["shard", "symbol"], registry=registry)
        self.settle_lag = Histogram("settle_settle_lag_seconds", "ME execution time to store commit",
                                    labels, buckets=LATENCY_BUCKETS_S, registry=registry).labels(s)
        self.fsync = Histogram("settle_wal_fsync_seconds", "WAL group commit: write and fdatasync",
                               labels, buckets=FSYNC_BUCKETS_S, registry=registry).labels(s)
        self.group_commit = Histogram("settle_wal_group_commit_trades", "Trades per WAL group commit",
                                      labels, buckets=BATCH_BUCKETS, registry=registry).labels(s)
        self.wal_bytes = Gauge("settle_wal_bytes", "Bytes in WAL segments", labels, registry=registry).labels(s)
        self.wal_segments = Gauge("settle_wal_segments", "WAL segment files", labels,
                                  registry=registry).labels(s)
        self.wal_pending = Gauge("settle_wal_pending_trades", "Trades fsynced to the WAL, not yet in the store",
                                 labels, registry=registry).labels(s)
        self.store_write = Histogram("settle_store_write_seconds", "Store batch write latency", labels,
                                     buckets=LATENCY_BUCKETS_S, registry=registry).labels(s)
        self.store_batch = Histogram("settle_store_batch_trades", "Trades per store batch", labels,
                                     buckets=BATCH_BUCKETS, registry=registry).labels(s)
        self.store_inflight = Gauge("settle_store_inflight_batches", "Store batches being written", labels,
                                    registry=registry).labels(s)
        self.store_errors = Counter("settle_store_errors_total", "Failed store writes (retried)", labels,
                                    registry=registry).labels(s)
        self.gaps_open = Gauge("settle_gaps_open", "Symbols with a sequence gap open", labels,
                               registry=registry).labels(s)
        self.gap_held = Gauge("settle_gap_held_trades", "Trades held behind open gaps", labels,
                              registry=registry).labels(s)
        self.replay_requests = Counter("settle_replay_requests_total", "Replay requests sent to the ME",
                                       labels, registry=registry).labels(s)
        self.replayed = Counter("settle_replayed_trades_total", "Trades received by replay", labels,
                                registry=registry).labels(s)
        self.replay_rejected = Counter("settle_replay_rejected_total", "Replay replies rejected, by reason",
                                       ["shard", "reason"], registry=registry)
        self.ready = Gauge("settle_shard_ready", "1 once recovery is done and the shard takes trades", labels,
                           registry=registry).labels(s)
        self.recovered = Counter("settle_recovered_trades_total", "WAL records re-settled at start-up", labels,
                                 registry=registry).labels(s)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter("settle_router_received_total", "Messages received from the ME",
                                registry=registry)
        self.forwarded = Counter("settle_router_forwarded_total", "Messages forwarded, per shard", ["shard"],
                                 registry=registry)
        self.dropped = Counter("settle_router_dropped_total",
                               "Messages dropped because a shard's queue was full (replay refills)", ["shard"],
                               registry=registry)
        self.queue_depth = Gauge("settle_router_queue_depth", "Messages waiting for a busy shard", ["shard"],
                                 registry=registry)
        self.quarantined = Counter("settle_quarantined_total", "Messages quarantined, by reason",
                                   ["process", "reason"], registry=registry)


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts = Counter("settle_supervisor_restarts_total", "Child restarts, by slot and reason",
                                ["slot", "reason"], registry=registry)
        self.up = Gauge("settle_supervisor_child_up", "1 when the slot's process is running and ready", ["slot"],
                        registry=registry)
