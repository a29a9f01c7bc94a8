"""Preflight: what only the host can tell, found before anything starts, each finding naming its key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.core import config as configmod
from engine.core import security
from engine.core.errors import ConfigError
from engine.ops import preflight
from engine.ops.preflight import Finding


def make(tmp_path: Path, overrides: dict[str, Any] | None = None) -> configmod.Config:
    raw: dict[str, Any] = {}
    base = {"engine.data_dir": str(tmp_path / "var"), "store.path": str(tmp_path / "var" / "settle.db"),
            "engine.shards": 2}
    for key, value in {**base, **(overrides or {})}.items():
        configmod.set_dotted(raw, key, value)
    return configmod.from_dict(raw)


def errors(findings: list[Finding]) -> list[str]:
    return [str(f) for f in findings if f.level == "error"]


def warnings(findings: list[Finding]) -> list[str]:
    return [str(f) for f in findings if f.level == "warning"]


def test_the_defaults_in_a_fresh_directory_pass(tmp_path: Path) -> None:
    findings = preflight.check(make(tmp_path), usable=[0, 1, 2, 3])
    assert findings == []
    assert not (tmp_path / "var").exists()  # probing left nothing behind


# ----------------------------------------------------------------------------------------------- ports


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"metrics.router_port": 5555}, "error: me.publish: port 5555 is also used by metrics.router_port"),
        ({"me.replay": "tcp://127.0.0.1:5555"}, "error: me.publish: port 5555 is also used by me.replay"),
        ({"metrics.router_port": 9411},
         "error: metrics.router_port: port 9411 is also used by metrics.shard_port_base (shard-1)"),
        ({"router.transport": "tcp", "router.tcp_base_port": 9399},
         "error: router.tcp_base_port (shard-1): port 9400 is also used by metrics.supervisor_port"),
        ({"metrics.host": "0.0.0.0", "metrics.router_port": 5556},
         "error: me.replay: port 5556 is also used by metrics.router_port"),
        ({"metrics.shard_port_base": 65535}, "error: metrics.shard_port_base: 65535 + 2 shards runs past port 65535"),
    ],
)
def test_port_collisions_name_both_keys(tmp_path: Path, overrides: dict[str, Any], expected: str) -> None:
    found = errors(preflight.check(make(tmp_path, overrides), usable=[0, 1, 2, 3]))
    assert any(expected in f for f in found), found


def test_same_port_on_different_hosts_is_no_collision(tmp_path: Path) -> None:
    config = make(tmp_path, {"me.publish": "tcp://10.1.2.3:9401", "security.curve": False})
    findings = preflight.check(config, usable=[0, 1, 2, 3])
    assert errors(findings) == []
    assert any("me.publish: tcp on 10.1.2.3:9401 without security.curve" in w for w in warnings(findings))


def test_a_disabled_metrics_port_is_not_checked(tmp_path: Path) -> None:
    config = make(tmp_path, {"metrics.router_port": 0, "metrics.supervisor_port": 0})
    assert preflight.check(config, usable=[0, 1]) == []
    assert preflight.check(make(tmp_path, {"metrics.enabled": False, "metrics.router_port": 5555}),
                           usable=[0, 1]) == []


# ----------------------------------------------------------------------------------------------- cores


def test_more_shards_than_cores_is_a_warning(tmp_path: Path) -> None:
    findings = preflight.check(make(tmp_path, {"engine.shards": 4}), usable=[0, 1])
    assert errors(findings) == []
    assert warnings(findings) == ["warning: engine.shards: 4 shards but this process may use 2 cores (0-1); "
                                  "shards will share cores and each one's latency suffers"]


def test_impossible_pinning_is_an_error(tmp_path: Path) -> None:
    findings = preflight.check(make(tmp_path, {"cpu.router": 7, "cpu.shards": [0]}), usable=[0, 1])
    assert errors(findings) == [
        "error: cpu.shards: lists 1 cores but the engine runs 2 shards (engine.shards); give one core per shard, "
        "or \"auto\"",
        "error: cpu.router: core 7 is not available: this process may use cores 0-1",
    ]


def test_two_slots_pinned_to_one_core_is_a_warning(tmp_path: Path) -> None:
    findings = preflight.check(make(tmp_path, {"cpu.router": 1, "cpu.shards": [0, 1]}), usable=[0, 1, 2])
    assert warnings(findings) == ["warning: cpu: core 1 runs router, shard-1; one core each is what pinning is for"]


# ----------------------------------------------------------------------------------------------- paths


def test_data_dir_where_a_file_is(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    found = errors(preflight.check(make(tmp_path, {"engine.data_dir": str(tmp_path / "file" / "var")}),
                                   usable=[0, 1]))
    assert any(f.startswith("error: engine.data_dir: ") and "is not a directory" in f for f in found), found


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    """/proc takes no directories, for root either (a read-only mount behaves the same)."""
    found = errors(preflight.check(make(tmp_path, {"engine.data_dir": "/proc/settle-preflight/var"}),
                                   usable=[0, 1]))
    assert any(f.startswith("error: engine.data_dir: /proc/settle-preflight/var is not writable: cannot create")
               for f in found), found


def test_existing_wal_directory_that_is_a_file(tmp_path: Path) -> None:
    config = make(tmp_path)
    config.wal_path(1).parent.mkdir(parents=True)
    config.wal_path(1).write_text("")
    found = errors(preflight.check(config, usable=[0, 1]))
    assert any(f.startswith("error: engine.data_dir (WAL of shard-1): ") for f in found), found


def test_ipc_socket_path_too_long_for_unix_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pytest.raises(ConfigError, match=r"key 'engine.data_dir' .* longer than the 107 bytes"):
        make(tmp_path, {"engine.data_dir": str(deep)})
    assert not errors(preflight.check(make(tmp_path, {"engine.data_dir": str(deep), "router.transport": "tcp"}),
                                      usable=[0, 1]))


def test_too_little_free_disk(tmp_path: Path) -> None:
    found = errors(preflight.check(make(tmp_path, {"engine.disk_free_bytes_min": 1 << 60}), usable=[0, 1]))
    assert len(found) == 1
    assert found[0].startswith(f"error: engine.data_dir: {tmp_path}")
    assert "free, below engine.disk_free_bytes_min (1048576.0 TiB)" in found[0]
    assert "--set engine.disk_free_bytes_min=0" in found[0]
    assert preflight.check(make(tmp_path, {"engine.disk_free_bytes_min": 0}), usable=[0, 1]) == []


# ----------------------------------------------------------------------------------------------- keys


def curve(tmp_path: Path, **more: Any) -> configmod.Config:
    return make(tmp_path, {"security.curve": True, "security.keys_dir": str(tmp_path / "keys"),
                           "router.transport": "tcp", "router.tcp_base_port": 5600, **more})


def test_curve_without_keys(tmp_path: Path) -> None:
    assert errors(preflight.check(curve(tmp_path), usable=[0, 1])) == [
        f"error: security.keys_dir: {tmp_path / 'keys'} is not a directory; make the keys with "
        f"`settle keys generate --dir {tmp_path / 'keys'}`"]


def test_curve_with_generated_keys_passes(tmp_path: Path) -> None:
    assert security.keys_main(["generate", "--dir", str(tmp_path / "keys")]) == 0
    assert preflight.check(curve(tmp_path), usable=[0, 1]) == []


def test_curve_key_problems_name_their_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert security.keys_main(["generate", "--dir", str(keys)]) == 0
    (keys / "me.key.pub").unlink()
    (keys / "router.key").chmod(0o644)
    config = curve(tmp_path, **{"security.allowed_clients": ["router.key.pub", "bridge.key.pub"]})
    findings = preflight.check(config, usable=[0, 1])
    assert [f.key for f in findings if f.level == "error"] == ["security.me_key", "security.allowed_clients[1]"]
    assert warnings(findings) == [f"warning: security.router_key: secret key file {keys / 'router.key'} is mode "
                                  f"644; others on this host can read it (chmod 600 {keys / 'router.key'})"]


# ----------------------------------------------------------------------------------------------- store secrets


def cassandra(tmp_path: Path, **more: Any) -> configmod.Config:
    return make(tmp_path, {"store.kind": "cassandra", "store.cassandra.username": "settle", **more})


def test_password_file_checks_never_show_the_password(tmp_path: Path) -> None:
    secret = "hunter2-preflight"
    password = tmp_path / "password"
    password.write_text(secret)
    password.chmod(0o640)
    findings = preflight.check(cassandra(tmp_path, **{"store.cassandra.password_file": str(password)}),
                               usable=[0, 1])
    assert warnings(findings) == [f"warning: store.cassandra.password_file: password file {password} is mode 640; "
                                  f"others on this host can read it (chmod 600 {password})"]
    assert all(secret not in str(f) for f in findings)
    password.chmod(0o600)
    assert preflight.check(cassandra(tmp_path, **{"store.cassandra.password_file": str(password)}),
                           usable=[0, 1]) == []
    missing = errors(preflight.check(cassandra(tmp_path, **{"store.cassandra.password_file": str(tmp_path / "no")}),
                                     usable=[0, 1]))
    assert missing == [f"error: store.cassandra.password_file: password file {tmp_path / 'no'} cannot be read: "
                       f"No such file or directory"]


def test_password_env_and_ca_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SETTLE_TEST_DB_PASSWORD", raising=False)
    config = cassandra(tmp_path, **{"store.cassandra.password_env": "SETTLE_TEST_DB_PASSWORD",
                                    "store.cassandra.tls_ca_file": str(tmp_path / "ca.pem")})
    assert [f.key for f in preflight.check(config, usable=[0, 1])] == ["store.cassandra.password_env",
                                                                        "store.cassandra.tls_ca_file"]
    monkeypatch.setenv("SETTLE_TEST_DB_PASSWORD", "from-the-environment")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert preflight.check(config, usable=[0, 1]) == []
    assert errors(preflight.check(cassandra(tmp_path), usable=[0, 1])) == [
        "error: store.cassandra.username: is set but neither password_file nor password_env is"]


def test_metrics_beyond_loopback_is_a_warning(tmp_path: Path) -> None:
    assert warnings(preflight.check(make(tmp_path, {"metrics.host": "0.0.0.0"}), usable=[0, 1])) == [
        "warning: metrics.host: 0.0.0.0 serves /metrics beyond this host; keep it on 127.0.0.1 behind a scraper "
        "you trust"]


# ----------------------------------------------------------------------------------------------- settle run


def test_settle_run_stops_before_spawning_anything(tmp_path: Path) -> None:
    config_path = tmp_path / "settle.json"
    config_path.write_text(json.dumps({"engine": {"data_dir": str(tmp_path / "var"), "shards": 2},
                                       "store": {"path": str(tmp_path / "var" / "settle.db")},
                                       "metrics": {"router_port": 5555}}))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "run", "--config", str(config_path)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 78, out.stderr
    assert "settle: error: me.publish: port 5555 is also used by metrics.router_port" in out.stderr
    assert "not starting" in out.stderr
    assert not (tmp_path / "var" / "run" / "supervisor.json").exists()
