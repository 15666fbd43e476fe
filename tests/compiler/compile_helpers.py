"""Helpers for tests/compiler: tiny ONNX graphs built with onnx.helper, and a plain ONNX Runtime run."""

from __future__ import annotations

import numpy as np


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int = 8):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def mlp_model(features: int = 6, hidden: int = 8, classes: int = 3, seed: int = 0, batch="N"):
    """x[N,features] -> logits[N,classes]: MatMul/Add/Relu/MatMul/Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((features, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    b2 = np.zeros(classes, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
             helper.make_node("Add", ["l0", "b2"], ["logits"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
                      [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])


def ort_run(model_path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def outlier_input_mlp_model(seed: int = 0, scale: float = 1000.0):
    """x[N,16] -> y[N,4], 3 MatMul/Add layers with ReLU, for data whose feature 0 is ``scale`` times larger.

    Row 0 of the first weight is divided by ``scale`` so every feature matters alike in FP32, but
    quantizing the input to 8 bits over feature 0's range wipes out the other 15: only keeping the
    first layer in FP32 saves int8 accuracy.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [16, 32, 32, 4]
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        if i == 0:
            w[0, :] /= scale
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(dims[i + 1], np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        prev = f"a{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
