"""The roofline script's arithmetic: MACs and weight bytes read off an ONNX graph, and the bound they give."""

from __future__ import annotations

import numpy as np
import pytest

from edgeml.benchmarks.roofline import bound_ms, model_cost


def test_conv_and_gemm_macs_and_weight_bytes_are_counted_at_batch_one(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((4, 3, 3, 3), dtype=np.float32)          # Cout 4, Cin 3, 3x3, pad 1: out [1, 4, 8, 8]
    g = np.ones((256, 10), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("Gemm", ["f", "g"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(g, "g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model.SerializeToString())
    cost = model_cost(path)
    assert cost["macs"] == 4 * 8 * 8 * 27 + 10 * 256
    assert cost["weight_bytes_fp32"] == w.nbytes + g.nbytes


def test_the_bound_is_the_slower_of_compute_and_weight_traffic():
    peaks = {"fp32_gmacs": 100.0, "int8_gmacs": 400.0, "bandwidth_gbs": 10.0}
    compute_bound = {"macs": 1e9, "weight_bytes_fp32": 1e6}
    assert bound_ms(compute_bound, peaks, "fp32") == pytest.approx(10.0)
    assert bound_ms(compute_bound, peaks, "int8") == pytest.approx(2.5)
    memory_bound = {"macs": 1e6, "weight_bytes_fp32": 1e9}
    assert bound_ms(memory_bound, peaks, "fp32") == pytest.approx(100.0)
    assert bound_ms(memory_bound, peaks, "int8") == pytest.approx(25.0)   # one byte per weight
