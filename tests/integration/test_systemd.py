"""The shipped systemd units: ``systemd-analyze verify`` accepts them, hardening stays, their commands parse.

``verify`` needs the ExecStart binary to exist, so each unit is verified as a copy in which only the
install path of ``settle`` (/opt/settle/venv/bin/settle) is replaced by this environment's entry point.
It also exits 0 on an unknown or unparsable directive and only prints a warning, so any output fails.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.sim.mesim import _parser as sim_parser
from tests.conftest import unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
UNITS = sorted((ROOT / "ops" / "systemd").glob("*.service"))
INSTALLED = "/opt/settle/venv/bin/settle"
EXPOSURE_MAX = 2.0  # `systemd-analyze security` scale: 0 (locked down) .. 10 (exposed); both units are 1.4


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        unavailable("systemd-analyze is missing: it comes with Debian's systemd package (ops/install.sh)")
    return path


def entry_point() -> Path:
    settle = Path(sys.executable).parent / "settle"
    assert settle.is_file(), f"{settle}: install settle first (ops/install.sh)"
    assert os.access(settle, os.X_OK), settle
    return settle


def localized(unit: Path, directory: Path) -> Path:
    text = unit.read_text()
    assert INSTALLED in text, f"{unit.name}: ExecStart should run {INSTALLED}"
    copy = directory / unit.name
    copy.write_text(text.replace(INSTALLED, str(entry_point())))
    return copy


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=120)


def test_units_exist() -> None:
    assert [u.name for u in UNITS] == ["settle-sim.service", "settle.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    out = verify(localized(unit, tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout + out.stderr == "", out.stdout + out.stderr


def test_verify_catches_what_it_should(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is a warning only, and it is seen."""
    unit = localized(UNITS[-1], tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strict\nProtectSytem=full"))
    out = verify(unit)
    assert "Unknown key 'ProtectSytem'" in out.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_hardening_exposure_stays_low(unit: Path, tmp_path: Path) -> None:
    out = subprocess.run([systemd_analyze(), "security", "--offline=yes", f"--threshold={int(EXPOSURE_MAX * 10)}",
                          str(localized(unit, tmp_path))], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr


def unit_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", unit.read_text())  # join continuation lines
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_engine_unit_policy() -> None:
    s = unit_settings(ROOT / "ops" / "systemd" / "settle.service")
    assert s["ExecStart"] == [f"{INSTALLED} run -c /etc/settle/settle.toml"]
    assert s["Restart"] == ["on-failure"]
    assert sorted(s["RestartPreventExitStatus"][0].split()) == ["65", "75", "78"]  # engine/core/errors.py EXIT_*
    assert s["KillMode"] == ["mixed"]  # SIGTERM to the supervisor only: it stops the children in order
    assert s["KillSignal"] == ["SIGTERM"]
    drain_s = 30.0  # supervisor.drain_timeout_s default; the supervisor waits drain + 5 s per group (2 groups)
    assert float(s["TimeoutStopSec"][0].rstrip("s")) > 2 * (drain_s + 5)
    assert s["User"] == ["settle"]
    assert s["ProtectSystem"] == ["strict"]
    assert "/var/lib/settle" in s["ReadWritePaths"][0].split()
    assert s["CapabilityBoundingSet"] == [""]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == ["yes"], key
    assert int(s["LimitNOFILE"][0]) >= 65536


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_command_line_parses(unit: Path) -> None:
    """ExecStart uses only flags the CLI has (argparse exits on an unknown one)."""
    argv = shlex.split(unit_settings(unit)["ExecStart"][0])
    assert argv[0] == INSTALLED
    if argv[1] == "sim":
        args = sim_parser().parse_args(argv[2:])
        assert args.curve_key == "/etc/settle/keys/me.key"
    else:
        args = build_parser().parse_args(argv[1:])
        assert args.command == "run"
