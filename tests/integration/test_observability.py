"""Observability against the real thing: promtool on every process's exposition and on the alert rules, a
real Prometheus scraping the engine under load with the production scrape config and rules, every panel of
every dashboard and every alert's expression evaluated through its HTTP API, `settle top` on the running
engine, and a killed shard firing the stalled-shard alert.

Prometheus and promtool come from Debian's `prometheus` package (ops/install.sh). In CI (``CI`` set) a
missing tool or a Prometheus that does not start fails; locally the tests that need it are skipped.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from engine.core.metrics import STAGES
from engine.ops.top import Samples, Scrape, frame, top
from engine.verify.demo import free_port
from engine.verify.testbed import System
from tests import conftest

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("observability")]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "ops" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "settle.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "settle.rules.test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARDS = sorted((ROOT / "ops" / "grafana" / "dashboards").glob("*.json"))
SHARDS = 2
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval comes to with the test's 1s scrapes
TEST_FOR = "3s"  # every rule's `for:` in the test copy of the rules, so alerts fire within the test


def unavailable(what: str, error: object) -> NoReturn:
    conftest.unavailable(f"{what}: {error}")


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        unavailable(name, "not installed (Debian package `prometheus`; run ops/install.sh)")
    assert path is not None
    return path


def run(argv: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)


def http_get(url: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body: bytes = response.read()
        return body


# ---------------------------------------------------------------------------------------- promtool


def test_promtool_checks_and_tests_the_rules_and_the_scrape_config() -> None:
    promtool = tool("promtool")
    for argv in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)],
                 ["check", "config", str(SCRAPE_CONFIG)]):
        out = run([promtool, *argv])
        assert out.returncode == 0, (argv, out.stdout.decode() + out.stderr.decode())
        assert b"SUCCESS" in out.stdout


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M)


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    tests = RULE_TESTS.read_text()
    names = alert_names()
    assert len(names) >= 6
    for name in names:
        fires = re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", tests)
        quiet = re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests)
        assert fires, f"no promtool test where {name} fires"
        assert quiet, f"no promtool test where {name} stays quiet"


@pytest.mark.parametrize("alert", alert_names())
def test_the_unit_tests_fail_when_an_alert_never_fires(alert: str, tmp_path: Path) -> None:
    """Each rule's unit test can fail: with the rule's expression replaced by one that never fires,
    `promtool test rules` must report it."""
    promtool = tool("promtool")
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}\n")
    expr = re.compile(r"(        expr: \|\n)((?:          .*\n)+)")
    match = expr.search(text, start)
    assert match is not None
    broken = text[: match.start(2)] + "          vector(1) > 2\n" + text[match.end(2):]
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / "settle.rules.yml").write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    out = run([promtool, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name)])
    assert out.returncode != 0
    assert f"alertname: {alert}" in out.stdout.decode() + out.stderr.decode()


# ---------------------------------------------------------------------------------------- the system


@dataclass
class Observed:
    system: System
    prometheus: str  # http://127.0.0.1:PORT
    targets: dict[str, str]  # process name -> /metrics URL
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(url))
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def api(self, path: str) -> Any:
        body = json.loads(http_get(f"{self.prometheus}{path}"))
        assert body["status"] == "success", body
        return body["data"]


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"ops/prometheus/prometheus.yml no longer has exactly one {old!r}"
    return text.replace(old, new)


def write_prometheus_config(system: System, directory: Path) -> Path:
    """The production scrape config and rules, pointed at the system's ports, scraping every second."""
    m = system.config.metrics
    rules = re.sub(r"^(\s+)for: \S+$", rf"\1for: {TEST_FOR}", RULES.read_text(), flags=re.M)
    (directory / "settle.rules.yml").write_text(rules)
    shards = [{"targets": [f"127.0.0.1:{m.shard_port_base + i}"], "labels": {"shard": str(i)}}
              for i in range(SHARDS)]
    (directory / "settle-shards.json").write_text(json.dumps(shards))
    text = SCRAPE_CONFIG.read_text()
    text = _replace_once(text, "scrape_interval: 15s", "scrape_interval: 1s")
    text = _replace_once(text, "scrape_timeout: 5s", "scrape_timeout: 1s")
    text = _replace_once(text, "evaluation_interval: 15s", "evaluation_interval: 1s")
    text = _replace_once(text, "rules/settle.rules.yml", str(directory / "settle.rules.yml"))
    text = _replace_once(text, "targets/settle-shards.json", str(directory / "settle-shards.json"))
    for default, port in ((9400, m.supervisor_port), (9401, m.router_port), (9402, m.simulator_port)):
        text = _replace_once(text, f"127.0.0.1:{default}", f"127.0.0.1:{port}")
    # This run is in ZMQ mode: the Kafka bridge's job has nothing to scrape.
    bridge_job = re.search(r"\n  # Kafka mode only:.*?\n(?=\n  #|\Z)", text, flags=re.S)
    assert bridge_job is not None, "the bridge job is gone from prometheus.yml"
    text = text.replace(bridge_job.group(0), "\n")
    path = directory / "prometheus.yml"
    path.write_text(text)
    return path


def start_prometheus(config: Path, directory: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    binary = tool("prometheus")
    port = free_port()
    log = directory / "prometheus.log"
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            http_get(f"{url}/-/ready", timeout_s=1)
            return proc, url, log
        except OSError:
            time.sleep(0.2)
    stop_process(proc)
    unavailable("Prometheus did not start", log.read_text(errors="replace")[-2000:])
    raise AssertionError("unreachable")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(what: str, check: Any, timeout_s: float = 60.0, interval_s: float = 0.5) -> Any:
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not seen within {timeout_s:.0f}s (last: {value!r})")


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """The engine (2 shards) under steady load from the simulator, scraped by a real Prometheus."""
    tool("promtool")
    root = tmp_path_factory.mktemp("observability")
    system = System(root / "system", shards=SHARDS)
    m = system.config.metrics
    prom_dir = root / "prometheus"
    prom_dir.mkdir()
    proc: subprocess.Popen[bytes] | None = None
    try:
        system.start_engine()
        system.start_sim(300_000, rate=1500, extra=["--metrics-port", str(m.simulator_port),
                                                    "--hostile-every", "3000"])
        proc, url, log = start_prometheus(write_prometheus_config(system, prom_dir), prom_dir)
        targets = {"supervisor": m.supervisor_port, "router": m.router_port, "simulator": m.simulator_port,
                   **{f"shard-{i}": m.shard_port_base + i for i in range(SHARDS)}}
        obs = Observed(system, url, {k: f"http://127.0.0.1:{p}/metrics" for k, p in targets.items()}, log)
        # Ready when every target answers and a few seconds of settling are in the TSDB.
        wait_until("every target up", lambda: len(obs.query("up == 1")) == len(targets))
        wait_until("5 scrapes of every target", lambda: len(obs.query("count_over_time(up[1m]) >= 5")) == len(targets))
        wait_until("trades settling in Prometheus",
                   lambda: obs.query(f"sum(rate(settle_trades_settled_total[{RATE_INTERVAL}])) > 0"))
        wait_until("a quarantined frame", lambda: obs.query("sum(settle_quarantined_total) > 0"))
        yield obs
    finally:
        if proc is not None:
            stop_process(proc)
        system.stop()


def test_promtool_check_metrics_accepts_every_exposition(observed: Observed) -> None:
    promtool = tool("promtool")
    for name, url in observed.targets.items():
        exposition = http_get(url)
        assert b"# TYPE" in exposition, name
        out = run([promtool, "check", "metrics"], stdin=exposition)
        problems = (out.stdout + out.stderr).decode().strip()
        assert out.returncode == 0, f"{name}: {problems}"
        assert problems == "", f"{name}: {problems}"


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with Grafana's variables filled in) for every panel target."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = [p for top_level in dashboard["panels"]
                  for p in ([*top_level.get("panels", [])] if top_level["type"] == "row" else [top_level])]
        for panel in panels:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$shard", "1")
                assert "$" not in expr, f"{path.name} {panel['title']!r}: unresolved variable in {expr}"
                out.append((path.stem, panel["title"], expr))
    return out


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_every_dashboard_query_returns_data(observed: Observed) -> None:
    queries = dashboard_queries()
    assert len(queries) > 40
    empty = []
    for dashboard, title, expr in queries:
        result = observed.query(expr)
        if not has_finite_value(result):
            empty.append(f"{dashboard} / {title}: {expr} -> {result}")
    assert not empty, "panels that show nothing:\n" + "\n".join(empty)


_COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?(?![\w.])")


def split_top_level(expr: str, operator: str) -> list[str]:
    """Split ``expr`` at ``operator`` (a binary keyword such as ``or``) outside parentheses and strings."""
    parts, depth, start, i, quote = [], 0, 0, 0, ""
    word = f" {operator} "
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = "" if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and expr.startswith(word, i):
            parts.append(expr[start:i])
            start = i + len(word)
            i = start
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def underlying(expr: str) -> str:
    """The expression without its threshold comparisons: what the alert looks at."""
    return _COMPARISON.sub("", expr)


def test_underlying_strips_thresholds_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) > 2 and on (a) '
            'max by (a) (changes(y[5m])) == 0 or predict_linear(z[1h], 4 * 3600) < -1e3')
    assert split_top_level(expr, "or")[1] == "predict_linear(z[1h], 4 * 3600) < -1e3"
    assert underlying(expr) == ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) and on (a) "
                                "max by (a) (changes(y[5m])) or predict_linear(z[1h], 4 * 3600)")
    assert split_top_level('a{x="1 or 2"} or (b or c)', "or") == ['a{x="1 or 2"}', "(b or c)"]


def test_every_alert_expression_selects_data(observed: Observed) -> None:
    groups = observed.api("/api/v1/rules?type=alert")["groups"]
    alerts = {rule["name"]: rule["query"] for group in groups for rule in group["rules"]}
    assert sorted(alerts) == sorted(alert_names())
    empty = []
    for name, expr in alerts.items():
        assert underlying(expr) != expr, f"{name} has no threshold: {expr}"
        for branch in split_top_level(expr, "or"):  # each way an alert can fire must see data
            probe = underlying(branch)
            if not observed.query(probe):
                empty.append(f"{name}: {probe}")
    assert not empty, "alert expressions that select nothing:\n" + "\n".join(empty)


def test_settle_top_shows_every_shard_settling(observed: Observed) -> None:
    out = io.StringIO()
    assert top(observed.system.config, once=True, interval_s=1.0, out=out) == 0
    text = out.getvalue()
    shards_part, _, stages_part = text.partition("time per trade:")
    rows = {line.split()[0]: line.split() for line in shards_part.splitlines() if re.match(r"^\d+\s", line)}
    assert sorted(rows) == [str(i) for i in range(SHARDS)], text
    header = next(line.split() for line in shards_part.splitlines() if line.startswith("shard "))
    settled = header.index("settled/s")
    for row in rows.values():
        assert row[1] == "ready", text
        assert row[settled] != "-", text
    assert sum(float(row[settled].replace(",", "")) for row in rows.values()) > 0, text
    # Where the time goes: the lag and every stage have a value for each shard that settled in the window.
    stage_header = next(line.split() for line in stages_part.splitlines() if line.startswith("shard "))
    assert stage_header == ["shard", "lag", "p50", "lag", "p99", "lag", "mean", *STAGES], text
    stage_rows = [line.split() for line in stages_part.splitlines() if re.match(r"^\d+\s", line)]
    assert [row[0] for row in stage_rows] == [str(i) for i in range(SHARDS)], text
    for row in stage_rows:
        assert len(row) == 4 + len(STAGES), text
        if float(rows[row[0]][settled].replace(",", "")) > 0:
            assert all(re.fullmatch(r"[\d.]+m?s", cell) for cell in row[1:]), text
    assert re.search(r"^router\s+received [\d,]+/s", text, re.M), text
    assert re.search(r"^supervisor\s+children up 3/3", text, re.M), text


def _parse_duration(text: str) -> float:
    """Seconds from `settle top`'s "3.21ms" or "1.25s"."""
    match = re.fullmatch(r"([\d.]+)(ms|s)", text)
    assert match is not None, text
    return float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)


def test_settle_top_lag_p99_agrees_with_prometheus_histogram_quantile(observed: Observed) -> None:
    """`settle top`'s lag p99 column, computed from two scrapes of each shard that Prometheus also holds,
    against Prometheus's own histogram_quantile over the difference of the same two scrapes: the same
    bucket, and the same value to the precision top prints (both interpolate linearly within the bucket).
    (That top's own scrapes reach the shards is test_settle_top_shows_every_shard_settling's part.)"""
    at = time.time() - 1  # every scrape up to here is in the TSDB
    old: dict[str, Samples | None] = {}
    new: dict[str, Samples | None] = {}
    window: dict[str, tuple[float, float]] = {}
    bounds: list[float] = []
    for shard in range(SHARDS):
        series = observed.api("/api/v1/query?" + urllib.parse.urlencode(
            {"query": f'settle_lag_seconds_bucket{{shard="{shard}"}}[15s]', "time": f"{at:.3f}"}))["result"]
        assert series, f"Prometheus holds no settle_lag_seconds buckets of shard {shard}"
        # Buckets of one scrape share its timestamp: take the first and the last scrape every bucket has.
        common = set.intersection(*({float(t) for t, _ in s["values"]} for s in series))
        assert len(common) >= 2, series
        first, last = min(common), max(common)
        window[str(shard)] = (first, last)

        def at_scrape(when: float, series: list[dict[str, Any]] = series, shard: int = shard) -> Samples:
            return {"settle_lag_seconds_bucket": [
                ((("le", s["metric"]["le"]), ("shard", str(shard))),
                 next(float(v) for t, v in s["values"] if float(t) == when)) for s in series]}

        old[f"shard-{shard}"], new[f"shard-{shard}"] = at_scrape(first), at_scrape(last)
        bounds = sorted(float(s["metric"]["le"]) for s in series)
    screen = frame(Scrape(0.0, old), Scrape(1.0, new), SHARDS, "Prometheus's scrapes")
    stages_part = screen.partition("time per trade:")[2]
    header = next(line.split() for line in stages_part.splitlines() if line.startswith("shard "))
    assert header[:7] == ["shard", "lag", "p50", "lag", "p99", "lag", "mean"], screen
    rows = {line.split()[0]: line.split() for line in stages_part.splitlines() if re.match(r"^\d+\s", line)}
    assert sorted(rows) == [str(i) for i in range(SHARDS)], screen
    for slot, (first, last) in window.items():
        delta = (f'settle_lag_seconds_bucket{{shard="{slot}"}} @ {last:.3f}'
                 f' - settle_lag_seconds_bucket{{shard="{slot}"}} @ {first:.3f}')
        result = observed.query(f"histogram_quantile(0.99, {delta})")
        assert len(result) == 1, result
        expected = float(result[0]["value"][1])
        assert math.isfinite(expected), (slot, result)  # trades settled between the two scrapes
        shown = rows[slot][2]
        seen = _parse_duration(shown)
        precision = 0.5 * 10 ** -(len(shown.rstrip("ms").partition(".")[2]))
        precision /= 1000 if shown.endswith("ms") else 1
        assert abs(seen - expected) <= precision + 1e-12, (slot, shown, expected, screen)
        upper = next(b for b in bounds if b >= expected)
        lower = max((b for b in bounds if b < upper), default=0.0)
        assert lower - precision <= seen <= upper + precision, (slot, shown, lower, upper)


def firing(observed: Observed, alert: str) -> list[dict[str, str]]:
    alerts = observed.api("/api/v1/alerts")["alerts"]
    return [a["labels"] for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def test_a_killed_shard_fires_the_stalled_alert(observed: Observed) -> None:
    """SIGKILL shard 1 while the supervisor is stopped (so it is not respawned at once): its scrapes fail,
    SettleShardStalled fires for shard 1 only; the supervisor, resumed, respawns it and counts the restart."""
    system = observed.system
    assert firing(observed, "SettleShardStalled") == []
    supervisor = system.state()["pid"]
    os.kill(supervisor, signal.SIGSTOP)
    try:
        victim = system.kill("shard-1")
        labels = wait_until("SettleShardStalled firing", lambda: firing(observed, "SettleShardStalled"))
        assert [(a["shard"], a["job"], a["severity"]) for a in labels] == [("1", "settle-shard", "page")]
    finally:
        os.kill(supervisor, signal.SIGCONT)
    system.wait_respawned("shard-1", victim)
    restarted = 'settle_supervisor_restarts_total{slot="shard-1", reason="signal_SIGKILL"} == 1'
    wait_until("the restart counted in Prometheus", lambda: observed.query(restarted))
