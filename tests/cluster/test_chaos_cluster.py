"""A bounded ``settle chaos --cluster``: the Kafka mode on two settle hosts (network namespaces), three
brokers and a 3-node Cassandra with logins and TLS (RF 3, LOCAL_QUORUM), under a Cassandra node SIGKILL, a
SIGKILL of the partition leaders' broker and a settle host partitioned from the brokers, each at least
once. The run must exit 0 (its own checker found every trade settled once, every balance exact) and its
report must show every kind injected and nothing lost or doubled. When the namespaces or the servers
cannot be had here the test fails in CI (``tests.conftest.unavailable``), never passes as a skip.

Its cost: ~35 s to start the servers, 60 s of soak, the last restarts, the settling and the teardown: about 4
minutes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.verify import chaos_cluster, chaos_faults
from tests.cluster.conftest import require_netns
from tests.conftest import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.xdist_group("hosts")]

SEED = 20261206
TRADES = 12_000
RUN_TIMEOUT_S = 600  # a hang guard only


def test_bounded_chaos_run_on_the_cluster(tmp_path: Path) -> None:
    require_netns()
    run_dir = tmp_path / "chaos"
    argv = [sys.executable, "-m", "engine.verify.chaos", "--cluster", "--seed", str(SEED), "--minutes", "1",
            "--trades", str(TRADES), "--rate", "200", "--data-dir", str(run_dir)]
    with open(tmp_path / "chaos.out", "w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # it stops every server and deletes its namespaces, then exits
            code = proc.wait()
        out.seek(0)
        output = out.read()
    if code == chaos_cluster.EXIT_NO_CLUSTER:
        unavailable(f"settle chaos --cluster could not set up its cluster: {output[-3000:]}")
    assert code == 0, output[-20_000:]
    report = json.loads((run_dir / "settle" / "chaos-report.json").read_text())
    print(f"\n{output[output.rfind('settle chaos --cluster: PASSED'):].strip()}")
    assert report["passed"], output[-20_000:]
    assert set(report["faults"]) == set(chaos_faults.CLUSTER_KINDS)
    assert report["trades_published"] == TRADES
    assert report["trades_settled"] == report["trades_published"]
    assert report["lost"] == report["duplicated"] == report["balance_mismatches"] == 0
    assert report["order_errors"] == report["assets_not_conserved"] == 0
