"""A supervisor started before an in-place upgrade respawns its children under the module names it knew.
Those names must still run the same code, or the upgrade turns into a crash loop."""

import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.errors import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("old", "new", "extra"), [
    ("engine.bridge", "engine.kafka.bridge", []),
    ("shards.kafka_shard", "engine.kafka.shard", ["--shard", "0"]),
])
def test_old_module_name_runs_the_moved_process(tmp_path: Path, old: str, new: str, extra: list[str]) -> None:
    missing = tmp_path / "nope.toml"
    results = [subprocess.run([sys.executable, "-m", name, "--config", str(missing), *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=False) for name in (old, new)]
    for out in results:  # the real main: a config error exits EXIT_CONFIG, so the old supervisor halts, no loop
        assert out.returncode == EXIT_CONFIG, out.stderr
        assert f"config file {missing} does not exist" in out.stderr
