"""scripts/release_pipeline.py end to end: real compile, bench, Mosquitto, manager and agents."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import deploy_models as models

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "release_pipeline.py"

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]


def pipeline(fleet, tmp: Path, model: Path, version: str, eval_npz: Path, *extra: str) -> tuple[int, dict, str]:
    report = tmp / f"report-{version}"
    cmd = [sys.executable, str(SCRIPT), "--model", str(model), "--name", "clf", "--version", version,
           "--target", "x86_64", "--eval", str(eval_npz), "--sign-key", str(fleet.key),
           "--trusted-key", str(fleet.pub), "--releases", str(tmp / "releases"), "--fleet-db", str(fleet.db),
           "--report-dir", str(report), "--canary-selector", "ring=canary", "--canary-bake", "0.5s",
           "--bench-duration", "0.3s", "--bench-repeats", "3", "--rollout-timeout", "90",
           "--compile-arg=--backend=onnxruntime", "--compile-arg=--precision=fp32", "--compile-arg=--no-benchmark",
           "--compile-arg=--no-cache", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    data = json.loads((report / "pipeline.json").read_text()) if (report / "pipeline.json").exists() else {}
    return proc.returncode, data, proc.stdout + proc.stderr


def steps(data: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in data["steps"]}


def active(fleet, device: str) -> str | None:
    return fleet.devices()[device]["active"]


def test_pipeline_releases_to_canary_and_stops_an_accuracy_regression(fleet, tmp_path):
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx is not installed (pip install 'edgeml[compiler]'): the test builds its ONNX models")
    w = models.weights()
    good = models.write_classifier(tmp_path / "clf.onnx", w)
    eval_npz = models.write_eval(tmp_path / "eval.npz", w)
    fleet.start_manager()
    fleet.start_agent("canary-1", "ring=canary")
    fleet.start_agent("main-1", "ring=main")
    fleet.wait_online(["canary-1", "main-1"])

    # 1. first release: compiled, signed, published, canary rollout completes on the canary ring only
    code, data, out = pipeline(fleet, tmp_path, good, "1.0.0", eval_npz)
    assert code == 0, out + fleet.logs()
    assert data["outcome"] == "released"
    assert steps(data) == {"change": "passed", "compile": "passed", "accuracy-gate": "skipped", "speed-gate": "skipped",
                           "sign": "passed", "publish": "passed", "canary": "passed", "record": "passed"}
    assert active(fleet, "canary-1") == "clf@1.0.0"
    assert active(fleet, "main-1") is None
    assert (tmp_path / "report-1.0.0" / "pipeline.md").read_text().startswith("# Release clf@1.0.0: released")

    # 2. the same model again: nothing to release
    code, data, out = pipeline(fleet, tmp_path, good, "1.0.1", eval_npz)
    assert code == 0 and data["outcome"] == "unchanged", out

    # 3. a model that lost accuracy (class columns reversed): stopped at the accuracy gate, never published
    bad = models.write_classifier(tmp_path / "clf.onnx", w[:, ::-1].copy())
    code, data, out = pipeline(fleet, tmp_path, bad, "1.1.0", eval_npz)
    assert code == 1, out
    assert data["outcome"] == "stopped"
    assert steps(data) == {"change": "passed", "compile": "passed", "accuracy-gate": "failed"}
    gate = data["steps"][2]["data"]
    assert gate["previous_top1"] == 100.0 and gate["drop_points"] > 50
    assert "accuracy regression" in out
    assert json.loads((tmp_path / "releases" / "clf" / "latest.json").read_text())["version"] == "1.0.0"
    published = subprocess.run([sys.executable, "-m", "edgeml.cli", "fleet", "devices", "--db", str(fleet.db), "--json"],
                               capture_output=True, text=True, timeout=60)
    assert "1.1.0" not in published.stdout
    assert active(fleet, "canary-1") == "clf@1.0.0"

    # 4. a changed but equally accurate model: both gates pass against 1.0.0 and the canary gets it
    better = models.write_classifier(tmp_path / "clf.onnx", w * 2.0)
    code, data, out = pipeline(fleet, tmp_path, better, "1.2.0", eval_npz, "--max-slowdown", "10")
    assert code == 0, out + fleet.logs()
    assert steps(data)["accuracy-gate"] == "passed" and steps(data)["speed-gate"] == "passed"
    speed = data["steps"][3]["data"]
    # the verdict agrees with the measured ratio, and "passed" agrees with the gate's own rule
    assert {"better": speed["p50_ratio"] < 1.0, "worse": speed["p50_ratio"] > 1.0,
            "within noise": True}[speed["verdict"]], speed
    assert not (speed["verdict"] == "worse" and speed["p50_ratio"] > 1.0 + speed["max_slowdown"]), speed
    assert active(fleet, "canary-1") == "clf@1.2.0"


def test_pipeline_refuses_missing_model_with_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "nope.onnx"), "--name", "clf",
                           "--version", "1.0.0", "--sign-key", "k", "--trusted-key", "k.pub", "--releases",
                           str(tmp_path / "r"), "--fleet-db", str(tmp_path / "f.db"), "--report-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "nope.onnx does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["outcome"] == "error"
