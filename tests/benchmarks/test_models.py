"""Reference models (benchmarks/models.py): export to ONNX, run in ONNX Runtime, match PyTorch eager."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgeml.benchmarks import models
from edgeml.errors import UsageError


def _ort(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    return sess.run(["logits"], {"input": x})[0]


@pytest.mark.parametrize("name,classes", [("resnet18", 1000), ("mobilenetv2", 1000), ("mlp", 2)])
def test_reference_model_exports_and_matches_torch(tmp_path, name, classes):
    torch = pytest.importorskip("torch", reason="exporting reference models needs torch (edgeml[compiler])")
    path = models.export_onnx(name, tmp_path / f"{name}.onnx", batch="dynamic")
    calib, ev = models.data(name, n_calib=4, n_eval=2)
    x = ev["input"]
    got = _ort(path, x)
    assert got.shape == (2, classes)
    with torch.no_grad():
        want = models.build(name)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert calib["input"].shape[1:] == x.shape[1:] and calib["input"].dtype == np.float32


def test_mlp_is_trained_on_real_data(tmp_path):
    pytest.importorskip("torch", reason="training the MLP needs torch")
    path = models.export_onnx("mlp", tmp_path / "mlp.onnx", batch="dynamic")
    _, ev = models.data("mlp", n_eval=100)
    top1 = 100.0 * np.mean(_ort(path, ev["input"]).argmax(1) == ev["labels"])
    assert top1 >= 90.0, top1


def test_fixed_batch_and_cli(tmp_path):
    out = tmp_path / "d.onnx"
    proc = subprocess.run([sys.executable, "-m", "edgeml.benchmarks.models", "digits", str(out), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 1, 8, 8]
    assert sorted(np.load(tmp_path / "digits_eval.npz").files) == ["input", "labels"]
    bad = subprocess.run([sys.executable, "-m", "edgeml.benchmarks.models", "resnet99", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "resnet99" in bad.stderr
    with pytest.raises(UsageError, match="unknown reference model"):
        models.export_onnx("vgg", tmp_path / "x.onnx")
