"""False-breach and miss rates of the ``drift_psi`` rollout gate, simulated rollouts on real data.

    python -m edgeml.benchmarks.drift_gate [--rollouts 200] [--shifted 50] [--looks 10] [--json]

A rollout's gate reads the windows its devices sent since the rollout started and is evaluated again
on every manager tick while the bake runs, so each simulated rollout delivers its ``n`` live samples
in ``--looks`` equal chunks (telemetry windows, sketched by the device's ``edgeml.runtime.drift.Sketch``)
and the gate judges the cumulative windows after every chunk; one breach rolls the release back.

* **No-op release** (same model, clean traffic): the reference profile is built, as at compile time,
  from 360 images drawn at random from the 1,797 images of sklearn's digits and the live traffic is
  ``n`` further images disjoint from it, so each rollout is exactly the no-drift null. Any breach is
  a false breach.
* **Shifted release**: the same, with the live images shifted (noise, inverted, 1-px translation,
  dimmed); a rollout that never breaches is a miss.

Three rules side by side, on the same windows: the old gate (raw max PSI >= 0.2 breaches), the
``drifted`` verdict at ``fleet drift``'s alpha 0.01, and the shipped gate (``DriftPsiGate``:
the ``drifted`` verdict at GATE_ALPHA with min PSI 0.2 and the 50-sample floor), evaluated through the
gate class itself. Below the floor the gate waits ("not enough data yet"): at n = 30 it never decides.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np

SIZES = (30, 50, 100, 200, 500, 1000)
N_REF = 360
THRESHOLD = 0.2
ALPHAS = (0.01, 0.001)          # the verdict at fleet drift's one-look alpha, and a tenth of it, beside the gate


def _digits() -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    from edgeml.benchmarks.drift_detect import DIGITS_DIR

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(DIGITS_DIR / "digits.onnx"), opts, providers=["CPUExecutionProvider"])
    x = (load_digits().images.astype(np.float32) / 16.0)[:, None, :, :]       # as examples/digits/train.py
    return x, lambda a: sess.run(None, {"input": a.astype(np.float32)})[0]


def _windows(profile: Any, x: np.ndarray, logits: np.ndarray, looks: int) -> list[Any]:
    from edgeml.fleet import drift as F
    from edgeml.runtime import drift as D

    out = []
    for i, part in enumerate(np.array_split(np.arange(len(x)), looks)):
        sketch = D.Sketch(profile)
        for j in range(0, len(part), D.MAX_ROWS_PER_SAMPLE):
            rows = part[j: j + D.MAX_ROWS_PER_SAMPLE]
            sketch.add({"input": x[rows]}, {"logits": logits[rows]})
        row = D.wire("digits", "2", sketch, 1.0)
        out.append(F.Window(f"dev-{i % 2}", "digits", "2", float(i), row["n"], 0, row["counts"]))
    return out


def rollout(profile: Any, x: np.ndarray, logits: np.ndarray, looks: int) -> dict[str, bool]:
    """Which rules breach at any look of one rollout (and whether the shipped gate ever decided)."""
    from edgeml.fleet import drift as F
    from edgeml.fleet.gates import GateContext, VersionStats
    from edgeml.fleet.gates.drift_psi import DriftPsiGate

    gate = DriftPsiGate(THRESHOLD)
    wins = _windows(profile, x, logits, looks)
    hit = {"raw_psi": False, **{f"drifted_{a:g}": False for a in ALPHAS}, "gate": False, "decided": False}
    for k in range(1, len(wins) + 1):
        rep = F.report(profile, "digits", "2", "rollout", wins[:k], F.Settings())

        def measure(rep: Any = rep) -> F.GateMeasure:
            m = F.GateMeasure((rep.score, "simulated"))
            m.report = rep
            return m

        ctx = GateContext(wave=0, wave_devices=2, failed=0, committed=2, new=VersionStats(), old=VersionStats(),
                          drift=measure)
        res = gate.evaluate(ctx)
        hit["gate"] |= not res.ok
        hit["decided"] |= res.value is not None
        if rep.score is not None:      # the old gate (value < 0.2 passes) had no value below 50 samples either
            hit["raw_psi"] |= rep.score >= THRESHOLD
            for a in ALPHAS:
                hit[f"drifted_{a:g}"] |= F.verdict(rep.samples, rep.score, rep.p_value or 1.0,
                                                   F.Settings(alpha=a, min_psi=THRESHOLD))
        if hit["gate"]:
            break
    return hit


def shifts() -> dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
    return {
        "none (no-op release)": lambda a, r: a,
        "noise sd 0.2": lambda a, r: np.clip(a + r.normal(0, 0.2, a.shape), 0, 1).astype(np.float32),
        "inverted": lambda a, r: (1.0 - a).astype(np.float32),
        "translated 1 px": lambda a, r: np.concatenate([np.zeros_like(a[..., :1]), a[..., :-1]], axis=-1),
        "dimmed x0.7": lambda a, r: (a * 0.7).astype(np.float32),
        "dimmed x0.9 (subtle)": lambda a, r: (a * 0.9).astype(np.float32),
        "noise sd 0.05 (subtle)": lambda a, r: np.clip(a + r.normal(0, 0.05, a.shape), 0, 1).astype(np.float32),
    }


def run(*, rollouts: int, shifted: int, looks: int, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> list[dict]:
    from edgeml.benchmarks.drift_detect import Case, profile_of

    x, predict = _digits()
    logits_all = predict(x)
    case = Case("digits", x[:1], x[:1], predict)
    rng = np.random.default_rng(seed)
    rows = []
    for label, shift in shifts().items():
        trials = rollouts if label.startswith("none") else shifted
        for n in sizes:
            counts = dict.fromkeys(["raw_psi", *(f"drifted_{a:g}" for a in ALPHAS), "gate", "decided"], 0)
            for _ in range(trials):
                perm = rng.permutation(len(x))
                ref, live = perm[:N_REF], perm[N_REF: N_REF + n]
                profile = profile_of(case, x[ref])
                xl = shift(x[live], rng)
                logits = logits_all[live] if label.startswith("none") else predict(xl)
                for k, v in rollout(profile, xl, logits, looks).items():
                    counts[k] += int(v)
            rows.append({"traffic": label, "n": n, "rollouts": trials, "looks": looks,
                         **{f"{k}_rate": v / trials for k, v in counts.items()}, "breaches": counts["gate"]})
    return rows


def table(rows: list[dict]) -> str:
    from edgeml.fleet.gates.drift_psi import GATE_ALPHA

    lines = ["| traffic | n | rollouts | old gate: raw PSI >= 0.2 | " + " | ".join(f"drifted, alpha {a:g}" for a in ALPHAS)
             + f" | shipped gate (alpha {GATE_ALPHA:g}) | gate decided |", "| --- " * (6 + len(ALPHAS)) + "|"]
    for r in rows:
        word = "false breach" if r["traffic"].startswith("none") else "miss"
        def rate(k: str, r: dict = r, word: str = word) -> str:
            v = r[f"{k}_rate"] if word == "false breach" else 1.0 - r[f"{k}_rate"]
            return f"{word} {v:.3f}"
        alphas = " | ".join(rate(f"drifted_{a:g}") for a in ALPHAS)
        lines.append(f"| {r['traffic']} | {r['n']} | {r['rollouts']} | {rate('raw_psi')} | {alphas} |"
                     f" {rate('gate')} | {r['decided_rate']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from edgeml.fleet.gates.drift_psi import GATE_ALPHA

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=200, help="no-op rollouts per window size")
    ap.add_argument("--shifted", type=int, default=50, help="shifted rollouts per (shift, window size)")
    ap.add_argument("--looks", type=int, default=10, help="gate evaluations per rollout, on the growing data")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="live samples per rollout, comma-separated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(rollouts=args.rollouts, shifted=args.shifted, looks=args.looks,
               sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
        print(f"\n{args.looks} looks per rollout on the growing data; shipped gate: drift_psi<{THRESHOLD}"
              f" = drifted at alpha {GATE_ALPHA} (Holm), min PSI {THRESHOLD}, >= 50 samples;"
              f" {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
