"""deploy/mosquitto/site-bridge.conf, tested: two real Mosquitto processes, a site broker run with that file (only
ports, addresses, paths and authentication changed for a test) bridging to a central one; an agent on the site
broker, the manager on the central one; a rollout completes (desired down, presence/events/heartbeats up)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edgeml.fleet.broker import Broker, free_port
from edgeml.fleet.testing import wait_until

pytestmark = pytest.mark.mqtt
SITE_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "site-bridge.conf"


def site_conf_for_test(central_port: int, site_port: int, workdir: Path) -> str:
    """The shipped file with only what a test must change: ports, the central address, paths, anonymous access."""
    out = []
    for line in SITE_CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            line = f"listener {site_port} 127.0.0.1"
        elif key == "address":
            line = f"address 127.0.0.1:{central_port}"
        elif key == "allow_anonymous":
            line = "allow_anonymous true"
        elif key == "password_file":
            continue
        elif key == "persistence_location":
            line = f"persistence_location {workdir}/"
        out.append(line)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        out.append("user root")
    return "\n".join(out) + "\n"


def test_shipped_bridge_forwards_desired_down_and_the_rest_up():
    topics = [line.split()[1:3] for line in SITE_CONF.read_text().splitlines() if line.startswith("topic ")]
    assert sorted(topics) == sorted([["edgeml/v1/devices/+/desired", "in"]] + [
        [f"edgeml/v1/devices/+/{kind}", "out"] for kind in ("presence", "heartbeat", "events", "telemetry")])


def test_agent_on_a_site_broker_manager_on_the_central_one(mosquitto_bin, start_manager, agents, artifacts, tmp_path):
    central = Broker(tmp_path / "central", kind="mosquitto").start()
    site_port, site_dir = free_port(), tmp_path / "site"
    site_dir.mkdir()
    conf = site_dir / "site-bridge.conf"
    conf.write_text(site_conf_for_test(central.port, site_port, site_dir))
    with open(site_dir / "mosquitto.log", "wb") as log:
        site = subprocess.Popen([mosquitto_bin, "-c", str(conf), "-v"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        svc = start_manager(central.url)
        m = svc.manager
        m.publish_artifact(artifacts["v1"], "pytest")
        agents.start("site-0", f"mqtt://127.0.0.1:{site_port}", labels="fleet=site")
        wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id = 'site-0'")[0],
                   30, "the site's agent online at the manager (presence/heartbeat over the bridge)")
        r = m.start_rollout("tiny@1.0.0", selector={"fleet": "site"}, waves=[1.0], max_failure_rate=0.0,
                            bake_s=0.0, gates=[], actor="pytest")
        s = wait_until(lambda: (s := m.rollout_status(r["id"]))["state"] in ("completed", "rolled_back", "aborted")
                       and s, 40, "the rollout over the bridge")
        assert s["state"] == "completed" and s["per_wave"] == [{"committed": 1}], s
        assert "committed" in agents.log("site-0")
        assert site.poll() is None, (site_dir / "mosquitto.log").read_text()[-2000:]
    finally:
        agents.stop_all()
        site.terminate()
        site.wait(10)
        central.stop()
