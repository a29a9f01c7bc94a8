"""The Grafana dashboards in ops/grafana: valid against the dashboard schema, every panel has a query, every
query names metrics settle exports, the per-shard board is driven by a ``shard`` variable.

``ops/grafana/dashboard.schema.json`` is a JSON Schema (draft 2020-12) of the fields Grafana requires. The
validator here implements the keywords that schema uses; the schema itself is checked against the
draft's metaschema when the ``jsonschema`` package happens to be installed.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from engine.core import metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "ops" / "grafana"
SCHEMA = json.loads((GRAFANA / "dashboard.schema.json").read_text())
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

# -------------------------------------------------------------------------------- a small validator

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,), "null": (type(None),),
    "integer": (int,), "number": (int, float),
}
_KEYWORDS = {"$schema", "$id", "$comment", "$defs", "title", "description", "type", "required", "properties",
             "items", "enum", "const", "minimum", "maximum", "minLength", "maxLength", "minItems", "pattern",
             "$ref", "anyOf"}


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def _same(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python's, ``true`` is not ``1``."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def validate(value: Any, schema: dict[str, Any], root: dict[str, Any] = SCHEMA, path: str = "$") -> list[str]:
    """Every violation of ``schema`` in ``value``, as ``path: problem`` lines; [] when valid."""
    unknown = set(schema) - _KEYWORDS
    assert not unknown, f"the validator does not implement {unknown}"
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        return validate(value, root["$defs"][ref[len("#/$defs/"):]], root, path)
    if "anyOf" in schema:
        results = [validate(value, option, root, path) for option in schema["anyOf"]]
        if all(results):
            best = min(results, key=len)
            return [f"{path}: matches none of anyOf; closest: {'; '.join(best)}"]
        return []
    errors: list[str] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            return [f"{path}: expected {'/'.join(names)}, got {type(value).__name__} {value!r:.40}"]
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        errors.extend(f"{path}: missing required {key!r}" for key in schema.get("required", []) if key not in value)
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors.extend(validate(value[key], sub, root, f"{path}.{key}"))
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors.extend(validate(item, schema["items"], root, f"{path}[{i}]"))
    return errors


# -------------------------------------------------------------------------------- helpers


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]


_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                 "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and strings removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_WORDS:
            continue
        names.add(name)
    return names


def exported_names(tmp_path: Path) -> set[str]:
    """Every series name the settle processes can export, from the families in engine/core/metrics.py."""
    registry = metrics.new_registry()
    metrics.ShardMetrics(registry, 0, wal_dir=tmp_path)
    router = CollectorRegistry()
    metrics.RouterMetrics(router)
    supervisor = CollectorRegistry()
    metrics.SupervisorMetrics(supervisor, ["shard-0"])
    names: set[str] = set()
    for reg in (registry, router, supervisor):
        for family in reg.collect():
            names.add(family.name)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [])
            names.update(family.name + s for s in suffixes)
    return names


# -------------------------------------------------------------------------------- tests


def test_there_are_two_dashboards() -> None:
    assert [p.name for p in DASHBOARDS] == ["settle-overview.json", "settle-shard.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_validates_against_the_schema(path: Path) -> None:
    assert validate(load(path), SCHEMA) == []


def test_the_validator_rejects_what_grafana_rejects() -> None:
    good = load(DASHBOARDS[0])
    assert validate(good, SCHEMA) == []
    broken: list[tuple[str, Any]] = []
    d = copy.deepcopy(good)
    del d["schemaVersion"]
    broken.append(("schemaVersion", d))
    d = copy.deepcopy(good)
    panels(d)[0]["gridPos"]["w"] = 25
    broken.append(("maximum", d))
    d = copy.deepcopy(good)
    del panels(d)[0]["targets"][0]["expr"]
    broken.append(("expr", d))
    d = copy.deepcopy(good)
    panels(d)[0]["type"] = ""
    broken.append(("anyOf", d))
    d = copy.deepcopy(good)
    d["templating"]["list"][0]["hide"] = 7
    broken.append(("hide", d))
    d = copy.deepcopy(good)
    d["graphTooltip"] = True
    broken.append(("graphTooltip", d))
    for needle, dashboard in broken:
        errors = validate(dashboard, SCHEMA)
        assert any(needle in e for e in errors), (needle, errors)


def test_the_schema_is_valid_json_schema() -> None:
    import jsonschema  # a test dependency (pyproject [test]); a missing one fails, it does not skip
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for path in DASHBOARDS:
        jsonschema.Draft202012Validator(SCHEMA).validate(load(path))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_has_a_query_on_the_datasource_variable(path: Path) -> None:
    dashboard = load(path)
    assert panels(dashboard)
    for panel in panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_panel_ids_unique_and_panels_do_not_overlap(path: Path) -> None:
    dashboard = load(path)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_selects_metrics_settle_exports(path: Path, tmp_path: Path) -> None:
    known = exported_names(tmp_path) | {"up", "ALERTS", "process_cpu_seconds_total",
                                        "process_resident_memory_bytes"}
    for title, expr in queries(load(path)):
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        assert names <= known, f"{title!r}: {sorted(names - known)} are not exported by settle"


def test_metric_names_reads_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (shard, le) (rate(settle_lag_seconds_bucket{shard="$shard"}'
            '[$__rate_interval]))) > 2 or up{job="x"} == 0 and on (shard) count(a_b:c) offset 5m')
    assert metric_names(expr) == {"settle_lag_seconds_bucket", "up", "a_b:c"}


def test_the_shard_dashboard_is_driven_by_a_shard_variable() -> None:
    dashboard = load(GRAFANA / "dashboards" / "settle-shard.json")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    shard = variables["shard"]
    assert shard["type"] == "query"
    assert shard["multi"] is False  # one shard at a time
    assert shard["includeAll"] is False
    assert "label_values(settle_shard_ready, shard)" in json.dumps(shard["query"])
    for title, expr in queries(dashboard):
        assert "$shard" in expr, f"{title!r} ignores the shard variable: {expr}"


def test_the_overview_links_to_the_shard_dashboard() -> None:
    overview = load(GRAFANA / "dashboards" / "settle-overview.json")
    shard = load(GRAFANA / "dashboards" / "settle-shard.json")
    assert any(link["type"] == "dashboards" and set(link["tags"]) <= set(shard["tags"])
               for link in overview["links"])
    assert overview["uid"] != shard["uid"]


def test_provisioning_points_at_the_dashboards_and_the_datasource() -> None:
    provider = (GRAFANA / "provisioning" / "dashboards" / "settle.yml").read_text()
    assert re.search(r"^apiVersion: 1$", provider, re.M)
    assert re.search(r"^\s+type: file$", provider, re.M)
    assert re.search(r"^\s+path: \S+", provider, re.M)
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s+type: prometheus$", datasource, re.M)
    uid = re.search(r"^\s+uid: (\S+)$", datasource, re.M)
    assert uid is not None
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in load(path)["templating"]["list"]}
        assert variables["datasource"]["current"]["value"] == uid.group(1)


# -------------------------------------------------------------------------------- the families they read


def _exposition(registry: CollectorRegistry, prefix: str) -> list[str]:
    from prometheus_client import generate_latest

    return sorted(line for line in generate_latest(registry).decode().splitlines() if line.startswith(prefix))


def test_hot_histogram_exposes_what_prometheus_client_would() -> None:
    from prometheus_client import Histogram

    values = [0.0, 0.0005, 0.0007, 0.001, 0.0049, 0.03, 0.25, 0.2500001, 7.0, 30.0, 31.0, 1e9]
    hot_registry = metrics.new_registry()
    hot = metrics.ShardMetrics(hot_registry, 4)
    reference_registry = CollectorRegistry()
    reference = Histogram("settle_lag_seconds", "doc", ["shard"], buckets=metrics.LATENCY_BUCKETS_S,
                          registry=reference_registry).labels("4")
    for v in values:
        hot.settle_lag.observe(v)
        reference.observe(v)
    ours = _exposition(hot_registry, "settle_lag_seconds")
    assert ours == _exposition(reference_registry, "settle_lag_seconds")
    assert 'settle_lag_seconds_bucket{le="+Inf",shard="4"} 12.0' in ours


def test_hot_histogram_observes_a_batch_of_stamps_as_one_by_one() -> None:
    """``observe_since`` (a sort and a bisection per bucket, or a bisect per stamp for a few) puts every stamp
    where ``observe`` of its wait would, stamps after ``now`` included (a wait of 0), and adds the same sum."""
    import random

    rng = random.Random(7)
    now_ns = 1_800_000_000_000_000_000
    bounds_ns = [math.floor(b * 1e9) for b in metrics.LATENCY_BUCKETS_S]
    waits = [0, 1, -5, *bounds_ns, *(b + 1 for b in bounds_ns), *(b - 1 for b in bounds_ns), 10**12]
    waits += [rng.randrange(-10**6, 60 * 10**9) for _ in range(2000)]
    rng.shuffle(waits)
    stamps = [now_ns - w for w in waits]
    batch, one_by_one = metrics.HotHistogram(metrics.LATENCY_BUCKETS_S), metrics.HotHistogram(metrics.LATENCY_BUCKETS_S)
    batch.observe_since(now_ns, stamps[:1000])
    start = 1000
    while start < len(stamps):  # small batches too, observed stamp by stamp: 1 to 25 stamps at a time
        size = 1 + start % 25
        batch.observe_since(now_ns, stamps[start : start + size])
        start += size
    batch.observe_since(now_ns, [])
    for stamp in stamps:
        one_by_one.observe(max(0, now_ns - stamp) / 1e9)
    assert batch.counts == one_by_one.counts
    assert sum(batch.counts) == len(stamps)
    assert batch.sum == pytest.approx(one_by_one.sum, rel=1e-12)


def test_hot_counters_count_and_start_at_zero() -> None:
    registry = CollectorRegistry()
    router = metrics.RouterMetrics(registry)
    for shard in range(3):
        router.forwarded.labels(str(shard))
    router.forwarded.labels("1").inc()
    router.forwarded.labels("1").inc(4)
    lines = _exposition(registry, "settle_router_forwarded_total")
    assert lines == ['settle_router_forwarded_total{shard="0"} 0.0', 'settle_router_forwarded_total{shard="1"} 5.0',
                     'settle_router_forwarded_total{shard="2"} 0.0']
    assert router.forwarded.labels("1")._value.get() == 5


def test_every_known_label_combination_starts_at_zero() -> None:
    registry = CollectorRegistry()
    metrics.SupervisorMetrics(registry, ["shard-0", "router"])
    restarts = _exposition(registry, "settle_supervisor_restarts_total")
    assert len(restarts) == 2 * len(metrics.RESTART_REASONS)
    assert all(line.endswith(" 0.0") for line in restarts)
    router = CollectorRegistry()
    metrics.RouterMetrics(router)
    quarantined = _exposition(router, "settle_quarantined_total")
    assert len(quarantined) == len(metrics.ROUTER_QUARANTINE_REASONS)


def test_disabled_metrics_count_nothing_and_serve_nothing(tmp_path: Path) -> None:
    registry = metrics.new_registry(enabled=False)
    m = metrics.ShardMetrics(registry, 0, wal_dir=tmp_path)
    m.received.inc()
    m.settle_lag.observe(1.0)
    m.fsync.observe(0.001)
    m.settled.inc(5)
    m.watermark.labels("0", "BTC-USDT").set(7)
    m.quarantined.labels("shard-0", "malformed").inc()
    assert m.received.get() == 0
    assert sum(m.settle_lag.counts) == 0
    assert list(registry.collect()) == []
    metrics.serve(registry, "127.0.0.1", 1)  # a disabled registry binds nothing (port 1 would fail)


def test_wal_disk_is_read_at_scrape_time(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics.ShardMetrics(registry, 2, wal_dir=tmp_path / "wal" / "shard-2")  # not created yet
    free = registry.get_sample_value("settle_wal_disk_free_bytes", {"shard": "2"})
    size = registry.get_sample_value("settle_wal_disk_size_bytes", {"shard": "2"})
    assert free is not None
    assert size is not None
    assert 0 <= free <= size
