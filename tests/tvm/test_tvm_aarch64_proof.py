"""The aarch64 proof: TVM and ONNX Runtime artifacts for aarch64-a72 run under qemu-user.

Models: a tiny CNN, the digits example and MobileNetV2 (random weights).

Runs scripts/aarch64_proof.py (arm64 Debian rootfs by debootstrap, aarch64 wheels,
one emulated Python process) and checks its JSON report. The rootfs is built in a
temporary folder per test session (about a minute); set EDGEML_AARCH64_PROOF_CACHE
to a folder to reuse one between sessions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("qemu-aarch64-static", "debootstrap", "dpkg-deb", "aarch64-linux-gnu-gcc")


@pytest.mark.qemu
@pytest.mark.slow
def test_tvm_and_ort_artifacts_match_x86_reference_under_qemu(tmp_path_factory):
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the aarch64 proof needs {', '.join(missing)} "
                    "(apt-get install qemu-user-static debootstrap gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    if os.geteuid() != 0:
        pytest.skip("the aarch64 proof needs root for debootstrap")
    cache = os.environ.get("EDGEML_AARCH64_PROOF_CACHE") or str(tmp_path_factory.mktemp("aarch64-proof-cache"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "aarch64_proof.py"), "--cache", cache, "--models", "tiny,digits,mobilenetv2",
         "--builder", "pipeline", "--workdir", str(tmp_path_factory.mktemp("aarch64-proof-work")), "--json"],
        capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0, f"aarch64 proof failed (exit {proc.returncode})"
    text = proc.stdout
    report = json.loads(text[text.index("{\n"):text.rindex("\n}") + 2])
    assert report["machine"] == "aarch64" and report["qemu_cpu"] == "cortex-a72"
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {f"{m}/{b}" for m in ("tiny", "digits", "mobilenetv2") for b in ("tvm", "onnxruntime")}
    for name, run in runs.items():
        assert run["ok"], f"{name}: {run.get('error')}"
        assert run["max_abs_error"] < 1e-3
        assert run["backend"] == name.split("/")[1]
