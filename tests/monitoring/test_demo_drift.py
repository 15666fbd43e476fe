"""``edgeml fleet demo --scenario drift`` as a user runs it: real Mosquitto, manager, agent subprocesses serving the
compiled digits model; silent on clean data, drift detected on inverted images, the alert posted to a webhook."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeml.fleet.broker import mosquitto_binary

pytestmark = pytest.mark.mqtt


def test_drift_demo_is_silent_on_clean_data_detects_the_shift_and_posts_the_alert(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); the demo needs a real broker")
    out = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "demo", "--scenario", "drift",
                          "--broker-kind", "mosquitto", "--workdir", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert s["seconds"] < 120
    clean, shifted = s["clean"], s["shifted"]
    assert clean["drifted"] is False and clean["samples"] >= 200 and clean["devices"] == 2, clean
    assert s["clean_alert_quiet"] is True
    assert shifted["drifted"] is True and shifted["p_value"] < 0.01 and shifted["score"] >= 0.2, shifted
    assert shifted["samples"] >= clean["samples"] + 150
    assert shifted["top"] and shifted["top"][0]["name"].startswith(("input:", "prediction:")), shifted["top"]
    by_device = {r["group"]: r["drifted"] for r in s["per_device"]}
    assert by_device == {"device=cam-1": False, "device=cam-2": True}      # only the camera fed inverted images
    # the manager's notifier posted Alertmanager webhook JSON to the demo's receiver, drift only after the shift
    alert = s["alert"]
    assert alert["status"] == "firing" and alert["labels"]["alertname"] == "EdgemlModelDrift"
    assert alert["labels"]["model"] == "digits" and alert["labels"]["version"] == "0.1.0"
    assert any(p["version"] == "4" and alert in p["alerts"] for p in s["webhook_payloads"])
    assert 'edgeml_fleet_drift_drifted{model="digits",version="0.1.0"} 1' in s["metrics"]


def test_health_probes_are_not_sampled_into_drift_sketches(tmp_path):
    """The agent's probes send the same golden input every health window; sampled, they would make a clean
    device look drifted (the demo's clean phase raised EdgemlModelDrift before this was fixed)."""
    pytest.importorskip("edgeml.runtime.server", reason="edgeml.runtime.server is not installed")
    import json as _json
    import time
    import urllib.request
    from pathlib import Path

    import numpy as np

    import edgeml
    from edgeml.fleet.serving import HttpServing

    digits = Path(__file__).resolve().parents[2] / "examples" / "digits"
    art = edgeml.compile(str(digits / "digits.onnx"), target="x86_64", output=str(tmp_path / "d.edgepkg"),
                         calib=str(digits / "calib.npz"), eval=str(digits / "eval.npz"), backend="onnxruntime",
                         precision="fp32", benchmark=False)
    serving = HttpServing(tmp_path / "cache", port=0, drift_rate=1.0)
    try:
        serving.activate(Path(art), "digits", "0.1.0")
        for _ in range(5):
            serving.probe()
        img = np.load(digits / "calib.npz")["input"][0]
        body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": img.ravel().tolist()}]}
        host, port = serving.address
        req = urllib.request.Request(f"http://{host}:{port}/v2/models/digits/infer", data=_json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        n, deadline = 0, time.monotonic() + 10
        while n < 1 and time.monotonic() < deadline:      # the sampler bins in its own thread
            n += sum(row["n"] for row in serving.drift_windows())
            time.sleep(0.05)
        time.sleep(0.3)
        n += sum(row["n"] for row in serving.drift_windows())
        assert n == 1            # the client's request only, none of the 5 probes
        assert serving.stats()[0]["requests"] == 6        # the probes still count as served requests
    finally:
        serving.close()
