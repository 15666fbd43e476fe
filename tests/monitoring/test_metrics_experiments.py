"""Experiment arms on the manager's /metrics: the numbers of `experiment status`, per experiment and arm."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict

import pytest

from edgeml.fleet import experiments as E
from edgeml.fleet.db import FleetDB
from edgeml.fleet.prometheus import FleetMetrics, families

BUCKETS_FAST = {"0.25": 10, "0.5": 90, "1": 100, "+Inf": 100}
BUCKETS_SLOW = {"0.25": 0, "0.5": 0, "1": 0, "2": 5, "5": 95, "+Inf": 100}


def _arm(version: str, buckets: dict[str, int], feedback: int, wins: int) -> dict:
    return {"version": version, "requests": 100, "failures": 1, "latency_buckets_ms": buckets,
            "latency_sum_ms": 50.0, "feedback": feedback, "reward_sum": float(wins), "reward_sq": float(wins)}


def _ab_db(tmp_path, horizon_reached: bool) -> tuple[FleetDB, str]:
    db = FleetDB(tmp_path / "fleet.db")
    E.ensure_tables(db)
    spec = E.build_spec({"name": "ab-1", "champion": "tiny@1.0.0", "challenger": "tiny@2.0.0", "mode": "ab",
                         "baseline": 0.5, "mde": 0.15})
    db.x("INSERT INTO experiments VALUES (?,?,?,?,?,?,?,?,?)",
         ("e1", spec.name, json.dumps(asdict(spec)), "running", json.dumps(["d1", "d2"]), "test", 100.0, 100.0, 100.0))
    n = spec.horizon if horizon_reached else 20
    for dev in ("d1", "d2"):       # two devices' cumulative reports, as agents send them in telemetry
        report = {"experiment": "e1", "mode": "ab", "shadow": None,
                  "arms": [_arm("1.0.0", BUCKETS_FAST, n, n // 2), _arm("2.0.0", BUCKETS_SLOW, n, int(n * 0.7))]}
        assert E.wire_problem(report) is None
        E.record(db, {"device_id": dev, "ts": 101.0, "experiments": [report]})
    return db, spec.name


def _value(text: str, prefix: str) -> float:
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].rsplit(" ", 1)[1])


def test_metrics_export_each_arm_and_the_decision_of_an_ab_test(tmp_path):
    db, _ = _ab_db(tmp_path, horizon_reached=True)
    st = E.status(db, "e1")
    text = FleetMetrics(db, None, clock=lambda: 200.0).render()
    exp = 'experiment="e1",name="ab-1",model="tiny"'
    champ, chall = f'{{{exp},arm="1.0.0",role="champion"', f'{{{exp},arm="2.0.0",role="challenger"'
    assert _value(text, f"edgeml_fleet_experiment_arm_requests_total{champ}}}") == 200      # 2 devices x 100
    assert _value(text, f"edgeml_fleet_experiment_arm_failures_total{chall}}}") == 2
    assert _value(text, f"edgeml_fleet_experiment_arm_feedback_total{chall}}}") == st["arms"][1]["feedback"]
    assert _value(text, f"edgeml_fleet_experiment_arm_outcome{chall}}}") == pytest.approx(st["arms"][1]["outcome"])
    assert _value(text, f'edgeml_fleet_experiment_arm_outcome{chall},bound="low"}}') == pytest.approx(
        st["arms"][1]["outcome_ci"][0])
    assert _value(text, f"edgeml_fleet_experiment_arm_p95_latency_seconds{champ}}}") == 0.001   # rank 95: <= 1 ms
    assert _value(text, f"edgeml_fleet_experiment_arm_p95_latency_seconds{chall}}}") == 0.005
    assert _value(text, f"edgeml_fleet_experiment_arm_p50_latency_seconds{champ}}}") == 0.0005
    decision = st["decision"]["decision"]
    assert decision != "continue"          # at the horizon: promote or reject (here the slower challenger)
    assert _value(text, f'edgeml_fleet_experiment_decision{{{exp},decision="{decision}"}}') == 1
    assert _value(text, f'edgeml_fleet_experiment_p_value{{{exp},test="primary"}}') == pytest.approx(
        st["test"]["p_value"])
    assert _value(text, f'edgeml_fleet_experiment_p_value{{{exp},test="latency"}}') == pytest.approx(
        st["latency_test"]["p_value"])
    assert _value(text, f'edgeml_fleet_experiment_state{{{exp},mode="ab",state="running"}}') == 1
    assert _value(text, f"edgeml_fleet_experiment_samples_needed{{{exp}}}") == 0


def test_metrics_before_the_horizon_say_continue_and_how_many_outcomes_are_missing(tmp_path):
    db, _ = _ab_db(tmp_path, horizon_reached=False)
    st = E.status(db, "e1")
    text = FleetMetrics(db, None, clock=lambda: 200.0).render()
    exp = 'experiment="e1",name="ab-1",model="tiny"'
    assert _value(text, f'edgeml_fleet_experiment_decision{{{exp},decision="continue"}}') == 1
    assert _value(text, f"edgeml_fleet_experiment_samples_needed{{{exp}}}") == st["decision"]["samples_needed_per_arm"] > 0


def test_experiment_series_are_bounded_and_absent_without_experiments(tmp_path):
    db = FleetDB(tmp_path / "fleet.db")
    text = FleetMetrics(db, None).render()            # no experiments table yet: families declared, no samples
    assert "edgeml_fleet_experiment_arm_requests_total" in families(text)
    assert "edgeml_fleet_experiment_arm_requests_total{" not in text
    (tmp_path / "x").mkdir()
    db, _ = _ab_db(tmp_path / "x", horizon_reached=False)
    db.x("UPDATE experiments SET state = 'stopped', updated_at = 100")
    old = FleetMetrics(db, None, clock=lambda: 100.0 + 2 * 86400).render()     # ended two days ago: left out
    assert "edgeml_fleet_experiment_arm_requests_total{" not in old
    recent = FleetMetrics(db, None, clock=lambda: 200.0).render()
    assert 'edgeml_fleet_experiment_state{experiment="e1",name="ab-1",model="tiny",mode="ab",state="stopped"} 1' in recent


def test_promtool_accepts_the_exposition_with_experiment_series(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (Debian package `prometheus`: apt-get install prometheus)")
    db, _ = _ab_db(tmp_path, horizon_reached=True)
    text = FleetMetrics(db, None, clock=lambda: 200.0).render()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if "experiment" in ln]
    assert not problems, problems


def test_grafana_dashboard_plots_experiment_series_the_manager_exports(tmp_path):
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "edgeml-fleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"edgeml_fleet_experiment_\w+", e)}
    db, _ = _ab_db(tmp_path, horizon_reached=True)
    exported = set(families(FleetMetrics(db, None, clock=lambda: 200.0).render()))
    assert {"edgeml_fleet_experiment_arm_outcome", "edgeml_fleet_experiment_arm_requests_total",
            "edgeml_fleet_experiment_arm_p95_latency_seconds", "edgeml_fleet_experiment_decision"} <= used
    assert used <= exported, used - exported
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_manager_notifier_fires_when_an_experiment_arm_fails_too_often(tmp_path):
    from edgeml.fleet.alerts import Thresholds, evaluate

    db, _ = _ab_db(tmp_path, horizon_reached=False)
    quiet = [a for a in evaluate(db, None, 200.0, Thresholds(min_requests=100)) if "Experiment" in a.name]
    assert quiet == []                               # 2 of 200 failed: 1 % is under 5 %
    report = json.loads(db.one("SELECT report FROM experiment_reports WHERE device_id = 'd1'")["report"])
    report["arms"][1]["failures"] = 30              # the challenger now fails 31 of its 200 requests
    E.record(db, {"device_id": "d1", "ts": 102.0, "experiments": [report]})
    fired = [a for a in evaluate(db, None, 200.0, Thresholds(min_requests=100)) if "Experiment" in a.name]
    assert [(a.name, a.labels["arm"], a.labels["role"], a.severity) for a in fired] == [
        ("EdgemlExperimentArmErrorRate", "2.0.0", "challenger", "critical")]
    assert "31/200" in fired[0].summary


def test_p95_regression_needs_a_real_slowdown_not_one_bucket_of_jitter(tmp_path):
    """Seen in the experiment demo under load: sub-ms models at p95 <= 1 vs <= 2 ms (2x) fired a regression."""
    from edgeml.fleet.alerts import evaluate

    db = FleetDB(tmp_path / "fleet.db")

    def telemetry(version: str, buckets: dict[str, int]) -> None:
        db.x("INSERT OR REPLACE INTO telemetry VALUES ('cam-1', 'tiny', ?, 100, 200, 0, ?, 100.0)",
             (version, json.dumps(buckets)))

    telemetry("1.0.0", {"0.5": 195, "1": 200, "+Inf": 200})
    telemetry("2.0.0", {"0.5": 0, "1": 0, "2": 200, "+Inf": 200})            # p95 <= 2 ms vs <= 1 ms
    assert not [a for a in evaluate(db, None, 200.0) if a.name == "EdgemlP95LatencyRegression"]
    telemetry("2.0.0", {"0.5": 0, "1": 0, "2": 0, "10": 200, "+Inf": 200})   # p95 <= 10 ms: 10x and 9 ms slower
    fired = [a for a in evaluate(db, None, 200.0) if a.name == "EdgemlP95LatencyRegression"]
    assert [a.labels["version"] for a in fired] == ["2.0.0"]
