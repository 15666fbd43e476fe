"""SIGTERM stops an agent that serves a model (with a client's idle keep-alive connection open) and a manager with
/metrics promptly. The issue saw ~2.7 s; here the manager took 0.95-1.2 s before the fix (the artifact store and
/metrics servers noticed shutdown() only at their next 0.5 s poll, one after the other), the agent 0.3-0.4 s.
Real subprocesses; the bound is 2 s (the measured times are printed) so a busy CI box does not flake."""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time

import pytest

from edgeml.fleet.broker import free_port
from edgeml.fleet.testing import wait_until

pytestmark = pytest.mark.mqtt
STOP_BOUND_S = 2.0


def _stop_seconds(proc: subprocess.Popen) -> float:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    took = time.monotonic() - started
    assert proc.returncode == 0
    return took


def test_agent_serving_a_model_and_manager_stop_promptly_on_sigterm(broker, start_manager, agents, artifacts,
                                                                     tmp_path, keys):
    svc = start_manager(broker.url)
    m = svc.manager
    m.publish_artifact(artifacts["v1"], "pytest")
    http_port = free_port()
    agent = agents.start("stop-0", broker.url, labels="fleet=stop", extra=["--http-port", str(http_port)])
    wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id = 'stop-0'")[0], 30,
               "the agent online")
    r = m.start_rollout("tiny@1.0.0", selector={"fleet": "stop"}, waves=[1.0], max_failure_rate=0.0, bake_s=0.0,
                        gates=[], actor="pytest")
    wait_until(lambda: m.rollout_status(r["id"])["state"] == "completed", 30, "the model installed and served")
    client = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)    # a live client's idle keep-alive socket
    client.request("GET", "/v2/health/ready")
    assert client.getresponse().read() is not None
    agent_s = _stop_seconds(agent)
    client.close()

    log = open(tmp_path / "manager.log", "wb")
    manager = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "fleet", "manager", "--db",
                                str(tmp_path / "m2.db"), "--broker", broker.url, "--http-port", str(free_port()),
                                "--metrics-port", "0", "--sign-key", str(keys["key"])],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    wait_until(lambda: "connected to" in (tmp_path / "manager.log").read_text(), 30, "the manager connected")
    manager_s = _stop_seconds(manager)
    print(f"\nSIGTERM to exit: agent serving a model {agent_s:.2f}s, manager with /metrics {manager_s:.2f}s")
    assert agent_s < STOP_BOUND_S and manager_s < STOP_BOUND_S, (agent_s, manager_s)
