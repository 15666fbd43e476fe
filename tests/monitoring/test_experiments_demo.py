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
