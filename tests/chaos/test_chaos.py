"""Chaos: the invariant checker proven able to fail on a real store, and a bounded ``settle chaos`` run.

1. A small real system settles a few thousand trades on the embedded store; then the SQLite file is
   tampered with directly (one trade missing, one applied twice, one balance off by one minor unit) and
   the checker must report each, attributed to exactly the rows and amounts that were changed.
2. ``settle chaos`` on real Cassandra: a few minutes, at least 20 faults of every kind, at least 100k
   trades; it must exit 0 (its own checker passed) and its report must show what was injected. Power loss
   under the WALs needs FUSE: in CI (``CI`` set) the test fails at once when FUSE is missing, and names every
   kind so the runner refuses to leave one out; elsewhere the run says it left power loss out.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import pytest

from engine.core.errors import EXIT_USAGE
from engine.core.messages import Trade
from engine.core.store.embedded import EmbeddedStore, shard_file, store_files
from engine.sim.melog import read_all
from engine.verify import chaos, chaos_cluster, chaos_faults, lazyfs
from engine.verify.checker import CheckReport, check
from engine.verify.testbed import System
from tests.servers.cassandra import CassandraServer

FEE_ACCOUNT = 0
CHAOS_SEED = 20251125
CHAOS_RUN_TIMEOUT_S = 900  # a hang guard only: the run is ~4 minutes


# -- 1. the checker on a real, tampered store ---------------------------------------------------------


def effect(trade: Trade) -> dict[tuple[int, str], int]:
    """The trade's balance changes, from the documented arithmetic (engine/verify/checker.py's docstring)."""
    base, _, quote = trade.symbol.partition("-")
    n = trade.price * trade.qty // 10**trade.qty_scale
    out: defaultdict[tuple[int, str], int] = defaultdict(int)
    out[(trade.buyer, base)] += trade.qty
    out[(trade.buyer, quote)] -= n + trade.buyer_fee
    out[(trade.seller, base)] -= trade.qty
    out[(trade.seller, quote)] += n - trade.seller_fee
    if trade.buyer_fee + trade.seller_fee:
        out[(FEE_ACCOUNT, quote)] += trade.buyer_fee + trade.seller_fee
    return dict(out)


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> System:
    """4,000 trades settled by the real engine (2 shards) on the embedded store, stopped cleanly."""
    system = System(tmp_path_factory.mktemp("settled"), shards=2)
    try:
        system.start_engine()
        system.start_sim(4_000, rate=0)
        system.wait_settled()
    finally:
        system.stop()
    merge_into_one_file(system.config.store.path)
    return system


def merge_into_one_file(path: str) -> None:
    """Fold the store's shard files into ``path`` by the store's own rules (a ledger row once, each position's
    newest row, each symbol's largest watermark) and delete them: the tests below copy and edit one file."""
    files = store_files(path)
    assert files == [path, *(shard_file(path, shard) for shard in (0, 1))]  # the readers' file, one per shard
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for other in files[1:]:
            conn.execute("ATTACH ? AS other", (other,))
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO ledger SELECT * FROM other.ledger")
            conn.execute("INSERT INTO positions SELECT * FROM other.positions WHERE true ON CONFLICT "
                         "(account, asset, symbol) DO UPDATE SET amount = excluded.amount, last_seq = "
                         "excluded.last_seq WHERE excluded.last_seq > positions.last_seq")
            conn.execute("INSERT INTO watermarks SELECT * FROM other.watermarks WHERE true ON CONFLICT (symbol) "
                         "DO UPDATE SET seq = max(seq, excluded.seq)")
            conn.execute("COMMIT")
            conn.execute("DETACH other")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the file itself: copies are whole
    for other in files[1:]:
        for leftover in (other, other + "-wal", other + "-shm"):
            Path(leftover).unlink(missing_ok=True)
    assert store_files(path) == [path]


def copy_store(system: System, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.db"
    shutil.copy(system.config.store.path, path)
    return path


def run_check(system: System, db: Path) -> CheckReport:
    async def go() -> CheckReport:
        store = await EmbeddedStore.open(str(db))
        try:
            return await check(str(system.log_path), store, FEE_ACCOUNT)
        finally:
            await store.close()

    return asyncio.run(go())


def fold(db: Path, trade: Trade, sign: int) -> None:
    """Add ``sign`` times the trade's effect to its position rows, as a store that applied it would."""
    with sqlite3.connect(db) as conn:
        for (account, asset), change in effect(trade).items():
            cur = conn.execute("UPDATE positions SET amount = amount + ? WHERE account = ? AND asset = ? "
                               "AND symbol = ?", (sign * change, account, asset, trade.symbol))
            assert cur.rowcount == 1, (account, asset, trade.symbol)
    conn.close()


def pick(system: System) -> tuple[Trade, Trade, tuple[int, str, str]]:
    """A trade to lose, one of another quote asset to double, and a position row neither touches."""
    trades = list(read_all(str(system.log_path)))
    lost = trades[len(trades) // 3]
    doubled = next(t for t in trades[len(trades) // 2 :] if t.symbol.partition("-")[2] != lost.symbol.partition(
        "-")[2] and not set(effect(t)) & set(effect(lost)))
    touched = set(effect(lost)) | set(effect(doubled))
    with sqlite3.connect(system.config.store.path) as conn:
        rows = conn.execute("SELECT account, asset, symbol FROM positions ORDER BY account, asset, symbol")
        account, asset, symbol = next(r for r in rows if (r[0], r[1]) not in touched and r[0] != FEE_ACCOUNT)
    conn.close()
    return lost, doubled, (account, asset, symbol)


def lose(db: Path, trade: Trade) -> None:
    """The trade never reached the store: no ledger row, no effect on positions."""
    with sqlite3.connect(db) as conn:
        cur = conn.execute("DELETE FROM ledger WHERE symbol = ? AND seq = ?", (trade.symbol, trade.seq))
        assert cur.rowcount == 1
    conn.close()
    fold(db, trade, -1)


def add_one(db: Path, key: tuple[int, str, str]) -> None:
    with sqlite3.connect(db) as conn:
        cur = conn.execute("UPDATE positions SET amount = amount + 1 WHERE account = ? AND asset = ? AND symbol = ?",
                           key)
        assert cur.rowcount == 1
    conn.close()


def mismatches(report: CheckReport) -> dict[tuple[int, str], int]:
    """(account, asset) -> actual - expected, for every balance the checker says is wrong."""
    assert report.balance_mismatch_count == len(report.balance_mismatches)  # all listed (under 100)
    return {(account, asset): actual - want for account, asset, want, actual in report.balance_mismatches}


def test_the_untouched_store_passes(settled: System, tmp_path: Path) -> None:
    report = run_check(settled, copy_store(settled, tmp_path, "clean"))
    assert report.ok, report.format()
    assert report.published == report.settled == 4_000


def test_a_missing_trade_is_reported(settled: System, tmp_path: Path) -> None:
    lost, _, _ = pick(settled)
    db = copy_store(settled, tmp_path, "missing")
    lose(db, lost)
    report = run_check(settled, db)
    assert not report.ok
    assert report.missing == [(lost.symbol, lost.seq)]
    assert report.settled == 3_999
    assert mismatches(report) == {key: -change for key, change in effect(lost).items() if change}
    assert f"missing: {lost.symbol} seq {lost.seq} is in the ME log but not settled" in report.format()
    assert not report.conservation  # a whole trade's effect sums to zero per asset: only the balances say it


def test_a_trade_applied_twice_is_reported(settled: System, tmp_path: Path) -> None:
    # The ledger's key is (symbol, seq): a second apply cannot add a row, only its effect a second time.
    _, doubled, _ = pick(settled)
    db = copy_store(settled, tmp_path, "doubled")
    fold(db, doubled, +1)
    report = run_check(settled, db)
    assert not report.ok
    assert mismatches(report) == {key: change for key, change in effect(doubled).items() if change}
    assert report.missing_count == 0
    text = report.format()
    for (account, asset), change in effect(doubled).items():
        assert f"balance: account {account} {asset} is " in text
        assert f"({change:+d})" in text


def test_a_balance_off_by_one_minor_unit_is_reported(settled: System, tmp_path: Path) -> None:
    _, _, key = pick(settled)
    db = copy_store(settled, tmp_path, "plus_one")
    add_one(db, key)
    report = run_check(settled, db)
    assert not report.ok
    account, asset, _ = key
    assert mismatches(report) == {(account, asset): 1}
    assert report.conservation == {asset: 1}
    assert f"conservation: {asset} sums to 1 over all accounts, not 0" in report.format()


def test_all_three_at_once_are_each_reported(settled: System, tmp_path: Path) -> None:
    lost, doubled, key = pick(settled)
    db = copy_store(settled, tmp_path, "all")
    lose(db, lost)
    fold(db, doubled, +1)
    add_one(db, key)
    report = run_check(settled, db)
    expected: defaultdict[tuple[int, str], int] = defaultdict(int)
    for k, change in effect(lost).items():
        expected[k] -= change
    for k, change in effect(doubled).items():
        expected[k] += change
    expected[(key[0], key[1])] += 1
    assert report.missing == [(lost.symbol, lost.seq)]
    assert mismatches(report) == {k: v for k, v in expected.items() if v}
    assert report.conservation == {key[1]: 1}


# -- 2. a bounded chaos run on real Cassandra ---------------------------------------------------------


def test_the_schedule_is_a_pure_function_of_the_seed() -> None:
    def plan(seed: int) -> str:
        out = subprocess.run([sys.executable, "-m", "engine.verify.chaos", "--seed", str(seed), "--minutes", "20",
                              "--plan-only"], capture_output=True, text=True, timeout=60, check=True)
        return out.stdout

    first = plan(CHAOS_SEED)
    assert first == plan(CHAOS_SEED)
    assert first != plan(CHAOS_SEED + 1)
    faults = chaos_faults.plan(CHAOS_SEED, start_s=5, end_s=1195, shards=2)
    assert {f.kind for f in faults} == set(chaos_faults.KINDS)
    assert [f.describe() for f in faults] == [
        line.split("s  ", 1)[1] for line in first.splitlines() if line.startswith("  +")
    ]


def test_the_schedule_keeps_its_spacing() -> None:
    faults = chaos_faults.plan(CHAOS_SEED, start_s=5, end_s=1195, shards=2)
    assert len(faults) >= 190
    for slot in ("shard-0", "shard-1", "router"):
        kills = [f.at_s for f in faults if f.target == slot and f.kind in chaos_faults.ENGINE_KINDS]
        assert all(b - a >= chaos_faults.SLOT_KILL_GAP_S for a, b in zip(kills, kills[1:], strict=False))
        assert all(kills[i + 4] - kills[i] > 60 for i in range(len(kills) - 4)), slot  # crash-loop guard: 8/min
    floods = [f for f in faults if f.kind == chaos_faults.HOSTILE_FLOOD]
    router_kills = [f.at_s for f in faults if f.kind == chaos_faults.ROUTER_KILL or f.kind in
                    chaos_faults.WHOLE_ENGINE_KINDS]  # fmt: skip
    assert not [(f, t) for f in floods for t in router_kills if f.at_s - 3 <= t <= f.end_s + 8]
    whole = [f.at_s for f in faults if f.kind in chaos_faults.WHOLE_ENGINE_KINDS]
    assert all(b - a >= chaos_faults.SUPERVISOR_GAP_S for a, b in zip(whole, whole[1:], strict=False))
    cuts = [f for f in faults if f.kind == chaos_faults.POWER_LOSS]
    assert {chaos_faults.power_mode(f.param) for f in cuts} == set(lazyfs.MODES)


def test_power_loss_without_fuse_is_an_error_when_asked_for_and_left_out_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(lazyfs, "unavailable", lambda: "missing /dev/fuse")
    assert chaos.main(["--seed", "1", "--kinds", "shard_kill,power_loss"]) == chaos.EXIT_NO_FUSE == 2
    err = capsys.readouterr().err
    assert "power_loss needs a FUSE file system" in err
    assert "missing /dev/fuse" in err
    ran: list[tuple[str, ...]] = []

    def run(self: chaos.Chaos) -> int:
        ran.append(self.kinds)
        return 0

    monkeypatch.setattr(chaos.Chaos, "run", run)
    assert chaos.main(["--seed", "1"]) == 0
    assert ran == [tuple(k for k in chaos_faults.KINDS if k != chaos_faults.POWER_LOSS)]
    assert "power_loss left out, no FUSE file system can be mounted here (missing /dev/fuse)" in (
        capsys.readouterr().out)


def test_the_cluster_schedule_has_every_cluster_kind_and_one_of_each_down_at_a_time() -> None:
    faults = chaos_faults.plan(CHAOS_SEED, start_s=5, end_s=1195, shards=2, kinds=chaos_faults.CLUSTER_KINDS)
    assert {f.kind for f in faults} == set(chaos_faults.CLUSTER_KINDS)
    for kind in chaos_faults.CLUSTER_KINDS:  # RF 3 and min.insync.replicas 2 survive one replica down, not two
        episodes = sorted(chaos_faults.busy(f) for f in faults if f.kind == kind)
        assert len(episodes) >= 5, kind
        assert all(a[1] < b[0] for a, b in zip(episodes, episodes[1:], strict=False)), kind
    assert {f.target for f in faults if f.kind == chaos_faults.HOST_PARTITION} == {"host-a", "host-b"}
    assert {f.target for f in faults if f.kind == chaos_faults.CASSANDRA_NODE_KILL} == {"node-1", "node-2", "node-3"}


def test_the_cluster_run_counts_a_stall_for_the_faults_under_way_when_it_began() -> None:
    args = chaos.parser().parse_args(["--cluster", "--minutes", "1", "--trades", "100", "--rate", "1"])
    run = chaos_cluster.ClusterChaos(args, seed=1)
    assert run.total == 100
    run.samples = [(0.0, 0), (1.0, 10), (2.0, 10), (3.0, 10), (4.0, 20), (5.0, 20), (9.0, 20), (10.0, 100),
                   (30.0, 100)]  # stalls: 1-4 s and 4-10 s; none once all 100 are settled
    run.episodes = [chaos_cluster.Episode("broker_kill", 0.5, 2.0), chaos_cluster.Episode("host_partition", 3.5),
                    chaos_cluster.Episode("cassandra_node_kill", 11.0, 20.0)]
    assert run.longest_stalls() == {"broker_kill": 3.0, "host_partition": 6.0, "cassandra_node_kill": 0.0}


def test_the_cluster_mode_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from engine.verify import netns

    assert chaos.main(["--cluster", "--kinds", "shard_kill"]) == EXIT_USAGE
    assert "--cluster runs the fault kinds cassandra_node_kill, broker_kill, host_partition; not shard_kill" in (
        capsys.readouterr().err)
    assert chaos.main(["--cluster", "--shards", "3"]) == EXIT_USAGE
    assert "--shards, --store and --cassandra-dir are not for it" in capsys.readouterr().err
    monkeypatch.setattr(netns, "missing", lambda: "network namespaces need root")
    assert chaos.main(["--cluster", "--seed", "1"]) == chaos_cluster.EXIT_NO_CLUSTER == 4
    err = capsys.readouterr().err
    assert "settle chaos --cluster: cannot run here: the settle hosts are network namespaces and network " \
           "namespaces need root" in err


def test_orphans_of_a_run_are_found_by_their_config(tmp_path: Path) -> None:
    config = tmp_path / "run" / "config.json"
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "--config-json", str(config), "--shard", "1"]
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL) as proc:
        try:
            # Popen returns once the child has exec-ed: its command line is already the interpreter's.
            assert chaos_faults.engine_processes(tmp_path) == {proc.pid: (os.getpid(), "shard 1")}
            assert chaos_faults.engine_processes(tmp_path / "other") == {}
        finally:
            proc.kill()


@pytest.mark.chaos
@pytest.mark.xdist_group("cassandra")
def test_bounded_chaos_run_on_cassandra(tmp_path: Path, cassandra: CassandraServer) -> None:
    run_dir = tmp_path / "chaos"
    argv = [sys.executable, "-m", "engine.verify.chaos", "--seed", str(CHAOS_SEED), "--minutes", "2.5",
            "--trades", "100000", "--rate", "700", "--store", "cassandra", "--cassandra-dir",
            str(cassandra.data_dir), "--data-dir", str(run_dir)]
    no_fuse = lazyfs.unavailable()
    if os.environ.get("CI"):
        # CI runs every fault kind: power loss is never left out there. Named kinds make the runner refuse
        # to start without FUSE (exit 2) instead of leaving power_loss out.
        if no_fuse:
            pytest.fail(f"the bounded chaos run needs power loss under the WALs (LazyFS) and it cannot run here: "
                        f"{no_fuse}", pytrace=False)
        argv += ["--kinds", ",".join(chaos_faults.KINDS)]
    with open(tmp_path / "chaos.out", "w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(CHAOS_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # it stops everything it started, then exits
            code = proc.wait()
        out.seek(0)
        output = out.read()
    assert code == 0, output[-20_000:]
    report = json.loads((run_dir / "chaos-report.json").read_text())
    assert report["passed"], output[-20_000:]
    assert report["faults_total"] >= 20
    kinds = set(chaos_faults.KINDS)
    if no_fuse and not os.environ.get("CI"):  # outside CI the run says it left power loss out
        kinds.discard(chaos_faults.POWER_LOSS)
        assert "power_loss left out" in output
    assert set(report["faults"]) == kinds
    assert report["trades_published"] >= 100_000
    assert report["trades_settled"] == report["trades_published"]
    assert report["lost"] == report["duplicated"] == report["balance_mismatches"] == 0
    assert report["hostile_unaccounted"] == 0
    assert report["quarantined"] == sum(report["hostile_sent"].values()) > 0
    assert sum(report["power_cuts"].values()) == report["faults"].get(chaos_faults.POWER_LOSS, 0)
