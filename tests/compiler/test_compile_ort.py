"""End-to-end ONNX Runtime compiles on the shipped digits CNN and tiny graphs (real ORT, real artifacts)."""

from __future__ import annotations

import numpy as np
import pytest

import edgeml
from edgeml.compiler import compile_with_report
from edgeml.errors import AccuracyError

from compile_helpers import ort_run

MANIFEST_KEYS = {"schema_version", "name", "version", "target", "arch", "required_features", "backend", "precision",
                 "quantization", "inputs", "outputs", "files", "candidates", "accuracy", "provenance", "runtime",
                 "selftest", "drift_profile", "selection"}


def test_fp32_artifact_matches_onnxruntime_and_fills_the_manifest(digits, tmp_path):
    out = tmp_path / "digits.edgepkg"
    result = compile_with_report(digits["model"], target="x86_64", output=out, precision="fp32",
                                 backend="onnxruntime", calib=digits["calib"], eval=digits["eval"],
                                 name="digits-cnn", version="1.2.3", cache_dir=tmp_path / "cc")
    assert result.path == out and out.is_file() and result.cache == "miss"
    m = result.manifest
    assert MANIFEST_KEYS <= set(m), MANIFEST_KEYS - set(m)
    assert (m["name"], m["version"], m["precision"], m["backend"]["name"]) == ("digits-cnn", "1.2.3", "fp32", "onnxruntime")
    assert m["backend"]["options"]["graph_optimization_level"] == "all"
    assert m["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}]
    assert m["accuracy"]["metric"] == "top1" and m["accuracy"]["data"] == "eval" and m["accuracy"]["samples"] == 360
    prov = m["provenance"]
    assert len(prov["source_model"]["sha256"]) == 64 and len(prov["calibration"]["sha256"]) == 64
    assert prov["tools"]["onnxruntime"] and prov["created"].endswith("Z")
    assert m["drift_profile"]["outputs"]["logits"]["histogram"]["counts"]
    x = np.load(digits["eval"])["input"]
    model = edgeml.load(out, cache_dir=tmp_path / "x")
    got = model.predict({"input": x})["logits"]
    want = ort_run(digits["model"], {"input": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert model.selftest().passed
    # The offline-optimized graph is portable: no ISA-specific layout ops, and it runs with no optimization.
    import onnx
    import onnxruntime as ort

    shipped = model.artifact.member("model/model.onnx")
    assert not [n.op_type for n in onnx.load(str(shipped)).graph.node if n.domain == "com.microsoft.nchwc"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(shipped), so, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(plain.run(None, {"input": x})[0], want, rtol=1e-3, atol=1e-4)


def test_int8_keeps_digits_top1_within_one_point(digits, tmp_path):
    out = tmp_path / "int8.edgepkg"
    result = compile_with_report(digits["model"], target="x86_64", output=out, precision="int8",
                                 backend="onnxruntime", calib=digits["calib"], eval=digits["eval"],
                                 max_accuracy_drop=1.0, use_cache=False)
    m = result.manifest
    assert m["precision"] == "int8"
    q = m["quantization"]
    assert q["method"] == "static-qdq" and q["saturation_hazard"] is True
    # x86_64 does not require VNNI: every recipe avoids the u8s8 saturation (7-bit weights or u8u8).
    assert all(c["recipe"]["reduce_range"] or c["recipe"]["weight_type"] == "QUInt8"
               for c in m["candidates"] if c["precision"] == "int8")
    data = np.load(digits["eval"])
    fp32 = ort_run(digits["model"], {"input": data["input"]})["logits"]
    fp32_top1 = 100 * np.mean(fp32.argmax(1) == data["labels"])
    model = edgeml.load(out, cache_dir=tmp_path / "x")
    int8_top1 = 100 * np.mean(model.predict({"input": data["input"]})["logits"].argmax(1) == data["labels"])
    assert fp32_top1 - int8_top1 <= 1.0, (fp32_top1, int8_top1)
    assert abs(m["accuracy"]["compiled"] - int8_top1) < 1e-3 and abs(m["accuracy"]["fp32"] - fp32_top1) < 1e-3
    assert model.selftest().passed


def test_auto_selection_times_every_passing_candidate_and_keeps_the_fastest(mlp_file, mlp_data, tmp_path):
    result = compile_with_report(mlp_file, target="x86_64", output=tmp_path / "a.edgepkg", backend="onnxruntime",
                                 calib=mlp_data["calib"], eval=mlp_data["eval"], max_accuracy_drop=100,
                                 use_cache=False, benchmark_seconds=0.3)
    cands = [c for c in result.candidates if c["status"] in ("selected", "passed")]
    assert {c["precision"] for c in cands} == {"fp32", "int8"}
    # Every passing candidate is timed (a >5x slower one only through its warm-up runs).
    assert all(c["latency_ms"]["p50"] > 0 and (c["latency_ms"]["runs"] >= 5 or c["latency_ms"].get("screened"))
               for c in cands)
    chosen = result.selected
    assert chosen["latency_ms"]["p50"] == min(c["latency_ms"]["p50"] for c in cands)
    assert result.manifest["selection"]["method"] == "fastest-measured"
    assert result.manifest["accuracy"]["metric"] == "fp32_agreement"


def test_candidates_past_the_tolerance_are_rejected_with_the_reason(mlp_file, mlp_data, tmp_path):
    # reference_<output> makes it a regression metric: int8 rounding shows as lost points.
    x = mlp_data["x"]
    ref = ort_run(mlp_file, {"x": x[48:]})["logits"]
    np.savez(tmp_path / "eval_ref.npz", x=x[48:], reference_logits=ref)
    result = compile_with_report(mlp_file, target="x86_64", output=tmp_path / "r.edgepkg", backend="onnxruntime",
                                 calib=mlp_data["calib"], eval=tmp_path / "eval_ref.npz", max_accuracy_drop=0.001,
                                 use_cache=False, benchmark=False)
    by_precision = {}
    for c in result.candidates:
        by_precision.setdefault(c["precision"], []).append(c)
    assert result.manifest["accuracy"]["metric"] == "relative_error_score"
    assert all(c["status"] == "rejected" and "drops" in c["reason"] for c in by_precision["int8"])
    assert result.manifest["precision"] == "fp32"
    assert result.manifest["selection"]["method"] == "static-order"
    with pytest.raises(AccuracyError, match="no candidate kept accuracy"):
        compile_with_report(mlp_file, target="x86_64", output=tmp_path / "none.edgepkg", precision="int8",
                            backend="onnxruntime", calib=mlp_data["calib"], eval=tmp_path / "eval_ref.npz",
                            max_accuracy_drop=0.001, use_cache=False)
    assert not (tmp_path / "none.edgepkg").exists()


def test_without_eval_part_of_calib_is_held_out(mlp_file, mlp_data, tmp_path):
    result = compile_with_report(mlp_file, target="x86_64", output=tmp_path / "h.edgepkg", backend="onnxruntime",
                                 precision="int8", calib=mlp_data["calib"], max_accuracy_drop=100,
                                 use_cache=False, benchmark=False, ort_int8_recipes=["u8u8"])
    acc, prov = result.manifest["accuracy"], result.manifest["provenance"]
    assert acc["data"] == "calib-holdout" and acc["samples"] == 12
    assert prov["calibration"]["samples"] == 36
    assert [c["label"] for c in result.candidates] == ["onnxruntime/int8/u8u8"]


def test_signed_artifact_loads_with_its_key(mlp_file, tmp_path):
    from edgeml.runtime.signing import generate_keypair

    key, pub = generate_keypair(tmp_path / "k")
    out = edgeml.compile(mlp_file, target="x86_64", output=tmp_path / "s.edgepkg", backend="onnxruntime",
                         precision="fp32", sign_key=key, cache_dir=tmp_path / "cc")
    model = edgeml.load(out, trusted_keys=[pub], cache_dir=tmp_path / "x")
    assert model.artifact.signed_by is not None


def test_accuracy_aware_int8_keeps_sensitive_nodes_in_fp32_when_plain_recipes_fail(tmp_path):
    from compile_helpers import outlier_input_mlp_model

    src = tmp_path / "outlier.onnx"
    src.write_bytes(outlier_input_mlp_model().SerializeToString())
    x = np.random.default_rng(0).standard_normal((96, 16)).astype(np.float32)
    x[:, 0] *= 1000.0
    np.savez(tmp_path / "c.npz", x=x[:64])
    np.savez(tmp_path / "e.npz", x=x[64:], reference_y=ort_run(src, {"x": x[64:]})["y"])
    result = compile_with_report(src, target="x86_64", output=tmp_path / "aw.edgepkg", backend="onnxruntime",
                                 precision="int8", calib=tmp_path / "c.npz", eval=tmp_path / "e.npz",
                                 max_accuracy_drop=5.0, use_cache=False, benchmark=False)
    by_label = {c["label"].split("/")[-1]: c for c in result.candidates}
    for plain in ("u8s8-per-channel-reduce-range", "u8u8", "u8s8-per-channel-reduce-range-exclude-ends"):
        assert by_label[plain]["status"] == "rejected" and by_label[plain]["accuracy_drop"] > 5.0, by_label[plain]
    aware = by_label["u8s8-per-channel-reduce-range-accuracy-aware"]
    assert aware["status"] == "selected" and aware["accuracy_drop"] <= 5.0
    q = result.manifest["quantization"]
    assert q["accuracy_aware"] is True and q["sensitivity"]["steps"][0]["excluded"] == 0
    assert q["excluded_nodes"] and q["excluded_nodes"][0] == q["sensitivity"]["top"][0]["node"]
    assert q["sensitivity"]["top"][0]["node"].startswith("MatMul_0")     # the layer reading the raw input


@pytest.mark.slow
def test_mobilenetv2_module_object_compiles_and_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch (the compiler extra)")
    models = pytest.importorskip("edgeml.benchmarks.models", reason="benchmarks/models.py defines MobileNetV2")
    net = models.mobilenetv2(num_classes=10).eval()
    result = compile_with_report(net, target="x86_64", output=tmp_path / "mnv2.edgepkg", backend="onnxruntime",
                                 precision="fp32", input_shape={"input": (1, 3, 96, 96)}, use_cache=False,
                                 benchmark=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = edgeml.load(result.path, cache_dir=tmp_path / "x").predict({"input": x})["output"]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
    assert result.manifest["provenance"]["source_model"]["kind"] == "pytorch"
