"""Gap replay: how long a lost trade takes to be settled, and how fast a shard catches up by replay.

Lost trades (``lost_trades``): ``settle sim --drop F --timestamps wall`` logs every trade but does not
publish a fraction ``F`` of trades and heartbeats. A shard sees the gap when the symbol's next trade or
heartbeat arrives, asks the ME's replay endpoint at once for one range covering the symbol's holes and
settles it. Each shard observes ME execution time to store commit into
``settle_replay_lag_seconds`` for the trades that came by replay (and ``settle_lag_seconds`` for all of
them); both are read after every trade is settled. Two regimes:

- busy: every symbol trades many times a second, so the next trade reveals a loss at once;
- quiet: a symbol trades about once a second, so a lost trade (or a lost tail) is found by the next
  heartbeat: the heartbeat interval (``me.heartbeat_interval_ms``) is the time to beat.

Replay throughput (``catch_up``): the simulator writes ``N`` trades to its log with nobody subscribed,
then serves them; a fresh engine with an empty WAL and store learns the symbols' latest sequences from
the heartbeats and replays everything, ``REQUEST_TRADES_MAX`` trades a request, settling as it goes.
Measured from the engine being ready (a shard asks for nothing before) to the last trade settled.
``raw_replay_rate`` is the ceiling on the ME side: one client asking for the same ranges and only decoding
the replies.

``python -m bench.replay [--quick]`` runs both and writes ``bench-results/replay.json``; ``settle bench``
runs them as its ``replay`` scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq

from bench.common import RESULTS, clean_json, metric_sum, quantile, scrape, table
from bench.latency import lag_buckets
from bench.settlerun import Bench, CassandraTarget
from engine.core.messages import ReplayChunk, ReplayEnd, ReplayFailed, ReplayRequest, encoder, replay_reply_decoder
from engine.sim import melog
from shards.gaps import REQUEST_TRADES_MAX

REPLAY_LAG = "settle_replay_lag_seconds"
LAG = "settle_lag_seconds"
SIM_EXIT_TIMEOUT_S = 600.0
RAW_TIMEOUT_S = 30.0


def _quantiles_ms(buckets: dict[float, float]) -> dict[str, float]:
    return {"p50_ms": quantile(0.50, buckets) * 1e3, "p99_ms": quantile(0.99, buckets) * 1e3}


def lost_trades(name: str, *, rate: float, seconds: float, drop: float, heartbeat_ms: int, symbols: int = 16,
                store: str = "embedded", cassandra: CassandraTarget | None = None,
                work_dir: Path | None = None) -> dict[str, Any]:
    """Publish at ``rate`` for ``seconds`` with a fraction ``drop`` lost; the lag of the replayed trades."""
    trades = max(200, int(rate * seconds))
    with Bench(name, shards=2, store=store, cassandra=cassandra, work_dir=work_dir,
               overrides={"me.heartbeat_interval_ms": heartbeat_ms}) as bench:
        bench.start()
        assert bench.progress is not None
        bench.start_publisher("sim", trades, rate=rate, symbols=symbols, extra=["--drop", str(drop)])
        bench.progress.wait_for(trades)
        replay = lag_buckets(bench, REPLAY_LAG)
        every = lag_buckets(bench, LAG)
        replayed = sum(metric_sum(scrape(url), "settle_replayed_trades_total") for url in bench.shard_metrics_urls())
        sim = bench.system.stop_sim()
        bench.publisher = None
        verified = bench.verify().ok
    lost = sim.dropped if sim is not None else None
    replay_q = _quantiles_ms(replay)
    every_q = _quantiles_ms(every)
    return {
        "name": name, "store": store, "rate": rate, "trades": trades, "symbols": symbols,
        "per_symbol_per_s": rate / symbols, "drop": drop, "heartbeat_ms": heartbeat_ms,
        "lost": lost, "replayed": int(replayed), "replay_lag_count": int(max(replay.values(), default=0)),
        "replay_p50_ms": replay_q["p50_ms"], "replay_p99_ms": replay_q["p99_ms"],
        "all_p50_ms": every_q["p50_ms"], "all_p99_ms": every_q["p99_ms"],
        "replay_buckets": [[le, count] for le, count in sorted(replay.items())],
        "verified": verified,
    }


def raw_replay_rate(endpoint: str, latest: dict[str, int]) -> dict[str, Any]:
    """One client asks for every symbol's whole range, ``REQUEST_TRADES_MAX`` a request, one request in flight
    per symbol (as a shard does), and decodes the replies: trades/s the ME serves."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    decode = replay_reply_decoder().decode
    next_seq = dict.fromkeys(latest, 1)
    ids: dict[int, str] = {}
    received = 0
    request_id = 0

    def ask(symbol: str) -> None:
        nonlocal request_id
        first = next_seq[symbol]
        request_id += 1
        ids[request_id] = symbol
        last = min(latest[symbol], first + REQUEST_TRADES_MAX - 1)
        sock.send(encoder.encode(ReplayRequest(request_id, symbol, first, last)))

    started = time.perf_counter()
    try:
        for symbol in latest:
            ask(symbol)
        while ids:
            if not sock.poll(int(RAW_TIMEOUT_S * 1000)):
                raise RuntimeError(f"raw replay: the ME at {endpoint} answered nothing for {RAW_TIMEOUT_S:.0f}s")
            reply = decode(sock.recv(copy=False).bytes)
            if isinstance(reply, ReplayChunk):
                received += len(reply.trades)
            elif isinstance(reply, ReplayEnd):
                symbol = ids.pop(reply.request_id)
                next_seq[symbol] = reply.last_seq + 1
                if next_seq[symbol] <= latest[symbol]:
                    ask(symbol)
            elif isinstance(reply, ReplayFailed):
                raise RuntimeError(f"raw replay: {reply.code}: {reply.message}")
        seconds = time.perf_counter() - started
    finally:
        sock.close()
        ctx.term()
    return {"trades": received, "seconds": seconds, "trades_per_s": received / seconds}


def catch_up(name: str, *, trades: int, symbols: int = 16, store: str = "embedded",
             cassandra: CassandraTarget | None = None, work_dir: Path | None = None) -> dict[str, Any]:
    """A fresh engine replays ``trades`` the ME published while nobody listened; trades/s settled."""
    with Bench(name, shards=2, store=store, cassandra=cassandra, work_dir=work_dir) as bench:
        system = bench.system
        quiet = ["--wait-subscribers", "0", "--heartbeat-ms", "100"]
        system.start_sim(trades, symbols=symbols, extra=[*quiet, "--linger", "0"], log_name="sim-publish.log")
        assert system.sim is not None
        if system.sim.wait(SIM_EXIT_TIMEOUT_S) != 0:
            raise RuntimeError(f"{name}: the simulator exited with {system.sim.returncode}; see {bench.root}/logs")
        latest = Counter(t.symbol for t in melog.read_all(str(system.log_path)))
        if sum(latest.values()) != trades:
            raise RuntimeError(f"{name}: the ME log holds {sum(latest.values())} trades, not {trades}")
        # the same log, served: replay and heartbeats, nothing new published
        system.start_sim(trades, symbols=symbols, extra=quiet, log_name="sim-serve.log")
        bench.publisher = system.sim
        time.sleep(0.5)  # bound and serving
        raw = raw_replay_rate(system.config.me.replay, dict(latest))
        started = time.monotonic()
        bench.start()
        assert bench.progress is not None
        ready_at = time.monotonic()
        bench.progress.wait_for(trades)
        # a shard asks for nothing before it is ready: from the engine ready to the last trade settled (to
        # the progress reading that saw it, POLL_S apart) bounds the replay from above
        seconds = time.monotonic() - ready_at
        rate = trades / seconds
        replayed = sum(metric_sum(scrape(url), "settle_replayed_trades_total") for url in bench.shard_metrics_urls())
        verified = bench.verify().ok
    return {"name": name, "store": store, "trades": trades, "symbols": symbols, "replayed": int(replayed),
            "engine_ready_s": ready_at - started, "seconds": seconds, "trades_per_s": rate,
            "raw_me_replay_per_s": raw["trades_per_s"], "vs_raw": rate / raw["trades_per_s"], "verified": verified}


def run_all(*, quick: bool, store: str = "embedded", cassandra: CassandraTarget | None = None,
            work_dir: Path | None = None) -> dict[str, Any]:
    scale = 0.15 if quick else 1.0
    runs = []
    for regime, rate, seconds, drop, heartbeats in (
        ("busy", 2_000.0, 20.0, 0.01, (500,)),
        ("quiet", 16.0, 60.0, 0.05, (500, 100)),
    ):
        for heartbeat_ms in heartbeats:
            runs.append(lost_trades(f"lost-{regime}-hb{heartbeat_ms}", rate=rate, seconds=seconds * scale, drop=drop,
                                    heartbeat_ms=heartbeat_ms, store=store, cassandra=cassandra,
                                    work_dir=work_dir))
            print(table([runs[-1]], ["name", "per_symbol_per_s", "heartbeat_ms", "lost", "replay_lag_count",
                                     "replay_p50_ms", "replay_p99_ms", "all_p99_ms", "verified"]), flush=True)
    catch = catch_up("catch-up", trades=30_000 if quick else 500_000, store=store, cassandra=cassandra,
                     work_dir=work_dir)
    print(table([catch], ["name", "trades", "seconds", "trades_per_s", "raw_me_replay_per_s", "vs_raw",
                          "verified"]), flush=True)
    return {"request_trades_max": REQUEST_TRADES_MAX, "lost": runs,
            "catch_up": catch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs")
    p.add_argument("--out", default=str(RESULTS / "replay.json"))
    args = p.parse_args(argv)
    result = run_all(quick=args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(clean_json(result), indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    ok = result["catch_up"]["verified"] and all(r["verified"] for r in result["lost"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
