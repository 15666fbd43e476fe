"""``--profile lab`` on the real processes: a manager, two agents and ``fleet rollout start`` given only
``--profile lab`` (no timing flags) complete a 2-wave rollout in seconds -- with the defaults (bake 60 s per
wave, health window 10 s, 10 s reporting) the same rollout takes over two minutes. Explicit options win."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from edgeml.fleet.broker import free_port
from edgeml.fleet.db import FleetDB
from edgeml.fleet.manager import Manager, ManagerConfig, rollout_status
from edgeml.fleet.testing import wait_until

pytestmark = pytest.mark.mqtt
CLI = [sys.executable, "-m", "edgeml.cli"]


def test_lab_profile_rollout_takes_seconds(broker, keys, artifacts, tmp_path):
    db_path, store = tmp_path / "fleet.db", tmp_path / "store"
    m = Manager(ManagerConfig(db=db_path, store_dir=store), None)
    m.publish_artifact(artifacts["v1"], "test")
    m.db.close()
    procs = []
    try:
        with open(tmp_path / "manager.log", "wb") as log:
            procs.append(subprocess.Popen(CLI + ["fleet", "manager", "--profile", "lab", "--db", str(db_path),
                                                 "--store", str(store), "--broker", broker.url, "--http-port",
                                                 str(free_port()), "--sign-key", str(keys["key"])],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for i in range(2):
            with open(tmp_path / f"lab-{i}.log", "wb") as log:
                procs.append(subprocess.Popen(CLI + ["agent", "--profile", "lab", "--broker", broker.url,
                                                     "--device-id", f"lab-{i}", "--labels", "fleet=lab",
                                                     "--state-dir", str(tmp_path / f"lab-{i}"), "--trusted-key",
                                                     str(keys["pub"]), "--http-port", "-1"],
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        db = FleetDB(db_path, readonly=True)
        wait_until(lambda: db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id LIKE 'lab-%'")[0]
                   == 2, 30, "2 lab agents online")
        started = time.monotonic()
        out = subprocess.run(CLI + ["fleet", "rollout", "start", "tiny@1.0.0", "--db", str(db_path), "--selector",
                                    "fleet=lab", "--waves", "50%,100%", "--profile", "lab", "--json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout)["id"]
        s = wait_until(lambda: (s := rollout_status(db, rid))["state"] == "completed" and s, 40,
                       "the lab rollout to complete")
        took = time.monotonic() - started
        print(f"\n2-wave rollout to 2 agents with --profile lab: {took:.1f}s (defaults: > 120 s of bake alone)")
        assert s["bake_s"] == 2.0 and s["per_wave"] == [{"committed": 1}, {"committed": 1}]
        assert took < 60
        db.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_explicit_options_win_over_the_profile():
    """The rule every command uses (fleet/profiles.py), on a real click command: the profile fills options left at
    their defaults, and an option given explicitly -- even with its default value -- wins."""
    import click

    from edgeml.fleet.profiles import apply_profile, profile_option

    @click.command()
    @click.option("--bake", default="60s")
    @click.option("--health-window", default=None)
    @profile_option
    def cmd(bake, health_window, profile):
        click.echo(json.dumps(apply_profile(profile, "rollout", {"bake": bake, "health_window": health_window})))

    def run(*args: str) -> dict:
        res = CliRunner().invoke(cmd, list(args))
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    assert run() == {"bake": "60s", "health_window": None}
    assert run("--profile", "lab") == {"bake": "2s", "health_window": "1s"}
    assert run("--profile", "lab", "--bake", "7s") == {"bake": "7s", "health_window": "1s"}
    assert run("--profile", "lab", "--bake", "60s") == {"bake": "60s", "health_window": "1s"}
    assert CliRunner().invoke(cmd, ["--profile", "fast"]).exit_code == 2       # unknown profile: a usage error
