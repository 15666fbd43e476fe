"""Experiments end to end: real Mosquitto, the manager in process, two agents as subprocesses each with its
embedded v2 server, real ONNX models (tiny 1.0.0 champion, 2.0.0 challenger), feedback over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgeml.fleet.broker import Broker, free_port, mosquitto_binary
from edgeml.fleet.testing import wait_until

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); the end-to-end needs a real broker")
    pytest.importorskip("onnx", reason="building the test artifacts needs the onnx package")
    from edgeml.fleet.manager import ManagerConfig
    from edgeml.fleet.service import ManagerService
    from edgeml.fleet.testing import make_artifact
    from edgeml.fleet.transport import BrokerConfig
    from edgeml.runtime.signing import generate_keypair

    tmp = tmp_path_factory.mktemp("exp-fleet")
    key, pub = generate_keypair(tmp / "signing.key")
    broker = Broker(tmp / "mosquitto", kind="mosquitto").start()
    svc = ManagerService(ManagerConfig(db=tmp / "fleet.db", http_port=free_port(), heartbeat_timeout_s=5, tick_s=0.1,
                                       sign_key=key, health_window_s=0.3),
                         BrokerConfig(broker.url, backoff_min_s=0.2, backoff_max_s=1)).start()
    m = svc.manager
    for v in ("1.0.0", "2.0.0"):
        m.publish_artifact(make_artifact(tmp / f"tiny-{v}.edgepkg", "tiny", v, sign_key=key), "pytest")
    procs, ports = [], {}
    try:
        for i in range(2):
            dev = f"exp-{i}"
            ports[dev] = free_port()
            log = open(tmp / f"{dev}.log", "ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edgeml.cli", "agent", "--broker", broker.url, "--device-id", dev,
                 "--labels", "fleet=exp", "--state-dir", str(tmp / dev), "--trusted-key", str(pub),
                 "--heartbeat", "0.5s", "--telemetry", "1s", "--health-window", "0.3s",
                 "--http-port", str(ports[dev]), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ)))
            log.close()
        wait_until(lambda: m.db.one("SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id LIKE 'exp-%'")[0] == 2,
                   40, "2 agents online")
        r = m.start_rollout("tiny@1.0.0", selector={"fleet": "exp"}, waves=[1.0], max_failure_rate=0.0, bake_s=0.1,
                            gates=[], actor="pytest")
        wait_until(lambda: m.rollout_status(r["id"])["state"] == "completed", 60, "champion rolled out")
        wait_until(lambda: all(json.loads(d["active"] or "{}").get("version") == "1.0.0" for d in
                               m.db.q("SELECT active FROM devices WHERE device_id LIKE 'exp-%'")), 20, "registry on 1.0.0")
        yield {"m": m, "svc": svc, "ports": ports, "tmp": tmp}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        svc.stop()
        broker.stop()


def _post(url: str, doc: dict, headers: dict | None = None) -> tuple[dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read()), dict(r.headers)


def _infer(port: int, x: np.ndarray, rid: str) -> dict:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return _post(f"http://127.0.0.1:{port}/v2/models/tiny/infer", body, {"X-Request-ID": rid})[0]


def _command(m, command: str, args: dict) -> dict:
    return m.execute(command, args, "pytest")


def _running_everywhere(fleet, eid: str) -> bool:
    return _log_has(fleet, f"experiment {eid}")


def _log_has(fleet, text: str) -> bool:
    return all(text in (Path(fleet["tmp"]) / f"{d}.log").read_text(errors="replace") for d in fleet["ports"])


def test_shadow_experiment_reports_agreement_and_clients_only_see_the_champion(fleet):
    m = fleet["m"]
    st = _command(m, "experiment.start", {"name": "shadow-1", "champion": "tiny@1.0.0", "challenger": "tiny@2.0.0",
                                          "mode": "shadow", "sample": 1.0, "selector": {"fleet": "exp"}})
    eid = st["id"]
    assert st["devices"] == 2
    wait_until(lambda: _running_everywhere(fleet, eid), 30, "challenger installed beside the champion on both devices")
    rng = np.random.default_rng(0)
    versions = set()
    for i in range(30):
        for dev, port in fleet["ports"].items():
            versions.add(_infer(port, rng.standard_normal((1, 4)).astype(np.float32), f"s{i}-{dev}")["model_version"])
    assert versions == {"1.0.0"}
    from edgeml.fleet.experiments import status

    s = wait_until(lambda: (s := status(m.db, eid))["shadow"]["compared"] >= 50 and s, 20, "shadow comparisons reported")
    sh = s["shadow"]
    assert sh["failures"] == 0 and sh["mirrored"] + sh["dropped"] == 60
    assert 0.0 <= sh["agreement_ci"][0] <= sh["agreement"] <= sh["agreement_ci"][1] <= 1.0
    assert sh["challenger_p95_ms"] is not None and s["arms"][0]["requests"] == 60
    done = _command(m, "experiment.stop", {"id": eid})
    assert done["state"] == "stopped"
    wait_until(lambda: _log_has(fleet, f"experiment {eid} stopped"), 20, "devices stopped the experiment")


def test_ab_experiment_reaches_a_promote_decision_with_its_p_value_then_promotes(fleet):
    """The challenger's outcomes succeed 85 % of the time, the champion's 35 %: the fixed horizon (sized from
    baseline 0.35, mde 0.5) is reached and the two-proportion test says promote; promote rolls 2.0.0 out."""
    from edgeml.fleet.experiments import status

    m = fleet["m"]
    st = _command(m, "experiment.start", {"name": "ab-1", "champion": "tiny@1.0.0", "challenger": "tiny@2.0.0",
                                          "mode": "ab", "split": 0.5, "baseline": 0.35, "mde": 0.5,
                                          "selector": {"fleet": "exp"}})
    eid, horizon = st["id"], st["decision"]["horizon_per_arm"]
    assert st["decision"]["decision"] == "continue" and st["decision"]["samples_needed_per_arm"] == horizon
    wait_until(lambda: _running_everywhere(fleet, eid), 30, "A/B experiment running on both devices")
    rng = np.random.default_rng(1)
    x = np.ones((1, 4), np.float32)
    per_version = {"1.0.0": 0, "2.0.0": 0}
    i = 0
    while min(per_version.values()) < horizon + 5 and i < 2000:
        dev = f"exp-{i % 2}"
        port = fleet["ports"][dev]
        rid = f"ab{i}"
        v = _infer(port, x, rid)["model_version"]
        per_version[v] += 1
        reward = int(rng.random() < (0.85 if v == "2.0.0" else 0.35))
        _post(f"http://127.0.0.1:{port}/v2/models/tiny/feedback", {"id": rid, "reward": reward})
        i += 1
    s = wait_until(lambda: (s := status(m.db, eid))["decision"]["decision"] != "continue" and s, 20,
                   "the decision at the horizon")
    assert s["decision"]["decision"] == "promote", s
    assert s["test"]["p_value"] < 0.025 and s["test"]["ci_low"] > 0
    assert {a["role"]: a["feedback"] for a in s["arms"]} == {"champion": per_version["1.0.0"],
                                                           "challenger": per_version["2.0.0"]}
    out = _command(m, "experiment.promote", {"id": eid})
    assert out["state"] == "promoted" and out["rollout"]["target"] == "tiny@2.0.0"
    wait_until(lambda: m.rollout_status(out["rollout"]["id"])["state"] == "completed", 60, "challenger rolled out")
