"""BF16 candidates: a target capability, detected from the host, accuracy-checked like every candidate.

The case the issue asks for: a model whose activations have an outlier channel (x[:, 0] ~ 1000x the
others, weighted down by the model) loses its small channels to per-tensor INT8 and fails a 1-point
tolerance, while BF16 (8 mantissa bits per value) keeps it; with INT8 rejected, BF16 is selected over FP32.
Like with like: both are OpenVINO, the only difference is ``INFERENCE_PRECISION_HINT``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgeml
from edgeml.compiler import compile_with_report
from edgeml.errors import TargetError
from edgeml.targets import get_target, parse_target_file


def _outlier_mlp(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 256)).astype(np.float32) / 8
    w1[0] *= 1e-3                                   # the outlier channel matters as much as one other
    w2 = rng.standard_normal((256, 32)).astype(np.float32) / 16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _outlier_data(folder: Path) -> tuple[Path, Path]:
    x = np.random.default_rng(1).standard_normal((160, 64)).astype(np.float32)
    x[:, 0] *= 1000.0
    np.savez(folder / "calib.npz", x=x[:96])
    np.savez(folder / "eval.npz", x=x[96:])
    return folder / "calib.npz", folder / "eval.npz"


def test_a_cpu_target_lists_bf16_only_when_it_requires_the_feature(tmp_path):
    assert "bf16" in get_target("x86_64-avx512-bf16").precisions
    assert "avx512_bf16" in get_target("x86_64-avx512-bf16").required_features
    assert "amx_bf16" in get_target("x86_64-amx").required_features
    assert {"fp16", "asimdhp"} <= {*get_target("aarch64-fp16").precisions, *get_target("aarch64-fp16").required_features}
    bad = tmp_path / "bad-bf16.toml"
    bad.write_text('name = "bad-bf16"\ndescription = "d"\narch = "x86_64"\nrequired_features = ["avx2"]\n'
                   'backends = ["openvino"]\nprecisions = ["fp32", "bf16"]\ndevice = "cpu"\n')
    with pytest.raises(TargetError, match="lists precision bf16 .* without requiring"):
        parse_target_file(bad)


@pytest.mark.needs_cpu("target:x86_64-avx512-bf16")
def test_int8_fails_the_tolerance_and_bf16_is_selected(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    pytest.importorskip("nncf", reason="NNCF is not installed")
    calib, ev = _outlier_data(tmp_path)
    result = compile_with_report(_outlier_mlp(tmp_path / "m.onnx"), target="x86_64-avx512-bf16",
                                 output=tmp_path / "m.edgepkg", backend="openvino", calib=calib, eval=ev,
                                 metric="relative_error", max_accuracy_drop=1.0, cache_dir=False, benchmark=False,
                                 ov_accuracy_control=False)
    cands = {c["label"]: c for c in result.candidates}
    int8, bf16, fp32 = cands["openvino/int8/nncf"], cands["openvino/bf16"], cands["openvino/fp32"]
    assert int8["status"] == "rejected" and int8["accuracy_drop"] > 1.0, int8
    assert bf16["status"] == "selected" and bf16["accuracy_drop"] <= 1.0
    assert bf16["max_abs_error"] > 10 * max(fp32["max_abs_error"], 1e-6)   # really computed in bf16
    m = result.manifest
    assert m["precision"] == "bf16" and m["backend"]["options"]["inference_precision"] == "bf16"
    assert "avx512_bf16" in m["required_features"]
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    assert model.selftest().passed
