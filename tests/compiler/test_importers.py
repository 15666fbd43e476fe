"""Importing ONNX (old opsets, dynamic dims) and PyTorch models."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeml
from edgeml.compiler import compile_with_report
from edgeml.errors import ModelError

from compile_helpers import make_model, mlp_model, ort_run


def old_opset7_model():
    """Opset 7, IR 3: weights listed among graph inputs, one weight carried as a Constant node."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((5, 7)).astype(np.float32)
    b1 = rng.standard_normal((7,)).astype(np.float32)
    w2 = rng.standard_normal((7, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2")),
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5]),
              helper.make_tensor_value_info("w1", TensorProto.FLOAT, [5, 7]),
              helper.make_tensor_value_info("b1", TensorProto.FLOAT, [7])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                      [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1")], opset=7, ir_version=3)


def test_old_opset7_model_with_initializer_inputs_imports(tmp_path):
    src = tmp_path / "old.onnx"
    src.write_bytes(old_opset7_model().SerializeToString())
    x = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    result = compile_with_report(src, target="x86_64", output=tmp_path / "old.edgepkg", backend="onnxruntime",
                                 precision="fp32", eval=tmp_path / "eval.npz", use_cache=False, benchmark=False)
    m = result.manifest
    assert [i["name"] for i in m["inputs"]] == ["x"]            # the weights are no longer inputs
    notes = " ".join(m["provenance"]["import_notes"])
    assert "initializers listed as graph inputs" in notes and "Constant" in notes and "upgraded opset 7" in notes
    assert m["provenance"]["source_model"]["opset_original"] == 7
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    want = ort_run(src, {"x": x[:2]})["y"]      # ONNX Runtime still runs the original opset-7 file
    np.testing.assert_allclose(model.predict({"x": x[:2]})["y"], want, rtol=1e-3, atol=1e-4)


def test_dynamic_non_batch_dim_needs_input_shape(tmp_path):
    src = tmp_path / "dyn.onnx"
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", 4])])
    src.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="dynamic non-batch dims") as info:
        edgeml.compile(src, target="x86_64", output=tmp_path / "o.edgepkg", backend="onnxruntime", cache_dir=False)
    assert "--input-shape x=1,N?,4" in str(info.value)
    result = compile_with_report(src, target="x86_64", output=tmp_path / "o.edgepkg", backend="onnxruntime",
                                 input_shape="x=1,3,4", use_cache=False, benchmark=False)
    assert result.manifest["inputs"][0]["shape"] == [1, 3, 4]
    with pytest.raises(ModelError, match="conflicts with the model"):
        edgeml.compile(src, target="x86_64", output=tmp_path / "p.edgepkg",
                       input_shape={"x": (1, 3, 5)}, cache_dir=False)


def test_fixed_batch_model_is_evaluated_in_chunks(tmp_path):
    src = tmp_path / "b1.onnx"
    src.write_bytes(mlp_model(batch=1).SerializeToString())
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    np.savez(tmp_path / "e.npz", x=x)
    result = compile_with_report(src, target="x86_64", output=tmp_path / "b1.edgepkg", backend="onnxruntime",
                                 precision="fp32", eval=tmp_path / "e.npz", use_cache=False, benchmark=False)
    assert result.manifest["inputs"][0]["shape"] == [1, 6]
    assert result.manifest["accuracy"]["samples"] == 10 and result.manifest["selftest"]["samples"] == 1


FACTORY = textwrap.dedent('''
    import torch

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
''')


def test_pytorch_factory_is_exported_and_compiled(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="PyTorch import needs torch (the compiler extra)")
    (tmp_path / "edgeml_test_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="needs its input shapes"):
        edgeml.compile("edgeml_test_factory:make", target="x86_64", output=tmp_path / "f.edgepkg", cache_dir=False)
    result = compile_with_report("edgeml_test_factory:make", target="x86_64", output=tmp_path / "f.edgepkg",
                                 backend="onnxruntime", precision="fp32", input_shape=["input=1,1,6,6"],
                                 use_cache=False, benchmark=False)
    m = result.manifest
    assert m["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 1, 6, 6]}]
    assert m["provenance"]["source_model"]["kind"] == "pytorch" and m["name"] == "make"
    x = np.random.default_rng(0).standard_normal((3, 1, 6, 6)).astype(np.float32)
    net = sys.modules["edgeml_test_factory"].make().eval()
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = edgeml.load(result.path, cache_dir=tmp_path / "x").predict({"input": x})["output"]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_unknown_factory_module_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="cannot import PyTorch factory module"):
        edgeml.compile("no_such_pkg_xyz.mod:make", target="x86_64", output=tmp_path / "f.edgepkg",
                       input_shape="input=1,3", cache_dir=False)


def test_saved_exported_program_is_exported_and_compiled(tmp_path):
    torch = pytest.importorskip("torch", reason="ExportedProgram import needs torch (the compiler extra)")
    pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    ep = torch.export.export(net, (torch.randn(2, 1, 6, 6),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, tmp_path / "net.pt2")
    result = compile_with_report(tmp_path / "net.pt2", target="x86_64", output=tmp_path / "ep.edgepkg",
                                 backend="onnxruntime", precision="fp32", use_cache=False, benchmark=False)
    m = result.manifest
    assert m["provenance"]["source_model"]["kind"] == "pytorch-exported-program"
    assert m["inputs"][0]["shape"] == [None, 1, 6, 6]
    x = np.random.default_rng(0).standard_normal((3, 1, 6, 6)).astype(np.float32)
    model = edgeml.load(result.path, cache_dir=tmp_path / "x")
    got = model.predict({model.inputs[0].name: x})[model.outputs[0].name]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-5)


def test_unreadable_exported_program_is_a_model_error(tmp_path):
    pytest.importorskip("torch", reason="ExportedProgram import needs torch (the compiler extra)")
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable torch.export ExportedProgram"):
        edgeml.compile(tmp_path / "bad.pt2", target="x86_64", output=tmp_path / "o.edgepkg", cache_dir=False)
