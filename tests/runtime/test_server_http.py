"""A real server on a loopback port: v2 endpoints, tritonclient, bad input, failures, metrics, logs."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import socket

import numpy as np
import pytest

from serve_models import mlp_onnx, reference_mlp
from edgeml.runtime.server import ModelServer, ServerConfig
from edgeml.runtime.server.logs import configure_logging


TOKEN = "test-admin-token-1"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(make_mlp_artifact, make_gather_artifact, artifact_cache):
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, max_body_bytes=1 << 20, admin_token=TOKEN))
    srv.load(make_mlp_artifact())
    srv.load(make_gather_artifact())
    srv.start()
    yield srv
    srv.stop()


def call(srv, method, path, body=None, headers=None):
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def infer_body(x):
    x = np.asarray(x, np.float32)
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def test_health_metadata_and_model_endpoints(server):
    assert call(server, "GET", "/v2/health/live")[0] == 200
    assert call(server, "GET", "/v2/health/ready")[0] == 200
    status, _, data = call(server, "GET", "/v2")
    meta = json.loads(data)
    assert status == 200 and meta["name"] == "edgeml" and "binary_tensor_data" in meta["extensions"]
    status, _, data = call(server, "GET", "/v2/models/mlp")
    meta = json.loads(data)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 30]}]
    assert [o["name"] for o in meta["outputs"]] == ["probs", "logits"]
    assert call(server, "GET", "/v2/models/mlp/versions/1")[0] == 200
    status, _, data = call(server, "GET", "/v2/models/mlp/versions/1/ready")
    assert status == 200 and json.loads(data)["ready"] is True
    status, _, data = call(server, "GET", "/v2/models/mlp/config")
    assert json.loads(data)["max_batch_size"] == 32


def test_json_inference_matches_onnxruntime(server):
    x = np.random.default_rng(1).standard_normal((3, 30)).astype(np.float32)
    status, headers, data = call(server, "POST", "/v2/models/mlp/infer", {**infer_body(x), "id": "abc"})
    assert status == 200, data
    doc = json.loads(data)
    assert doc["model_name"] == "mlp" and doc["model_version"] == "1" and doc["id"] == "abc"
    want = reference_mlp(mlp_onnx(), x)
    probs = next(o for o in doc["outputs"] if o["name"] == "probs")
    assert probs["shape"] == [3, 2] and probs["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(probs["data"]).reshape(3, 2), want["probs"], rtol=1e-5)
    assert headers["X-Request-ID"]


def test_tritonclient_json_and_binary(server):
    import tritonclient.http as th

    host, port = server.address
    client = th.InferenceServerClient(f"{host}:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    assert client.get_model_metadata("mlp")["name"] == "mlp"
    x = np.random.default_rng(2).standard_normal((4, 30)).astype(np.float32)
    want = reference_mlp(mlp_onnx(), x)
    for binary_in in (True, False):
        for binary_out in (True, False):
            inp = th.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary_in)
            outs = [th.InferRequestedOutput("probs", binary_data=binary_out),
                    th.InferRequestedOutput("logits", binary_data=binary_out)]
            res = client.infer("mlp", [inp], outputs=outs, model_version="1", request_id="t1")
            np.testing.assert_allclose(res.as_numpy("probs"), want["probs"], rtol=1e-5)
            np.testing.assert_allclose(res.as_numpy("logits"), want["logits"], rtol=1e-5)
            assert res.get_response()["id"] == "t1"
    # no outputs listed: tritonclient asks binary_data_output for all
    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("mlp", [inp])
    np.testing.assert_allclose(res.as_numpy("logits"), want["logits"], rtol=1e-5)
    # compressed request bodies
    res = client.infer("mlp", [inp], request_compression_algorithm="gzip")
    np.testing.assert_allclose(res.as_numpy("probs"), want["probs"], rtol=1e-5)
    index = client.get_model_repository_index(headers=ADMIN)
    assert {(m["name"], m["version"]) for m in index} == {("mlp", "1"), ("gather", "1")}
    with pytest.raises(th.InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [inp])
    client.close()


GOOD_X = [0.5] * 30


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v2/models/nope/infer", infer_body([GOOD_X]), 404, "unknown model 'nope'"),
    ("/v2/models/mlp/versions/9/infer", infer_body([GOOD_X]), 404, "model 'mlp' has no version '9'"),
    ("/v2/models/mlp/versions/9", None, 404, "no version '9'"),
    ("/v2/nothing", None, 404, "no such endpoint"),
    ("/v2/models/mlp/infer", b'{"inputs": [', 400, "not valid JSON"),
    ("/v2/models/mlp/infer", {"inputs": [{"name": "y", "shape": [1, 30], "datatype": "FP32", "data": GOOD_X}]},
     400, "unknown input 'y'; the model's inputs are ['x']"),
    ("/v2/models/mlp/infer", {"inputs": [{"name": "x", "shape": [1, 29], "datatype": "FP32", "data": GOOD_X[:29]}]},
     400, "input 'x' has shape [1, 29]; the model expects [-1, 30]"),
    ("/v2/models/mlp/infer", {"inputs": [{"name": "x", "shape": [1, 30], "datatype": "INT64", "data": [1] * 30}]},
     400, "input 'x' has datatype INT64; the model expects FP32"),
    ("/v2/models/mlp/infer", {"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": GOOD_X[:10]}]},
     400, "needs 30 values"),
])
def test_bad_input_gets_status_and_message(server, path, body, status, needle):
    method = "POST" if body is not None else "GET"
    got, _, data = call(server, method, path, body)
    assert got == status
    assert needle in json.loads(data)["error"]
    # and the server keeps serving
    assert call(server, "POST", "/v2/models/mlp/infer", infer_body([GOOD_X]))[0] == 200


def test_body_over_the_limit_is_413_and_server_keeps_serving(server):
    big = b'{"inputs": [' + b" " * (2 << 20) + b"]}"
    status, headers, data = call(server, "POST", "/v2/models/mlp/infer", big)
    assert status == 413 and "over the server's limit of 1048576 bytes" in json.loads(data)["error"]
    assert headers.get("Connection") == "close"
    gz = gzip.compress(b'{"inputs": [' + b" " * (2 << 20) + b"]}")
    status, _, data = call(server, "POST", "/v2/models/mlp/infer", gz, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed request body is over" in json.loads(data)["error"]
    assert call(server, "POST", "/v2/models/mlp/infer", infer_body([GOOD_X]))[0] == 200


def test_malformed_http_is_400(server):
    host, port = server.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"NOT-HTTP garbage\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b"malformed HTTP request" in reply
    assert call(server, "GET", "/v2/health/live")[0] == 200


def pipelined(server, requests: list[bytes]) -> list[tuple[int, bytes]]:
    """Send several requests in one write on one connection; read the responses in order."""
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"".join(requests))
        f = s.makefile("rb")
        out = []
        for _ in requests:
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                if key.lower() == "content-length":
                    length = int(value)
            out.append((status, f.read(length)))
        return out


def post(path: str, doc: dict, extra: str = "") -> bytes:
    body = json.dumps(doc).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def gather_body(i: int) -> dict:
    return {"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [i]}]}


def test_backend_failure_is_500_for_that_request_only(server):
    # Three requests arrive together and are batched into one run; the bad index makes
    # ONNX Runtime fail, so the batch is re-run request by request.
    results = pipelined(server, [post("/v2/models/gather/infer", gather_body(i)) for i in (1, 10, 2)])
    assert [s for s, _ in results] == [200, 500, 200]
    assert "failed" in json.loads(results[1][1])["error"] and "gather" in json.loads(results[1][1])["error"]
    np.testing.assert_array_equal(json.loads(results[0][1])["outputs"][0]["data"], [3, 4, 5])
    np.testing.assert_array_equal(json.loads(results[2][1])["outputs"][0]["data"], [6, 7, 8])
    st = server.stats("gather")
    assert st["failures"] == 1 and st["requests"] == 3
    assert st["batch_sizes"]["2"] < st["batch_sizes"]["4"], "the three requests should have run as one batch"
    assert call(server, "POST", "/v2/models/gather/infer", gather_body(3))[0] == 200


def test_pipelined_responses_keep_request_order(server):
    reqs = []
    for i in range(20):
        reqs.append(post("/v2/models/gather/infer", gather_body(i % 4), f"X-Request-ID: req-{i}\r\n"))
        reqs.append(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
    results = pipelined(server, reqs)
    for i in range(20):
        status, data = results[2 * i]
        assert status == 200
        assert json.loads(data)["outputs"][0]["data"][0] == (i % 4) * 3
        assert results[2 * i + 1] == (200, b'{"live":true}')


def test_request_ids_are_echoed_or_generated_and_logged(server):
    buf = io.StringIO()
    configure_logging(True, stream=buf)
    status, headers, _ = call(server, "POST", "/v2/models/mlp/infer", infer_body([GOOD_X]), {"X-Request-ID": "my-id-1"})
    assert status == 200 and headers["X-Request-ID"] == "my-id-1"
    status, headers, _ = call(server, "POST", "/v2/models/mlp/infer", b"{bad", {"X-Request-ID": "my-id-2"})
    assert status == 400 and headers["X-Request-ID"] == "my-id-2"
    _, h1, _ = call(server, "GET", "/v2/health/live")
    _, h2, _ = call(server, "GET", "/v2/health/live")
    assert h1["X-Request-ID"] != h2["X-Request-ID"]
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    bad = [ln for ln in lines if ln.get("request_id") == "my-id-2"]
    assert bad and bad[0]["status"] == 400 and "not valid JSON" in bad[0]["error"] and bad[0]["model"] == "mlp"


def test_prometheus_metrics(server):
    for _ in range(3):
        call(server, "POST", "/v2/models/mlp/infer", infer_body([GOOD_X, GOOD_X]))
    call(server, "POST", "/v2/models/mlp/infer", b"{bad")
    status, headers, data = call(server, "GET", "/metrics")
    text = data.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'edgeml_inference_requests_total{model="mlp",version="1"} 4' in text
    assert 'edgeml_inference_rejected_total{model="mlp",version="1"} 1' in text
    assert 'edgeml_inference_failures_total{model="mlp",version="1"} 0' in text
    assert 'edgeml_request_duration_seconds_count{model="mlp",version="1"} 4' in text
    assert 'edgeml_batch_size_bucket{model="mlp",version="1",le="2"} 3' in text
    assert 'edgeml_queue_duration_seconds_sum{model="mlp",version="1"}' in text
    assert 'edgeml_queue_duration_seconds_count{model="mlp",version="1"} 3' in text, "bad JSON never queues"
    assert 'edgeml_queue_duration_seconds_bucket{model="mlp",version="1",le="0.0001"}' in text, "ms -> s bounds"
    assert 'edgeml_compute_duration_seconds_bucket{model="mlp",version="1",le="+Inf"} 3' in text
    assert 'edgeml_http_responses_total{code="400"} 1' in text


def test_stats_are_raw_mergeable_counters(server):
    for _ in range(5):
        call(server, "POST", "/v2/models/mlp/infer", infer_body([GOOD_X]))
    st = server.stats("mlp")
    assert st["requests"] == 5 and st["failures"] == 0
    buckets = list(st["latency_buckets_ms"].values())
    assert buckets == sorted(buckets) and buckets[-1] == 5, "cumulative bucket counts"
    assert st["latency_sum_ms"] > 0 and st["compute_ms_sum"] > 0
    # one queue-time sample per request, each a real wait (enqueue -> batch start) inside its latency
    assert st["queue_ms_buckets"]["+Inf"] == 5 and st["compute_ms_buckets"]["+Inf"] == st["batches"]
    assert 0 < st["queue_ms_sum"] < st["latency_sum_ms"]
    assert [m["name"] for m in server.models()] == ["mlp", "gather"]
    assert server.models()[0] == {**server.models()[0], "default": True, "ready": True, "backend": "onnxruntime",
                                  "precision": "fp32", "version": "1"}


def test_oversized_headers_are_refused(server):
    host, port = server.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n" + b"X-Junk: " + b"a" * 70000 + b"\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b"headers are over 65536 bytes" in reply
    assert call(server, "GET", "/v2/health/live")[0] == 200


def test_idle_keepalive_connections_are_closed(make_mlp_artifact, artifact_cache):
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, keepalive_timeout_s=0.2))
    srv.load(make_mlp_artifact())
    with srv:
        with socket.create_connection(srv.address, timeout=5) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.settimeout(3)
            assert s.recv(4096) == b"", "the idle connection should be closed by the server"
