"""Proof table for drift detection on real data: false alarms on clean data, samples needed on shifted data.

    python -m edgeml.benchmarks.drift_detect [--windows 500] [--trials 50] [--json]

The whole path is the product's: the reference profile from ``edgeml.compiler.profile`` (built,
as at compile time, from the eval split), live windows binned by the device sketch
(``edgeml.runtime.drift.Sketch``) and judged by the manager (``edgeml.fleet.drift.report``:
per-column PSI + chi-square, Holm-corrected, drifted = p < alpha and PSI >= min_psi).

* digits (examples/digits: the trained CNN; reference = eval split, 360 images; live = the
  calibration split, 200 held-out images never trained on), and
* the breast-cancer MLP of benchmarks/models.py (reference = eval split, 100 rows; live =
  the calibration split, 100 held-out rows).

Every window re-splits the pooled held-out data (eval + calibration, never trained on) at
random into a reference of the compile-time size and disjoint live rows, so a clean window
is exactly the no-drift null hypothesis (a fixed small pool resampled with replacement would
not be: its own sampling error would count as drift). Clean rows: the false-alarm rate over
``--windows`` windows of 100 samples. Shifted rows: the live rows shifted (noise, inverted,
translated or dimmed images; one feature scaled x1.5) -> the detection rate per window size
and the smallest n detected in >= 95 % of ``--trials`` windows (the manager decides nothing
below ``min_samples`` = 50).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

SIZES = (10, 25, 50, 100, 200, 400, 800)
CLEAN_N = 100
DIGITS_DIR = Path(__file__).resolve().parent.parent / "examples" / "digits"


@dataclass
class Case:
    name: str
    reference: np.ndarray
    held_out: np.ndarray
    predict: Callable[[np.ndarray], np.ndarray]


def digits_case() -> Case:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(DIGITS_DIR / "digits.onnx"), providers=["CPUExecutionProvider"])
    ref = np.load(DIGITS_DIR / "eval.npz")["input"]
    live = np.load(DIGITS_DIR / "calib.npz")["input"]
    return Case("digits (CNN)", ref, live, lambda x: sess.run(None, {"input": x.astype(np.float32)})[0])


def mlp_case() -> Case:
    import torch

    from edgeml.benchmarks import models

    calib, ev = models.data("mlp", n_calib=100, n_eval=100)
    net = models.mlp()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x.astype(np.float32))).numpy()

    return Case("breast-cancer MLP", ev["input"], calib["input"], predict)


def shifts(case: Case) -> dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
    if case.reference.ndim == 4:
        return {
            "gaussian noise sd 0.2": lambda x, r: np.clip(x + r.normal(0, 0.2, x.shape), 0, 1).astype(np.float32),
            "inverted (1 - x)": lambda x, r: (1.0 - x).astype(np.float32),
            "translated 1 px right": lambda x, r: np.concatenate([np.zeros_like(x[..., :1]), x[..., :-1]], axis=-1),
            "brightness x0.7": lambda x, r: (x * 0.7).astype(np.float32),
        }

    def scale0(x: np.ndarray, r: np.random.Generator) -> np.ndarray:
        y = x.copy()
        y[:, 0] *= 1.5
        return y

    def shift_all(x: np.ndarray, r: np.random.Generator) -> np.ndarray:
        return (x + 0.5).astype(np.float32)

    return {"feature 0 (mean radius) x1.5": scale0, "every feature +0.5 sd": shift_all,
            "gaussian noise sd 0.5": lambda x, r: (x + r.normal(0, 0.5, x.shape)).astype(np.float32)}


def judge(case: Case, profile: Any, x: np.ndarray, settings: Any) -> Any:
    from edgeml.fleet import drift as F
    from edgeml.runtime import drift as D

    sketch = D.Sketch(profile)
    for i in range(0, len(x), D.MAX_ROWS_PER_SAMPLE):     # as the device does: one request at a time
        part = x[i: i + D.MAX_ROWS_PER_SAMPLE]
        sketch.add({"input": part}, {"logits": case.predict(part)})
    row = D.wire("m", "1", sketch, 1.0)
    assert D.wire_problem(row) is None
    win = F.Window("dev", "m", "1", 0.0, row["n"], 0, row["counts"])
    return F.report(profile, "m", "1", "all", [win], settings)


def run_case(case: Case, *, windows: int, trials: int, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> dict[str, Any]:
    """Each window: a fresh random split of the pooled held-out data into a reference (its size as at
    compile time) and live rows (disjoint, so the clean windows are exactly the no-drift null)."""
    from edgeml.fleet import drift as F

    settings = F.Settings()
    rng = np.random.default_rng(seed)
    pool = np.concatenate([case.reference, case.held_out])
    n_ref = len(case.reference)

    def split(n: int) -> tuple[Any, np.ndarray]:
        perm = rng.permutation(len(pool))
        ref, rest = pool[perm[:n_ref]], pool[perm[n_ref:]]
        live = rest[:n] if n <= len(rest) else rest[rng.integers(0, len(rest), n)]
        return profile_of(case, ref), live

    alarms = 0
    for _ in range(windows):
        profile, live = split(CLEAN_N)
        alarms += judge(case, profile, live, settings).drifted
    clean = {"condition": "clean held-out data", "n": CLEAN_N, "windows": windows, "alarms": alarms,
             "false_alarm_rate": alarms / windows if windows else None}
    rows = []
    for label, shift in shifts(case).items():
        rates = {}
        for n in sizes:
            hits = 0
            for _ in range(trials):
                profile, live = split(n)
                hits += judge(case, profile, shift(live, rng), settings).drifted
            rates[n] = hits / trials if trials else 0.0
        needed = next((n for n in sizes if rates[n] >= 0.95), None)
        rows.append({"condition": label, "detection_rate": rates, "samples_needed": needed})
    return {"case": case.name, "reference_samples": n_ref, "pool": len(pool), "alpha": settings.alpha,
            "min_psi": settings.min_psi, "min_samples": settings.min_samples, "clean": clean, "shifted": rows}


def profile_of(case: Case, ref: np.ndarray) -> Any:
    from edgeml.compiler.profile import build_profile
    from edgeml.runtime import drift as D

    return D.parse_profile(build_profile({"logits": case.predict(ref)}, {"input": ref}, ["logits"]))


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | data | windows x n | drifted | rate | samples to detect (>= 95 %) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        c = r["clean"]
        lines.append(f"| {r['case']} | {c['condition']} | {c['windows']} x {c['n']} | {c['alarms']} |"
                     f" false alarms {c['false_alarm_rate']:.3f} | - |")
        for s in r["shifted"]:
            rates = ", ".join(f"n={n}: {v:.2f}" for n, v in s["detection_rate"].items())
            lines.append(f"| {r['case']} | {s['condition']} | per n | - | {rates} |"
                         f" {s['samples_needed'] if s['samples_needed'] else '> ' + str(max(s['detection_rate']))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=500, help="clean windows per model (false-alarm rate)")
    ap.add_argument("--trials", type=int, default=50, help="shifted windows per (shift, n)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = [run_case(digits_case(), windows=args.windows, trials=args.trials),
               run_case(mlp_case(), windows=args.windows, trials=args.trials)]
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(table(results))
        print(f"\nalpha {results[0]['alpha']} (Holm over all columns), min PSI {results[0]['min_psi']},"
              f" min samples {results[0]['min_samples']};"
              f" {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
