"""``edgeml fleet demo --scenario experiment`` as a user runs it: real broker, agents, models; < 2 minutes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeml.fleet.broker import mosquitto_binary

pytestmark = pytest.mark.mqtt


def test_experiment_demo_shows_shadow_agreement_and_an_ab_decision_with_its_p_value(tmp_path):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); the demo needs a real broker")
    pytest.importorskip("onnx", reason="the demo builds its artifacts with the onnx package")
    out = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "demo", "--scenario", "experiment",
                          "--broker-kind", "mosquitto", "--workdir", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert s["seconds"] < 120
    assert s["shadow"]["compared"] > 0 and 0 <= s["shadow"]["agreement"] <= 1 and s["shadow"]["failures"] == 0
    assert s["ab"]["decision"]["decision"] == "promote" and s["ab"]["test"]["p_value"] < 0.025
    assert s["promoted"] is True
    # the broken challenger's failures reach the manager's webhook notifier; stopping the test resolves the alert
    al = s["alerts"]
    assert al["failed_requests"] > 100
    fired, resolved = al["fired"], al["resolved"]
    assert fired["status"] == "firing" and fired["labels"]["alertname"] == "EdgemlExperimentArmErrorRate"
    assert fired["labels"]["arm"] == "3.0.0" and fired["labels"]["role"] == "challenger"
    assert resolved["status"] == "resolved" and resolved["fingerprint"] == fired["fingerprint"]
    assert f"failed {al['failed_requests']}/{al['failed_requests']} requests" in fired["annotations"]["summary"]
    failures = [ln for ln in al["metrics"] if ln.startswith("edgeml_fleet_experiment_arm_failures_total")
                and 'arm="3.0.0"' in ln]
    assert failures and failures[0].endswith(f" {al['failed_requests']}")
    assert any(q.startswith("EdgemlP95LatencyRegression quiet") for q in al["quiet"])
