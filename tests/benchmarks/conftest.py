"""Shared fixtures for the benchmark tests: a tiny ONNX model, its .edgepkg, a fake clock and target."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest


def make_tiny_onnx(path: Path, *, dynamic_batch: bool = True, features: int = 16) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((features, 8)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((8,)).astype(np.float32), "B")
    batch = "N" if dynamic_batch else 1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])],
        "tiny", [x], [y], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_edgepkg(tmp_path_factory, tiny_onnx) -> Path:
    """The tiny model wrapped as an ONNX Runtime artifact (written with the real artifact writer)."""
    from edgeml.runtime.artifact import write_artifact
    from edgeml.targets import get_target

    import onnxruntime

    target = get_target("x86_64")
    manifest = {
        "name": "tiny", "version": "1.0.0", "target": target.name, "required_features": list(target.required_features),
        "arch": target.arch, "precision": "fp32",
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {"graph_optimization_level": "all"}},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 16]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 8]}],
    }
    out = tmp_path_factory.mktemp("artifacts") / "tiny.edgepkg"
    return write_artifact(out, manifest, {"model/model.onnx": tiny_onnx})


class FakeClock:
    """A clock that only moves when told to; ``sleep`` advances it. Integer nanoseconds, so sums are exact."""

    def __init__(self) -> None:
        self.ns = 0

    def now(self) -> float:
        return self.ns / 1e9

    def advance(self, seconds: float) -> None:
        self.ns += max(0, round(seconds * 1e9))

    def sleep(self, seconds: float) -> None:
        self.ns += max(0, math.ceil(seconds * 1e9))  # never short of the deadline, so waits end


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


def fake_target(clock: FakeClock, latencies_s, *, batch_axis=None):
    """A BenchTarget whose every run takes the next latency from ``latencies_s`` (cycled) on ``clock``."""
    from edgeml.benchmarks.sut import BenchTarget
    from edgeml.runtime.model import TensorSpec

    seq = list(latencies_s)

    class FakeTarget(BenchTarget):
        kind = "fake"

        def __init__(self):
            super().__init__("fake.onnx", clock=clock.now)
            self.inputs = [TensorSpec("x", "float32", (batch_axis, 4))]
            self.info = {"kind": "fake", "name": "fake", "backend": "fake", "precision": "fp32", "path": "fake.onnx"}
            self.calls = 0
            self.batches: list[int] = []

        def _new_runner(self, first):
            def run(feeds):
                self.batches.append(int(feeds["x"].shape[0]))
                clock.advance(seq[self.calls % len(seq)])
                self.calls += 1
            return run

    return FakeTarget()


@pytest.fixture
def make_fake_target():
    return fake_target


@pytest.fixture
def tiny_onnx_factory():
    return make_tiny_onnx
