"""deploy/systemd/*.service: valid for systemd, hardened, and their ExecStart options exist in the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = sorted(UNITS_DIR.glob("*.service"))
REQUIRED = ["NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "DynamicUser=yes",
            "KillSignal=SIGTERM", "CapabilityBoundingSet=", "SystemCallFilter=@system-service"]
EXPOSURE_THRESHOLD = "20"    # systemd-analyze security's scale is 0-100 here: 20 = exposure 2.0 ("OK")
COMMANDS = {"edgeml-serve.service": ["serve"], "edgeml-manager.service": ["fleet", "manager"],
            "edgeml-agent.service": ["agent"]}


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd): cannot verify the units")
    return path


def test_every_edgeml_service_has_a_unit():
    assert [u.name for u in UNITS] == sorted(COMMANDS)


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies_cleanly(unit):
    proc = subprocess.run([analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"systemd-analyze warned about {unit.name}:\n{proc.stderr}"


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_is_hardened(unit, tmp_path):
    text = unit.read_text()
    lines = set(text.splitlines())
    missing = [d for d in REQUIRED if d not in lines]
    assert not missing, f"{unit.name} lacks {missing}"
    assert re.search(r"^MemoryMax=\d+[KMG]$", text, re.M), f"{unit.name} has no MemoryMax"
    assert re.search(r"^StateDirectory=edgeml", text, re.M), f"{unit.name} keeps no state directory"
    tool = analyze()
    secure = subprocess.run([tool, "security", "--offline=yes", f"--threshold={EXPOSURE_THRESHOLD}", str(unit)],
                            capture_output=True, text=True, timeout=60)
    if "--offline" in secure.stderr and "unrecognized" in secure.stderr:
        pytest.skip(f"this systemd-analyze has no `security --offline` (systemd >= 250): {secure.stderr.strip()}")
    assert secure.returncode == 0, f"{unit.name} exposure above {EXPOSURE_THRESHOLD}:\n{secure.stdout[-3000:]}"
    # the same unit without its hardening block must fail the threshold: the check is not vacuous
    weak = tmp_path / unit.name
    weak.write_text(text.split("# --- hardening")[0] + "\n[Install]\nWantedBy=multi-user.target\n")
    weak_run = subprocess.run([tool, "security", "--offline=yes", f"--threshold={EXPOSURE_THRESHOLD}", str(weak)],
                              capture_output=True, text=True, timeout=60)
    assert weak_run.returncode != 0


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_execstart_options_exist_in_the_cli(unit):
    text = unit.read_text().replace("\\\n", " ")
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M)
    assert exec_start, f"{unit.name} has no ExecStart"
    command = COMMANDS[unit.name]
    assert f"edgeml {' '.join(command)} " in exec_start.group(1)
    help_text = subprocess.run([sys.executable, "-m", "edgeml.cli", *command, "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for option in re.findall(r"(--[a-z][a-z-]+)", exec_start.group(1)):
        assert option in help_text, f"{unit.name}: `edgeml {' '.join(command)}` has no {option}"
