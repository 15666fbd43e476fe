"""Tiny real ONNX models (built with onnx.helper) packed as real .edgepkg artifacts.

Helpers for tests/runtime (imported by conftest.py and the server tests under this
unique module name, so they never clash with another folder's conftest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def mlp_onnx(features: int = 30, hidden: int = 16, classes: int = 2, seed: int = 0, scale: float = 1.0) -> bytes:
    """A 2-layer MLP: x[N,features] float32 -> probs[N,classes] (softmax). ``scale`` changes the weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((features, hidden)) * 0.2 * scale).astype(np.float32)
    b1 = np.zeros(hidden, np.float32)
    w2 = (rng.standard_normal((hidden, classes)) * 0.2 * scale).astype(np.float32)
    b2 = np.zeros(classes, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def gather_onnx(table_size: int = 4) -> bytes:
    """idx[N,1] int64 -> y[N,1,3] float32 = table[idx]; an index >= table_size makes ONNX Runtime fail."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(table_size * 3, dtype=np.float32).reshape(table_size, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 3])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def reference_mlp(onnx_bytes: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"x": x})))


def write_onnx_artifact(out: Path, onnx_bytes: bytes, *, name: str, version: str, inputs: list[dict],
                        outputs: list[dict], sign_key: Path | None = None) -> Path:
    import onnxruntime

    from edgeml.runtime.artifact import write_artifact

    manifest = {
        "schema_version": 1, "name": name, "version": version, "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {"graph_optimization_level": "all"}},
        "precision": "fp32", "inputs": inputs, "outputs": outputs, "runtime": {"threads": 1},
    }
    return write_artifact(Path(out), manifest, {"model/model.onnx": onnx_bytes}, sign_key=sign_key)


MLP_INPUTS = [{"name": "x", "dtype": "float32", "shape": [None, 30]}]
MLP_OUTPUTS = [{"name": "probs", "dtype": "float32", "shape": [None, 2]},
               {"name": "logits", "dtype": "float32", "shape": [None, 2]}]
