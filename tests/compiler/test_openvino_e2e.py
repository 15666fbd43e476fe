"""edgeml.compile(..., backend="openvino") -> edgeml.load(...).predict, on the shipped digits example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'edgeml[compiler]')")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'edgeml[compiler]')")

import edgeml  # noqa: E402

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


def _ort_logits(x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(DIGITS / "digits.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compile_openvino_artifact(tmp_path, precision):
    if not (DIGITS / "digits.onnx").is_file():
        pytest.skip("examples/digits is missing; run python examples/digits/train.py")
    out = edgeml.compile(DIGITS / "digits.onnx", target="x86_64", output=tmp_path / "d.edgepkg",
                         backend="openvino", precision=precision, calib=DIGITS / "calib.npz",
                         eval=DIGITS / "eval.npz", max_accuracy_drop=1.0, benchmark=False, cache_dir=False)
    model = edgeml.load(out)
    assert model.manifest["backend"]["name"] == "openvino" and model.precision == precision
    assert model.manifest["backend"]["options"]["inference_precision"] == "f32"
    ev = np.load(DIGITS / "eval.npz")
    logits = model.predict({"input": ev["input"]})["logits"]
    want = _ort_logits(ev["input"])
    if precision == "fp32":
        np.testing.assert_allclose(logits, want, rtol=1e-3, atol=1e-4)
    fp32_top1 = 100.0 * np.mean(want.argmax(1) == ev["labels"])
    top1 = 100.0 * np.mean(logits.argmax(1) == ev["labels"])
    print(f"{precision}: top-1 {top1:.2f}% (ORT fp32 {fp32_top1:.2f}%), recipe {model.manifest.get('quantization')}")
    assert fp32_top1 - top1 <= 1.0
    assert model.selftest().passed
