"""Every process the supervisor starts ends a config error the same way: exit code EXIT_CONFIG (which halts
the supervisor instead of respawning into the same error) and one line on stderr naming the process, the key
and the value. Run as real processes, under the module names the supervisor spawns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.errors import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[2]

KINDS = [  # (module the supervisor runs, extra arguments, how the process names itself)
    ("shards", ["--shard", "1"], "shard 1"),
    ("engine.kafka.shard", ["--shard", "2"], "shard 2"),
    ("engine.kafka.bridge", [], "bridge"),
    ("router", [], "router"),
]


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("module", "extra", "name"), KINDS)
def test_a_bad_value_exits_with_the_config_code_naming_process_key_and_value(
    tmp_path: Path, module: str, extra: list[str], name: str
) -> None:
    config = tmp_path / "settle.toml"
    config.write_text("[wal]\nbatch_trades_max = 0\n")
    out = _run(module, ["--config", str(config), *extra])
    assert out.returncode == EXIT_CONFIG, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"settle {name}: config error: ")]
    assert len(errors) == 1, out.stderr
    assert errors[0].endswith(f"{config}: key 'wal.batch_trades_max' has value 0; Expected `int` >= 1")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("module", "extra", "name"), KINDS)
def test_a_missing_config_file_exits_with_the_config_code(
    tmp_path: Path, module: str, extra: list[str], name: str
) -> None:
    missing = tmp_path / "nope.toml"
    out = _run(module, ["--config", str(missing), *extra])
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert f"settle {name}: config error: config file {missing} does not exist" in out.stderr


def test_a_config_error_while_starting_exits_with_the_config_code(tmp_path: Path) -> None:
    # The config is valid, but the router's CURVE key file it names is not there: found only while starting.
    out = _run("router", ["--set", "security.curve=true", "--set", f"security.keys_dir={tmp_path}",
                          "--set", "me.publish=tcp://127.0.0.1:1", "--set", f"engine.data_dir={tmp_path}"])
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert f"settle router: config error: security.router_key: key file {tmp_path}/router.key" in out.stderr
