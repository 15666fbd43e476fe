"""Tiny ONNX classifiers and eval data for the release-pipeline tests (built with onnx, no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES, CLASSES, SAMPLES = 8, 4, 256


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((FEATURES, CLASSES)).astype(np.float32)


def write_classifier(path: Path, w: np.ndarray, extra_matmuls: int = 0) -> Path:
    """x[N,8] @ W -> logits[N,4]; ``extra_matmuls`` identity MatMuls make a slower, equally accurate model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"])]
    inits = [numpy_helper.from_array(w, "W")]
    eye = np.eye(CLASSES, dtype=np.float32)
    for i in range(extra_matmuls):
        inits.append(numpy_helper.from_array(eye, f"I{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"I{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{extra_matmuls}"], ["logits"]))
    graph = helper.make_graph(nodes, "classifier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_eval(path: Path, w: np.ndarray) -> Path:
    """Inputs whose labels are what W predicts: W scores 100 %, a shuffled W scores near chance."""
    x = np.random.default_rng(1).standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    np.savez(path, x=x, labels=np.argmax(x @ w, axis=1).astype(np.int64))
    return path
