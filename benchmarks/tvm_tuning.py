"""TVM tuning benchmark: tuned TVM vs untuned TVM vs ONNX Runtime vs OpenVINO, side by side.

    python -m edgeml.benchmarks.tvm_tuning --model mobilenetv2 --budget 20m [--db DIR] [--json]

For one reference model (batch 1, FP32) it measures, in one run on this machine:

* ONNX Runtime FP32 with default session options,
* OpenVINO FP32 defaults (when installed),
* the untuned TVM artifact (``edgeml.load``),
* a TVM artifact tuned with MetaSchedule within ``--budget`` (records go to
  ``--db``; a second compile reuses them, and its time is printed too).

Latency is the p50 of ``--runs`` single-sample calls after ``--warmup`` calls,
all with ``--threads`` threads (default: every core). Ratios are relative to ONNX
Runtime. Nothing here is a unit test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def p50_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def bench_ort(onnx_path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int, warmup: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    return p50_ms(lambda: session.run(None, feeds), runs, warmup)


def bench_openvino(onnx_path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int, warmup: int) -> float | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    inputs = list(feeds.values())
    return p50_ms(lambda: request.infer(inputs), runs, warmup)


def bench_artifact(path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int, warmup: int,
                   cache: Path) -> float:
    import edgeml

    model = edgeml.load(path, threads=threads, cache_dir=cache)
    return p50_ms(lambda: model.predict(feeds), runs, warmup)


def build(onnx_path: Path, target: str, output: Path, options: dict[str, Any], builder: str,
          progress: Callable[[str], None] | None = None) -> tuple[Path, float]:
    sys.path.insert(0, str(REPO / "scripts"))
    from tvm_artifacts import compile_artifact

    start = time.perf_counter()
    path = compile_artifact(onnx_path, target, "tvm", output, workdir=output.parent / f"work-{output.stem}",
                            options=options, builder=builder, log=lambda m: None, progress=progress)
    return path, time.perf_counter() - start


def run(args) -> dict[str, Any]:
    from edgeml.benchmarks.models import export_onnx
    from edgeml.runtime.artifact import read_manifest
    from edgeml.targets import best_host_target

    work = Path(tempfile.mkdtemp(prefix="tvm-tuning-bench-"))
    threads = args.threads or os.cpu_count() or 1
    target = args.target or best_host_target().name
    onnx_path = export_onnx(args.model, work / f"{args.model}.onnx", batch=1)
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for gi in model.graph.input:
        if gi.name in inits:
            continue
        shape = [d.dim_value or 1 for d in gi.type.tensor_type.shape.dim]
        feeds[gi.name] = rng.standard_normal(shape).astype(np.float32)
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    rows: dict[str, Any] = {"model": args.model, "target": target, "threads": threads, "budget_s": None}
    log(f"[{args.model}] ONNX Runtime FP32 ...")
    rows["onnxruntime_ms"] = bench_ort(onnx_path, feeds, threads, args.runs, args.warmup)
    log(f"[{args.model}] OpenVINO FP32 ...")
    rows["openvino_ms"] = bench_openvino(onnx_path, feeds, threads, args.runs, args.warmup)
    log(f"[{args.model}] untuned TVM build ...")
    untuned, rows["untuned_build_s"] = build(onnx_path, target, work / "untuned.edgepkg", {}, args.builder)
    rows["tvm_untuned_ms"] = bench_artifact(untuned, feeds, threads, max(3, args.runs // 4), 1, work / "c")
    if args.budget:
        from edgeml.backends.tvm import parse_budget

        rows["budget_s"] = parse_budget(args.budget)
        options = {"tune_budget": args.budget, "tuning_db": args.db}
        log(f"[{args.model}] tuned TVM build, budget {args.budget} (progress below) ...")
        tuned, rows["tuned_build_s"] = build(onnx_path, target, work / "tuned.edgepkg", _opts(options), args.builder,
                                             progress=_throttled(log))
        recipe = read_manifest(tuned)["quantization"] or {}
        rows["tuning"] = {k: recipe.get(k) for k in ("trials", "tasks", "tasks_from_database", "tasks_measured",
                                                     "failed_builds", "failed_runs", "seconds", "database")}
        rows["tvm_tuned_ms"] = bench_artifact(tuned, feeds, threads, args.runs, args.warmup, work / "c")
        log(f"[{args.model}] second tuned compile (database reuse) ...")
        _, rows["retuned_build_s"] = build(onnx_path, target, work / "again.edgepkg", _opts(options), args.builder)
        reference = onnx_reference(onnx_path, feeds)
        import edgeml

        got = edgeml.load(tuned, cache_dir=work / "c").predict(feeds)
        rows["tuned_max_abs_error"] = max(float(np.max(np.abs(got[k] - v))) for k, v in reference.items())
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return rows


def _opts(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _throttled(log: Callable[[str], None], every_s: float = 10.0) -> Callable[[str], None]:
    """Pass tuning progress through at most every ``every_s`` seconds (other messages always)."""
    last = [0.0]

    def progress(message: str) -> None:
        now = time.monotonic()
        if "trials," in message and now - last[0] < every_s:
            return
        last[0] = now
        log(f"  {message}")

    return progress


def onnx_reference(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def table(rows: dict[str, Any]) -> str:
    base = rows["onnxruntime_ms"]
    lines = [f"{rows['model']} on {rows['target']}, batch 1, FP32, {rows['threads']} threads (p50 latency)",
             f"{'runtime':<32}{'p50 ms':>10}{'vs ORT':>10}"]

    def line(name: str, value: float | None) -> None:
        if value is None:
            lines.append(f"{name:<32}{'n/a':>10}{'':>10}")
        else:
            lines.append(f"{name:<32}{value:>10.2f}{base / value:>9.2f}x")

    line("ONNX Runtime FP32 (defaults)", base)
    line("OpenVINO FP32 (defaults)", rows["openvino_ms"])
    line("TVM untuned", rows["tvm_untuned_ms"])
    if rows.get("tvm_tuned_ms") is not None:
        t = rows["tuning"]
        line(f"TVM tuned ({rows['budget_s']:.0f}s budget)", rows["tvm_tuned_ms"])
        lines.append(f"tuned vs untuned TVM: {rows['tvm_untuned_ms'] / rows['tvm_tuned_ms']:.1f}x faster; "
                     f"{t['trials']} trials over {t['tasks']} kernels ({t['failed_builds']} failed builds); "
                     f"tuned compile {rows['tuned_build_s']:.0f}s, second compile reusing the database "
                     f"{rows['retuned_build_s']:.0f}s; max |tuned - ORT| {rows['tuned_max_abs_error']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenetv2", choices=["digits", "mlp", "mobilenetv2", "resnet18"])
    parser.add_argument("--budget", default="20m", help="tuning budget (e.g. 60s, 20m); 0 skips tuning")
    parser.add_argument("--db", default=None, help="tuning database root (default ~/.cache/edgeml/tvm-tuning)")
    parser.add_argument("--target", default=None, help="edgeml target (default: this host's best)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--builder", choices=["auto", "pipeline", "direct"], default="direct")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.budget in ("0", "0s", "none"):
        args.budget = None
    rows = run(args)
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
