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



@pytest.fixture
def require_cross_compiler():
    """``require_cross_compiler(target)`` skips the test when the target's cross toolchain is missing here."""
    return _require_cross_compiler


def _require_cross_compiler(target_name: str) -> None:
    """Skip (with the reason printed in pytest's summary) when the target needs a cross toolchain this host lacks.

    `bash .ci/run` installs it; `bash setup.sh` installs it too when it runs as root with apt-get.
    """
    import shutil

    from edgeml.targets import get_target

    compiler = get_target(target_name).cross_compiler
    if not compiler:
        return
    if shutil.which(compiler) is None:
        pytest.skip(f"target {target_name} needs the cross compiler {compiler}, not installed here "
                    "(apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    if compiler.startswith("aarch64-linux-gnu") and not Path("/usr/aarch64-linux-gnu/lib/crti.o").exists():
        pytest.skip(f"target {target_name}: {compiler} cannot link without the arm64 C library "
                    "(apt-get install libc6-dev-arm64-cross)")
