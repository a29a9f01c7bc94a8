import pytest

from engine.core import config as configmod
from engine.core.errors import ConfigError


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
