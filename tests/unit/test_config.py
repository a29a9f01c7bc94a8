import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core import config as configmod
from engine.core.child import run_async
from engine.core.errors import EXIT_CONFIG, ConfigError
from engine.core.store import open_store


def test_shipped_config_file_is_valid_and_matches_defaults() -> None:
    assert configmod.load("config/settle.toml") == configmod.load(None)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("wal.batch_trades_max=0", "key 'wal.batch_trades_max' has value 0; Expected `int` >= 1"),
        ("wal.batch_trade_max=10", "unknown key 'wal.batch_trade_max'"),
        ('store.kind="mongo"', "key 'store.kind' has value 'mongo'"),
        ("me.publish=nowhere", "key 'me.publish' has value 'nowhere'; Expected `str` matching regex"),
        ('engine.shards="many"', "key 'engine.shards' has value 'many'"),
        ("metrics.router_port=70000", "key 'metrics.router_port' has value 70000; Expected `int` <= 65535"),
    ],
)
def test_bad_values_name_key_value_and_expectation(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        configmod.load(None, [override])
    assert expected in str(err.value)


def test_missing_file_and_bad_toml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="does not exist"):
        configmod.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[wal\nx=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        configmod.load(bad)


def test_override_syntax_is_checked() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        configmod.load(None, ["wal.batch_trades_max"])


def test_overrides_are_typed() -> None:
    config = configmod.load(None, ["wal.batch_trades_max=512", "engine.shards=3", "router.transport=tcp"])
    assert config.wal.batch_trades_max == 512
    assert config.shard_count == 3
    assert config.shard_endpoint(2) == "tcp://127.0.0.1:5602"


def test_config_is_immutable() -> None:
    config = configmod.load(None)
    with pytest.raises(AttributeError):
        config.wal.batch_trades_max = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------- settings that lose trades


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('store.factory="bench.nullstore:NullStore"', "key 'store.factory' is 'bench.nullstore:NullStore'"),
        ("wal.fsync=false", "key 'wal.fsync' is false: a crash would lose trades already acknowledged"),
    ],
)
def test_settings_that_lose_trades_are_refused_without_the_benchmark_switch(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        configmod.load(None, [override])
    assert expected in str(err.value)
    assert "engine.benchmark_unsafe = true" in str(err.value)
    config = configmod.load(None, [override, "engine.benchmark_unsafe=true"])
    assert config.engine.benchmark_unsafe


def test_settle_run_refuses_a_store_that_discards_writes(tmp_path: Path) -> None:
    config_path = tmp_path / "settle.json"
    config_path.write_text(json.dumps({"engine": {"data_dir": str(tmp_path / "var"), "shards": 1},
                                       "store": {"factory": "bench.nullstore:NullStore"}}))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "run", "--config", str(config_path)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert "key 'store.factory' is 'bench.nullstore:NullStore'" in out.stderr
    assert not (tmp_path / "var" / "run" / "supervisor.json").exists()


def test_the_benchmark_store_is_opened_by_name_and_discards_writes() -> None:
    config = configmod.load(None, ['store.factory="bench.nullstore:NullStore"', "engine.benchmark_unsafe=true"])
    store = run_async(open_store(config.store))
    assert type(store).__module__ == "bench.nullstore"
    assert run_async(store.watermarks()) == {}
