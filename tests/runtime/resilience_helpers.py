"""Helpers for the resilience tests (admission, breaker, cache, fallback): real servers, real ONNX models."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import numpy as np

from serve_models import write_onnx_artifact


class FakeClock:
    """An injected clock the test moves by hand (no sleeps)."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gather_table_onnx(table_size: int, offset: float = 0.0) -> bytes:
    """idx[N,1] int64 -> y[N,1,3] = table[idx] (+offset); an index >= table_size makes ONNX Runtime fail."""
    from onnx import TensorProto, helper, numpy_helper

    table = (np.arange(table_size * 3, dtype=np.float32) + offset).reshape(table_size, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 3])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


GATHER_IN = [{"name": "idx", "dtype": "int64", "shape": [None, 1]}]
GATHER_OUT = [{"name": "y", "dtype": "float32", "shape": [None, 1, 3]}]


def gather_artifact(out: Path, table_size: int = 4, *, name: str = "gather", version: str = "1",
                    offset: float = 0.0, runtime: dict | None = None) -> Path:
    path = write_onnx_artifact(out, gather_table_onnx(table_size, offset), name=name, version=version,
                               inputs=GATHER_IN, outputs=GATHER_OUT)
    if runtime:
        return rewrite_runtime(path, runtime)
    return path


def rewrite_runtime(path: Path, runtime: dict) -> Path:
    """Re-pack an artifact with extra keys in its manifest's runtime section."""
    import zipfile

    from edgeml.runtime.artifact import write_artifact

    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {n: zf.read(n) for n in manifest["files"]}
    manifest["runtime"] = {**manifest.get("runtime", {}), **runtime}
    manifest.pop("files", None)
    return write_artifact(path, manifest, members)


def slow_onnx(layers: int = 12, width: int = 1024) -> bytes:
    """x[N,width] -> y[N,width]: ``layers`` MatMul+Relu (a few ms per run on one thread)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"h{i}" if i < layers - 1 else "y"])]
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def call(srv, method: str, path: str, body=None, headers=None):
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def post(path: str, doc: dict) -> bytes:
    body = json.dumps(doc).encode()
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def pipelined(srv, requests: list[bytes]) -> list[tuple[int, dict[str, str], bytes]]:
    """Send several requests in one write on one connection; read (status, headers, body) in order."""
    with socket.create_connection(srv.address, timeout=20) as s:
        s.sendall(b"".join(requests))
        f = s.makefile("rb")
        out = []
        for _ in requests:
            status = int(f.readline().split()[1])
            headers = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            out.append((status, headers, f.read(int(headers.get("content-length", 0)))))
        return out


def gather_body(i: int) -> dict:
    return {"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [i]}]}


def metric(text: str, name: str, model: str, extra: str = "") -> float:
    """The value of one Prometheus sample ``name{model="..",version="..",extra}``."""
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line and extra in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not in /metrics")
