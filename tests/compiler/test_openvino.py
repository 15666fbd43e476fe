"""OpenVINO compiler backend: IR candidates built for real, run by the runtime backend, compared with ORT."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'edgeml[compiler]')")

from edgeml.backends.base import BuildContext, CandidateSpec, Reference  # noqa: E402
from edgeml.backends.openvino.build import OpenVinoCompiler  # noqa: E402
from edgeml.errors import BackendError, CompileError, ModelError, UnsupportedOp  # noqa: E402
from edgeml.backends.openvino.run import OpenVinoBackend  # noqa: E402
from edgeml.runtime.model import TensorSpec  # noqa: E402
from edgeml.targets import get_target  # noqa: E402

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.fixture(scope="module")
def example():
    if not (DIGITS / "digits.onnx").is_file():
        pytest.skip("examples/digits is missing; run python examples/digits/train.py")
    calib = dict(np.load(DIGITS / "calib.npz"))
    ev = dict(np.load(DIGITS / "eval.npz"))
    return {"onnx": DIGITS / "digits.onnx", "calib": calib, "eval": ev}


def make_ctx(tmp_path: Path, example, target: str = "x86_64", reference: Reference | None = None,
             **options) -> BuildContext:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return BuildContext(onnx_path=example["onnx"], target=get_target(target),
                        inputs=[TensorSpec("input", "float32", (None, 1, 8, 8))],
                        outputs=[TensorSpec("logits", "float32", (None, 10))],
                        workdir=work, calib=example["calib"], options=options, reference=reference)


def load(built) -> OpenVinoBackend:
    manifest = {"backend": {"name": "openvino", "entrypoint": built.entrypoint, "options": built.backend_options},
                "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}]}
    root = built.files[built.entrypoint].parent.parent
    return OpenVinoBackend(root, manifest, threads=1)


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(logits.argmax(1) == labels))


def build(backend: OpenVinoCompiler, ctx: BuildContext, label: str):
    specs = {s.label: s for s in backend.candidates(ctx, ["fp32", "fp16", "int8"])}
    assert label in specs, f"{label} not offered; offered {sorted(specs)}"
    return backend.build(specs[label], ctx)


def test_candidates_follow_target_and_data(tmp_path, example):
    b = OpenVinoCompiler()
    assert b.unavailable_reason() is None
    ctx = make_ctx(tmp_path, example)
    labels = [s.label for s in b.candidates(ctx, ["fp32", "int8"])]
    assert labels == ["openvino/fp32", "openvino/int8/nncf"]
    ctx.calib = None  # no calibration data -> no int8 candidate
    assert [s.label for s in b.candidates(ctx, ["fp32", "int8"])] == ["openvino/fp32"]
    ctx = make_ctx(tmp_path, example, reference=Reference(
        eval_data={"inputs": {"input": example["eval"]["input"]}, "labels": example["eval"]["labels"]},
        max_accuracy_drop=1.0))
    assert "openvino/int8/nncf-accuracy-control" in [s.label for s in b.candidates(ctx, ["int8"])]
    # a target OpenVINO does not serve gets no candidate
    assert b.candidates(make_ctx(tmp_path, example, target="jetson-orin"), ["fp32", "int8"]) == []
    # the no-VNNI saturation hazard selects NNCF's overflow fix on every layer
    hazard = b.candidates(make_ctx(tmp_path, example, target="x86_64-avx2"), ["int8"])[0].recipe
    safe = b.candidates(make_ctx(tmp_path, example, target="x86_64-avx512-vnni"), ["int8"])[0].recipe
    assert (hazard["overflow_fix"], safe["overflow_fix"]) == ("enable", "first_layer")


def test_fp32_ir_matches_onnxruntime(tmp_path, example):
    built = build(OpenVinoCompiler(), make_ctx(tmp_path, example), "openvino/fp32")
    assert set(built.files) == {"model/model.xml", "model/model.bin"} and built.entrypoint == "model/model.xml"
    assert built.backend_options == {"device": "CPU", "performance_hint": "LATENCY", "inference_precision": "f32"}
    rt = load(built)
    x = example["eval"]["input"][:64]
    got = rt.run({"input": x})["logits"]
    want = ort_logits(example["onnx"], x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # batch 1 too (dynamic batch), and results survive the next run (no shared output buffers)
    one = rt.run({"input": x[:1]})["logits"]
    rt.run({"input": x[1:2]})
    np.testing.assert_allclose(one, want[:1], rtol=1e-3, atol=1e-4)


def test_fp16_weights_ir_is_smaller_and_close(tmp_path, example):
    b = OpenVinoCompiler()
    ctx = make_ctx(tmp_path, example)
    fp32 = build(b, ctx, "openvino/fp32")
    fp16 = build(b, ctx, "openvino/fp16")
    size = lambda built: built.files["model/model.bin"].stat().st_size  # noqa: E731
    assert size(fp16) < 0.6 * size(fp32)
    x = example["eval"]["input"]
    got = load(fp16).run({"input": x})["logits"]
    np.testing.assert_allclose(got, ort_logits(example["onnx"], x), rtol=2e-2, atol=2e-2)


def test_nncf_int8_keeps_digits_top1_within_one_point(tmp_path, example):
    built = build(OpenVinoCompiler(), make_ctx(tmp_path, example), "openvino/int8/nncf")
    r = built.recipe
    assert r["method"] == "nncf.quantize" and r["subset_size"] == 200 and r["fake_quantize_ops"] > 0
    assert {"preset", "fast_bias_correction", "overflow_fix", "ignored_scope", "nncf"} <= set(r)
    x, y = example["eval"]["input"], example["eval"]["labels"]
    fp32 = top1(ort_logits(example["onnx"], x), y)
    int8 = top1(load(built).run({"input": x})["logits"], y)
    print(f"digits top-1: fp32 {fp32:.2f}%  openvino int8 (nncf) {int8:.2f}%")
    assert fp32 - int8 <= 1.0, (fp32, int8)


def test_accuracy_control_candidate(tmp_path, example):
    ev = example["eval"]
    ctx = make_ctx(tmp_path, example, reference=Reference(
        eval_data={"inputs": {"input": ev["input"]}, "labels": ev["labels"]}, max_accuracy_drop=1.0))
    built = build(OpenVinoCompiler(), ctx, "openvino/int8/nncf-accuracy-control")
    assert built.recipe["method"] == "nncf.quantize_with_accuracy_control"
    assert built.recipe["validation"] == {"metric": "top1", "samples": 360}
    got = top1(load(built).run({"input": ev["input"]})["logits"], ev["labels"])
    assert top1(ort_logits(example["onnx"], ev["input"]), ev["labels"]) - got <= 1.0


def test_same_model_gives_identical_files(tmp_path, example):
    b = OpenVinoCompiler()
    digests = []
    for i in range(2):  # in one process: OpenVINO's name counters have moved on the second time
        (tmp_path / str(i)).mkdir()
        built = build(b, make_ctx(tmp_path / str(i), example), "openvino/fp32")
        digests.append({k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in built.files.items()})
    assert digests[0] == digests[1]


def test_gpu_target_records_device_and_fp16_precision(tmp_path, example):
    b = OpenVinoCompiler()
    ctx = make_ctx(tmp_path, example, target="intel-gpu")
    spec = next(s for s in b.candidates(ctx, ["fp16"]) if s.precision == "fp16")
    built = b.build(spec, ctx)  # building needs no GPU; running does
    assert built.backend_options["device"] == "GPU" and built.backend_options["inference_precision"] == "f16"


def test_unsupported_op_is_named(tmp_path, example):
    from onnx import TensorProto, helper, save

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("FancyOp", ["a"], ["y"], domain="com.example")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    save(model, tmp_path / "bad.onnx")
    ctx = make_ctx(tmp_path, example)
    ctx.onnx_path = tmp_path / "bad.onnx"
    with pytest.raises(UnsupportedOp) as err:
        OpenVinoCompiler().build(CandidateSpec("openvino", "fp32", {}, "openvino/fp32"), ctx)
    print("user sees:", err.value)
    assert "FancyOp" in str(err.value) and "OpenVINO" in str(err.value)
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file")
    ctx.onnx_path = tmp_path / "junk.onnx"
    with pytest.raises(ModelError, match="junk.onnx"):
        OpenVinoCompiler().build(CandidateSpec("openvino", "fp32", {}, "openvino/fp32"), ctx)
    with pytest.raises(CompileError, match="int4"):   # bf16 is a candidate now (tests/compiler/test_bf16.py)
        ctx.onnx_path = example["onnx"]
        OpenVinoCompiler().build(CandidateSpec("openvino", "int4", {}, "openvino/int4"), ctx)


def test_runtime_errors_are_backend_errors(tmp_path, example):
    rt = load(build(OpenVinoCompiler(), make_ctx(tmp_path, example), "openvino/fp32"))
    with pytest.raises(BackendError, match="OpenVINO cannot run the model"):
        rt.run({"input": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(BackendError, match="OpenVINO cannot load the model"):
        OpenVinoBackend(tmp_path, {"backend": {"name": "openvino", "entrypoint": "model/missing.xml", "options": {}}})


def test_ignored_scope_is_applied_and_checked(tmp_path, example):
    b = OpenVinoCompiler()
    (tmp_path / "a").mkdir()
    plain = build(b, make_ctx(tmp_path / "a", example), "openvino/int8/nncf").recipe["fake_quantize_ops"]
    (tmp_path / "b").mkdir()
    scoped = build(b, make_ctx(tmp_path / "b", example, ov_ignored_scope={"types": ["MatMul"]}), "openvino/int8/nncf")
    assert scoped.recipe["ignored_scope"]["types"] == ["MatMul"]
    assert scoped.recipe["fake_quantize_ops"] < plain
    (tmp_path / "c").mkdir()
    with pytest.raises(CompileError, match="NNCF could not quantize") as err:
        build(b, make_ctx(tmp_path / "c", example, ov_ignored_scope={"names": ["no-such-layer"]}), "openvino/int8/nncf")
    print("user sees:", err.value)


@pytest.mark.needs_cpu("target:x86_64-avx512-vnni")   # built for that target, then run here
def test_accuracy_control_recovers_a_model_that_plain_int8_breaks(tmp_path):
    """Feature 0 spans +-2000 but carries nothing; the class is the argmax of features 1-3 (+-1).
    Per-tensor int8 on the input crushes the small features; accuracy control must revert it."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    f, h, c = 8, 16, 3
    w1 = np.zeros((f, h), np.float32)
    w2 = np.zeros((h, c), np.float32)
    for k in range(c):
        w1[1 + k, k], w1[1 + k, c + k] = 1.0, -1.0
        w2[k, k], w2[c + k, k] = 1.0, -1.0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, tmp_path / "m.onnx")

    def data(n):
        x = rng.standard_normal((n, f)).astype(np.float32)
        x[:, 0] *= 2000.0
        return x, np.argmax(x[:, 1:4], 1)

    xc, _ = data(200)
    xe, ye = data(300)
    ctx = BuildContext(onnx_path=tmp_path / "m.onnx", target=get_target("x86_64-avx512-vnni"),
                       inputs=[TensorSpec("x", "float32", (None, f))], outputs=[TensorSpec("logits", "float32", (None, c))],
                       workdir=tmp_path, calib={"x": xc},
                       reference=Reference(eval_data={"inputs": {"x": xe}, "labels": ye}, max_accuracy_drop=1.0))
    b = OpenVinoCompiler()
    acc = {}
    for spec in b.candidates(ctx, ["int8"]):
        built = b.build(spec, ctx)
        manifest = {"backend": {"name": "openvino", "entrypoint": built.entrypoint, "options": built.backend_options}}
        out = OpenVinoBackend(built.files[built.entrypoint].parent.parent, manifest).run({"x": xe})["logits"]
        acc[spec.label] = top1(out, ye)
    print("top-1:", acc)
    assert acc["openvino/int8/nncf"] < 90.0, "the trap did not trigger; the test proves nothing"
    assert acc["openvino/int8/nncf-accuracy-control"] >= 99.0


def test_accuracy_control_is_skipped_when_plain_int8_passes(tmp_path, example):
    from edgeml.backends.base import CandidateSkipped

    ev = example["eval"]
    fp32 = top1(ort_logits(example["onnx"], ev["input"]), ev["labels"])
    ctx = make_ctx(tmp_path, example, reference=Reference(
        eval_data={"inputs": {"input": ev["input"]}, "labels": ev["labels"]}, max_accuracy_drop=1.0, fp32_score=fp32))

    def evaluate(files_dir, fragment):  # what the pipeline provides: the runtime backend on the eval split
        manifest = {**fragment, "outputs": [{"name": "logits"}]}
        return top1(OpenVinoBackend(files_dir, manifest).run({"input": ev["input"]})["logits"], ev["labels"])

    ctx.evaluate = evaluate
    b = OpenVinoCompiler()
    specs = {s.label: s for s in b.candidates(ctx, ["int8"])}
    b.build(specs["openvino/int8/nncf"], ctx)
    with pytest.raises(CandidateSkipped, match="not needed: openvino/int8/nncf is within the tolerance"):
        b.build(specs["openvino/int8/nncf-accuracy-control"], ctx)
