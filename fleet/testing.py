"""Tiny real artifacts for fleet tests and the demo (needs the ``onnx`` package).

``make_artifact(out, name, version, kind=...)`` builds a 4->3 ONNX MatMul+Add
model, runs it with ONNX Runtime for the golden outputs and writes a signed
``.edgepkg``. ``kind="bad_golden"`` stores wrong golden outputs (self-test
fails); ``kind="slow"`` sets a latency budget no model meets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _model_bytes(seed: int) -> bytes:
    from edgeml.errors import require

    onnx = require("onnx", "compiler", feature="building test artifacts")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_artifact(out: Path, name: str = "tiny", version: str = "1.0.0", *, kind: str = "good",
                  sign_key: Path | None = None, seed: int | None = None) -> Path:
    import onnxruntime as ort

    from edgeml.runtime.artifact import golden_npz_bytes, write_artifact

    seed = seed if seed is not None else sum(map(ord, version))
    model = _model_bytes(seed)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    if kind == "bad_golden":
        y = y + 1.0
    manifest = {
        "schema_version": 1, "name": name, "version": version, "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": ort.__version__, "entrypoint": "model/model.onnx",
                    "options": {"graph_optimization_level": "all"}},
        "precision": "fp32",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}],
        "selftest": {"file": "selftest/golden.npz", "rtol": 1e-3, "atol": 1e-4,
                     "latency_budget_ms": 0.000001 if kind == "slow" else 50},
        "runtime": {"threads": 1},
    }
    files = {"model/model.onnx": model, "selftest/golden.npz": golden_npz_bytes({"x": x}, {"y": y})}
    return write_artifact(Path(out), manifest, files, sign_key=sign_key)
