"""Fixtures for tests/backends: a tiny ONNX Identity model the null backend reproduces exactly, and its data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def identity_model(tmp_path: Path) -> Path:
    """x[N,4] -> y[N,4] = x: the null backend's function, so its exact candidate matches FP32 bit for bit."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "identity.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def eval_data(tmp_path: Path) -> Path:
    """200 samples without labels: the metric is agreement of the argmax with FP32, in points."""
    x = np.random.default_rng(3).standard_normal((200, 4)).astype(np.float32)
    path = tmp_path / "eval.npz"
    np.savez(path, x=x)
    return path
