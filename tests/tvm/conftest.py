"""Shared fixtures for the TVM tests: a tiny random-weight CNN (digits-sized) and build helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from tvm_artifacts import build_tvm_artifact, tiny_cnn_onnx  # noqa: E402


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """Conv-ReLU-Pool-Conv-ReLU-GlobalPool-Gemm on 1x8x8 inputs (the digits example's shape), dynamic batch."""
    return tiny_cnn_onnx(tmp_path_factory.mktemp("tvm-model") / "tiny.onnx")


@pytest.fixture(scope="session")
def sample_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((4, 1, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="session")
def ort_reference(tiny_onnx, sample_inputs) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    return session.run(None, sample_inputs)[0]


@pytest.fixture(scope="session")
def x86_artifact(tmp_path_factory, tiny_onnx) -> Path:
    from edgeml.targets import best_host_target

    out = tmp_path_factory.mktemp("tvm-x86") / "tiny-x86.edgepkg"
    return build_tvm_artifact(tiny_onnx, best_host_target().name, out, workdir=out.parent / "work")

