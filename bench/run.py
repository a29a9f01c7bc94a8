"""``settle bench`` (``python -m bench``): every scenario side by side in one run; a table, JSON, PNG charts.

Scenarios (``--only`` picks some; each one's failure is recorded and the run goes on):

``limits``      fdatasync/s and group-commit bandwidth on the WAL's disk; raw pyzmq PUSH/PULL msgs/s
``baseline``    the design note's design (:mod:`bench.baseline`) on each store
``throughput``  settle with 1, 2 and N shards on each store, and with store writes discarded (``null``)
``demo``        ``settle demo``'s set-up (simulator generating live, flat out), 1 and 2 shards, and one
                fsync per trade (``wal.batch_trades_max = 1``) against group commit
``cassandra``   the store's write path against the raw driver's ceiling for the same rows; LOGGED
                against the default; Cassandra's start-up time
``sustained``   the highest rate each store holds for 5 minutes (30%, 45%, 60% and 75% of its burst rate,
                lowest first, until one fails: the lag's p99 in the last minute above the second's)
``latency``     ME timestamp to store commit, p50/p99/p99.9 and the stages, at 50% and 90% of the
                sustained rate (of the burst rate when ``sustained`` did not run)
``recovery``    re-settling 1M pending WAL records; a SIGKILLed shard settling again under load
``replay``      lost trades (``settle sim --drop``): their time to settlement by replay, busy and quiet
                symbols, two heartbeat intervals; a fresh engine catching up 500k trades by replay
``memory``      RSS of every process over a long run (10M trades)
``others``      ``bench.metrics_cost`` and ``bench.kafka_vs_zmq``, when present (full runs only)

Results: ``OUT/bench.json`` (written after every scenario, so a failed run keeps what it measured),
``OUT/throughput.png``, ``OUT/latency.png``, ``OUT/latency-vs-rate.png``, ``OUT/memory.png``; with
``--doc FILE`` the tables also go into FILE's generated section (:mod:`bench.report`). Nothing here
asserts a speed: each target is evaluated and reported as met or missed. The exit code is non-zero only
when a scenario failed or a run's result did not verify.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS, clean_json, disk_of, machine, table

SCENARIOS = ("limits", "baseline", "throughput", "demo", "cassandra", "sustained", "latency", "recovery", "replay",
             "memory", "others")
STORES = ("embedded", "cassandra")


@dataclass(frozen=True)
class Sizes:
    throughput_trades: int
    cassandra_trades: int
    shard_counts: tuple[int, ...]
    baseline_trades: dict[str, int]
    demo_trades: int
    fsync_per_trade_trades: int
    store_write_trades: int
    store_write_concurrencies: tuple[int, ...]
    latency_s: float
    recovery_records: dict[str, int]
    kill_s: float
    sustained_fractions: tuple[float, ...]  # of the burst rate, tried lowest first until one does not hold
    sustained_minutes: int
    sustained_minute_s: float  # the sampling period ("minute"): 60 s, shorter in a quick run
    memory_trades: int
    memory_interval_s: float


FULL = Sizes(
    throughput_trades=400_000, cassandra_trades=100_000, shard_counts=(1, 2, 4),
    baseline_trades={"embedded": 5_000, "cassandra": 1_000}, demo_trades=200_000, fsync_per_trade_trades=5_000,
    store_write_trades=40_000, store_write_concurrencies=(32, 128, 512), latency_s=30.0,
    recovery_records={"embedded": 1_000_000, "cassandra": 100_000}, kill_s=30.0,
    memory_trades=10_000_000, memory_interval_s=5.0,
    sustained_fractions=(0.3, 0.45, 0.6, 0.75), sustained_minutes=5, sustained_minute_s=60.0,
)
QUICK = Sizes(
    throughput_trades=20_000, cassandra_trades=5_000, shard_counts=(2,),
    baseline_trades={"embedded": 300, "cassandra": 100}, demo_trades=10_000, fsync_per_trade_trades=500,
    store_write_trades=4_000, store_write_concurrencies=(64,), latency_s=3.0,
    recovery_records={"embedded": 20_000, "cassandra": 5_000}, kill_s=6.0,
    memory_trades=40_000, memory_interval_s=0.5,
    sustained_fractions=(0.3,), sustained_minutes=2, sustained_minute_s=3.0,
)
LATENCY_FRACTIONS = (0.5, 0.9)
MEMORY_RATE_FRACTION = 0.6
KILL_RATE_FRACTION = 0.5


class Run:
    """One ``settle bench`` run: its options, its results so far, and where they go."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.stores = list(STORES) if args.store == "both" else [args.store]
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir())
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.cassandra: Any = None
        self.results: dict[str, Any] = {
            "command": "settle bench " + " ".join(args.argv),
            "quick": args.quick,
            "stores": self.stores,
            "machine": {**machine(), "wal_disk": disk_of(self.work_dir)},
            "errors": {},
        }
        self.failed = False

    # -- plumbing ---------------------------------------------------------------------------------------

    def save(self) -> Path:
        path = self.out / "bench.json"
        path.write_text(json.dumps(clean_json(self.results), indent=2, allow_nan=False, default=str) + "\n")
        return path

    def scenario(self, name: str, fn: Callable[[], None]) -> None:
        if name not in self.args.only:
            return
        print(f"\n=== {name}", flush=True)
        started = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one scenario's failure must not lose the others
            self.failed = True
            self.results["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.results.setdefault("scenario_seconds", {})[name] = time.monotonic() - started
        self.save()

    def cassandra_target(self) -> Any:
        from bench.settlerun import CassandraTarget

        if self.args.cassandra_port:
            return CassandraTarget("127.0.0.1", self.args.cassandra_port)
        if self.cassandra is None:
            from bench.cassandra import Cassandra

            data_dir = Path(tempfile.mkdtemp(prefix="settle-bench-cassandra-", dir=self.work_dir))
            self.cassandra = Cassandra(data_dir / "node").start()
            self.results.setdefault("cassandra", {})["start_s"] = self.cassandra.start_s
            print(f"cassandra: ready on port {self.cassandra.port} in {self.cassandra.start_s:.1f}s")
        return self.cassandra.target

    def target_for(self, store: str) -> Any:
        return self.cassandra_target() if store == "cassandra" else None

    def verified(self, ok: bool | None, what: str) -> None:
        if ok is False:
            self.failed = True
            self.results["errors"][what] = "verification failed: the checker found the store wrong"

    def close(self) -> None:
        if self.cassandra is not None:
            data_dir = self.cassandra.data_dir
            self.cassandra.stop()
            import shutil

            shutil.rmtree(data_dir.parent, ignore_errors=True)

    # -- scenarios --------------------------------------------------------------------------------------

    def limits(self) -> None:
        from bench.limits import measure

        self.results["limits"] = measure(self.work_dir, quick=self.args.quick)
        lim = self.results["limits"]
        print(f"fdatasync {lim['fdatasync_per_s']:,.0f}/s, fsync {lim['fsync_per_s']:,.0f}/s, group commit "
              f"{lim['group_commit_mb_per_s']:,.0f} MB/s, "
              f"pyzmq PUSH/PULL {lim['zmq_push_pull_msgs_per_s']:,.0f} msgs/s")

    def baseline(self) -> None:
        from bench.settlerun import run_baseline

        runs = self.results.setdefault("baseline", {"runs": []})["runs"]
        for store in self.stores:
            run = run_baseline(f"baseline-{store}", trades=self.sizes.baseline_trades[store], store=store,
                               cassandra=self.target_for(store), work_dir=self.work_dir)
            runs.append(run.row())
            self.verified(run.verified, f"baseline-{store}")
            print(table([run.row()], ["run", "trades", "seconds", "trades_per_s", "cpu_us_per_trade", "verified"]))
            self.save()

    def throughput(self) -> None:
        from bench.settlerun import run_settle

        runs = self.results.setdefault("throughput", {"runs": []})["runs"]
        plan = [(store, n) for store in self.stores for n in self.sizes.shard_counts]
        plan += [("null", n) for n in self.sizes.shard_counts]
        for store, shards in plan:
            trades = self.sizes.cassandra_trades if store == "cassandra" else self.sizes.throughput_trades
            name = f"{store}-{shards}-shard{'s' if shards > 1 else ''}"
            run = run_settle(name, trades=trades, shards=shards, store=store, cassandra=self.target_for(store),
                             work_dir=self.work_dir)
            runs.append(run.row())
            self.verified(run.verified, name)
            print(table([run.row()], ["run", "trades", "seconds", "trades_per_s", "cpu_us_per_trade", "verified"]))
            self.save()

    def demo(self) -> None:
        from bench.settlerun import run_settle

        section = self.results.setdefault("demo", {"runs": []})
        for store in self.stores:
            trades = self.sizes.demo_trades if store == "embedded" else self.sizes.cassandra_trades
            counts = (1, 2) if store == "embedded" and not self.args.quick else (2,)
            for shards in counts:
                name = f"demo-{store}-{shards}-shard{'s' if shards > 1 else ''}"
                run = run_settle(name, trades=trades, shards=shards, store=store, publisher="sim",
                                 cassandra=self.target_for(store), work_dir=self.work_dir)
                section["runs"].append(run.row())
                self.verified(run.verified, name)
                print(table([run.row()], ["run", "trades", "seconds", "trades_per_s", "verified"]))
                self.save()
        from bench.pipeline import wal_alone

        rates = wal_alone(2_000 if self.args.quick else 20_000)
        section["wal_alone_records_per_s"] = {"fsync_per_record": rates[1], "group_commit_4096": rates[4096]}
        section["wal_alone_group_commit_ratio"] = rates[4096] / rates[1]
        print(f"WAL alone: {rates[1]:,.0f} records/s with an fsync per record, {rates[4096]:,.0f} with group "
              f"commits of 4096: {rates[4096] / rates[1]:,.1f}x")
        if "embedded" in self.stores:
            run = run_settle("demo-embedded-2-shards-fsync-per-trade", trades=self.sizes.fsync_per_trade_trades,
                             shards=2, publisher="sim", overrides={"wal.batch_trades_max": 1}, work_dir=self.work_dir)
            section["runs"].append(run.row())
            self.verified(run.verified, run.name)
            group = next(r for r in section["runs"] if r["run"] == "demo-embedded-2-shards")
            section["group_commit_vs_fsync_per_trade"] = group["trades_per_s"] / run.trades_per_s
            print(table([run.row()], ["run", "trades", "seconds", "trades_per_s", "verified"]))
            print(f"group commit / one fsync per trade: {section['group_commit_vs_fsync_per_trade']:,.1f}x")

    def cassandra_store(self) -> None:
        import uvloop

        from bench.store_write import compare

        if "cassandra" not in self.stores:
            print("skipped: --store does not include cassandra")
            return
        target = self.cassandra_target()
        result = uvloop.run(compare(target.host, target.port, trades=self.sizes.store_write_trades,
                                    concurrencies=self.sizes.store_write_concurrencies))
        self.results.setdefault("cassandra", {}).update(result)
        print(table(result["modes"], ["mode", "seconds", "rows_per_s", "trades_per_s"]))
        print(f"settle / raw ceiling (same rows): {result['settle_vs_raw']:.2f}; "
              f"LOGGED / default: {result.get('logged_vs_default', math.nan):.2f}")

    def max_rate(self, store: str) -> float:
        """The rate the latency, kill and memory runs are a fraction of: the sustained capacity on ``store``
        when measured, else the burst rate (:meth:`burst_rate`)."""
        sustained = self.results.get("sustained", {}).get("capacity", {}).get(store, {}).get("sustained_trades_per_s")
        return float(sustained) if sustained else self.burst_rate(store)

    def burst_rate(self, store: str) -> float:
        """Settle on ``store`` with the live simulator and the default shard count; else the best flat-out
        figure; else ``--max-rate``."""
        demo = [r for r in self.results.get("demo", {}).get("runs", [])
                if r["store"] == store and r["publisher"] == "sim" and r["shards"] == 2 and "fsync" not in r["run"]]
        if demo:
            return float(demo[0]["trades_per_s"])
        runs = [r["trades_per_s"] for r in self.results.get("throughput", {}).get("runs", []) if r["store"] == store]
        if runs:
            return float(max(runs))
        if self.args.max_rate:
            return float(self.args.max_rate)
        raise RuntimeError(f"no maximum rate measured for the {store} store yet: run `demo` or `throughput` "
                           "first, or pass --max-rate")

    def sustained(self) -> None:
        from bench.sustained import run_rate

        section = self.results.setdefault("sustained", {"runs": [], "capacity": {}})
        for store in self.stores:
            burst = self.burst_rate(store)
            held = None
            for fraction in self.sizes.sustained_fractions:
                r = run_rate(max(100.0, burst * fraction), minutes=self.sizes.sustained_minutes, store=store,
                             cassandra=self.target_for(store), minute_s=self.sizes.sustained_minute_s,
                             work_dir=self.work_dir)
                r["fraction_of_burst"] = fraction
                section["runs"].append(r)
                self.verified(r["verified"], f"sustained-{store}-{r['rate']:.0f}")
                self.save()
                if not r["holds"]:
                    break
                held = r["rate"]
            section["capacity"][store] = {"burst_trades_per_s": burst, "sustained_trades_per_s": held}
            print(f"sustained capacity ({store}): {held or 'none of the rates tried'} trades/s "
                  f"(burst {burst:,.0f})", flush=True)
            self.save()

    def latency(self) -> None:
        from bench.latency import run_latency

        runs = self.results.setdefault("latency", {"runs": []})["runs"]
        for store in self.stores:
            top = self.max_rate(store)
            for fraction in LATENCY_FRACTIONS:
                rate = max(100.0, top * fraction)
                r = run_latency(f"latency-{store}-{int(fraction * 100)}", rate=rate, seconds=self.sizes.latency_s,
                                shards=2, store=store, cassandra=self.target_for(store), work_dir=self.work_dir)
                r["fraction"] = fraction
                r["max_rate"] = top
                runs.append(r)
                self.verified(r["verified"], r["name"])
                print(table([r], ["name", "rate", "trades", "settled_per_s", "p50_ms", "p99_ms", "p999_ms",
                                  "share_le_25ms"]))
                self.save()

    def recovery(self) -> None:
        from bench.recovery import kill_shard, resettle

        section = self.results.setdefault("recovery", {"resettle": [], "kill": []})
        for store in self.stores:
            r = resettle(self.sizes.recovery_records[store], store=store, cassandra=self.target_for(store),
                         work_dir=self.work_dir)
            section["resettle"].append(r)
            self.verified(r["complete"], f"recovery-{store}")
            print(table([r], ["store", "records", "scan_s", "start_s", "records_per_s", "complete"]))
            self.save()
        for store in self.stores:
            rate = max(200.0, self.max_rate(store) * KILL_RATE_FRACTION)
            k = kill_shard(rate=rate, seconds=self.sizes.kill_s, store=store, cassandra=self.target_for(store),
                           work_dir=self.work_dir)
            section["kill"].append(k)
            self.verified(k["verified"], f"kill-shard-{store}")
            print(table([k], ["store", "rate", "ready_again_s", "settling_again_s", "verified"]))
            self.save()

    def replay(self) -> None:
        from bench.replay import run_all

        store = "embedded" if "embedded" in self.stores else self.stores[0]
        r = run_all(quick=self.args.quick, store=store, cassandra=self.target_for(store), work_dir=self.work_dir)
        self.results["replay"] = r
        for run in r["lost"]:
            self.verified(run["verified"], run["name"])
        self.verified(r["catch_up"]["verified"], "replay-catch-up")

    def memory(self) -> None:
        from bench.memory import run_memory

        store = "embedded" if "embedded" in self.stores else self.stores[0]
        rate = max(500.0, self.max_rate(store) * MEMORY_RATE_FRACTION)
        r = run_memory(trades=self.sizes.memory_trades, rate=rate, interval_s=self.sizes.memory_interval_s,
                       shards=2, store=store, cassandra=self.target_for(store), work_dir=self.work_dir)
        self.results["memory"] = r
        self.verified(r["verified"], "memory")
        rows = [{"process": slot, **{k: v for k, v in p.items() if k != "series"}}
                for slot, p in r["processes"].items()]
        print(table(rows, ["process", "rss_mib_start", "rss_mib_early", "rss_mib_late", "rss_mib_max", "growth"]))

    def others(self) -> None:
        if self.args.quick:
            print("skipped in --quick runs")
            return
        section = self.results.setdefault("others", {})
        here = Path(__file__).resolve().parent
        for module in ("metrics_cost", "kafka_vs_zmq"):
            if not (here / f"{module}.py").exists():
                continue
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", f"bench.{module}"], capture_output=True, text=True,
                                  check=False, timeout=7200)
            print(done.stdout[-3000:])
            entry: dict[str, Any] = {"exit_code": done.returncode, "seconds": time.monotonic() - started}
            produced = RESULTS / f"{module}.json"
            if produced.exists():
                entry["result"] = json.loads(produced.read_text())
            if done.returncode != 0:
                self.failed = True
                self.results["errors"][module] = done.stderr[-2000:]
            section[module] = entry

    # -- the verdict ------------------------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        r = self.results
        out: list[dict[str, Any]] = []

        def add(name: str, value: float | None, goal: str, met: bool | None, detail: str) -> None:
            out.append({"target": name, "value": value, "goal": goal, "met": met, "detail": detail})

        for store in self.stores:
            base = [x for x in r.get("baseline", {}).get("runs", []) if x["store"] == store]
            best = [x for x in r.get("throughput", {}).get("runs", []) if x["store"] == store]
            if base and best:
                top = max(best, key=lambda x: x["trades_per_s"])
                ratio = top["trades_per_s"] / base[0]["trades_per_s"]
                add(f"throughput vs design note ({store})", ratio, ">= 20x", ratio >= 20,
                    f"{top['trades_per_s']:,.0f} trades/s ({top['shards']} shards) vs {base[0]['trades_per_s']:,.1f}")
        zmq = r.get("limits", {}).get("zmq_push_pull_msgs_per_s")
        null = [x for x in r.get("throughput", {}).get("runs", []) if x["store"] == "null"]
        if zmq and null:
            top = max(null, key=lambda x: x["trades_per_s"])
            ratio = top["trades_per_s"] / zmq
            add("router + WAL path vs raw pyzmq", ratio, ">= 0.5", ratio >= 0.5,
                f"{top['trades_per_s']:,.0f} trades/s ({top['shards']} shards, store writes discarded) "
                f"vs {zmq:,.0f} msgs/s")
        cass = r.get("cassandra", {})
        if cass.get("raw_ceiling_rows_per_s"):
            ratio = cass["settle_vs_raw"]
            add("settle on Cassandra vs raw driver (same rows, store path)", ratio, ">= 0.6", ratio >= 0.6,
                f"settle stage (prepare + write) {ratio * cass['raw_ceiling_rows_per_s']:,.0f} rows/s vs raw "
                f"{cass['raw_ceiling_rows_per_s']:,.0f} rows/s ({cass['raw_best_mode']})")
            pipe = [x for x in r.get("throughput", {}).get("runs", []) if x["store"] == "cassandra"]
            if pipe:
                top = max(pipe, key=lambda x: x["trades_per_s"])
                ratio = top["trades_per_s"] / cass["raw_ceiling_trades_per_s"]
                add("settle on Cassandra vs raw driver (whole pipeline)", ratio, ">= 0.6", ratio >= 0.6,
                    f"{top['trades_per_s']:,.0f} trades/s end to end ({top['shards']} shards) vs the raw "
                    f"ceiling's {cass['raw_ceiling_trades_per_s']:,.0f} trades/s "
                    f"({cass['rows_per_trade']:.2f} rows a trade)")
        for lat in r.get("latency", {}).get("runs", []):
            if lat["fraction"] == 0.5 and lat.get("count"):
                add(f"p99 latency at 50% of max ({lat['store']})", lat["p99_ms"], "<= 25 ms", lat["p99_ms"] <= 25,
                    f"{lat['rate']:,.0f} trades/s; p50 {lat['p50_ms']:.1f} ms, p99.9 {lat['p999_ms']:.1f} ms, "
                    f"{lat['share_le_25ms']:.1%} within 25 ms")
        for rec in r.get("recovery", {}).get("resettle", []):
            detail = f"{rec['records']:,} records in {rec['start_s']:.1f}s"
            if rec["store"] == "cassandra" and cass.get("raw_ceiling_trades_per_s"):
                detail += (f"; the raw driver's ceiling for these rows is {cass['raw_ceiling_trades_per_s']:,.0f} "
                           f"trades/s ({rec['records_per_s'] / cass['raw_ceiling_trades_per_s']:.0%} of it)")
            add(f"recovery, re-settle pending WAL ({rec['store']})", rec["records_per_s"], ">= 100k records/s",
                rec["records_per_s"] >= 100_000, detail)
        mem = r.get("memory", {})
        if mem.get("max_growth") is not None:
            add("RSS growth over the long run", mem["max_growth"], "< 10%", mem["max_growth"] < 0.10,
                f"{mem['trades']:,} trades at {mem['rate']:,.0f}/s, worst engine process")
        return out

    def report(self) -> None:
        targets = self.targets()
        self.results["targets"] = targets
        rows = [{**t, "met": {True: "yes", False: "NO", None: "-"}[t["met"]]} for t in targets]
        print("\n=== targets")
        if rows:
            print(table(rows, ["target", "value", "goal", "met"]))
            for t in targets:
                print(f"  {t['target']}: {t['detail']}")
        summary = self.summary_rows()
        self.results["summary"] = summary
        print("\n=== summary")
        print(table(summary, ["scenario", "store", "shards", "trades_per_s", "cpu_us_per_trade", "verified"]))
        if self.results["errors"]:
            print("\nerrors:", json.dumps(self.results["errors"], indent=2))

    def summary_rows(self) -> list[dict[str, Any]]:
        return [{"scenario": x["run"], "store": x["store"], "shards": x["shards"], "trades_per_s": x["trades_per_s"],
                 "cpu_us_per_trade": x["cpu_us_per_trade"], "verified": x["verified"]}
                for section in ("baseline", "throughput", "demo")
                for x in self.results.get(section, {}).get("runs", [])]

    def charts(self) -> None:
        try:
            from bench.charts import draw

            files = draw(self.results, self.out)
        except ImportError as e:
            self.results["charts"] = f"not drawn: {e} (pip install matplotlib)"
            print(self.results["charts"])
            return
        self.results["charts"] = [f.name for f in files]
        for f in files:
            print(f"wrote {f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="settle bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small runs (under 2 minutes on the embedded store)")
    p.add_argument("--store", choices=["embedded", "cassandra", "both"], default="both",
                   help="which stores to run on (default both; cassandra starts a real server via ops/cassandra)")
    p.add_argument("--out", default=str(RESULTS), help="where bench.json and the charts go (default %(default)s)")
    p.add_argument("--work-dir", help="data directories (WALs, stores) go here: put it on the WAL disk you "
                   "want measured (default: the system's temporary directory)")
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), metavar="SCENARIO",
                   help=f"run only these scenarios ({', '.join(SCENARIOS)})")
    p.add_argument("--cassandra-port", type=int, help="use the Cassandra already listening on 127.0.0.1:PORT")
    p.add_argument("--doc", help="also rewrite the generated section of this Markdown file (docs/performance.md) "
                   "with this run's tables and links to its charts")
    p.add_argument("--max-rate", type=float, help="trades/s the latency, kill and memory runs take fractions "
                   "of, when neither `demo` nor `throughput` runs")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    run = Run(args)
    started = time.monotonic()
    print(f"settle bench: {'quick' if args.quick else 'full'} run on {', '.join(run.stores)}; WAL disk "
          f"{run.results['machine']['wal_disk']}; results in {run.out}", flush=True)
    try:
        run.scenario("limits", run.limits)
        run.scenario("baseline", run.baseline)
        run.scenario("throughput", run.throughput)
        run.scenario("demo", run.demo)
        run.scenario("cassandra", run.cassandra_store)
        run.scenario("sustained", run.sustained)
        run.scenario("latency", run.latency)
        run.scenario("recovery", run.recovery)
        run.scenario("replay", run.replay)
        run.scenario("memory", run.memory)
        run.scenario("others", run.others)
    finally:
        run.close()
        run.results["seconds"] = time.monotonic() - started
        run.report()
        run.charts()
        path = run.save()
        print(f"wrote {path}")
        if args.doc:
            from bench.report import update_doc

            update_doc(Path(args.doc), json.loads(path.read_text()), run.out)
            print(f"updated {args.doc}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
