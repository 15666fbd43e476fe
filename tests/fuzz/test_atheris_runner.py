"""The coverage-guided runner starts and runs each target briefly (atheris is optional: skip says why)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent / "run_atheris.py"


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (optional: pip install atheris); the hypothesis properties still run")
@pytest.mark.parametrize("target", ["artifact", "v2", "fleet"])
def test_atheris_runner_runs_each_target(target):
    proc = subprocess.run([sys.executable, str(RUNNER), target, "-runs=200"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Done 200 runs" in proc.stderr
