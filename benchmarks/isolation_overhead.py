"""What running candidates in worker processes costs: compile wall time and the selected artifact's speed.

For each reference model the same compile runs with ``isolation="none"`` (the candidates in the compiler's
own process, as before) and ``isolation="process"`` (the default), alternating A B B A ... so machine noise
hits both alike. Then the two selected artifacts are loaded with ``edgeml.load`` and timed interleaved in
this process (same threads, same feeds), so "the selected artifact's speed does not regress" is a ratio
measured side by side, not a figure from two runs.

    python -m edgeml.benchmarks.isolation_overhead [--models digits,resnet18] [--pairs 2] [--json]

Prints per model: compile seconds (median of the pairs) for each mode and their ratio, the selected
candidate of each, and the selected artifacts' p50 ms with the ratio process/none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("none", "process")


def _compile(name: str, files: dict[str, Path], onnx: Path, out: Path, mode: str) -> tuple[float, dict[str, Any]]:
    from edgeml.compiler import compile_with_report
    from edgeml.targets import best_host_target

    start = time.perf_counter()
    result = compile_with_report(str(onnx), target=best_host_target().name, output=out, calib=files["calib"],
                                        eval=files["eval"], cache_dir=False, isolation=mode, benchmark_seconds=1.0)
    return time.perf_counter() - start, result.selected or {}


def _time_artifacts(paths: dict[str, Path], feeds: dict[str, np.ndarray], rounds: int = 20) -> dict[str, float]:
    """p50 ms of each loaded artifact, interleaved rounds of ~50 ms each."""
    import edgeml
    from edgeml.stats import percentile

    models = {mode: edgeml.load(path) for mode, path in paths.items()}
    for model in models.values():
        for _ in range(5):
            model.predict(feeds)
    t0 = time.perf_counter()
    next(iter(models.values())).predict(feeds)
    reps = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {mode: [] for mode in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for mode in order:
            models[mode].predict(feeds)   # settle
            for _ in range(reps):
                t = time.perf_counter()
                models[mode].predict(feeds)
                samples[mode].append((time.perf_counter() - t) * 1000.0)
    return {mode: percentile(s, 50) for mode, s in samples.items()}


def bench(name: str, work: Path, pairs: int) -> dict[str, Any]:
    from edgeml.benchmarks import models

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx = models.export_onnx(name, folder / f"{name}.onnx")
    files = models.write_data(name, folder, n_calib=32, n_eval=32)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    selected: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for i in range(pairs):
        for mode in (MODES if i % 2 == 0 else tuple(reversed(MODES))):
            out = folder / f"{mode}.edgepkg"
            took, chosen = _compile(name, files, onnx, out, mode)
            seconds[mode].append(took)
            selected[mode], paths[mode] = str(chosen.get("label")), out
    feeds_all = dict(np.load(files["eval"]))
    feeds = {k: v[:1] for k, v in feeds_all.items() if k != "labels" and not k.startswith("reference_")}
    p50 = _time_artifacts(paths, feeds)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    return {"model": name, "compile_s": {m: round(v, 2) for m, v in median.items()},
            "compile_ratio": round(median["process"] / median["none"], 3), "selected": selected,
            "selected_p50_ms": {m: round(v, 4) for m, v in p50.items()},
            "p50_ratio": round(p50["process"] / p50["none"], 3), "pairs": pairs}


def cpu_summary() -> str:
    from edgeml.benchmarks.sysinfo import cpu_info
    from edgeml.targets import host_isa

    info = cpu_info()
    return f"{info['model']}, {info['usable_cores']} usable cores, widest ISA {host_isa()}"


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,resnet18")
    ap.add_argument("--pairs", type=int, default=2, help="compiles per mode, alternating (default 2)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeml-isolation-") as tmp:
        rows = [bench(name.strip(), Path(tmp), a.pairs) for name in a.models.split(",") if name.strip()]
    if a.json:
        print(json.dumps({"cpu": cpu_summary(), "rows": rows}, indent=2))
        return 0
    print(f"host: {cpu_summary()}")
    print(f"{'model':<12} {'compile s (none)':>17} {'(process)':>10} {'ratio':>6}   {'p50 ms (none)':>14} "
          f"{'(process)':>10} {'ratio':>6}   selected (none | process)")
    for r in rows:
        print(f"{r['model']:<12} {r['compile_s']['none']:>17.2f} {r['compile_s']['process']:>10.2f} "
              f"{r['compile_ratio']:>6.2f}   {r['selected_p50_ms']['none']:>14.4f} "
              f"{r['selected_p50_ms']['process']:>10.4f} {r['p50_ratio']:>6.2f}   "
              f"{r['selected']['none']} | {r['selected']['process']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
