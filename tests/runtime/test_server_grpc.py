"""The gRPC endpoint (inference.GRPCInferenceService) against tritonclient.grpc, on a real loopback port."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from serve_models import mlp_onnx, reference_mlp
from edgeml.errors import ServeError
from edgeml.runtime.server import ModelServer, ServerConfig

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (edgeml[serve])")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def server(make_mlp_artifact, make_gather_artifact, artifact_cache):
    srv = ModelServer(ServerConfig(port=0, grpc_port=0, cache_dir=artifact_cache, max_body_bytes=1 << 20))
    srv.load(make_mlp_artifact())
    srv.load(make_gather_artifact())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    host, port = server.grpc_address
    c = grpcclient.InferenceServerClient(f"{host}:{port}")
    yield c
    c.close()


def mlp_inputs(x: np.ndarray, datatype: str = "FP32"):
    inp = grpcclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)   # raw_input_contents
    return [inp]


def test_health_and_metadata(server, client):
    assert server.grpc_address[1] not in (0, server.address[1])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edgeml" and "binary_tensor_data" in meta["extensions"]
    mm = client.get_model_metadata("mlp", as_json=True)
    assert mm["versions"] == ["1"]
    assert mm["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "30"]}]   # int64 -> str in JSON
    assert [o["name"] for o in mm["outputs"]] == ["probs", "logits"]


def test_infer_raw_and_typed_contents_match_onnxruntime(server, client):
    x = np.random.default_rng(2).standard_normal((3, 30)).astype(np.float32)
    want = reference_mlp(mlp_onnx(), x)
    res = client.infer("mlp", mlp_inputs(x), request_id="r-1")
    resp = res.get_response()
    assert resp.model_name == "mlp" and resp.model_version == "1" and resp.id == "r-1"
    assert len(resp.raw_output_contents) == 2
    np.testing.assert_allclose(res.as_numpy("probs"), want["probs"], rtol=1e-5)
    np.testing.assert_allclose(res.as_numpy("logits"), want["logits"], rtol=1e-5)

    # typed InferTensorContents (fp32_contents) instead of raw bytes; ask for one output only
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name="mlp", model_version="1")
    t = req.inputs.add(name="x", datatype="FP32", shape=[3, 30])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    req.outputs.add(name="logits")
    out = client._client_stub.ModelInfer(req)
    assert [o.name for o in out.outputs] == ["logits"] and list(out.outputs[0].shape) == [3, 2]
    got = np.frombuffer(out.raw_output_contents[0], np.float32).reshape(3, 2)
    np.testing.assert_allclose(got, want["logits"], rtol=1e-5)

    # int64 input through the other model
    g = grpcclient.InferInput("idx", [2, 1], "INT64")
    g.set_data_from_numpy(np.array([[1], [3]], np.int64))
    assert client.infer("gather", [g]).as_numpy("y").shape == (2, 1, 3)


def test_concurrent_requests_share_the_batcher_and_metrics(server, client):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 30)).astype(np.float32) for _ in range(32)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda x: client.infer("mlp", mlp_inputs(x)).as_numpy("probs"), xs))
    want = reference_mlp(mlp_onnx(), np.concatenate(xs))["probs"]
    np.testing.assert_allclose(np.concatenate(outs), want, rtol=1e-5)
    st = server.stats("mlp")
    assert st["requests"] == 32 and st["failures"] == 0 and st["rows"] == 32
    # the same Prometheus metrics as HTTP requests
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert 'edgeml_inference_requests_total{model="mlp",version="1"} 32' in text


def test_errors_carry_grpc_status_and_name_the_problem(server, client):
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", mlp_inputs(np.zeros((1, 30), np.float32)))
    assert e.value.status() == "StatusCode.NOT_FOUND" and "nope" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", mlp_inputs(np.zeros((1, 30), np.float32)), model_version="9")
    assert e.value.status() == "StatusCode.NOT_FOUND" and "'9'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.is_model_ready("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", mlp_inputs(np.zeros((2, 5), np.float32)))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'x'" in e.value.message() and "[2, 5]" in e.value.message() and "[-1, 30]" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", mlp_inputs(np.zeros((1, 30), np.float64), "FP64"))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "FP32" in e.value.message()
    bad = grpcclient.InferInput("x", [1, 30], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 30), np.float32))
    bad._raw_content = bad._raw_content[:-4]           # one float short
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [bad])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "'x'" in e.value.message()
    # the server keeps serving, and the rejections were counted
    assert client.infer("mlp", mlp_inputs(np.zeros((1, 30), np.float32))).as_numpy("probs").shape == (1, 2)
    assert server.stats("mlp")["rejected"] == 3     # 404s resolve no model version, as over HTTP


def test_grpc_off_by_default_and_taken_port_is_a_clear_error(make_mlp_artifact, artifact_cache):
    with ModelServer(ServerConfig(port=0, cache_dir=artifact_cache)) as srv:
        assert srv.grpc_address is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        srv = ModelServer(ServerConfig(port=0, grpc_port=taken, cache_dir=artifact_cache))
        with pytest.raises(ServeError, match="gRPC"):
            srv.start()
        assert not srv.running


def test_grpc_is_imported_lazily_and_a_missing_grpcio_names_the_extra(tmp_path):
    code = (
        "import sys\n"
        "from edgeml.runtime.server import ModelServer, ServerConfig\n"
        "srv = ModelServer(ServerConfig(port=0)); srv.start(); srv.stop()\n"
        "print('grpc' in sys.modules)\n"
        "sys.modules['grpc'] = None   # as if grpcio were not installed\n"
        "from edgeml.errors import MissingDependency\n"
        "try:\n"
        "    ModelServer(ServerConfig(port=0, grpc_port=0)).start()\n"
        "except MissingDependency as exc:\n"
        "    print(exc.hint)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["False", "pip install 'edgeml[serve]'"]


def test_cli_grpc_port(make_mlp_artifact, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeml.cli", "serve", str(make_mlp_artifact()), "--port", "0", "--grpc-port", "0",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        lines = []
        while not lines or lines[-1].rstrip() != "}":
            line = proc.stdout.readline()
            assert line, f"serve exited early: {proc.stderr.read()}"
            lines.append(line)
        info = json.loads("".join(lines))
        c = grpcclient.InferenceServerClient(info["grpc"])
        x = np.ones((2, 30), np.float32)
        np.testing.assert_allclose(c.infer("mlp", mlp_inputs(x)).as_numpy("probs"),
                                   reference_mlp(mlp_onnx(), x)["probs"], rtol=1e-5)
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_finishes_grpc_requests_in_flight(make_mlp_artifact, artifact_cache):
    srv = ModelServer(ServerConfig(port=0, grpc_port=0, cache_dir=artifact_cache, max_delay_ms=20))
    srv.load(make_mlp_artifact())
    srv.start()
    c = grpcclient.InferenceServerClient("{}:{}".format(*srv.grpc_address))
    x = np.ones((1, 30), np.float32)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(c.infer, "mlp", mlp_inputs(x)) for _ in range(8)]
        while srv.stats("mlp")["requests"] == 0 and srv._in_loop(lambda: srv.inflight) == 0:
            pass
        srv.stop(drain_timeout=5)
        outcomes = []
        for f in futs:
            try:
                outcomes.append(f.result().as_numpy("probs").shape)
            except InferenceServerException as exc:
                outcomes.append(exc.status())
    c.close()
    st = srv.stats("mlp")
    # every request the server accepted was answered; gRPC refuses (CANCELLED) the ones not yet accepted
    assert st["requests"] >= 1 and st["failures"] == 0 and outcomes.count((1, 2)) == st["requests"], (outcomes, st)
    assert set(outcomes) <= {(1, 2), "StatusCode.CANCELLED", "StatusCode.UNAVAILABLE"}, outcomes
