"""The v2 codec alone: JSON and binary tensors in, JSON and binary tensors out, and every 400."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from edgeml.runtime.model import TensorSpec
from edgeml.runtime.server.protocol import BadRequest, encode_infer_response, parse_infer_request
from edgeml.runtime.server.repository import ServeSpec

MODEL = SimpleNamespace(
    input_specs={"x": ServeSpec.of(TensorSpec("x", "float32", (None, 3))),
                 "k": ServeSpec.of(TensorSpec("k", "int64", (None, 1)))},
    output_specs={"y": ServeSpec.of(TensorSpec("y", "float32", (None, 2))),
                  "z": ServeSpec.of(TensorSpec("z", "int64", (None,)))},
)


def body(inputs, **extra) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


GOOD = [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
        {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [[7], [8]]}]


def test_json_inputs_decode_to_typed_arrays():
    req = parse_infer_request(body(GOOD, id="r1"), None, MODEL)
    assert req.rows == 2 and req.id == "r1"
    assert req.feeds["x"].dtype == np.float32 and req.feeds["x"].shape == (2, 3)
    np.testing.assert_array_equal(req.feeds["k"], [[7], [8]])


def test_binary_inputs_follow_the_json_header():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    k = np.array([[1], [2]], dtype=np.int64)
    header = orjson.dumps({"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
        {"name": "k", "shape": [2, 1], "datatype": "INT64", "parameters": {"binary_data_size": k.nbytes}}]})
    req = parse_infer_request(header + x.tobytes() + k.tobytes(), len(header), MODEL)
    np.testing.assert_array_equal(req.feeds["x"], x)
    np.testing.assert_array_equal(req.feeds["k"], k)


@pytest.mark.parametrize("raw, header_len, needle", [
    (b"{not json", None, "not valid JSON"),
    (b"[1,2]", None, "JSON object"),
    (b'{"inputs": []}', None, "non-empty 'inputs'"),
    (body([{**GOOD[0], "name": "nope"}, GOOD[1]]), None, "unknown input 'nope'"),
    (body([GOOD[0]]), None, "missing input 'k'"),
    (body([{**GOOD[0], "datatype": "FP64"}, GOOD[1]]), None, "input 'x' has datatype FP64; the model expects FP32"),
    (body([{**GOOD[0], "datatype": "FLOAT"}, GOOD[1]]), None, "unknown datatype 'FLOAT'"),
    (body([{**GOOD[0], "shape": [2, 4], "data": [0] * 8}, GOOD[1]]), None, "input 'x' has shape [2, 4]; the model expects [-1, 3]"),
    (body([{**GOOD[0], "shape": [6]}, GOOD[1]]), None, "input 'x' has shape [6]"),
    (body([{**GOOD[0], "data": [1, 2, 3]}, GOOD[1]]), None, "needs 6 values, 'data' has 3"),
    (body([{**GOOD[0], "data": ["a"] * 6}, GOOD[1]]), None, "cannot be read as FP32"),
    (body([{**GOOD[0], "shape": "2x3"}, GOOD[1]]), None, "'shape' must be a list"),
    (body([GOOD[0], {**GOOD[1], "shape": [3, 1], "data": [1, 2, 3]}]), None, "input 'k' has 3 rows; other inputs have 2"),
    (body([{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}}, GOOD[1]]),
     None, "no Inference-Header-Content-Length"),
    (body(GOOD), 10_000, "Inference-Header-Content-Length is 10000"),
    (body(GOOD, outputs=[{"name": "w"}]), None, "unknown output 'w'"),
])
def test_bad_requests_name_the_problem(raw, header_len, needle):
    with pytest.raises(BadRequest) as err:
        parse_infer_request(raw, header_len, MODEL)
    assert err.value.status == 400
    assert needle in err.value.message


def test_binary_size_must_match_shape_and_body():
    header = orjson.dumps({"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 20}}, GOOD[1]]})
    with pytest.raises(BadRequest, match="binary_data_size is 20 bytes; shape \\[2, 3\\] of FP32 needs 24"):
        parse_infer_request(header + b"\0" * 20, len(header), MODEL)
    with pytest.raises(BadRequest, match="runs past the end"):
        parse_infer_request(header + b"\0" * 4, len(header), MODEL)
    ok = orjson.dumps({"inputs": GOOD})
    with pytest.raises(BadRequest, match="3 bytes of binary data not claimed"):
        parse_infer_request(ok + b"abc", len(ok), MODEL)


def test_response_json_and_binary_outputs():
    req = parse_infer_request(body(GOOD, id="q", outputs=[{"name": "y", "parameters": {"binary_data": True}},
                                                          {"name": "z"}]), None, MODEL)
    y = np.array([[0.5, 1.5], [2.5, 3.5]], np.float32)
    z = np.array([3, 4], np.int64)
    data, hlen = encode_infer_response("m", "7", req.id, {"y": y, "z": z}, req, ["y", "z"])
    head = orjson.loads(data[:hlen])
    assert head["model_name"] == "m" and head["model_version"] == "7" and head["id"] == "q"
    assert head["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}
    assert head["outputs"][1] == {"name": "z", "datatype": "INT64", "shape": [2], "data": [3, 4]}
    np.testing.assert_array_equal(np.frombuffer(data[hlen:], np.float32).reshape(2, 2), y)


def test_binary_data_output_parameter_makes_all_outputs_binary():
    req = parse_infer_request(body(GOOD, parameters={"binary_data_output": True}), None, MODEL)
    y = np.ones((2, 2), np.float32)
    z = np.zeros(2, np.int64)
    data, hlen = encode_infer_response("m", "1", None, {"y": y, "z": z}, req, ["y", "z"])
    head = orjson.loads(data[:hlen])
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"]] == [16, 16]
    assert len(data) == hlen + 32


def test_latency_buckets_contain_the_fleet_protocol_edges():
    """The agent merges server telemetry into fleet histograms: every fleet edge must be a server edge."""
    from edgeml.fleet.protocol import LATENCY_BUCKETS_MS as FLEET   # same package: an import error must fail
    from edgeml.runtime.server.metrics import LATENCY_BUCKETS_MS

    assert set(map(float, FLEET)) <= set(LATENCY_BUCKETS_MS)


def test_server_imports_no_heavy_package(tmp_path):
    """A device serving an ONNX Runtime artifact never imports torch, openvino, tvm, onnx or sklearn."""
    import subprocess
    import sys

    code = (
        "import sys, edgeml.runtime.server as s\n"
        "print(','.join(m for m in ('torch','openvino','tvm','onnx','sklearn','nncf') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
