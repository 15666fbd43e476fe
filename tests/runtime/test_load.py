"""edgeml.load on compiled artifacts: light imports, input validation, self-test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeml
from edgeml.errors import DataError

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory) -> Path:
    if not (DIGITS / "digits.onnx").is_file():
        pytest.skip("examples/digits/digits.onnx is missing; run python examples/digits/train.py")
    out = tmp_path_factory.mktemp("art") / "digits.edgepkg"
    return edgeml.compile(DIGITS / "digits.onnx", target="x86_64", output=out, backend="onnxruntime",
                          calib=DIGITS / "calib.npz", eval=DIGITS / "eval.npz", cache_dir=False,
                          benchmark=False)


def test_loading_an_ort_artifact_imports_no_heavy_package(digits_artifact, tmp_path):
    code = (
        "import sys, json, numpy as np, edgeml\n"
        f"m = edgeml.load({str(digits_artifact)!r}, cache_dir={str(tmp_path / 'c')!r})\n"
        "m.predict({'input': np.zeros((1, 1, 8, 8), np.float32)})\n"
        "print(json.dumps(sorted(k for k in ('torch', 'openvino', 'tvm', 'nncf', 'onnx', 'neural_compressor') "
        "if k in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_predict_validates_inputs_and_selftest_passes(digits_artifact, tmp_path):
    model = edgeml.load(digits_artifact, cache_dir=tmp_path / "c")
    assert [s.name for s in model.inputs] == ["input"] and model.inputs[0].shape == (None, 1, 8, 8)
    with pytest.raises(DataError, match="input 'input' has shape \\[2, 8, 8\\]; the model expects \\[\\?, 1, 8, 8\\]"):
        model.predict({"input": np.zeros((2, 8, 8), np.float32)})
    with pytest.raises(DataError, match="dtype float64"):
        model.predict({"input": np.zeros((2, 1, 8, 8))})
    with pytest.raises(DataError, match="missing input 'input'"):
        model.predict({})
    sample = np.load(DIGITS / "sample.npz")["input"]
    assert model.predict({"input": sample})["logits"].shape == (len(sample), 10)
    result = model.selftest()
    assert result.passed, result.reason
    spec = model.manifest["selftest"]
    assert spec["samples"] == 4 and spec["latency_budget_ms"] is None  # benchmark=False: nothing measured


def test_cli_run_on_a_compiled_artifact(digits_artifact, tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))   # the CLI extracts into the default cache
    from edgeml.cli import main

    r = CliRunner().invoke(main, ["run", str(digits_artifact), "--input", str(DIGITS / "sample.npz"),
                                  "--output", str(tmp_path / "y.npz")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "y.npz")["logits"].shape == (4, 10)
