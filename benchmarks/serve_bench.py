"""Serving benchmark: edgeml serve vs Seldon MLServer vs the backend alone, same ONNX model.

    python -m edgeml.benchmarks.serve_bench [--duration 5] [--concurrency 1,8,32,64] [--no-mlserver]

* Model: an MLP trained on scikit-learn's breast_cancer set (30 features, standing
  in for fraud detection), exported to ONNX by hand, packed as an .edgepkg.
* Each server runs in its own process; the load generator is another process
  on loopback: wrk (Debian package) with a Lua script reporting p50/p95/p99,
  or, without wrk, a Python asyncio client with keep-alive connections.
* MLServer runs from a separate venv (default /work/mlserver-venv, or
  $MLSERVER_BIN) in one process (parallel_workers=0) with a minimal ONNX Runtime
  custom runtime written into a temp dir; skipped with the reason printed when
  it is not installed.
* "backend alone" calls ONNX Runtime in a loop at batch 1: the upper bound,
  measured before and after the servers (the better one is the reference).
* ``--model mobilenetv2``: binary tensors, 1-4 clients, vs the backend alone.

Bounded: every run lasts --duration seconds; servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BENCH_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
local hlen = os.getenv("BENCH_HLEN")
if hlen and hlen ~= "" then wrk.headers["Inference-Header-Content-Length"] = hlen end
function response(status, headers, body)
  if status ~= 200 then bad = (bad or 0) + 1 end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"errors": %d, "status_errors": %d}\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(95), latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""

MLSERVER_RUNTIME = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OrtRuntime(MLModel):
    async def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(self.settings.parameters.uri, so, providers=["CPUExecutionProvider"])
        self.out_names = [o.name for o in self.sess.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self.sess.run(self.out_names, feeds)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output(n, o) for n, o in zip(self.out_names, outs)])
'''


# --- model -----------------------------------------------------------------
def build_mlp(out_dir: Path) -> tuple[Path, Path, np.ndarray]:
    """Train a small MLP on breast_cancer; return (onnx path, .edgepkg path, sample rows)."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.datasets import load_breast_cancer
    from sklearn.neural_network import MLPClassifier

    from edgeml.runtime.artifact import write_artifact

    X, y = load_breast_cancer(return_X_y=True)
    mean, std = X.mean(0), X.std(0) + 1e-9
    Xs = ((X - mean) / std).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300, random_state=0).fit(Xs, y)
    # Fold the standardization into the first layer: (x - m) / s @ W + b = x @ (W / s) + (b - (m / s) @ W)
    W = [w.astype(np.float32) for w in clf.coefs_]
    B = [b.astype(np.float32) for b in clf.intercepts_]
    W0 = (W[0] / std[:, None]).astype(np.float32)
    B0 = (B[0] - (mean / std) @ W[0]).astype(np.float32)
    W, B = [W0] + W[1:], [B0] + B[1:]
    nodes, inits, prev = [], [], "x"
    for i, (w, b) in enumerate(zip(W, B)):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        prev = f"a{i}"
        if i < len(W) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Sigmoid", [prev], ["proba"]))
    graph = helper.make_graph(nodes, "fraud_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 30])],
                              [helper.make_tensor_value_info("proba", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx_path = out_dir / "model.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    manifest = {
        "schema_version": 1, "name": "mlp", "version": "1", "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {"graph_optimization_level": "all"}},
        "precision": "fp32", "runtime": {"threads": 1},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 30]}],
        "outputs": [{"name": "proba", "dtype": "float32", "shape": [None, 1]}],
    }
    pkg = write_artifact(out_dir / "mlp.edgepkg", manifest, {"model/model.onnx": onnx_path})
    return onnx_path, pkg, Xs[:64]


# --- helpers -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_wrk(url: str, body_file: Path, lua: Path, concurrency: int, duration: float, hlen: int | None = None) -> dict:
    env = {**os.environ, "BENCH_BODY": str(body_file), "BENCH_HLEN": "" if hlen is None else str(hlen)}
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, int(round(duration)))}s", "--latency", "-s", str(lua), url],
                         capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line[7:])
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50": r["p50_us"] / 1000, "p95": r["p95_us"] / 1000,
            "p99": r["p99_us"] / 1000, "errors": r["errors"] + r["status_errors"], "requests": r["requests"]}


def run_pyloadgen(url: str, body_file: Path, concurrency: int, duration: float, hlen: int | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--loadgen", url, str(body_file), str(concurrency), str(duration),
                          str(hlen or "")],
                         capture_output=True, text=True, timeout=duration + 60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loadgen_main(url: str, body_file: str, concurrency: int, duration: float, hlen: str = "") -> None:
    """Fallback load generator (own process): keep-alive HTTP/1.1 clients on asyncio."""
    import asyncio
    from urllib.parse import urlsplit

    u = urlsplit(url)
    body = Path(body_file).read_bytes()
    extra = f"Inference-Header-Content-Length: {hlen}\r\n" if hlen else ""
    req = (f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n{extra}"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    lat: list[float] = []
    errors = 0

    async def client(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(req)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if b" 200 " not in status:
                errors += 1
        writer.close()

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(t0 + duration) for _ in range(concurrency)))
        return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    ms = np.array(lat) * 1000
    print(json.dumps({"rps": len(lat) / elapsed, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
                      "p99": float(np.percentile(ms, 99)), "errors": errors, "requests": len(lat)}))


def backend_alone(onnx_path: Path, rows: np.ndarray, duration: float, threads: int = 1) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    lat = []
    i = 0
    end = time.perf_counter() + duration
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        if t0 > end:
            break
        sess.run(None, {name: rows[i % len(rows)][None]})
        lat.append(time.perf_counter() - t0)
        i += 1
    ms = np.array(lat) * 1000
    return {"rps": len(lat) / (time.perf_counter() - t_start), "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)), "errors": 0, "requests": len(lat)}


def start_edgeml(pkg: Path, port: int, cache: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "serve", str(pkg), "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc


def start_mlserver(onnx_path: Path, port: int, work: Path, mlserver_bin: str) -> subprocess.Popen:
    mdir = work / "mlserver" / "mlp"
    mdir.mkdir(parents=True)
    shutil.copy(onnx_path, mdir / "model.onnx")
    (mdir / "ort_runtime.py").write_text(MLSERVER_RUNTIME)
    (mdir / "model-settings.json").write_text(json.dumps(
        {"name": "mlp", "implementation": "ort_runtime.OrtRuntime", "parameters": {"uri": str(mdir / "model.onnx")}}))
    (mdir.parent / "settings.json").write_text(json.dumps(
        {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0,
         "debug": False, "metrics_endpoint": None}))
    proc = subprocess.Popen([mlserver_bin, "start", str(mdir.parent)], cwd=mdir.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/v2/models/mlp/ready", proc)
    return proc


def fmt(r: dict | None) -> str:
    if r is None:
        return f"{'-':>8} {'-':>7} {'-':>7} {'-':>7}"
    return f"{r['rps']:8.0f} {r['p50']:7.2f} {r['p95']:7.2f} {r['p99']:7.2f}" + (f" ({r['errors']} err)" if r["errors"] else "")


def build_mobilenet(out_dir: Path, threads: int) -> tuple[Path, Path, np.ndarray]:
    """MobileNetV2 (random weights, fixed seed) from edgeml.benchmarks.models, dynamic batch."""
    import onnx
    import onnxruntime

    from edgeml.benchmarks.models import export_onnx
    from edgeml.runtime.artifact import write_artifact

    onnx_path = export_onnx("mobilenetv2", out_dir / "model.onnx", batch="dynamic")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inp, out = graph.input[0].name, graph.output[0].name
    manifest = {
        "schema_version": 1, "name": "mobilenetv2", "version": "1", "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {"graph_optimization_level": "all"}},
        "precision": "fp32", "runtime": {"threads": threads},
        "inputs": [{"name": inp, "dtype": "float32", "shape": [None, 3, 224, 224]}],
        "outputs": [{"name": out, "dtype": "float32", "shape": [None, 1000]}],
    }
    pkg = write_artifact(out_dir / "mobilenetv2.edgepkg", manifest, {"model/model.onnx": onnx_path})
    rows = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    return onnx_path, pkg, rows


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6] if len(sys.argv) > 6 else "")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["mlp", "mobilenetv2"], default="mlp",
                    help="mlp: JSON tensors, vs MLServer; mobilenetv2: binary tensors, vs the backend alone")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--concurrency", default=None, help="client connections, comma-separated (mlp: 1,8,32,64; mobilenetv2: 1,2,4)")
    ap.add_argument("--threads", type=int, default=None, help="backend threads (mlp: 1, mobilenetv2: CPU count)")
    ap.add_argument("--no-mlserver", action="store_true")
    ap.add_argument("--mlserver-bin", default=os.environ.get("MLSERVER_BIN", "/work/mlserver-venv/bin/mlserver"))
    ap.add_argument("--loadgen", dest="loadgen_kind", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--serve-args", default="", help="extra arguments for edgeml serve, e.g. '--max-delay-ms 0'")
    ap.add_argument("--json", dest="as_json", action="store_true", help="also print the rows as JSON")
    ap.add_argument("--resilience", action="store_true",
                    help="only the response-cache replay and the 2x-overload admission-control runs (side by side)")
    args = ap.parse_args(argv)
    if args.resilience:
        from edgeml.benchmarks.serve_resilience import run as run_resilience

        with tempfile.TemporaryDirectory(prefix="edgeml-serve-resilience-") as tmp:
            rows = run_resilience(args.duration, Path(tmp))
        if args.as_json:
            print(json.dumps(rows))
        return 0
    mlp = args.model == "mlp"
    levels = [int(c) for c in (args.concurrency or ("1,8,32,64" if mlp else "1,2,4")).split(",")]
    threads = args.threads or (1 if mlp else (os.cpu_count() or 1))
    use_wrk = args.loadgen_kind == "wrk" or (args.loadgen_kind == "auto" and shutil.which("wrk"))
    with tempfile.TemporaryDirectory(prefix="edgeml-serve-bench-") as tmp:
        work = Path(tmp)
        body = work / "body.bin"
        hlen: int | None = None
        if mlp:
            onnx_path, pkg, rows = build_mlp(work)
            body.write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32",
                                                    "data": [round(float(v), 5) for v in rows[0]]}]}))
            what = "breast_cancer MLP 30-64-32-1, batch 1, JSON tensors"
        else:
            onnx_path, pkg, rows = build_mobilenet(work, threads)
            import onnx

            in_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
            header = json.dumps({"inputs": [{"name": in_name, "shape": [1, 3, 224, 224], "datatype": "FP32",
                                             "parameters": {"binary_data_size": rows[0].nbytes}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            body.write_bytes(header + rows[0].tobytes())
            hlen = len(header)
            what = f"MobileNetV2 224x224, batch 1 per request, binary tensors, {threads} backend threads"
        lua = work / "bench.lua"
        lua.write_text(WRK_LUA)
        name = "mlp" if mlp else "mobilenetv2"

        def drive(url: str, c: int) -> dict:
            if use_wrk:
                return run_wrk(url, body, lua, c, args.duration, hlen)
            return run_pyloadgen(url, body, c, args.duration, hlen)

        print(f"loadgen: {'wrk -t1 (own process)' if use_wrk else 'python asyncio keep-alive client (own process)'}, "
              f"{args.duration:g}s per run, model: {what}, {os.cpu_count()} CPUs", flush=True)
        results: dict[str, dict[int, dict]] = {"edgeml": {}, "mlserver": {}}
        # The machine may be shared: measure the upper bound before and after, compare with the better one.
        alone_before = backend_alone(onnx_path, rows, args.duration, threads)
        port = free_port()
        proc = start_edgeml(pkg, port, work / "cache", ["--threads", str(threads), *args.serve_args.split()])
        try:
            for c in levels:
                results["edgeml"][c] = drive(f"http://127.0.0.1:{port}/v2/models/{name}/infer", c)
        finally:
            stop(proc)
        mlserver_note = None
        if not mlp:
            mlserver_note = "not run for mobilenetv2 (compared with the backend alone; MLServer is compared on the MLP)"
        elif args.no_mlserver:
            mlserver_note = "skipped (--no-mlserver)"
        elif not Path(args.mlserver_bin).exists():
            mlserver_note = (f"skipped: {args.mlserver_bin} not found (python -m venv /work/mlserver-venv && "
                             "/work/mlserver-venv/bin/pip install mlserver onnxruntime)")
        else:
            port = free_port()
            try:
                proc = start_mlserver(onnx_path, port, work, args.mlserver_bin)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other columns
                mlserver_note = f"skipped: MLServer did not start ({exc})"
            else:
                try:
                    for c in levels:
                        results["mlserver"][c] = drive(f"http://127.0.0.1:{port}/v2/models/mlp/infer", c)
                finally:
                    stop(proc)
        alone_after = backend_alone(onnx_path, rows, args.duration, threads)
        alone = max(alone_before, alone_after, key=lambda r: r["rps"])

    head = f"{'conc':>5} | {'edgeml serve  req/s   p50   p95   p99 ms':>40} | {'MLServer  req/s   p50   p95   p99 ms':>40} | {'ratio':>6} | {'vs backend':>10}"
    print(head)
    print("-" * len(head))
    for c in levels:
        e, m = results["edgeml"][c], results["mlserver"].get(c)
        ratio = f"{e['rps'] / m['rps']:5.1f}x" if e and m else "   -"
        print(f"{c:>5} | {fmt(e):>40} | {fmt(m):>40} | {ratio:>6} | {e['rps'] / alone['rps'] * 100:9.0f}%")
    for label, r in (("before", alone_before), ("after", alone_after)):
        print(f"backend alone {label} (ONNX Runtime, batch 1, no HTTP, {threads} thread(s)): {r['rps']:.0f} runs/s, "
              f"p50 {r['p50']:.3f} ms, p95 {r['p95']:.3f} ms, p99 {r['p99']:.3f} ms")
    if mlserver_note:
        print(f"MLServer column: {mlserver_note}")
    ok = [r for r in results["edgeml"].values() if r["p95"] < 10]
    if mlp:
        best = max(ok, key=lambda r: r["rps"]) if ok else None
        print(f"edgeml best with p95 < 10 ms: {best['rps'] if best else 0:.0f} req/s (goal >= 5000)")
    else:
        best = max(results["edgeml"].values(), key=lambda r: r["rps"])
        print(f"edgeml best: {best['rps']:.1f} req/s = {best['rps'] / alone['rps'] * 100:.0f}% of the backend alone (goal >= 90%)")
    if args.as_json:
        print(json.dumps({"model": args.model, "results": {k: {str(c): r for c, r in v.items()} for k, v in results.items()},
                          "backend_alone": [alone_before, alone_after], "mlserver_note": mlserver_note}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
