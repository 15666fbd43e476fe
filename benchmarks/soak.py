"""Soak: `edgeml serve` under mixed good and bad traffic for a bounded time; RSS and threads must stay flat.

    python -m edgeml.benchmarks.soak [--duration 20] [--max-rss-growth-mb 48] [--max-thread-growth 2]

Starts `edgeml serve` in a subprocess on a loopback port (a tiny MatMul model built here), then runs, all at
once: good clients (keep-alive, each checks that its answer is the product of ITS OWN input), senders of bad
JSON, of bodies over the limit, of 0-row requests and of strict-JSON violations, and slowloris sockets that
trickle header or body bytes. After a warm-up it prints the server's RSS and thread count at start, middle
and end, the good-request success rate, and the count of each answer to bad traffic. Exit 1 when RSS or
threads grow past the bounds, when any good request fails or gets another client's data, or when a bad
request gets a 5xx.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

FEATURES, OUT = 8, 4
WEIGHTS = np.random.default_rng(7).standard_normal((FEATURES, OUT)).astype(np.float32)


def build_artifact(folder: Path) -> Path:
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from edgeml.runtime.artifact import write_artifact

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "soak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])], [numpy_helper.from_array(WEIGHTS, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = {
        "schema_version": 1, "name": "soak", "version": "1", "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {"graph_optimization_level": "all"}},
        "precision": "fp32", "runtime": {"threads": 1},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, FEATURES]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, OUT]}],
    }
    return write_artifact(folder / "soak.edgepkg", manifest, {"model/model.onnx": model.SerializeToString()})


# -- the server process ------------------------------------------------------------------------------------
def start_server(artifact: Path, folder: Path) -> tuple[subprocess.Popen, tuple[str, int]]:
    env = {**os.environ, "XDG_CACHE_HOME": str(folder / "cache")}
    cmd = [sys.executable, "-m", "edgeml.cli", "serve", str(artifact), "--port", "0", "--json",
           "--max-body-mb", "1", "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "256",
           "--max-batch", "16"]
    log = (folder / "server.log").open("w")       # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    lines = []
    while True:
        line = proc.stdout.readline()           # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"edgeml serve exited early; see {folder / 'server.log'}")
        lines.append(line)
        if line.rstrip() == "}":
            break
    host, port = json.loads("".join(lines))["listening"].removeprefix("http://").rsplit(":", 1)
    return proc, (host, int(port))


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MiB, thread count) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["Threads"])


# -- clients ---------------------------------------------------------------------------------------------------
def post(body: bytes, extra: str = "") -> bytes:
    return (f"POST /v2/models/soak/infer HTTP/1.1\r\nHost: s\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def read_response(f) -> tuple[int, bytes]:
    line = f.readline()
    if not line:
        return 0, b""
    status, length = int(line.split()[1]), 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, f.read(length)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.good_ok = 0
        self.good_failed: list[str] = []
        self.bad: Counter[tuple[str, int]] = Counter()    # (kind, status) -> count

    def add_bad(self, kind: str, status: int) -> None:
        with self.lock:
            self.bad[(kind, status)] += 1


def good_client(address, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        try:
            with socket.create_connection(address, timeout=10) as s:
                f = s.makefile("rb")
                for _ in range(200):
                    if stop.is_set():
                        return
                    x = rng.standard_normal((int(rng.integers(1, 5)), FEATURES)).astype(np.float32)
                    doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}
                    s.sendall(post(json.dumps(doc).encode()))
                    status, data = read_response(f)
                    ok = status == 200 and np.allclose(
                        np.reshape(json.loads(data)["outputs"][0]["data"], (len(x), OUT)), x @ WEIGHTS, rtol=1e-4,
                        atol=1e-5)
                    with tally.lock:
                        if ok:
                            tally.good_ok += 1
                        else:
                            tally.good_failed.append(f"status {status}: {data[:200]!r}")
        except OSError as exc:
            with tally.lock:
                tally.good_failed.append(f"connection error: {exc}")


BAD_BODIES = {
    "bad-json": post(b'{"inputs": [{"name": '),
    "zero-rows": post(b'{"inputs": [{"name": "x", "shape": [0, 8], "datatype": "FP32", "data": []}]}'),
    "strict-json": post(b'{"inputs": [{"name": {"x": 1}, "shape": [1, 8], "datatype": "FP32", "data": ["nan"]}]}'),
    "too-many-rows": post(json.dumps({"inputs": [{"name": "x", "shape": [64, FEATURES], "datatype": "FP32",
                                                  "data": [0.5] * (64 * FEATURES)}]}).encode()),
    "oversize": post(b" " * (1 << 20 | 4096)),
}


def bad_client(address, stop: threading.Event, tally: Tally) -> None:
    while not stop.is_set():
        for kind, raw in BAD_BODIES.items():
            try:
                with socket.create_connection(address, timeout=10) as s:
                    s.sendall(raw)
                    tally.add_bad(kind, read_response(s.makefile("rb"))[0])
            except OSError:
                tally.add_bad(kind, -1)


def slowloris(address, stop: threading.Event, tally: Tally, body: bool) -> None:
    first = (b"POST /v2/models/soak/infer HTTP/1.1\r\nHost: s\r\nContent-Length: 100000\r\n\r\n" if body
             else b"GET /v2/health/live HTTP/1.1\r\nHost: s\r\n")
    drip = b" " if body else b"X-Slow: 1\r\n"
    kind = "slow-body" if body else "slow-head"
    while not stop.is_set():
        try:
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(first)
                s.settimeout(0.2)
                while not stop.is_set():
                    try:
                        tally.add_bad(kind, read_response(s.makefile("rb"))[0])
                        break
                    except TimeoutError:
                        s.sendall(drip)
        except OSError:
            tally.add_bad(kind, -1)


# -- main ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of traffic after the warm-up")
    ap.add_argument("--max-rss-growth-mb", type=float, default=48.0, help="allowed RSS growth from start to end")
    ap.add_argument("--max-thread-growth", type=int, default=2, help="allowed thread-count growth")
    ap.add_argument("--slow-sockets", type=int, default=8, help="slowloris sockets held open at once")
    args = ap.parse_args(argv)
    if not 1 <= args.duration <= 3600 or not 1 <= args.slow_sockets <= 64:
        ap.error("--duration must be 1..3600 s and --slow-sockets 1..64")
    with tempfile.TemporaryDirectory(prefix="edgeml-soak-") as tmp:
        folder = Path(tmp)
        proc, address = start_server(build_artifact(folder), folder)
        stop = threading.Event()
        tally = Tally()
        workers = [threading.Thread(target=good_client, args=(address, stop, tally, k)) for k in range(3)]
        workers += [threading.Thread(target=bad_client, args=(address, stop, tally)) for _ in range(2)]
        workers += [threading.Thread(target=slowloris, args=(address, stop, tally, k % 2 == 1))
                    for k in range(args.slow_sockets)]
        try:
            for w in workers:
                w.start()
            warmup = min(3.0, args.duration / 4)
            time.sleep(warmup)
            samples = [("start", *proc_status(proc.pid))]
            time.sleep(args.duration / 2)
            samples.append(("middle", *proc_status(proc.pid)))
            time.sleep(args.duration / 2)
            samples.append(("end", *proc_status(proc.pid)))
        finally:
            stop.set()
            for w in workers:
                w.join(15)
            proc.terminate()
            proc.wait(20)
    return report(samples, tally, args)


def report(samples, tally: Tally, args) -> int:
    for label, rss, threads in samples:
        print(f"{label:>6}: server RSS {rss:7.1f} MiB, {threads} threads")
    total = tally.good_ok + len(tally.good_failed)
    rate = tally.good_ok / total if total else 0.0
    print(f"good requests: {tally.good_ok}/{total} answered correctly ({rate:.2%})")
    for (kind, status), n in sorted(tally.bad.items()):
        print(f"bad traffic {kind:>13} -> {status if status > 0 else 'connection error'}: {n}")
    problems = []
    rss_growth = samples[-1][1] - samples[0][1]
    thread_growth = samples[-1][2] - samples[0][2]
    if rss_growth > args.max_rss_growth_mb:
        problems.append(f"RSS grew {rss_growth:.1f} MiB (bound {args.max_rss_growth_mb:g})")
    if thread_growth > args.max_thread_growth:
        problems.append(f"threads grew by {thread_growth} (bound {args.max_thread_growth})")
    if tally.good_failed or not total:
        problems.append(f"{len(tally.good_failed)} good requests failed: {tally.good_failed[:3]}")
    server_errors = sum(n for (_, status), n in tally.bad.items() if status >= 500 and status != 503)
    if server_errors:
        problems.append(f"{server_errors} bad requests got a 5xx other than 503")
    print(f"bounds: RSS growth <= {args.max_rss_growth_mb:g} MiB (was {rss_growth:+.1f}), "
          f"thread growth <= {args.max_thread_growth} (was {thread_growth:+d})")
    for p in problems:
        print(f"FAIL: {p}")
    print("soak: PASS" if not problems else "soak: FAIL")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
