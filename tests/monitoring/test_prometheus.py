"""Alert rules under promtool, the manager's /metrics, and a real Prometheus scraping `edgeml serve` and the manager."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from edgeml.fleet.broker import free_port
from edgeml.fleet.db import FleetDB
from edgeml.fleet.prometheus import FleetMetrics, MetricsServer, families

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
ALERTS = ("EdgemlDeviceOffline", "EdgemlModelErrorRateHigh", "EdgemlP95LatencyRegression", "EdgemlModelDrift",
          "EdgemlRolloutStalled", "EdgemlExperimentArmErrorRate")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (Debian package `prometheus`: apt-get install prometheus)")
    return path


def test_alert_rules_are_valid_and_every_alert_has_a_unit_test():
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = (RULES / "tests.yml").read_text()
    rules = (RULES / "alerts.yml").read_text()
    for alert in ALERTS:
        assert f"alert: {alert}" in rules
        assert f"alertname: {alert}" in tests and tests.count(f"alertname: {alert}") >= 2, alert   # fires + quiet
    run = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=RULES, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_dashboard_queries_series_the_manager_exports():
    dash = json.loads((ROOT / "deploy" / "grafana" / "edgeml-fleet.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in ("edgeml_fleet_devices", "edgeml_fleet_drift_score", "edgeml_fleet_model_latency_ms_bucket",
                 "edgeml_fleet_rollout_wave", "edgeml_fleet_gate_value"):
        assert name in exprs


def _fleet_db(tmp_path: Path) -> FleetDB:
    db = FleetDB(tmp_path / "fleet.db")
    db.x("INSERT INTO devices (device_id, online, last_seen, active) VALUES ('cam-1', 1, 100, ?)",
         (json.dumps({"name": "digits", "version": "1"}),))
    db.x("INSERT INTO devices (device_id, online, last_seen) VALUES ('cam-\"2', 0, 50)")
    db.x("INSERT INTO telemetry VALUES ('cam-1', 'digits', '1', 100, 40, 2, ?, 12.5)",
         (json.dumps({"1": 30, "5": 38, "+Inf": 40}),))
    return db


def test_manager_metrics_text(tmp_path):
    text = FleetMetrics(_fleet_db(tmp_path), None).render()
    assert 'edgeml_fleet_devices{state="online"} 1' in text and 'edgeml_fleet_devices{state="offline"} 1' in text
    assert 'edgeml_fleet_device_online{device="cam-\\"2"} 0' in text                 # label escaping
    assert 'edgeml_fleet_model_latency_ms_bucket{model="digits",version="1",le="+Inf"} 40' in text
    assert 'edgeml_fleet_version_devices{model="digits",version="1"} 1' in text
    assert "edgeml_fleet_drift_score" in families(text)


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def test_real_prometheus_scrapes_edgeml_serve_and_the_manager(tmp_path):
    prometheus = _binary("prometheus")
    import edgeml

    art = edgeml.compile(str(ROOT / "examples" / "digits" / "digits.onnx"), target="x86_64",
                         output=str(tmp_path / "digits.edgepkg"), calib=str(ROOT / "examples/digits/calib.npz"),
                         eval=str(ROOT / "examples/digits/eval.npz"), backend="onnxruntime", precision="fp32")
    assert art
    metrics = MetricsServer(FleetMetrics(_fleet_db(tmp_path), None)).start()
    serve_port, prom_port = free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "serve", str(tmp_path / "digits.edgepkg"),
                              "--port", str(serve_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{RULES / 'alerts.yml'}]
scrape_configs:
  - job_name: manager
    static_configs: [{{targets: ['127.0.0.1:{metrics.port}']}}]
  - job_name: serve
    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]
""")
    prom = subprocess.Popen([prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 60
        wanted = ("edgeml_fleet_devices", "edgeml_fleet_device_online", "edgeml_inference_requests_total",
                  'up{job="serve"} == 1', 'up{job="manager"} == 1')
        while time.monotonic() < deadline and len(seen) < len(wanted):
            time.sleep(1)
            for q in wanted:
                try:
                    body = json.loads(_get(f"http://127.0.0.1:{prom_port}/api/v1/query?query=" + urllib.parse.quote(q)))
                except OSError:
                    continue
                if body.get("status") == "success" and body["data"]["result"]:
                    seen[q] = len(body["data"]["result"])
        assert len(seen) == len(wanted), (seen, (tmp_path / "prometheus.log").read_text()[-2000:])
        assert seen["edgeml_fleet_devices"] == 2
    finally:
        prom.terminate()
        serve.terminate()
        prom.wait(20)
        serve.wait(20)
        metrics.stop()
