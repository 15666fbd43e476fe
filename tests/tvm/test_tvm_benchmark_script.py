"""benchmarks/tvm_tuning.py runs and prints the side-by-side table (no tuning here: budget 0)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_tvm_tuning_benchmark_prints_side_by_side(tmp_path):
    cmd = [sys.executable, "-m", "edgeml.benchmarks.tvm_tuning", "--model", "digits", "--budget", "0",
           "--runs", "5", "--warmup", "1"]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    for row in ("ONNX Runtime FP32 (defaults)", "OpenVINO FP32 (defaults)", "TVM untuned", "vs ORT"):
        assert row in table.stdout
    as_json = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    rows = json.loads(as_json.stdout)
    assert rows["model"] == "digits" and rows["budget_s"] is None
    assert rows["onnxruntime_ms"] > 0 and rows["tvm_untuned_ms"] > 0
