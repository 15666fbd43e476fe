"""Compiling for a bigger CPU than this one: the shipped example for x86_64-avx512-vnni on a host without AVX-512.

The host is made smaller with ``EDGEML_HOST_FEATURES`` (and oneDNN's ISA cap), so this runs the same on an
AVX2-only machine and on an AVX-512 one. Before isolation the TVM candidate's native AVX-512 code ran in the
compiler's process and killed it with SIGILL on such hosts; now it is never executed, and the portable
runtimes' figures are recorded as measured with this host's kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MASK = {"EDGEML_HOST_FEATURES": "-avx512*,-amx*,-avx_vnni*", "ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2"}


def edgeml_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)


@pytest.mark.slow
@pytest.mark.needs_cpu("arch:x86_64")
def test_the_digits_example_compiles_for_avx512_vnni_on_a_host_without_avx512(digits, tmp_path):
    out = tmp_path / "d.edgepkg"
    run = edgeml_cli("compile", str(digits["model"]), "--target", "x86_64-avx512-vnni", "-o", str(out),
                     "--calib", str(digits["calib"]), "--eval", str(digits["eval"]), "--no-cache", "--json", env=MASK)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.is_file()
    report = json.loads(run.stdout)
    cands = [c for c in report["candidates"] if c["status"] != "skipped"]
    assert cands and not any(c["status"] == "passed" for c in cands)   # nothing is plainly "passed" here
    tvm = [c for c in cands if c["backend"] == "tvm"]
    portable = [c for c in cands if c["backend"] in ("onnxruntime", "openvino")]
    for c in tvm:   # AVX-512 native code: never executed on this host
        assert c["status"] in ("unverified", "selected") and c["verification"]["where"] is None
        assert "built native code for" in c["reason"] and "avx512f" in c["reason"], c
    for c in portable:   # run here as an indication, with this host's kernels
        assert c["verification"]["kernels"] == "this host's" and c["verification"]["complete"] is False
        assert c["status"] == "selected" or "measured on this host with its own" in c["reason"], c
    assert report["accuracy"]["verified"] is False
    assert report["selection"]["method"] == "static-order-unverified"
    shown = edgeml_cli("inspect", str(out), "--json", env=MASK)
    assert shown.returncode == 0, shown.stderr
    inspected = json.loads(shown.stdout)
    assert [c["label"] for c in inspected["candidates"]] == [c["label"] for c in report["candidates"]]
    assert all(c["reason"] for c in inspected["candidates"] if c["status"] != "selected")
    text = edgeml_cli("inspect", str(out), env=MASK)
    assert text.returncode == 0 and "unverified" in text.stdout
    for c in cands:
        assert c["label"] in text.stdout
