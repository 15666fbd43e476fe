"""Serving under repetition and overload: the response cache and admission control, side by side.

    python -m edgeml.benchmarks.serve_bench --resilience [--duration 3]

* Model: 8 MatMul+ReLU layers of 1024 (a few ms per run on one thread), ``--max-batch 1`` so
  the server's capacity is one run at a time and easy to overload.
* **Cache replay**: closed-loop clients replay a trace drawn from a small set of distinct
  inputs (a sensor repeating itself), with ``--cache-mb 0`` and with ``--cache-mb 64``;
  the hit rate is read from the server's /metrics.
* **2x overload**: the capacity is measured first (closed loop), then an open-loop client
  offers twice that rate (requests sent on schedule, pipelined on keep-alive connections;
  latency counted from the scheduled send, so a queue shows up as latency), once without
  admission control and once with ``--max-queue-ms``: p50/p99 of the answered requests and
  how many were refused fast (429/503) and how long a refusal took.
Each server runs in its own process, the load generator in another; everything is stopped at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

WIDTH, LAYERS = 1024, 8


def build_slow(out_dir: Path) -> Path:
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from edgeml.runtime.artifact import write_artifact

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [out])]
        prev = out
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = {
        "schema_version": 1, "name": "slow", "version": "1", "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {}},
        "precision": "fp32", "runtime": {"threads": 1},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, WIDTH]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, WIDTH]}],
    }
    return write_artifact(out_dir / "slow.edgepkg", manifest, {"model/model.onnx": model.SerializeToString()})


def request_bytes(port: int, x: np.ndarray) -> bytes:
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + x.astype(np.float32).tobytes()
    return (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


# --- load generator (own process) ------------------------------------------------
def loadgen_main(spec_file: str) -> None:
    """Closed loop (``concurrency`` clients, one request at a time each) or open loop (``rate`` req/s)."""
    import asyncio

    spec = json.loads(Path(spec_file).read_text())
    reqs = [bytes.fromhex(h) for h in spec["requests"]]
    port, duration = spec["port"], spec["duration"]
    lat: list[float] = []
    refused: list[float] = []
    codes: dict[int, int] = {}

    async def read_one(reader: asyncio.StreamReader) -> int:
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        return status

    def note(status: int, seconds: float) -> None:
        codes[status] = codes.get(status, 0) + 1
        (lat if status == 200 else refused).append(seconds)

    async def closed_client(k: int, deadline: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            note(await read_one(reader), time.perf_counter() - t0)
            i += spec["concurrency"]
        writer.close()

    async def open_conn(k: int, conns: int, t0: float, rate: float, total: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent: list[float] = []

        async def reading() -> None:
            for _ in range(len(range(k, total, conns))):
                status = await read_one(reader)
                note(status, time.perf_counter() - sent.pop(0))

        task = asyncio.ensure_future(reading())
        for i in range(k, total, conns):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(due)            # latency from the scheduled time: no coordinated omission
            writer.write(reqs[i % len(reqs)])
        try:
            await asyncio.wait_for(task, timeout=30)
        except asyncio.TimeoutError:
            pass
        writer.close()

    async def main() -> float:
        t0 = time.perf_counter()
        if spec.get("rate"):
            total = int(spec["rate"] * duration)
            conns = spec["connections"]
            await asyncio.gather(*(open_conn(k, conns, t0 + 0.05, spec["rate"], total) for k in range(conns)))
        else:
            await asyncio.gather(*(closed_client(k, t0 + duration) for k in range(spec["concurrency"])))
        return time.perf_counter() - t0

    elapsed = asyncio.run(main())

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(np.array(xs) * 1000, q)) if xs else None

    # elapsed includes draining the queue left at the end of the sending window
    print(json.dumps({"ok_rps": len(lat) / elapsed, "p50": pct(lat, 50), "p99": pct(lat, 99),
                      "refused": len(refused), "refused_p99": pct(refused, 99), "codes": codes,
                      "sent": int(spec["rate"] * duration) if spec.get("rate") else len(lat) + len(refused)}))


def drive(spec: dict, work: Path) -> dict:
    spec_file = work / "loadgen.json"
    spec_file.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, "-m", "edgeml.benchmarks.serve_resilience", "--loadgen", str(spec_file)],
                         capture_output=True, text=True, timeout=spec["duration"] + 90)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_hit_rate(port: int) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        for name in ("edgeml_cache_hits_total", "edgeml_cache_misses_total"):
            if line.startswith(name + "{"):
                vals[name] = float(line.rsplit(" ", 1)[1])
    total = sum(vals.values())
    return vals.get("edgeml_cache_hits_total", 0.0) / total if total else None


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def run(duration: float, work: Path) -> dict:
    """Both measurements; returns the rows it printed."""
    from edgeml.benchmarks.serve_bench import free_port, start_edgeml, stop

    pkg = build_slow(work)
    rng = np.random.default_rng(0)
    distinct = [rng.standard_normal(WIDTH).astype(np.float32)[None] for _ in range(32)]
    trace = rng.integers(0, len(distinct), 400)          # a sensor repeating 32 readings
    rows: dict = {"cache": {}, "overload": {}}
    print(f"\nresilience: model {LAYERS}x MatMul {WIDTH} (1 thread, --max-batch 1), {duration:g}s per run", flush=True)

    for label, args in (("cache off", ["--cache-mb", "0"]), ("cache 64 MiB", ["--cache-mb", "64"])):
        port = free_port()
        proc = start_edgeml(pkg, port, work / "cache", ["--max-batch", "1", *args])
        try:
            reqs = [request_bytes(port, distinct[i]).hex() for i in trace]
            r = drive({"port": port, "duration": duration, "concurrency": 4, "requests": reqs}, work)
            r["hit_rate"] = cache_hit_rate(port)
        finally:
            stop(proc)
        rows["cache"][label] = r
    print(f"{'cache replay (4 clients, 32 distinct inputs)':<46} | {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} | hit rate")
    for label, r in rows["cache"].items():
        hr = "-" if r["hit_rate"] is None else f"{r['hit_rate'] * 100:.1f}%"
        print(f"{label:<46} | {r['ok_rps']:7.0f} {ms(r['p50']):>7} {ms(r['p99']):>7} | {hr}")

    port = free_port()
    proc = start_edgeml(pkg, port, work / "cache", ["--max-batch", "1"])
    try:
        one = [request_bytes(port, distinct[0]).hex()]
        cap = drive({"port": port, "duration": duration, "concurrency": 4, "requests": one}, work)["ok_rps"]
    finally:
        stop(proc)
    rate = 2.0 * cap
    for label, args in (("no admission control", []), ("--max-queue-ms 20", ["--max-queue-ms", "20"])):
        port = free_port()
        proc = start_edgeml(pkg, port, work / "cache", ["--max-batch", "1", *args])
        try:
            reqs = [request_bytes(port, d).hex() for d in distinct]
            r = drive({"port": port, "duration": duration, "rate": rate, "connections": 128, "requests": reqs}, work)
        finally:
            stop(proc)
        rows["overload"][label] = r
    print(f"{f'2x overload: {rate:.0f} req/s offered (capacity {cap:.0f})':<46} | {'ok/s':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7} | refused (429/503), p99 of a refusal")
    for label, r in rows["overload"].items():
        print(f"{label:<46} | {r['ok_rps']:7.0f} {ms(r['p50']):>7} {ms(r['p99']):>7} | "
              f"{r['refused']} of {r['sent']}, {ms(r['refused_p99'])} ms")
    rows["capacity_rps"], rows["offered_rps"] = cap, rate
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2])
    else:
        sys.exit("run it through: python -m edgeml.benchmarks.serve_bench --resilience")
