"""The benchmark suite: reference models × backends × precisions -> benchmarks/REPORT.md (+ REPORT.html).

    python -m edgeml.benchmarks.suite [--quick]            # measure, then render
    python -m edgeml.benchmarks.suite --render-only        # re-render from benchmarks/results/suite.json

For every reference model (``python -m edgeml.benchmarks.models NAME OUT.onnx``)
the suite benchmarks the raw ONNX on ONNX Runtime defaults ("before compile")
and each artifact ``edgeml.compile`` builds for the best host target with each
backend and precision, running the real ``edgeml bench`` command in a fresh
process per run (so cold start and peak memory are per model). It then runs
OpenVINO's own ``benchmark_app`` and ``edgeml bench`` on the *same* OpenVINO IR,
interleaved round by round, to show both measure the same latency (within 10%).
The transformer encoders of benchmarks/encoder.py (bert-mini; bert-tiny under --quick)
are compiled the same way and benchmarked at sequence lengths 32 and 128
(``edgeml bench --input-shape input_ids=B,L ...``), reported in tokens/s.
Everything in REPORT.md is rendered from the suite's own output (suite.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REFERENCE_MODELS = ("digits", "mlp", "mobilenetv2", "resnet18")
ENCODER_SEQ_LENS = (32, 128)  # tokens per sample at which the transformer encoders are benchmarked
AGREEMENT = 0.10  # edgeml bench and benchmark_app must agree within 10%


@dataclass
class SuiteConfig:
    quick: bool = False
    models: list[str] = field(default_factory=lambda: list(REFERENCE_MODELS))
    extra_onnx: dict[str, str] = field(default_factory=dict)   # name -> path (bring your own model)
    backends: list[str] = field(default_factory=lambda: ["onnxruntime", "openvino", "tvm"])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    duration: str = "3s"
    repeats: int = 3
    min_queries: int = 64
    offline_batch: int = 8
    bapp_models: list[str] = field(default_factory=lambda: ["mobilenetv2", "resnet18"])
    bapp_rounds: int = 16
    bapp_seconds: int = 5   # benchmark_app's -t takes whole seconds
    bapp_threads: int = 1   # one inference thread on both sides: far less sensitive to a busy machine
    encoders: list[str] = field(default_factory=lambda: ["bert-mini"])   # benchmarks/encoder.py names
    seq_lens: list[int] = field(default_factory=lambda: list(ENCODER_SEQ_LENS))
    out_dir: Path = HERE
    work_dir: Path | None = None
    python: str = sys.executable

    @classmethod
    def quick_config(cls, **kw) -> "SuiteConfig":
        base: dict[str, Any] = dict(quick=True, backends=["onnxruntime", "openvino"], duration="1s", repeats=3,
                                    encoders=["bert-tiny"],
                                    min_queries=16, bapp_models=["mobilenetv2"], bapp_rounds=12, bapp_seconds=2)
        base.update(kw)
        return cls(**base)


def _log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, timeout: float = 1800, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _tail(text: str, n: int = 400) -> str:
    text = (text or "").strip()
    return text[-n:]


# ----------------------------------------------------------------------------- models

def export_model(cfg: SuiteConfig, name: str, out: Path) -> Path:
    if name in cfg.extra_onnx:
        shutil.copyfile(cfg.extra_onnx[name], out)
        return out
    proc = _run([cfg.python, "-m", "edgeml.benchmarks.models", name, str(out), "--batch", "dynamic", "--data", str(out.parent)])
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"python -m edgeml.benchmarks.models {name} failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}")
    return out


def onnx_inputs(path: Path, batch: int = 1) -> dict[str, tuple[tuple[int, ...], str]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from edgeml.benchmarks.sut import _ORT_TYPES

    out = {}
    for i in sess.get_inputs():
        shape = tuple(d if isinstance(d, int) and d > 0 else batch for d in i.shape)
        out[i.name] = (shape, _ORT_TYPES.get(i.type, "float32"))
    return out


def make_calib(onnx_path: Path, out: Path, samples: int = 32) -> Path:
    """Random calibration data keyed by input name (performance runs do not judge accuracy)."""
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {}
    for name, (shape, dtype) in onnx_inputs(onnx_path).items():
        full = (samples, *shape[1:]) if shape else (samples,)
        arrays[name] = (rng.standard_normal(full) if np.dtype(dtype).kind == "f" else rng.integers(0, 10, full)).astype(dtype)
    np.savez(out, **arrays)
    return out


def compile_variant(onnx_path: Path, backend: str, precision: str, out: Path, calib: Path, cache: Path) -> Path:
    import edgeml
    from edgeml.targets import best_host_target

    return edgeml.compile(str(onnx_path), target=best_host_target().name, output=out, backend=backend,
                          precision=precision, calib=calib if precision == "int8" else None, benchmark=False,
                          cache_dir=cache, name=onnx_path.stem.replace("_", "-")[:64] or "model")


# ----------------------------------------------------------------------------- edgeml bench runs

def bench(cfg: SuiteConfig, model: Path, report_dir: Path, args: list[str]) -> dict[str, Any]:
    """Run the real ``edgeml bench`` CLI in a fresh process and read its result.json."""
    cmd = [cfg.python, "-m", "edgeml.cli", "bench", str(model), *args, "--report", str(report_dir)]
    proc = _run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"edgeml bench exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}")
    return json.loads((report_dir / "result.json").read_text())


def scenario_args(cfg: SuiteConfig) -> dict[str, list[str]]:
    common = ["--duration", cfg.duration, "--repeats", str(cfg.repeats), "--min-queries", str(cfg.min_queries),
              "--warmup", "500ms"]
    return {
        "single-stream": [*common, "--scenario", "single-stream", "--no-sweep"],
        "offline": [*common, "--scenario", "offline", "--batch", str(cfg.offline_batch), "--sweep"],
    }


def encoder_args(cfg: SuiteConfig, seq_len: int) -> dict[str, list[str]]:
    """The scenario arguments with both token inputs sized to ``seq_len`` (axis 0 = the scenario's batch)."""
    from edgeml.benchmarks.encoder import INPUTS

    out = {}
    for scen, args in scenario_args(cfg).items():
        batch = cfg.offline_batch if scen == "offline" else 1
        shapes = [a for name in INPUTS for a in ("--input-shape", f"{name}={batch},{seq_len}")]
        out[scen] = [*args, *shapes]
    return out


def summarize_result(r: dict[str, Any]) -> dict[str, Any]:
    """The compact part of a result kept in suite.json (no traces)."""
    from edgeml.benchmarks import stats

    lat = r["metrics"]["latency_ms"]
    return {
        "inputs_used": r.get("inputs_used"), "sequence_length": r["metrics"].get("sequence_length"),
        "tokens_per_s": r["metrics"].get("tokens_per_s"),
        "scenario": r["scenario"], "verdict": r["verdict"], "batch": r["metrics"]["batch"],
        "latency_ms": {k: lat[k] for k in ("min", "mean", "p50", "p90", "p95", "p99", "p99_9", "max", "count")},
        "spread": r["spread"], "headline": r["metrics"]["headline"],
        "repeats": [{"p50_ms": p["latency_ms"]["p50"], "p90_ms": p["latency_ms"]["p90"], "p99_ms": p["latency_ms"]["p99"],
                     "samples_per_s": p["samples_per_s"], "queries": p["queries"], "duration_s": p["duration_s"]}
                    for p in r["repeats"]],
        "cold_start": r["cold_start"], "memory": r["memory"], "warmup": r["warmup"],
        "concurrency_sweep": r.get("concurrency_sweep"),
        "latency_cdf": stats.cdf_points(np.asarray(r["latency_cdf"]["latency_ms"]), max_points=120)
        if r["latency_cdf"]["latency_ms"] else r["latency_cdf"],
        "model": {k: r["model"].get(k) for k in ("kind", "name", "sha256", "precision", "backend", "backend_version", "target",
                                                   "quantization")},
    }


# ----------------------------------------------------------------------------- benchmark_app side-by-side

_BAPP_LINE = re.compile(r"(Median|Average|Min|Max):\s+([\d.]+)\s*(ms|us)")
_BAPP_TPUT = re.compile(r"Throughput:\s+([\d.]+)\s*FPS")
_BAPP_COUNT = re.compile(r"Count:\s+(\d+)\s+iterations")


def parse_benchmark_app(stdout: str) -> dict[str, float]:
    """Latency (ms) and throughput from benchmark_app's log (its JSON rounds latency to 0.01 ms)."""
    out: dict[str, float] = {}
    for key, value, unit in _BAPP_LINE.findall(stdout):
        out[f"{key.lower()}_ms"] = float(value) / (1000.0 if unit == "us" else 1.0)
    m = _BAPP_TPUT.search(stdout)
    if m:
        out["throughput_fps"] = float(m.group(1))
    m = _BAPP_COUNT.search(stdout)
    if m:
        out["iterations"] = int(m.group(1))
    if "median_ms" not in out or "throughput_fps" not in out:
        raise RuntimeError(f"could not read benchmark_app's statistics from its output: {_tail(stdout)}")
    return out


def openvino_ir_package(onnx_path: Path, folder: Path) -> tuple[Path, Path]:
    """Convert once to OpenVINO IR (fp32, batch 1) and wrap that same IR as an .edgepkg."""
    import openvino as ov

    from edgeml.runtime.artifact import write_artifact
    from edgeml.targets import best_host_target

    folder.mkdir(parents=True, exist_ok=True)
    inputs = onnx_inputs(onnx_path, batch=1)
    model = ov.convert_model(str(onnx_path))
    model.reshape({name: ov.PartialShape(list(shape)) for name, (shape, _) in inputs.items()})
    xml = folder / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    target = best_host_target()
    outputs = [{"name": o.get_any_name(), "dtype": o.get_element_type().to_dtype().name,
                "shape": [int(d) for d in o.get_shape()]} for o in model.outputs]
    manifest = {
        "name": f"{onnx_path.stem}-ov-ir", "version": "1.0.0", "target": target.name,
        "required_features": list(target.required_features), "arch": target.arch, "precision": "fp32",
        "backend": {"name": "openvino", "version": ov.get_version(), "entrypoint": "model/model.xml",
                    "options": {"performance_hint": "LATENCY", "device": "CPU"}},
        "inputs": [{"name": n, "dtype": dt, "shape": list(s)} for n, (s, dt) in inputs.items()],
        "outputs": outputs,
    }
    pkg = write_artifact(folder / "model.edgepkg", manifest,
                         {"model/model.xml": xml, "model/model.bin": xml.with_suffix(".bin")})
    return xml, pkg


def benchmark_app_bin(python: str) -> str:
    local = Path(python).parent / "benchmark_app"
    return str(local) if local.exists() else (shutil.which("benchmark_app") or "benchmark_app")


def side_by_side(cfg: SuiteConfig, name: str, onnx_path: Path, work: Path) -> dict[str, Any]:
    """edgeml bench and benchmark_app on the same IR, same hint (LATENCY), same sync single-stream loop."""
    xml, pkg = openvino_ir_package(onnx_path, work / "ov-ir")
    seconds = max(1, int(round(cfg.bapp_seconds)))
    rounds: list[dict[str, Any]] = []
    bapp = benchmark_app_bin(cfg.python)
    # benchmark_app only takes -nthreads with -hint none; a config file keeps the LATENCY hint on both sides.
    ov_config = work / "ov_config.json"
    ov_config.write_text(json.dumps({"CPU": {"INFERENCE_NUM_THREADS": str(cfg.bapp_threads)}}))
    edgeml_args = ["--scenario", "single-stream", "--duration", f"{seconds}s", "--threads", str(cfg.bapp_threads),
                   "--repeats", "1", "--warmup", "500ms", "--min-queries", "1", "--no-sweep"]
    for r in range(cfg.bapp_rounds):
        _log(f"{name}: benchmark_app vs edgeml bench, round {r + 1}/{cfg.bapp_rounds}")
        res = bench(cfg, pkg, work / f"edgeml-round{r}", edgeml_args)
        (work / f"bapp-round{r}").mkdir(parents=True, exist_ok=True)
        cmd = [bapp, "-m", str(xml), "-d", "CPU", "-hint", "latency", "-api", "sync", "-t", str(seconds),
               "-load_config", str(ov_config),
               "-report_type", "no_counters", "-json_stats", "-report_folder", str(work / f"bapp-round{r}")]
        proc = _run(cmd, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark_app exited {proc.returncode}: {_tail(proc.stdout + proc.stderr)}")
        ba = parse_benchmark_app(proc.stdout + proc.stderr)
        lat = res["metrics"]["latency_ms"]
        mine = {"median_ms": lat["p50"], "average_ms": lat["mean"], "min_ms": lat["min"], "max_ms": lat["max"],
                "throughput_fps": res["metrics"]["samples_per_s"], "iterations": lat["count"]}
        rounds.append({"load_average_1min": round(os.getloadavg()[0], 2), "edgeml": mine, "benchmark_app": ba})
    med = lambda side, key: statistics.median(x[side][key] for x in rounds)  # noqa: E731
    rows: dict[str, Any] = {}
    for key in ("median_ms", "average_ms", "throughput_fps"):
        e, b = med("edgeml", key), med("benchmark_app", key)
        ratio = e / b if b else float("nan")
        best = min if key != "throughput_fps" else max  # the least-disturbed round
        e_best = best(x["edgeml"][key] for x in rounds)
        b_best = best(x["benchmark_app"][key] for x in rounds)
        rows[key] = {"edgeml": e, "benchmark_app": b, "ratio": ratio, "within_10pct": abs(ratio - 1.0) <= AGREEMENT,
                     "edgeml_range": [min(x["edgeml"][key] for x in rounds), max(x["edgeml"][key] for x in rounds)],
                     "benchmark_app_range": [min(x["benchmark_app"][key] for x in rounds),
                                             max(x["benchmark_app"][key] for x in rounds)],
                     "best_round_ratio": e_best / b_best if b_best else float("nan")}
    return {"model": name, "ir_sha256": _sha(xml.with_suffix(".bin")), "rounds": rounds, "metrics": rows,
            "threads": cfg.bapp_threads,
            "command": " ".join(["benchmark_app", "-m", "model.xml", "-d", "CPU", "-hint", "latency", "-api", "sync",
                                 "-t", str(seconds), "-load_config", "ov_config.json"]),
            "edgeml_command": " ".join(["edgeml bench", "model.edgepkg", *edgeml_args]),
            # judged on the median latency: robust to the bursts of other load that move means and throughput
            "agree": rows["median_ms"]["within_10pct"]}


def _sha(path: Path) -> str:
    from edgeml.runtime.signing import file_sha256

    return file_sha256(path)


# ----------------------------------------------------------------------------- transformer encoders

def encoder_calib(name: str, out: Path, seq_len: int) -> Path:
    from edgeml.benchmarks import encoder

    calib, _ = encoder.data(name, n_calib=32, n_eval=1, seq_len=seq_len)
    np.savez(out, **calib)
    return out


def run_encoder(cfg: SuiteConfig, name: str, work: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Export ``name`` (benchmarks/encoder.py), compile each backend × precision, bench each at every seq_len."""
    from edgeml.benchmarks import encoder

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _log(f"{name}: exporting the encoder")
        onnx_path = encoder.export_onnx(name, folder / f"{name}.onnx")
    except Exception as exc:
        summary["skipped"].append({"model": name, "variant": "*", "stage": "export", "reason": f"{type(exc).__name__}: {exc}"[:500]})
        return None
    calib = encoder_calib(name, folder / "calib.npz", min(cfg.seq_lens))
    variants = _compile_variants(cfg, name, onnx_path, folder, calib, work, summary)
    entry: dict[str, Any] = {"name": name, "onnx_sha256": _sha(onnx_path), "seq_lens": list(cfg.seq_lens), "variants": []}
    for label, path, compile_s in variants:
        row: dict[str, Any] = {"label": label, "compile_s": float(compile_s) if compile_s else None, "runs": {}}
        for seq in cfg.seq_lens:
            for scen, args in encoder_args(cfg, seq).items():
                try:
                    _log(f"{name}: edgeml bench {label} {scen} at sequence length {seq}")
                    res = bench(cfg, path, folder / "runs" / _slug(label) / f"{scen}-{seq}", args)
                    row["runs"].setdefault(str(seq), {})[scen] = summarize_result(res)
                except Exception as exc:
                    summary["skipped"].append({"model": name, "variant": label, "stage": f"bench {scen} seq {seq}",
                                               "reason": str(exc)[:500]})
        if row["runs"]:
            entry["variants"].append(row)
    return entry


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace("(", "").replace(")", "")


def _compile_variants(cfg: SuiteConfig, name: str, onnx_path: Path, folder: Path, calib: Path, work: Path,
                      summary: dict[str, Any]) -> list[tuple[str, Path, str | None]]:
    """The raw ONNX plus one artifact per backend × precision that compiles (failures recorded as skipped)."""
    variants: list[tuple[str, Path, str | None]] = [("onnx (ORT defaults)", onnx_path, None)]
    for backend in cfg.backends:
        for precision in cfg.precisions:
            label = f"{backend}-{precision}"
            try:
                _log(f"{name}: compiling {label}")
                t0 = time.perf_counter()
                pkg = compile_variant(onnx_path, backend, precision, folder / f"{label}.edgepkg", calib, work / "cache")
                variants.append((label, pkg, f"{time.perf_counter() - t0:.1f}"))
            except Exception as exc:
                summary["skipped"].append({"model": name, "variant": label, "stage": "compile",
                                           "reason": f"{type(exc).__name__}: {exc}"[:500]})
    return variants


# ----------------------------------------------------------------------------- the suite

def run_suite(cfg: SuiteConfig) -> dict[str, Any]:
    from edgeml.benchmarks.sysinfo import system_info

    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="edgeml-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary: dict[str, Any] = {"schema": "edgeml.bench.suite", "schema_version": 1,
                               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                                          if k not in ("python", "out_dir", "work_dir")},
                               "system": system_info(), "models": [], "encoders": [], "side_by_side": [], "skipped": []}
    names = list(cfg.models) + [n for n in cfg.extra_onnx if n not in cfg.models]
    for name in names:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _log(f"{name}: exporting ONNX")
            onnx_path = export_model(cfg, name, folder / f"{name}.onnx")
        except Exception as exc:  # recorded in the report, the suite goes on
            summary["skipped"].append({"model": name, "variant": "*", "stage": "export", "reason": str(exc)})
            continue
        entry: dict[str, Any] = {"name": name, "onnx_sha256": _sha(onnx_path), "variants": []}
        calib = folder / f"{name}_calib.npz"  # real calibration data from the models module, when it wrote some
        if not calib.exists():
            calib = make_calib(onnx_path, folder / "calib.npz")
        variants = _compile_variants(cfg, name, onnx_path, folder, calib, work, summary)
        for label, path, compile_s in variants:
            row: dict[str, Any] = {"label": label, "compile_s": float(compile_s) if compile_s else None, "runs": {}}
            for scen, args in scenario_args(cfg).items():
                try:
                    _log(f"{name}: edgeml bench {label} {scen}")
                    res = bench(cfg, path, folder / "runs" / _slug(label) / scen, args)
                    row["runs"][scen] = summarize_result(res)
                except Exception as exc:
                    summary["skipped"].append({"model": name, "variant": label, "stage": f"bench {scen}",
                                               "reason": str(exc)[:500]})
            if row["runs"]:
                entry["variants"].append(row)
        summary["models"].append(entry)
        if name in cfg.bapp_models:
            try:
                summary["side_by_side"].append(side_by_side(cfg, name, onnx_path, folder / "bapp"))
            except Exception as exc:
                summary["skipped"].append({"model": name, "variant": "openvino IR", "stage": "benchmark_app side-by-side",
                                           "reason": f"{type(exc).__name__}: {exc}"[:500]})
    for name in cfg.encoders:
        enc = run_encoder(cfg, name, work, summary)
        if enc is not None:
            summary["encoders"].append(enc)
    summary["elapsed_s"] = round(time.time() - started, 1)
    summary["work_dir"] = str(work)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeml.benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer backends, 1 s runs, benchmark_app on mobilenetv2 only")
    p.add_argument("--models", help=f"comma-separated subset of {','.join(REFERENCE_MODELS)}")
    p.add_argument("--onnx", action="append", default=[], metavar="NAME=PATH", help="also benchmark this ONNX model")
    p.add_argument("--backends", help="comma-separated backends to compile for")
    p.add_argument("--precisions", help="comma-separated precisions (fp32,int8,fp16)")
    p.add_argument("--encoders", help="transformer encoders of benchmarks/encoder.py (default bert-mini, --quick "
                   "bert-tiny; '' for none), benchmarked at sequence lengths 32 and 128")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths for the encoders (default 32,128)")
    p.add_argument("--bapp-models", help="models for the benchmark_app side-by-side ('' for none)")
    p.add_argument("--duration", help="measured time per repeat (default 3s, --quick 1s)")
    p.add_argument("--repeats", type=int, help="repeats per run (default 3)")
    p.add_argument("--bapp-rounds", type=int, help="alternating rounds of the benchmark_app side-by-side")
    p.add_argument("--bapp-seconds", type=int, help="whole seconds per tool per round")
    p.add_argument("--out", type=Path, default=HERE, help="where REPORT.md, REPORT.html and results/ go")
    p.add_argument("--work", type=Path, help="keep the per-run reports here (default: a temp folder)")
    p.add_argument("--render-only", action="store_true", help="re-render REPORT.md/HTML from OUT/results/suite.json")
    a = p.parse_args(argv)
    from edgeml.benchmarks.suite_report import render_suite

    out = a.out
    if a.render_only:
        summary = json.loads((out / "results" / "suite.json").read_text())
    else:
        kw: dict[str, Any] = {"out_dir": out, "work_dir": a.work}
        if a.models is not None:
            kw["models"] = [m for m in a.models.split(",") if m]
        if a.backends is not None:
            kw["backends"] = [b for b in a.backends.split(",") if b]
        if a.precisions is not None:
            kw["precisions"] = [x for x in a.precisions.split(",") if x]
        for key in ("duration", "repeats", "bapp_rounds", "bapp_seconds"):
            if getattr(a, key) is not None:
                kw[key] = getattr(a, key)
        if a.encoders is not None:
            kw["encoders"] = [m for m in a.encoders.split(",") if m]
        if a.seq_lens is not None:
            try:
                kw["seq_lens"] = [int(x) for x in a.seq_lens.split(",") if x]
            except ValueError:
                p.error(f"--seq-lens {a.seq_lens!r} is not comma-separated integers (e.g. 32,128)")
        if a.bapp_models is not None:
            kw["bapp_models"] = [m for m in a.bapp_models.split(",") if m]
        kw["extra_onnx"] = dict(item.split("=", 1) for item in a.onnx)
        cfg = SuiteConfig.quick_config(**kw) if a.quick else SuiteConfig(**kw)
        summary = run_suite(cfg)
        summary["command"] = "python -m edgeml.benchmarks.suite" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        (out / "results").mkdir(parents=True, exist_ok=True)
        from edgeml.runtime.fsutil import atomic_write_bytes

        atomic_write_bytes(out / "results" / "suite.json", (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    paths = render_suite(summary, out)
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
