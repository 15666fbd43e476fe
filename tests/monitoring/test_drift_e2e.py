"""End to end on real parts: Mosquitto, the manager, an agent subprocess serving the compiled digits model over
HTTP; clean traffic -> not drifted, inverted images -> drifted (edgeml fleet drift), and the webhook fires."""

from __future__ import annotations

import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from edgeml.fleet.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"


def _infer(endpoint: str, image: np.ndarray) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": image.astype(np.float32).ravel().tolist()}]}
    req = urllib.request.Request(f"{endpoint}/v2/models/digits/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _drift(db: Path) -> list[dict]:
    from edgeml.cli import main

    res = CliRunner().invoke(main, ["fleet", "drift", "--db", str(db), "--window", "10m", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)["reports"]


def _samples(db: Path) -> int:
    reps = _drift(db)
    return reps[0]["samples"] if reps else 0


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        return


def test_agent_sketches_reach_the_manager_and_drift_is_detected(tmp_path, broker, keys, start_manager, agents):
    import edgeml
    from edgeml.fleet.alerts import Notifier

    art = tmp_path / "digits.edgepkg"
    edgeml.compile(str(DIGITS / "digits.onnx"), target="x86_64", output=str(art), calib=str(DIGITS / "calib.npz"),
                   eval=str(DIGITS / "eval.npz"), backend="onnxruntime", precision="fp32", sign_key=keys["key"])
    svc = start_manager(broker.url)
    mgr = svc.manager
    mgr.publish_artifact(art, "test")
    agents.start("cam-1", broker.url, extra=["--http-port", "0", "--drift-rate", "1", "--telemetry", "0.5s"])
    wait_until(lambda: mgr.db.one("SELECT 1 FROM devices WHERE device_id = 'cam-1' AND online = 1"), 30, "agent online")
    rollout = mgr.start_rollout("digits@0.1.0", selector={}, waves=[1.0], max_failure_rate=0.0, bake_s=0.5,
                                gates=["drift_psi<0.2"], actor="test")
    wait_until(lambda: mgr.rollout_status(rollout["id"])["state"] == "completed", 60, "rollout completed")
    endpoint = mgr.db.one("SELECT endpoint FROM devices WHERE device_id = 'cam-1'")["endpoint"]
    gates = {g["gate"]: g for g in mgr.rollout_status(rollout["id"])["gates"]}
    assert gates["drift_psi"]["ok"] is True            # no data yet is not a breach

    clean = np.load(DIGITS / "calib.npz")["input"]
    for img in clean[:120]:
        _infer(endpoint, img[None])
    wait_until(lambda: _samples(tmp_path / "fleet.db") >= 120, 30, "clean sketches at the manager")
    rep = _drift(tmp_path / "fleet.db")[0]
    assert rep["target"] == "digits@0.1.0" and rep["drifted"] is False, rep
    assert rep["windows"] >= 1 and rep["devices"] == 1

    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    notifier = Notifier(mgr.db, mgr.store.root, f"http://127.0.0.1:{hook.server_address[1]}/hook")
    try:
        notifier.round()
        assert not any(a["labels"]["alertname"] == "EdgemlModelDrift" for p in _Hook.received for a in p["alerts"])
        for img in clean[:150]:
            _infer(endpoint, 1.0 - img[None])            # inverted images
        wait_until(lambda: _samples(tmp_path / "fleet.db") >= 270, 30, "shifted sketches at the manager")
        rep = _drift(tmp_path / "fleet.db")[0]
        assert rep["drifted"] is True and rep["p_value"] < 0.01 and rep["score"] >= 0.2, rep
        assert rep["top"][0]["name"].startswith("input:"), rep["top"]
        payload = notifier.round()
        assert payload is not None and payload["version"] == "4"
        fired = [a for a in payload["alerts"] if a["labels"]["alertname"] == "EdgemlModelDrift"]
        assert fired and fired[0]["status"] == "firing" and fired[0]["labels"]["model"] == "digits"
        assert _Hook.received[-1] == payload
    finally:
        hook.shutdown()
