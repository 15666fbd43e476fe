"""How far each reference model's selected artifact is from what this host's hardware allows (a roofline line).

Measured here, in one run:

* the host's peaks: FP32 GEMM and u8s8 INT8 GEMM throughput (ONNX Runtime ``MatMul`` / ``MatMulInteger`` on
  1024^3, all cores) and memory bandwidth (ONNX Runtime ``Add`` over 64 Mi floats: two reads and a write per
  element), each the fastest run of three interleaved rounds (a peak is what the hardware can do);
* each model's cost from its ONNX graph: multiply-accumulates of Conv / MatMul / Gemm at batch 1 and the bytes
  of its weights (FP32, or one byte each for INT8);
* the selected artifact's p50 at batch 1 (``edgeml compile`` for the best host target, loaded with ``edgeml.load``).

The bound of a precision is ``max(MACs / GEMM peak, weight bytes / bandwidth)``: no kernel does better than its
GEMM peak, and every weight is read at least once per inference. ``distance`` is the best run / bound at the
selected precision (1.0 = at the bound; best against best, since the peaks are best runs); the p50 is printed
beside it. ``fp32 bound / best`` says how much faster than the FP32 bound the artifact is
(above 1 only by INT8 or fewer MACs). Models of a few thousand MACs (the MLP) are bound by the per-call cost, not
by compute or memory: their distance says so and nothing more.

    python -m edgeml.benchmarks.roofline [--models digits,mlp,mobilenetv2,resnet18] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

GEMM = 1024


def _times(fn: Callable[[], Any], min_runs: int = 5, seconds: float = 1.0) -> list[float]:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _p50_seconds(fn: Callable[[], Any], min_runs: int = 5, seconds: float = 1.0) -> float:
    return float(np.median(_times(fn, min_runs, seconds)))


def _best_seconds(fns: dict[str, Callable[[], Any]], rounds: int = 3, seconds: float = 0.5) -> dict[str, float]:
    """A peak is what the hardware can do: the fastest run, over interleaved rounds (a shared machine's
    other work slows some runs, never speeds one up)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], min(_times(fn, 3, seconds)))
    return best


def _session(graph: Any) -> Any:
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def host_peaks(seconds: float = 0.5) -> dict[str, float]:
    """GEMM peaks in GMAC/s (fp32, int8 u8s8) and memory bandwidth in GB/s: the best of interleaved runs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n = GEMM
    w = rng.standard_normal((n, n)).astype(np.float32)
    fp32 = _session(helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [numpy_helper.from_array(w, "w")]))
    a = rng.standard_normal((n, n)).astype(np.float32)
    w8 = rng.integers(-127, 128, (n, n)).astype(np.int8)
    int8 = _session(helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "gemm8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [numpy_helper.from_array(w8, "w")]))
    a8 = rng.integers(0, 256, (n, n)).astype(np.uint8)
    size = 64 << 20
    add = _session(helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])], "stream",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])]))
    x = np.ones(size, dtype=np.float32)
    y = np.empty_like(x)   # numpy into a preallocated output: no page faults in the timed runs
    best = _best_seconds({"fp32": lambda: fp32.run(None, {"a": a}), "int8": lambda: int8.run(None, {"a": a8}),
                          "mem": lambda: add.run(None, {"x": x, "z": x}), "mem_np": lambda: np.add(x, x, out=y)},
                         seconds=seconds)
    t_fp32, t_int8, t_mem = best["fp32"], best["int8"], min(best["mem"], best["mem_np"])
    macs = float(n) ** 3
    return {"fp32_gmacs": round(macs / t_fp32 / 1e9, 1), "int8_gmacs": round(macs / t_int8 / 1e9, 1),
            "bandwidth_gbs": round(3 * 4 * size / t_mem / 1e9, 1)}


def model_cost(onnx_path: Path) -> dict[str, float]:
    """MACs of Conv / MatMul / Gemm at the graph's (batch-1) shapes, and weight bytes as stored (FP32)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for name, arr in inits.items():
        shapes[name] = list(arr.shape)
    macs = 0.0
    for node in graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out:
            continue
        if node.op_type == "Conv" and node.input[1] in shapes:
            weight = shapes[node.input[1]]        # [Cout, Cin/group, kh, kw]
            macs += float(np.prod(out)) * float(np.prod(weight[1:]))
        elif node.op_type in ("MatMul", "Gemm") and node.input[0] in shapes:
            a = shapes[node.input[0]]
            k = a[-1] if not (node.op_type == "Gemm" and _attr(node, "transA")) else a[0]
            macs += float(np.prod(out)) * float(k)
    weight_bytes = float(sum(arr.nbytes for arr in inits.values() if arr.size > 1))
    return {"macs": macs, "weight_bytes_fp32": weight_bytes}


def _attr(node: Any, name: str) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), 0)


def bound_ms(cost: dict[str, float], peaks: dict[str, float], precision: str) -> float:
    int8 = precision == "int8"
    gmacs = peaks["int8_gmacs"] if int8 else peaks["fp32_gmacs"]
    weight_bytes = cost["weight_bytes_fp32"] / (4.0 if int8 else 1.0)
    compute_s = cost["macs"] / (gmacs * 1e9)
    memory_s = weight_bytes / (peaks["bandwidth_gbs"] * 1e9)
    return 1000.0 * max(compute_s, memory_s)


def bench(name: str, work: Path, peaks: dict[str, float]) -> dict[str, Any]:
    import edgeml
    from edgeml.benchmarks import models
    from edgeml.compiler import compile_with_report
    from edgeml.targets import best_host_target

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = models.export_onnx(name, folder / f"{name}.onnx", batch=1)
    data = models.write_data(name, folder, n_calib=64, n_eval=32)
    result = compile_with_report(str(onnx_path), target=best_host_target().name, output=folder / "m.edgepkg",
                                 calib=data["calib"], eval=data["eval"], cache_dir=work / "cache")
    m = result.manifest
    model = edgeml.load(folder / "m.edgepkg")
    evald = np.load(data["eval"])
    feeds = {i["name"]: np.ascontiguousarray(evald[i["name"]][:1]) for i in m["inputs"]}
    times = _times(lambda: model.predict(feeds), seconds=2.0)
    p50_ms, best_ms = 1000.0 * float(np.median(times)), 1000.0 * min(times)
    model.close()
    cost = model_cost(onnx_path)
    precision = m["precision"]
    bound = bound_ms(cost, peaks, precision)
    fp32_bound = bound_ms(cost, peaks, "fp32")
    return {"model": name, "gmacs": round(cost["macs"] / 1e9, 4), "weights_mb": round(cost["weight_bytes_fp32"] / 1e6, 2),
            "selected": f"{m['backend']['name']}/{precision}", "p50_ms": round(p50_ms, 4), "best_ms": round(best_ms, 4),
            "bound_ms": round(bound, 4), "distance": round(best_ms / bound, 2) if bound > 0 else None,
            "fp32_bound_ms": round(fp32_bound, 4), "fp32_bound_over_best": round(fp32_bound / best_ms, 2)}


def main(argv: list[str] | None = None) -> int:
    from edgeml.benchmarks.isolation_overhead import cpu_summary

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,mlp,mobilenetv2,resnet18")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    peaks = host_peaks()
    with tempfile.TemporaryDirectory(prefix="edgeml-roofline-") as tmp:
        rows = [bench(n.strip(), Path(tmp), peaks) for n in a.models.split(",") if n.strip()]
    if a.json:
        print(json.dumps({"host": cpu_summary(), "peaks": peaks, "rows": rows}, indent=2))
        return 0
    print(f"host: {cpu_summary()}")
    print(f"peaks: FP32 GEMM {peaks['fp32_gmacs']} GMAC/s, INT8 u8s8 GEMM {peaks['int8_gmacs']} GMAC/s, "
          f"memory {peaks['bandwidth_gbs']} GB/s")
    print(f"{'model':<12} {'GMAC':>8} {'weights MB':>10} {'selected':<22} {'p50 ms':>9} {'best ms':>9} "
          f"{'bound ms':>9} {'distance':>8} {'fp32 bound/best':>15}")
    for r in rows:
        print(f"{r['model']:<12} {r['gmacs']:>8.4f} {r['weights_mb']:>10.2f} {r['selected']:<22} {r['p50_ms']:>9.4f} "
              f"{r['best_ms']:>9.4f} {r['bound_ms']:>9.4f} {r['distance']:>8} {r['fp32_bound_over_best']:>15}")
    print("distance = best run / bound at the selected precision (peaks are best runs too: like with like)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
