"""Issue 9 rows 1, 5, 6, 7, 11, 13 on a real server over loopback sockets: each test fails on the old server."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from serve_models import mlp_onnx, reference_mlp
from edgeml.runtime.server import ModelServer, ServerConfig
from edgeml.runtime.server.protocol import BadRequest, ModelNotFound

ROW = [0.25] * 30


def mlp_doc(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def raw_post(path: str, doc: dict | bytes, extra: str = "") -> bytes:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def read_response(f) -> tuple[int, dict[str, str], bytes]:
    line = f.readline()
    if not line:
        return 0, {}, b""
    status = int(line.split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def exchange(srv, data: bytes, count: int, timeout: float = 10) -> list[tuple[int, dict[str, str], bytes]]:
    with socket.create_connection(srv.address, timeout=timeout) as s:
        s.sendall(data)
        f = s.makefile("rb")
        return [read_response(f) for _ in range(count)]


def make_server(make_mlp_artifact, artifact_cache, **config) -> ModelServer:
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, **config))
    srv.load(make_mlp_artifact())
    srv.start()
    return srv


@pytest.fixture
def mlp_server(make_mlp_artifact, artifact_cache):
    srv = make_server(make_mlp_artifact, artifact_cache, max_delay_ms=5.0)
    yield srv
    srv.stop()


# -- row 1: every response carries its own request's result ----------------------------------------
def test_zero_row_requests_get_400_and_never_shift_other_clients_results(mlp_server):
    want = reference_mlp(mlp_onnx(), np.array([ROW], np.float32))
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 3, 30)).astype(np.float32) for i in range(12)]
    zero = {"inputs": [{"name": "x", "shape": [0, 30], "datatype": "FP32", "data": []}]}
    stream = []
    for x in xs:   # a 0-row request between every pair: on the old server each shifted the split by one row
        stream += [raw_post("/v2/models/mlp/infer", mlp_doc(x)), raw_post("/v2/models/mlp/infer", zero)]
    results = exchange(mlp_server, b"".join(stream), len(stream))
    for i, x in enumerate(xs):
        status, _, data = results[2 * i]
        assert status == 200, data
        logits = next(o for o in json.loads(data)["outputs"] if o["name"] == "logits")
        np.testing.assert_allclose(np.reshape(logits["data"], (len(x), 2)), reference_mlp(mlp_onnx(), x)["logits"],
                                   rtol=1e-5)
        status, _, data = results[2 * i + 1]
        assert status == 400 and "0 rows" in json.loads(data)["error"]
    assert want["logits"].shape == (1, 2)


def test_concurrent_clients_each_get_their_own_result_while_an_attacker_sends_zero_rows(mlp_server):
    stop = threading.Event()
    zero = raw_post("/v2/models/mlp/infer", {"inputs": [{"name": "x", "shape": [0, 30], "datatype": "FP32",
                                                          "data": []}]})

    def attacker() -> None:
        while not stop.is_set():
            exchange(mlp_server, zero * 16, 16)

    wrong: list[str] = []

    def client(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        with socket.create_connection(mlp_server.address, timeout=10) as s:
            f = s.makefile("rb")
            for _ in range(25):
                x = rng.standard_normal((1 + k % 4, 30)).astype(np.float32)
                s.sendall(raw_post("/v2/models/mlp/infer", mlp_doc(x)))
                status, _, data = read_response(f)
                got = next(o for o in json.loads(data)["outputs"] if o["name"] == "logits") if status == 200 else None
                if got is None or not np.allclose(np.reshape(got["data"], (-1, 2)),
                                                  reference_mlp(mlp_onnx(), x)["logits"], rtol=1e-5):
                    wrong.append(f"client {k}: status {status}, {data[:120]!r}")

    threads = [threading.Thread(target=attacker)] + [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(60)
    stop.set()
    threads[0].join(30)
    assert wrong == []
    assert mlp_server.stats("mlp")["batch_sizes"]["1"] < mlp_server.stats("mlp")["requests"], "requests were batched"


def test_batch_split_uses_each_requests_own_rows_not_the_claimed_count():
    import asyncio

    from edgeml.runtime.server.batching import Batcher
    from edgeml.runtime.server.metrics import ModelStats

    loop = asyncio.new_event_loop()
    batcher = Batcher(lambda feeds: {"y": feeds["x"] * 10}, loop, ModelStats(), max_batch=8, max_delay_ms=0.0)
    arrays = [np.zeros((0, 2), np.float32), np.full((1, 2), 1, np.float32), np.full((2, 2), 2, np.float32)]
    got: list = [None] * 3

    def submit_all() -> None:
        for i, a in enumerate(arrays):
            def cb(result, queue_ms, i=i):
                got[i] = result
                if all(g is not None for g in got):
                    loop.stop()
            batcher.submit({"x": a}, 1, cb)     # the old server claimed max(rows, 1) = 1 for the empty one

    loop.call_soon(submit_all)
    loop.run_forever()
    loop.close()
    assert [g["y"].shape[0] for g in got] == [0, 1, 2]
    assert np.all(got[1]["y"] == 10) and np.all(got[2]["y"] == 20)


# -- row 5: the repository API needs an admin token -------------------------------------------------
def test_repository_api_is_off_by_default_and_needs_the_bearer_token(make_mlp_artifact, artifact_cache):
    index = raw_post("/v2/repository/index", b"")
    unload = raw_post("/v2/repository/models/mlp/unload", b"")
    srv = make_server(make_mlp_artifact, artifact_cache)
    try:
        for status, _, data in exchange(srv, index + unload, 2):
            assert status == 403
            assert json.loads(data)["error"] == "repository API is disabled; start the server with --admin-token"
        assert exchange(srv, b"GET /v2/models/mlp/ready HTTP/1.1\r\nHost: t\r\n\r\n", 1)[0][0] == 200
    finally:
        srv.stop()
    srv = make_server(make_mlp_artifact, artifact_cache, admin_token="s3cret-token")
    try:
        for auth in ("", "Authorization: Bearer wrong-token\r\n", "Authorization: Basic s3cret-token\r\n"):
            status, _, data = exchange(srv, raw_post("/v2/repository/models/mlp/unload", b"", auth), 1)[0]
            assert status == 401 and "Authorization: Bearer" in json.loads(data)["error"]
        status, _, data = exchange(srv, raw_post("/v2/repository/index", b"", "Authorization: Bearer s3cret-token\r\n"),
                                   1)[0]
        assert status == 200 and json.loads(data)[0]["name"] == "mlp"
    finally:
        srv.stop()


# -- row 6: per-request limits ----------------------------------------------------------------------------
def test_requests_over_the_row_or_byte_limit_get_413_and_the_server_keeps_serving(make_mlp_artifact,
                                                                                  artifact_cache):
    srv = make_server(make_mlp_artifact, artifact_cache, max_batch=8, max_body_bytes=256 << 10)
    try:
        x = np.zeros((9, 30), np.float32)          # over max_batch (the default row limit)
        header = json.dumps({"inputs": [{"name": "x", "shape": [9, 30], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        binary = raw_post("/v2/models/mlp/infer", header + x.tobytes(),
                          f"Inference-Header-Content-Length: {len(header)}\r\n")
        big = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n" + b" " * 300000
        results = exchange(srv, raw_post("/v2/models/mlp/infer", mlp_doc(x)) + binary, 2)
        for status, _, data in results:
            assert status == 413 and "at most 8 rows per request" in json.loads(data)["error"]
        status, headers, data = exchange(srv, big, 1)[0]
        assert status == 413 and "over the server's limit of 262144 bytes" in json.loads(data)["error"]
        assert headers["connection"] == "close"
        assert exchange(srv, raw_post("/v2/models/mlp/infer", mlp_doc(x[:8])), 1)[0][0] == 200
    finally:
        srv.stop()


def test_partial_bodies_count_against_one_server_wide_bound(make_mlp_artifact, artifact_cache):
    srv = make_server(make_mlp_artifact, artifact_cache, max_body_bytes=1 << 20, max_buffered_body_bytes=1 << 20)
    socks = []
    try:
        head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 900000\r\n\r\n"
        for _ in range(2):      # each under the per-request limit, together over the server-wide bound
            s = socket.create_connection(srv.address, timeout=10)
            s.sendall(head + b" " * 600000)
            socks.append(s)
        replies = []
        for s in socks:
            s.settimeout(5)
            try:
                replies.append(s.recv(4096))
            except TimeoutError:
                replies.append(b"")
        assert sum(r.startswith(b"HTTP/1.1 503") for r in replies) == 1, replies
        assert any(b"too many large request bodies" in r for r in replies)
        assert srv.in_loop(lambda: srv.buffered_body_bytes) == 600000   # the refused one gave its bytes back
    finally:
        for s in socks:
            s.close()
        srv.stop()


# -- row 7: slowloris ---------------------------------------------------------------------------------------
def trickle(srv, first: bytes, drip: bytes, seconds: float) -> bytes:
    """Send ``first``, then ``drip`` every 0.1 s; return what the server answered (b'' if nothing)."""
    with socket.create_connection(srv.address, timeout=seconds) as s:
        s.sendall(first)
        s.settimeout(0.1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = s.recv(4096)
                return data
            except TimeoutError:
                try:
                    s.sendall(drip)
                except OSError:
                    return b"(reset)"
        return b""


def test_slow_heads_and_bodies_get_408_however_often_a_byte_arrives(make_mlp_artifact, artifact_cache):
    srv = make_server(make_mlp_artifact, artifact_cache, header_timeout_s=0.5, body_timeout_s=0.5,
                      keepalive_timeout_s=0.5)
    try:
        head = trickle(srv, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n", b"X-A: b\r\n", 5)
        assert head.startswith(b"HTTP/1.1 408") and b"headers did not arrive within 0.5 s" in head
        body = trickle(srv, b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n",
                       b" ", 5)
        assert body.startswith(b"HTTP/1.1 408") and b"body did not arrive within 0.5 s" in body
        idle = trickle(srv, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n", b"\r\n", 5)
        assert idle.startswith(b"HTTP/1.1 200")
        assert srv.in_loop(lambda: srv.http_codes.get(408)) == 2
    finally:
        srv.stop()


def test_connections_over_the_cap_get_503_and_close(make_mlp_artifact, artifact_cache):
    srv = make_server(make_mlp_artifact, artifact_cache, max_connections=3)
    held = [socket.create_connection(srv.address, timeout=5) for _ in range(3)]
    try:
        deadline = time.monotonic() + 5
        while srv.in_loop(lambda: len(srv.connections)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(srv.address, timeout=5) as extra:
            reply = extra.makefile("rb")
            status, headers, data = read_response(reply)
            assert status == 503 and headers["connection"] == "close"
            assert "too many open connections" in json.loads(data)["error"]
            assert reply.read() == b""
        held.pop().close()
        deadline = time.monotonic() + 5
        while srv.in_loop(lambda: len(srv.connections)) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exchange(srv, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n", 1)[0][0] == 200
    finally:
        for s in held:
            s.close()
        srv.stop()


# -- row 11: strict v2 JSON, methods, upgrades ------------------------------------------------------------
def tensor(**change) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": ROW, **change}]}


@pytest.mark.parametrize("doc, needle", [
    (tensor(name={"x": 1}), "inputs[0].name must be a string, got an object"),
    (tensor(datatype={"a": 1}), "unknown datatype"),
    (tensor(data=["nan"] + ROW[1:]), "cannot be read as FP32: it holds a string (\"nan\")"),
    (tensor(data=["-inf"] + ROW[1:]), "it holds a string (\"-inf\")"),
    (tensor(data=["1_2"] + ROW[1:]), "it holds a string (\"1_2\")"),
    (tensor(data=[None] + ROW[1:]), "it holds null"),
    (tensor(data=[True] + ROW[1:]), "it holds a boolean (true)"),
    (tensor(data=[[0.5] * 30, 1.0]), "mixes lists and values"),
    (tensor(data=[1e39] + ROW[1:]), "out of range for FP32"),
    (tensor(shape=[True, 30]), "'shape' must be a list of non-negative integers"),
    (tensor(shape=[2 ** 63, 30]), "below 2^63"),
    (tensor(shape=["1", 30]), "'shape' must be a list"),
    (tensor(parameters="x"), "'parameters' must be an object"),
    ({**tensor(), "id": 5}, "'id' must be a string"),
    ({**tensor(), "outputs": [{"name": {"a": 1}}]}, "outputs[0]: unknown output"),
    ({**tensor(), "outputs": [{"name": "logits", "parameters": {"binary_data": "false"}}]},
     "binary_data must be true or false"),
    ({**tensor(), "parameters": {"binary_data_output": 1}}, "binary_data_output must be true or false"),
])
def test_strict_json_values_are_400_naming_the_field(mlp_server, doc, needle):
    status, _, data = exchange(mlp_server, raw_post("/v2/models/mlp/infer", doc), 1)[0]
    assert status == 400, data
    assert needle in json.loads(data)["error"]


@pytest.mark.parametrize("header_length", ["1_2", "+12", "0x10", "nan", "-1", "99999999999999999999"])
def test_binary_header_length_must_be_plain_digits(mlp_server, header_length):
    x = np.zeros((1, 30), np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    req = raw_post("/v2/models/mlp/infer", header + x.tobytes(), f"Inference-Header-Content-Length: {header_length}\r\n")
    status, _, data = exchange(mlp_server, req, 1)[0]
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(data)["error"]


@pytest.mark.parametrize("size", ["12", None, True, 120.0, -4, 2 ** 70])
def test_binary_data_size_must_be_an_integer(mlp_server, size):
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    req = raw_post("/v2/models/mlp/infer", header + bytes(120), f"Inference-Header-Content-Length: {len(header)}\r\n")
    status, _, data = exchange(mlp_server, req, 1)[0]
    assert status == 400 and "binary_data_size" in json.loads(data)["error"]


def test_wrong_methods_get_405_with_allow(mlp_server):
    for method, path, allow in (("OPTIONS", "/v2", "GET"), ("DELETE", "/v2/health/live", "GET"),
                                ("POST", "/metrics", "GET"), ("GET", "/v2/models/mlp/infer", "POST"),
                                ("PUT", "/v2/models/mlp", "GET")):
        status, headers, data = exchange(mlp_server, f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
                                         .encode(), 1)[0]
        assert (status, headers.get("allow")) == (405, allow), (method, path, data)


@pytest.mark.parametrize("request_bytes, status", [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", 405),
    (b"GET /v2 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n\r\n",
     400),
])
def test_connect_and_upgrade_get_one_error_then_close(mlp_server, request_bytes, status):
    with socket.create_connection(mlp_server.address, timeout=5) as s:
        s.sendall(request_bytes + b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        everything = b""
        while chunk := s.recv(65536):
            everything += chunk
    assert everything.startswith(f"HTTP/1.1 {status} ".encode())
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", everything)) == 1, everything


def test_no_bad_input_yields_500(mlp_server):
    bodies = [b"", b"null", b"42", b'"x"', b"[]", b'{"inputs": {}}', b'{"inputs": [null]}', b'{"inputs": [[]]}',
              b'{"inputs": [{"name": null}]}', b'{"inputs": [{"name": [1]}]}', b'{"inputs": [{"name": "x"}]}',
              b'{"inputs": [{"name": "x", "shape": {}, "datatype": "FP32", "data": []}]}',
              b'{"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": {"a": 1}}]}',
              b'{"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": [[[[]]]]}]}',
              b'{"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": 1}]}',
              b'{"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": [' + b"1," * 29 + b"1]}],"
              b' "outputs": 5}', b'{"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": [' +
              b"1," * 29 + b'1]}], "outputs": [5]}', b"\xff\xfe", b'{"a": "\\ud800"}']
    paths = ["/v2/models/mlp/infer", "/v2/models/%00/infer", "/v2/models/mlp/versions/%ff/infer",
             "/v2/repository/models/mlp/load"]
    stream = [raw_post(p, b) for p in paths for b in bodies]
    for status, _, data in exchange(mlp_server, b"".join(stream), len(stream)):
        assert 400 <= status < 500, data


# -- issue 12 item 3: one request path; 404 is its own error -----------------------------------------------
def test_model_not_found_is_not_a_bad_request():
    assert not issubclass(ModelNotFound, BadRequest)
    assert ModelNotFound("x").status == 404


# -- row 13: the serve CLI refuses impossible numbers --------------------------------------------------------
@pytest.mark.parametrize("args", [["--port", "99999"], ["--port", "-1"], ["--grpc-port", "70000"],
                                  ["--max-body-mb", "-1"], ["--max-body-mb", "0"], ["--max-body-mb", "nan"],
                                  ["--max-body-mb", "1e12"], ["--max-batch", "0"], ["--max-delay-ms", "-5"],
                                  ["--threads", "0"], ["--max-connections", "0"], ["--header-timeout", "0"],
                                  ["--body-timeout", "inf"], ["--max-request-rows", "-3"],
                                  ["--admin-token", "short"]])
def test_serve_refuses_impossible_numbers_with_exit_code_2(args, tmp_path):
    from edgeml.runtime.server.cli import serve_cmd

    result = CliRunner().invoke(serve_cmd, [str(tmp_path / "m.edgepkg"), *args])
    assert result.exit_code == 2, result.output
    assert args[0] in result.output and "Traceback" not in result.output


def test_server_config_refuses_impossible_limits():
    from edgeml.errors import ServeError

    for bad in ({"port": 99999}, {"max_body_bytes": -1}, {"header_timeout_s": float("nan")}, {"max_batch": 0},
                {"admin_token": "short"}):
        with pytest.raises(ServeError, match=f"ServerConfig.{next(iter(bad))}"):
            ModelServer(ServerConfig(**bad))
