"""kubectl-style rollouts: ``--wait`` / ``--watch`` exit codes against a real manager, broker and agent; the
pre-flight that refuses a target no selected device can run; ``fleet artifacts``; ``fleet devices forget``."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from edgeml.cli import main
from edgeml.fleet.broker import Broker, free_port, mosquitto_binary


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def db_with_devices(tmp_path):
    """A fleet database with tiny@1.0.0 (target x86_64) published and three devices registered by hand."""
    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.testing import make_artifact

    db = tmp_path / "fleet.db"
    art = make_artifact(tmp_path / "tiny.edgepkg", "tiny", "1.0.0")
    assert cli("fleet", "publish", art, "--db", db).exit_code == 0
    fdb = FleetDB(db)
    for device, online, host in (("arm-1", 0, "aarch64-a72"), ("arm-2", 1, "aarch64-a76"), ("pc-1", 0, "x86_64-avx2")):
        fdb.x("INSERT INTO devices (device_id, labels, online, first_seen, last_seen) VALUES (?,?,?,?,?)",
              (device, json.dumps({"host-target": host, "site": "a" if device.startswith("arm") else "b"}), online,
               time.time(), time.time()))
    fdb.close()
    return db


def test_cannot_run_is_certain_only():
    from edgeml.fleet.rollout_cli import cannot_run

    assert "aarch64 host" in cannot_run("x86_64", "aarch64-a72")
    assert "lacks" in cannot_run("x86_64-avx512-bf16", "x86_64-avx2")
    assert cannot_run("x86_64", "x86_64-avx2") is None          # a subset of what the host has
    assert cannot_run("x86_64-avx2", "x86_64-avx512-vnni") is None
    assert cannot_run("x86_64", None) is None                   # an agent that did not say: not judged
    assert cannot_run("no-such-target", "x86_64") is None


def test_preflight_refuses_then_force_warns(db_with_devices):
    from edgeml.errors import FleetError
    from edgeml.fleet.rollout_cli import preflight

    res = cli("fleet", "rollout", "start", "tiny@1.0.0", "--db", db_with_devices, "--selector", "site=a")
    assert res.exit_code == 10
    assert "no selected device can run tiny@1.0.0 (target x86_64)" in res.output
    assert "arm-1: x86_64 artifact on a aarch64 host" in res.output and "--force" in res.output
    with pytest.raises(FleetError):
        preflight(db_with_devices, "tiny@1.0.0", {"site": "a"}, False)
    forced = preflight(db_with_devices, "tiny@1.0.0", {"site": "a"}, True)
    assert forced and forced[0].startswith("warning: --force: no selected device can run")
    mixed = preflight(db_with_devices, "tiny@1.0.0", {}, False)     # pc-1 can: a warning naming the others
    assert mixed and "2 of 3 selected devices cannot run" in mixed[0]
    assert preflight(db_with_devices, "tiny@1.0.0", {"site": "b"}, False) == []
    one = preflight(db_with_devices, "tiny@1.0.0", {"site": "b"}, False, [0.05, 0.25, 1.0])
    assert one == ["note: 1 device(s) selected: wave(s) 2 (25%), 3 (100%) get none and pass at once (waves per"
                   " device: 1, 0, 0; fewer waves, e.g. --waves 100%, say the same)"]


def test_artifacts_lists_published(db_with_devices):
    res = cli("fleet", "artifacts", "--db", db_with_devices)
    assert res.exit_code == 0 and "tiny@1.0.0" in res.output and "x86_64" in res.output
    rows = json.loads(cli("fleet", "artifacts", "--db", db_with_devices, "--json").output)
    assert [(r["name"], r["version"]) for r in rows] == [("tiny", "1.0.0")]


def test_devices_forget(db_with_devices):
    res = cli("fleet", "devices", "forget", "arm-2", "--db", db_with_devices)
    assert res.exit_code == 10 and "is online" in res.output
    res = cli("fleet", "devices", "forget", "arm-3", "--db", db_with_devices)
    assert res.exit_code == 10 and "did you mean" in res.output and "arm-1" in res.output and "arm-2" in res.output
    res = cli("fleet", "devices", "forget", "arm-1", "--db", db_with_devices)
    assert res.exit_code == 0 and "forgot device arm-1" in res.output
    ids = [d["device_id"] for d in json.loads(cli("fleet", "devices", "--db", db_with_devices, "--json").output)]
    assert ids == ["arm-2", "pc-1"]


@pytest.mark.mqtt
def test_wait_exits_0_on_completed_and_10_on_rollback(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    from edgeml.fleet.agent import Agent, AgentConfig
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.serving import LocalServing
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.testing import make_artifact, wait_until
    from edgeml.fleet.transport import BrokerConfig
    from edgeml.runtime.signing import generate_keypair

    key, pub = generate_keypair(tmp_path / "k")
    good = make_artifact(tmp_path / "v1.edgepkg", "tiny", "1.0.0", sign_key=key)
    bad = make_artifact(tmp_path / "v2.edgepkg", "tiny", "2.0.0", sign_key=key, kind="bad_golden")
    db = tmp_path / "fleet.db"
    broker = Broker(tmp_path / "mosquitto", kind="mosquitto").start()
    svc = agent = None
    try:
        svc = ManagerService(ManagerConfig(db=db, http_port=free_port(), heartbeat_timeout_s=5, tick_s=0.1, sign_key=key,
                                           health_window_s=0.3, offline_timeout_s=30),
                             BrokerConfig(broker.url, backoff_min_s=0.2, backoff_max_s=1)).start()
        for art in (good, bad):
            assert cli("fleet", "publish", art, "--db", db).exit_code == 0
        agent = Agent(AgentConfig("w-0", tmp_path / "w-0", labels={"fleet": "w"}, trusted_keys=[pub], heartbeat_s=0.5,
                                  telemetry_s=0.5, health_window_s=0.2),
                      BrokerConfig(broker.url), LocalServing(tmp_path / "w-0" / "cache")).start()
        wait_until(lambda: svc.manager.db.one("SELECT online FROM devices WHERE device_id = 'w-0'"), 20, "agent")
        ok = cli("fleet", "rollout", "start", "tiny@1.0.0", "--db", db, "--waves", "100%", "--bake", "0.2s", "--wait")
        assert ok.exit_code == 0, ok.output
        assert "rollout 1 (tiny@1.0.0) completed" in ok.output and "WAVE  SIZE  DEVICES" in ok.output
        failed = cli("fleet", "rollout", "start", "tiny@2.0.0", "--db", db, "--waves", "100%", "--bake", "0.2s",
                     "--wait", "--json")
        assert failed.exit_code == 10, failed.output
        assert json.loads(failed.output)["state"] == "rolled_back"
        watch = cli("fleet", "rollout", "status", "2", "--db", db, "--watch")
        assert watch.exit_code == 10 and "rollout 2 (tiny@2.0.0) ended rolled_back" in watch.output
        assert cli("fleet", "rollout", "status", "1", "--db", db, "--watch").exit_code == 0
        listing = cli("fleet", "rollout", "status", "--db", db)
        assert listing.exit_code == 0 and "ID  TARGET" in listing.output and "rolled_back" in listing.output
    finally:
        if agent is not None:
            agent.stop()
        if svc is not None:
            svc.stop()
        broker.stop()
