"""benchmarks/regress.py, the regression guard: its verdict rule, its refusals, and its quickest real run.

The quickest form runs the working tree against the previous commit (serving on loopback and fleet ingest, one
round each): what CI can afford. It asserts that the guard ran both sides and that its exit code follows its
floors, not any speed (speed is for the script to print, side by side).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeml.benchmarks.regress import main, verdict

REPO = Path(__file__).resolve().parents[2]


def test_verdict_fails_only_when_every_round_is_under_the_floor():
    assert verdict([0.80, 0.85, 0.90], 0.95)["below"] is True
    noisy = verdict([0.80, 0.97, 0.90], 0.95)          # one round at the floor: within the noise
    assert noisy["below"] is False and noisy["median"] == 0.9 and (noisy["min"], noisy["max"]) == (0.8, 0.97)
    assert verdict([], 0.95)["below"] is False


def test_bad_base_ref_and_options_exit_2_with_one_line(capsys):
    assert main(["no-such-ref-anywhere"]) == 2
    err = capsys.readouterr().err
    assert "no-such-ref-anywhere" in err and "Traceback" not in err
    assert main(["HEAD", "--only", "serve,gpu"]) == 2
    assert "--only" in capsys.readouterr().err
    assert main(["HEAD", "--floor", "serve=fast"]) == 2
    assert "--floor" in capsys.readouterr().err


def test_quickest_form_against_the_previous_commit(tmp_path):
    has = subprocess.run(["git", "rev-parse", "--verify", "HEAD~1^{commit}"], cwd=REPO, capture_output=True)
    if has.returncode != 0:
        pytest.skip("HEAD~1 is not in this clone (a shallow checkout); the guard needs its base commit")
    cmd = [sys.executable, "-m", "edgeml.benchmarks.regress", "HEAD~1", "--only", "serve,ingest", "--quick",
           "--rounds", "1", "--duration", "1", "--levels", "4", "--remove-base", "--json"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    gated = [r for r in doc["ratios"] if r["gate"]]
    names = {r["metric"] for r in gated}
    assert {"serve req/s c=4", "serve CPU per request c=4"} <= names, doc["ratios"]
    assert "fleet ingest msgs/s per core (SQLite)" in names or "skipped" in doc["ingest"]
    assert all(r["rounds"] == 1 and r["median"] > 0 for r in gated)
    failed = any(r["below"] for r in gated) or any("failed" in doc.get(k, {}) for k in ("serve", "ingest"))
    assert out.returncode == (1 if failed else 0)
    assert "guard: " in out.stdout and doc["base"]["commit"] != doc["head"]["commit"]
