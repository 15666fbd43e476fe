"""Versions, hot swap under load, the repository extension, draining, batching, the CLI."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from serve_models import mlp_onnx, reference_mlp, write_onnx_artifact
from edgeml.errors import SignatureError
from edgeml.runtime.server import ModelServer, ServerConfig

ROWS = np.random.default_rng(5).standard_normal((16, 30)).astype(np.float32)
SCALES = {"1": 1.0, "2": 2.0, "3": 3.0}
REFS = {v: reference_mlp(mlp_onnx(scale=s), ROWS)["probs"] for v, s in SCALES.items()}


def body_for(i: int, path_version: str | None = None) -> bytes:
    x = ROWS[i % len(ROWS)]
    return json.dumps({"id": str(i), "inputs": [
        {"name": "x", "shape": [1, 30], "datatype": "FP32", "data": x.tolist()}]}).encode()


class Client(threading.Thread):
    """Keep-alive HTTP client sending inference requests until told to stop; checks every answer."""

    def __init__(self, address, seed: int, path="/v2/models/mlp/infer"):
        super().__init__(daemon=True)
        self.address, self.seed, self.path = address, seed, path
        self.stop_flag = threading.Event()
        self.results: list[tuple[float, int, str]] = []   # (time, status, version)
        self.errors: list[str] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=10)
        i = self.seed
        while not self.stop_flag.is_set():
            i += 1
            try:
                conn.request("POST", self.path, body=body_for(i), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except Exception as exc:  # noqa: BLE001 - any transport error is a dropped request
                self.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(*self.address, timeout=10)
                continue
            if resp.status != 200:
                self.errors.append(f"request {i}: HTTP {resp.status} {data[:200]!r}")
                continue
            doc = json.loads(data)
            version = doc["model_version"]
            probs = np.array(doc["outputs"][0]["data"], np.float32)
            if not np.allclose(probs, REFS[version][i % len(ROWS)], rtol=1e-4, atol=1e-6):
                self.errors.append(f"request {i}: output does not match version {version}")
            self.results.append((time.monotonic(), resp.status, version))
        conn.close()


@pytest.fixture
def mlp_versions(tmp_path):
    return {v: write_onnx_artifact(tmp_path / f"mlp-{v}.edgepkg", mlp_onnx(scale=s), name="mlp", version=v,
                                   inputs=[{"name": "x", "dtype": "float32", "shape": [None, 30]}],
                                   outputs=[{"name": "probs", "dtype": "float32", "shape": [None, 2]},
                                            {"name": "logits", "dtype": "float32", "shape": [None, 2]}])
            for v, s in SCALES.items()}


@pytest.mark.parametrize("batch_mode", ["inline", "thread"])
def test_hot_swap_under_load_drops_no_request(mlp_versions, artifact_cache, batch_mode):
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, batch_mode=batch_mode))
    srv.load(mlp_versions["1"])
    address = srv.start()
    clients = [Client(address, seed=1000 * k) for k in range(4)]
    try:
        for c in clients:
            c.start()
        time.sleep(0.3)
        srv.load(mlp_versions["2"])
        time.sleep(0.3)
        srv.load(mlp_versions["3"])
        swapped_at = time.monotonic()
        time.sleep(0.6)
    finally:
        for c in clients:
            c.stop_flag.set()
        for c in clients:
            c.join(10)
        srv.stop()
    errors = [e for c in clients for e in c.errors]
    results = [r for c in clients for r in c.results]
    assert not errors, errors[:5]
    seen = {v for _, _, v in results}
    assert seen == {"1", "2", "3"}, f"every version should have served under load, saw {seen}"
    late = [v for t, _, v in results if t > swapped_at + 0.2]
    assert late and set(late) == {"3"}, "after the swap every request reaches the new default"
    assert len(results) > 100


def test_versions_defaults_and_retirement(mlp_versions, artifact_cache):
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, max_versions=2))
    with srv:
        srv.load(mlp_versions["1"])
        srv.load(mlp_versions["2"], make_default=False)
        rows = {m["version"]: m for m in srv.models()}
        assert rows["1"]["default"] and not rows["2"]["default"]
        conn = http.client.HTTPConnection(*srv.address, timeout=5)
        for version in ("1", "2"):
            conn.request("POST", f"/v2/models/mlp/versions/{version}/infer", body=body_for(0))
            doc = json.loads(conn.getresponse().read())
            assert doc["model_version"] == version
            np.testing.assert_allclose(doc["outputs"][0]["data"], REFS[version][0], rtol=1e-5)
        conn.request("GET", "/v2/models/mlp")
        assert json.loads(conn.getresponse().read())["versions"] == ["1", "2"]
        srv.set_default("mlp", "2")
        conn.request("POST", "/v2/models/mlp/infer", body=body_for(0))
        assert json.loads(conn.getresponse().read())["model_version"] == "2"
        # a third version pushes out the oldest non-default one
        srv.load(mlp_versions["3"])
        assert sorted(m["version"] for m in srv.models()) == ["2", "3"]
        assert srv.stats("mlp")["version"] == "3"
        srv.unload("mlp", "2")
        assert [m["version"] for m in srv.models()] == ["3"]
        conn.request("POST", "/v2/models/mlp/versions/2/infer", body=body_for(0))
        resp = conn.getresponse()
        assert resp.status == 404 and "no version '2'" in json.loads(resp.read())["error"]
        srv.unload("mlp")
        conn.request("GET", "/v2/models/mlp/ready")
        assert conn.getresponse().status == 404
        conn.close()


def test_repository_extension_over_http(mlp_versions, artifact_cache, tmp_path):
    import tritonclient.http as th

    token = "swap-test-admin-token"
    admin = {"Authorization": f"Bearer {token}"}
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, repository_dir=tmp_path, admin_token=token))
    with srv:
        host, port = srv.address
        client = th.InferenceServerClient(f"{host}:{port}")
        client.load_model("mlp", config=json.dumps({"artifact": "mlp-1.edgepkg"}), headers=admin)
        assert client.is_model_ready("mlp", "1")
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", "/v2/repository/models/mlp/load",
                     body=json.dumps({"parameters": {"artifact": "mlp-2.edgepkg"}}), headers=admin)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        index = client.get_model_repository_index(headers=admin)
        assert sorted((m["version"], m["state"], m["default"]) for m in index) == [
            ("1", "READY", False), ("2", "READY", True)]
        conn.request("POST", "/v2/repository/models/mlp/load",
                     body=json.dumps({"parameters": {"artifact": "../../etc/passwd"}}), headers=admin)
        resp = conn.getresponse()
        assert resp.status == 400 and "outside the repository folder" in json.loads(resp.read())["error"]
        conn.request("POST", "/v2/repository/models/mlp/load",
                     body=json.dumps({"parameters": {"artifact": "missing.edgepkg"}}), headers=admin)
        resp = conn.getresponse()
        assert resp.status == 404 and "does not exist" in json.loads(resp.read())["error"]
        (tmp_path / "broken.edgepkg").write_bytes(b"not a zip")
        conn.request("POST", "/v2/repository/models/mlp/load",
                     body=json.dumps({"parameters": {"artifact": "broken.edgepkg"}}), headers=admin)
        resp = conn.getresponse()
        assert resp.status == 400 and "not a readable .edgepkg" in json.loads(resp.read())["error"]
        assert client.is_model_ready("mlp"), "a failed load leaves the served model alone"
        client.unload_model("mlp", headers=admin)
        assert not client.is_model_ready("mlp")
        assert client.get_model_repository_index(headers=admin) == []
        # reload by name re-reads the last artifact loaded under that name
        client.load_model("mlp", headers=admin)
        assert client.is_model_ready("mlp", "2")
        conn.close()
        client.close()


def test_graceful_stop_finishes_in_flight_requests(tmp_path, artifact_cache):
    """A slow model (about 0.1-1 s per request) with requests queued when stop() is called."""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((512, 512)) / 23).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(64):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    art = write_onnx_artifact(tmp_path / "slow.edgepkg", model.SerializeToString(), name="slow", version="1",
                              inputs=[{"name": "x", "dtype": "float32", "shape": [None, 512]}],
                              outputs=[{"name": "y", "dtype": "float32", "shape": [None, 512]}])
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, max_batch=1, batch_mode="thread",
                                   max_request_rows=256))   # one 256-row request per run
    srv.load(art)
    address = srv.start()
    x = np.ones((256, 512), np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [256, 512], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    payload = header + x.tobytes()
    import socket

    request = (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(payload)}\r\n"
               f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + payload
    sock = socket.create_connection(address, timeout=30)
    statuses: list[int] = []
    tail: list[bytes] = []

    def read_responses() -> None:       # a real client reads while the server drains
        f = sock.makefile("rb")
        for _ in range(3):
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(f.read(length)) == length:
                statuses.append(status)
        tail.append(f.read())

    reader = threading.Thread(target=read_responses)
    reader.start()
    sock.sendall(request * 3)      # three pipelined requests, queued behind each other (max_batch=1)
    deadline = time.monotonic() + 20
    while srv._in_loop(lambda: srv.inflight) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert srv._in_loop(lambda: srv.inflight) == 3
    srv.stop(drain_timeout=30)
    reader.join(30)
    sock.close()
    assert statuses == [200, 200, 200]
    assert tail == [b""], "the server closes the connection after draining"

    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1).close()


@pytest.mark.parametrize("batch_mode", ["inline", "thread"])
def test_batched_results_go_back_to_the_right_request(mlp_versions, artifact_cache, batch_mode):
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, batch_mode=batch_mode, max_batch=8))
    srv.load(mlp_versions["1"])
    with srv:
        import socket

        reqs = []
        for i in range(40):
            b = body_for(i)
            reqs.append(f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Length: {len(b)}\r\n\r\n".encode() + b)
        with socket.create_connection(srv.address, timeout=10) as s:
            s.sendall(b"".join(reqs))
            f = s.makefile("rb")
            for i in range(40):
                assert f.readline().startswith(b"HTTP/1.1 200")
                length = 0
                while (line := f.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                doc = json.loads(f.read(length))
                assert doc["id"] == str(i)
                np.testing.assert_allclose(doc["outputs"][0]["data"], REFS["1"][i % 16], rtol=1e-5)
        st = srv.stats("mlp")
        assert st["requests"] == 40 and st["batches"] < 40, "pipelined requests should share batches"
        assert st["batch_sizes"]["4"] < st["batch_sizes"]["8"] or st["batch_sizes"]["2"] < 40
        assert st["batch_sizes"]["+Inf"] == st["batch_sizes"]["8"], "no batch above max_batch"


def test_signature_required_when_trusted_keys_given(mlp_versions, artifact_cache, tmp_path):
    from edgeml.runtime.signing import generate_keypair

    _, public = generate_keypair(tmp_path / "k")
    srv = ModelServer(ServerConfig(port=0, cache_dir=artifact_cache, trusted_keys=[public]))
    with pytest.raises(SignatureError):
        srv.load(mlp_versions["1"])
    assert srv.models() == []


def test_cli_serves_until_sigterm(mlp_versions, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeml.cli", "serve", str(mlp_versions["1"]), "--port", "0", "--json", "--max-batch", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, f"serve exited early: {proc.stderr.read()}"
            lines.append(line)
            if line.rstrip() == "}":
                break
        info = json.loads("".join(lines))
        hostport = info["listening"].removeprefix("http://")
        conn = http.client.HTTPConnection(hostport, timeout=10)
        conn.request("POST", "/v2/models/mlp/infer", body=body_for(3), headers={"X-Request-ID": "cli-1"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 200 and resp.getheader("X-Request-ID") == "cli-1"
        np.testing.assert_allclose(doc["outputs"][0]["data"], REFS["1"][3], rtol=1e-5)
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert [ln["event"] for ln in logs if ln["event"].startswith("server")] == ["server started", "server stopped"]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_busy_port_is_a_clear_error(mlp_versions, artifact_cache):
    import socket

    from edgeml.errors import ServeError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = ModelServer(ServerConfig(port=port, cache_dir=artifact_cache))
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            srv.start()
        srv.stop()
