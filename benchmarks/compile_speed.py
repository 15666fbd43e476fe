"""Side-by-side batch-1 latency: PyTorch eager vs ONNX Runtime vs OpenVINO vs the auto-compiled artifact.

    python -m edgeml.benchmarks.compile_speed            # full run (several minutes on 2 cores)
    python -m edgeml.benchmarks.compile_speed --quick    # short run
    python -m edgeml.benchmarks.compile_speed --models resnet18,mlp --target x86_64

For each reference model (benchmarks/models.py, exported at batch 1) it compiles
the artifact with ``edgeml.compile(..., precision/backend auto)`` and then measures,
in interleaved rounds (every runner once per round, in rotating order, so load
changes on the box hit all of them alike; 100 ms pause and one untimed call when
switching runners, so one runtime's spinning threads do not slow the next), the
per-call latency of:

* ``torch``: PyTorch eager (``torch.no_grad``, default threads)
* ``ort``: ONNX Runtime FP32 with default session options
* ``ov_default``: OpenVINO with the CPU plugin's defaults (it picks bf16 compute on
  CPUs with AVX-512 BF16 / AMX; the JSON records what it picked)
* ``ov_f32``: OpenVINO with its defaults except ``INFERENCE_PRECISION_HINT=f32``
* ``edgeml``: ``edgeml.load(artifact).predict(feeds)``
* ``direct``: the same loaded artifact's backend library called directly (ORT
  ``session.run`` / OpenVINO ``request.infer`` / the TVM backend's ``run``)

predict's overhead over ``direct`` is measured again in its own phase where the
two alternate call by call (``overhead`` in the JSON; the ``ovh %`` column).

It prints p50 per runner, the speed-up of the artifact over ORT FP32 and over the
best single-backend default, and predict's overhead over the direct call; the JSON
goes to ``benchmarks/out/compile_speed-<time>.json`` (and ``compile_speed-latest.json``).
Random-weight CNNs get seeded random calibration/eval data: latency is real,
accuracy claims are not (the compiler then checks agreement with FP32).

Transformer encoders (``bert-mini``, from a transformers config; dynamic sequence axis) are compiled
once and measured at each of ``SEQ_LENS`` tokens (rows ``bert-mini@32``, ``bert-mini@128``), with
tokens/s = sequence length / p50. Every model's candidates (label, status, accuracy, p50 in the
compiler's own benchmark) are printed under the table, so new candidates (bf16, transformer fusion,
dynamic int8) show side by side with the peers.

Olive columns (``--olive-python PATH``, the python of a separate venv with ``olive-ai``; or
``EDGEML_OLIVE_PYTHON``): benchmarks/olive_peer.py runs Olive's CPU workflows on the same ONNX file
(peephole FP32, + static INT8 QDQ calibrated on the same data, + dynamic INT8); each variant that keeps
accuracy within 1 point of ORT FP32 (``acc`` = top-1 vs labels, else argmax agreement, else cosine x 100 for
encoders, on the eval file at batch 1) joins the same interleaved run, and ``olive`` is the fastest of them.
Without an Olive python the columns are skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

OUT_DIR = Path(__file__).resolve().parent / "out"
DEFAULT_MODELS = ("digits", "mobilenetv2", "resnet18", "mlp", "bert-mini")
SEQ_LENS = (32, 128)


def _p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0 if samples else float("nan")


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int, per_round: int, warmup: int = 5) -> dict[str, list[float]]:
    """Per-call seconds for every runner; each round runs every runner ``per_round`` times, rotating the order."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = runners[name]
            # Let the previous runner's spinning worker threads (ORT, OpenMP) go idle, and
            # wake this runner's own pool with one untimed call: measured here, an OpenVINO
            # call right after an ORT call took 2.6x its usual time.
            time.sleep(0.1)
            fn()
            for _ in range(per_round):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return times


def paired(a: Callable[[], Any], b: Callable[[], Any], pairs: int) -> tuple[list[float], list[float]]:
    """Alternate a, b call by call (order flipping each pair): load drift hits both alike."""
    ta: list[float] = []
    tb: list[float] = []
    clock = time.perf_counter
    for _ in range(5):
        a()
        b()
    for i in range(pairs):
        first, second = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, sink in (first, second):
            t0 = clock()
            fn()
            sink.append(clock() - t0)
    return ta, tb


def _calls_per_round(seconds_hint: float, single_call_s: float) -> int:
    return int(max(1, min(200, seconds_hint / max(single_call_s, 1e-6))))


def _direct_runner(model, feeds: dict[str, np.ndarray]) -> tuple[str, Callable[[], Any]]:
    """The artifact's backend library, called without edgeml's wrappers."""
    be = model.backend
    if model.backend_name == "onnxruntime":
        sess, names = be.session, be.output_names
        return "onnxruntime session.run", lambda: sess.run(names, feeds)
    if model.backend_name == "openvino":
        req = be.request
        return "openvino request.infer", lambda: req.infer(feeds, share_inputs=True)
    return f"{model.backend_name} backend.run", lambda: be.run(feeds)


def _feeds(name: str, eval_file: Path, seq_len: int | None) -> dict[str, np.ndarray]:
    """One sample: the eval file's first (image / tabular models) or seeded tokens of ``seq_len``."""
    if seq_len is not None:
        from edgeml.benchmarks import encoder

        return encoder.tokens(name, 1, seq_len, seed=7)
    return {"input": np.load(eval_file)["input"][:1]}


def bench_model(name: str, work: Path, target: str, rounds: int, round_seconds: float, say,
                seq_len: int | None = None, olive_python: Path | None = None) -> dict[str, Any]:
    import onnxruntime as ort
    import openvino as ov
    import torch

    import edgeml
    from edgeml.benchmarks import models

    onnx_path = models.export_onnx(name, work / f"{name}.onnx", batch=1)
    data = models.write_data(name, work, n_calib=64, n_eval=32 if name in ("resnet18", "mobilenetv2") else 64)
    entry: dict[str, Any] = {**models.describe(name), "model": name if seq_len is None else f"{name}@{seq_len}",
                             "batch": 1}
    if seq_len is not None:
        entry["sequence_length"] = seq_len

    say(f"[{name}] compiling for {target} (auto backend, auto precision)")
    t0 = time.perf_counter()
    from edgeml.compiler import compile_with_report

    result = compile_with_report(onnx_path, target=target, output=work / f"{name}.edgepkg", calib=data["calib"],
                                 eval=data["eval"], max_accuracy_drop=1.0, name=f"{name}-bench",
                                 cache_dir=work / "cache")
    entry["compile_seconds"] = round(time.perf_counter() - t0, 1)
    entry["compile_cache"] = getattr(result, "cache", None)
    manifest = result.manifest
    entry["selected"] = {"backend": manifest["backend"]["name"], "precision": manifest["precision"],
                         "options": manifest["backend"].get("options", {}),
                         "recipe": manifest.get("quantization"), "accuracy": manifest.get("accuracy")}
    entry["candidates"] = [{k: c.get(k) for k in ("label", "status", "accuracy", "latency_ms", "reason")}
                           for c in manifest.get("candidates", [])]

    feeds = _feeds(name, data["eval"], seq_len)
    model = edgeml.load(work / f"{name}.edgepkg")
    direct_label, direct = _direct_runner(model, feeds)

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    core = ov.Core()
    ov_default = core.compile_model(str(onnx_path), "CPU")
    ov_f32 = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req_default, req_f32 = ov_default.create_infer_request(), ov_f32.create_infer_request()
    precision = ov_default.get_property("INFERENCE_PRECISION_HINT")
    entry["ov_default_config"] = {"inference_precision": getattr(precision, "to_string", lambda: str(precision))(),
                                  "performance_hint": str(ov_default.get_property("PERFORMANCE_HINT")),
                                  "threads": int(ov_default.get_property("INFERENCE_NUM_THREADS"))}
    torch_model = models.build(name).eval()
    tx = tuple(torch.from_numpy(feeds[i["name"]]) for i in manifest["inputs"])

    def torch_run():
        with torch.no_grad():
            return torch_model(*tx)

    runners = {
        "torch": torch_run,
        "ort": lambda: sess.run(None, feeds),
        "ov_default": lambda: req_default.infer(feeds, share_inputs=True),
        "ov_f32": lambda: req_f32.infer(feeds, share_inputs=True),
        "edgeml": lambda: model.predict(feeds),
        "direct": direct,
    }
    if olive_python is not None:
        from edgeml.benchmarks import olive_columns

        entry["olive"] = olive_columns.prepare(name, onnx_path, data, work, olive_python, sess, model, feeds,
                                               runners, say)
    # outputs agree with ORT FP32 (sanity: a fast wrong artifact is no result)
    ref = sess.run(None, feeds)[0]
    got = model.predict(feeds)[manifest["outputs"][0]["name"]]
    entry["artifact_vs_ort"] = {"max_abs_diff": float(np.max(np.abs(got - ref))),
                                "same_argmax": bool(np.argmax(got) == np.argmax(ref)),
                                "cosine": float(np.dot(got.ravel(), ref.ravel())
                                                / max(float(np.linalg.norm(got) * np.linalg.norm(ref)), 1e-24))}
    t0 = time.perf_counter()
    sess.run(None, feeds)
    per_round = _calls_per_round(round_seconds / len(runners), time.perf_counter() - t0)
    say(f"[{name}] measuring {len(runners)} runners x {rounds} rounds x {per_round} calls")
    times = interleaved(runners, rounds, per_round)
    p50 = {k: round(_p50(v), 4) for k, v in times.items()}
    if "olive" in entry:
        from edgeml.benchmarks import olive_columns

        olive_columns.finish(entry["olive"], p50)
    entry["p50_ms"] = p50
    if seq_len is not None:
        entry["tokens_per_s"] = {k: round(seq_len / (v / 1000.0), 1) for k, v in p50.items()}
    entry["calls"] = {k: len(v) for k, v in times.items()}
    entry["direct_call"] = direct_label
    # predict's overhead: its own paired phase (edgeml and direct alternate call by call)
    pairs = max(20, rounds * per_round)
    t_edgeml, t_direct = paired(runners["edgeml"], direct, pairs)
    diffs = [(e - d) * 1e6 for e, d in zip(t_edgeml, t_direct)]
    # pairs alternate which call goes first; average the two orders' medians to cancel order effects
    per_call_us = (statistics.median(diffs[0::2]) + statistics.median(diffs[1::2])) / 2.0
    overhead = {"pairs": pairs, "edgeml_p50_ms": round(_p50(t_edgeml), 4), "direct_p50_ms": round(_p50(t_direct), 4),
                "per_call_us": round(per_call_us, 2)}
    entry["overhead"] = overhead
    best_default_name = min(("ort", "ov_default", "torch"), key=lambda k: p50[k])
    entry["ratios"] = {
        "speedup_vs_ort_fp32": round(p50["ort"] / p50["edgeml"], 3),
        "speedup_vs_ov_f32": round(p50["ov_f32"] / p50["edgeml"], 3),
        "best_single_default": best_default_name,
        "speedup_vs_best_default": round(p50[best_default_name] / p50["edgeml"], 3),
        "predict_overhead_pct": round(100.0 * overhead["per_call_us"] / (1000.0 * overhead["direct_p50_ms"]), 2),
    }
    model.close()
    return entry


def format_table(entries: list[dict[str, Any]]) -> str:
    cols = ("torch", "ort", "ov_default", "ov_f32", "edgeml", "direct")
    head = (f"{'model':<12}" + "".join(f"{c:>11}" for c in cols)
            + f"{'x ORT':>8}{'x best':>8}{'ovh us':>8}{'ovh %':>8}  selected")
    lines = ["p50 latency, batch 1, ms (lower is better)", head, "-" * len(head)]
    for e in entries:
        if "error" in e:
            lines.append(f"{e['model']:<12}  failed: {e['error']}")
            continue
        p, r, s = e["p50_ms"], e["ratios"], e["selected"]
        lines.append(f"{e['model']:<12}" + "".join(f"{p[c]:>11.3f}" for c in cols)
                     + f"{r['speedup_vs_ort_fp32']:>8.2f}{r['speedup_vs_best_default']:>8.2f}"
                     f"{e['overhead']['per_call_us']:>8.1f}{r['predict_overhead_pct']:>8.1f}  {s['backend']}/{s['precision']}")
    tokens = [e for e in entries if "tokens_per_s" in e]
    if tokens:
        lines.append("tokens/s at batch 1 (higher is better): " + "; ".join(
            f"{e['model']}: edgeml {e['tokens_per_s']['edgeml']:.0f}, ort {e['tokens_per_s']['ort']:.0f}, "
            f"ov_default {e['tokens_per_s']['ov_default']:.0f}, torch {e['tokens_per_s']['torch']:.0f}"
            for e in tokens))
    lines.append("x ORT = ORT FP32 p50 / artifact p50; x best = best of torch, ort, ov_default / artifact; "
                 "ovh us / % = what edgeml predict adds per call over the backend library called directly "
                 "(separate paired phase)")
    ok = [e for e in entries if "error" not in e]
    r18 = next((e for e in ok if e["model"] == "resnet18"), None)
    if r18 is not None:
        x = r18["ratios"]["speedup_vs_ort_fp32"]
        lines.append(f"goal ResNet-18 >= 2.0x ORT FP32: {'met' if x >= 2.0 else 'NOT met'} ({x:.2f}x)")
    slower = [e["model"] for e in ok if e["ratios"]["speedup_vs_best_default"] < 1.0]
    lines.append("goal never slower than the best single-backend default: "
                 + ("met" if not slower else f"NOT met on {', '.join(slower)}"))
    over = [e["model"] for e in ok if e["ratios"]["predict_overhead_pct"] > 3.0]
    lines.append("goal predict within 3% of the direct backend call: "
                 + ("met" if not over else f"NOT met on {', '.join(over)}"))
    defaults = {e["ov_default_config"]["inference_precision"] for e in entries if "ov_default_config" in e}
    if defaults:
        lines.append(f"ov_default = OpenVINO CPU plugin defaults (inference precision here: {', '.join(sorted(defaults))}); "
                     "ov_f32 pins f32")
    from edgeml.benchmarks import olive_columns

    lines.extend(olive_columns.format_lines(entries))
    lines.extend(format_candidates(entries))
    return "\n".join(lines)


def format_candidates(entries: list[dict[str, Any]]) -> list[str]:
    """Every model's candidates as the compiler judged and timed them (p50 from its own benchmark)."""
    lines = ["", "candidates (compiler's accuracy check and benchmark):"]
    for e in entries:
        if "error" in e or "@" in e["model"] and not e["model"].endswith(f"@{SEQ_LENS[0]}"):
            continue   # one listing per compiled model
        metric = (e["selected"].get("accuracy") or {}).get("metric")
        lines.append(f"  {e['model'].split('@')[0]} (metric {metric}):")
        for c in e["candidates"]:
            p50 = (c.get("latency_ms") or {}).get("p50")
            acc = c.get("accuracy")
            lines.append(f"    {c['label']:<48} {c['status']:<9} {'' if acc is None else f'{acc:8.3f}':>8} "
                         f"{'' if p50 is None else f'{p50:9.3f} ms':>12}"
                         + ("" if c["status"] in ("passed", "selected") else f"  {str(c.get('reason'))[:90]}"))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeml.benchmarks.compile_speed", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run (fewer, shorter rounds)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated subset of {','.join(DEFAULT_MODELS)}")
    p.add_argument("--target", default=None, help="compile target (default: the best target this host runs)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20, --quick 6)")
    p.add_argument("--fresh", action="store_true",
                   help="empty the script's compile cache first (compile everything again)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the JSON result and the work files")
    p.add_argument("--olive-python", type=Path, default=os.environ.get("EDGEML_OLIVE_PYTHON") or None,
                   help="python of a venv with olive-ai: adds Olive's best CPU optimization as columns")
    a = p.parse_args(argv)
    from edgeml.benchmarks import olive_columns

    olive_python, why = olive_columns.check_python(a.olive_python)
    if why:
        print(f"olive columns skipped: {why}", file=sys.stderr)

    from edgeml.benchmarks import models as refmodels
    from edgeml.targets import best_host_target

    names = [m for m in a.models.split(",") if m]
    unknown = [m for m in names if m not in refmodels.NAMES]
    if unknown:
        print(f"error: unknown model(s) {unknown}; choose from {', '.join(refmodels.NAMES)}", file=sys.stderr)
        return 2
    target = a.target or best_host_target().name
    rounds = a.rounds or (6 if a.quick else 20)
    round_seconds = 0.6 if a.quick else 2.0
    work = a.out / "compile_speed_work"
    work.mkdir(parents=True, exist_ok=True)
    if a.fresh:  # the script keeps its own compile cache; --fresh empties it
        import shutil

        shutil.rmtree(work / "cache", ignore_errors=True)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    entries = []
    for name in names:
        for seq_len in (SEQ_LENS if name in refmodels.TRANSFORMERS else (None,)):
            label = name if seq_len is None else f"{name}@{seq_len}"
            try:   # a transformer compiles once; the second length hits the script's compile cache
                entries.append(bench_model(name, work, target, rounds, round_seconds, say, seq_len,
                                           olive_python=olive_python))
            except Exception as exc:  # one model failing must not hide the others' numbers
                say(f"[{label}] failed: {type(exc).__name__}: {exc}")
                entries.append({"model": label, "error": f"{type(exc).__name__}: {exc}"})
    table = format_table(entries)
    if why:
        table += f"\nolive columns skipped: {why}"
    print(table)
    import onnxruntime
    import openvino
    import torch

    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target, "quick": a.quick, "rounds": rounds, "fresh_compile": a.fresh,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_average": os.getloadavg()},
        "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.get_version(),
                     "torch": torch.__version__},
        "models": entries, "table": table,
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for path in (a.out / f"compile_speed-{stamp}.json", a.out / "compile_speed-latest.json"):
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {a.out / f'compile_speed-{stamp}.json'}", file=sys.stderr)
    return 0 if all("error" not in e for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
