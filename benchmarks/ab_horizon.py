"""Is the A/B horizon sized for the decision rule actually used? A/A promote rate and power, simulated.

    python -m edgeml.benchmarks.ab_horizon [--sims 4000] [--json]

Each simulated experiment runs to its fixed horizon (outcomes per arm) and is decided by the manager's own
code path: the primary test (``two_proportions`` or ``welch_means``), the latency guardrail
(``latency_mann_whitney`` on histograms drawn from one latency distribution for both arms, as for two
equally fast versions) and ``decide`` (promote when p < alpha/2 and effect > 0, Bonferroni over the two
tests). Two horizons side by side, on the same random streams:

* old: sized at two-sided ``alpha`` (what ``build_spec`` did), and
* new: sized at ``decision_level(alpha)`` = alpha/2, the level the decision reads (``build_spec`` now).

A/A: both arms at the baseline (any promote is a false promote). A/B: the challenger better by exactly the
designed ``--mde`` (the promote rate is the power; the design says 80 %). Rates with a 95 % Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

DESIGNS: tuple[dict[str, Any], ...] = (
    {"reward": "binary", "baseline": 0.5, "mde": 0.05},      # the CLI's defaults
    {"reward": "binary", "baseline": 0.2, "mde": 0.05},
    {"reward": "continuous", "sigma": 1.0, "mde": 0.2},
)
ALPHA, POWER = 0.05, 0.8
LATENCY_BUCKETS = 8


def _latency(rng: np.random.Generator, n: int) -> dict[str, int]:
    """A cumulative latency histogram (the wire format) of n requests from a fixed distribution."""
    from edgeml.fleet.protocol import BUCKET_KEYS

    probs = np.array([0.05, 0.2, 0.3, 0.2, 0.12, 0.08, 0.04, 0.01])
    counts = rng.multinomial(n, probs)
    cum = np.cumsum(counts)
    keys = list(BUCKET_KEYS)[3: 3 + LATENCY_BUCKETS]
    return {k: int(c) for k, c in zip(keys, cum)}


def _one(rng: np.random.Generator, design: dict[str, Any], horizon: int, effect: float) -> str:
    from edgeml.fleet import experiment_stats as S

    n = horizon
    if design["reward"] == "binary":
        p = design["baseline"]
        primary = S.two_proportions(int(rng.binomial(n, p)), n, int(rng.binomial(n, p + effect)), n, alpha=ALPHA)
    else:
        a = rng.normal(0.0, design["sigma"], n)
        b = rng.normal(effect, design["sigma"], n)
        primary = S.welch_means(n, float(a.sum()), float((a * a).sum()), n, float(b.sum()), float((b * b).sum()),
                                alpha=ALPHA)
    latency = S.latency_mann_whitney(_latency(rng, n), _latency(rng, n), alpha=ALPHA)
    return S.decide(primary, latency, horizon, alpha=ALPHA).decision


def horizon(design: dict[str, Any], level: float) -> int:
    from edgeml.fleet import experiment_stats as S

    if design["reward"] == "binary":
        return S.sample_size_proportions(design["baseline"], design["mde"], alpha=level, power=POWER)
    return S.sample_size_means(design["sigma"], design["mde"], alpha=level, power=POWER)


def shipped_horizon(design: dict[str, Any]) -> int:
    """What ``build_spec`` (the CLI's path) fixes for this design today."""
    from edgeml.fleet.experiments import build_spec

    args = {"name": "sim", "champion": "m@1", "challenger": "m@2", "mode": "ab", "alpha": ALPHA, "power": POWER,
            **design}
    return build_spec(args).horizon


def _rate(k: int, n: int) -> dict[str, float]:
    from edgeml.fleet.experiment_stats import wilson

    rate, lo, hi = wilson(k, n)
    return {"rate": rate, "low": lo, "high": hi}


def run(sims: int, seed: int = 0) -> list[dict[str, Any]]:
    from edgeml.fleet.experiment_stats import decision_level

    rows = []
    for d_i, design in enumerate(DESIGNS):
        sizes = {"old (alpha)": horizon(design, ALPHA), "new (alpha/2)": horizon(design, decision_level(ALPHA))}
        assert sizes["new (alpha/2)"] == shipped_horizon(design), "build_spec must size at the decision's level"
        for h_i, (label, n) in enumerate(sizes.items()):
            out: dict[str, Any] = {"design": design, "horizon": label, "n_per_arm": n}
            for c_i, (case, effect) in enumerate((("aa", 0.0), ("ab", design["mde"]))):
                rng = np.random.default_rng([seed, d_i, h_i, c_i])
                promotes = sum(_one(rng, design, n, effect) == "promote" for _ in range(sims))
                out[case] = _rate(promotes, sims)
            rows.append(out)
    return rows


def _design(d: dict[str, Any]) -> str:
    if d["reward"] == "binary":
        return f"binary, baseline {d['baseline']}, mde {d['mde']:+}"
    return f"continuous, sigma {d['sigma']}, mde {d['mde']:+}"


def table(rows: list[dict[str, Any]], sims: int) -> str:
    lines = [f"| design | horizon sized at | n per arm | A/A promote ({sims} sims) | power at the mde ({sims} sims) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        aa, ab = r["aa"], r["ab"]
        lines.append(f"| {_design(r['design'])} | {r['horizon']} | {r['n_per_arm']} |"
                     f" {aa['rate']:.3f} [{aa['low']:.3f}, {aa['high']:.3f}] |"
                     f" {ab['rate']:.3f} [{ab['low']:.3f}, {ab['high']:.3f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sims", type=int, default=4000, help="simulated experiments per (design, horizon, case)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.sims)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, args.sims))
        print(f"\nalpha {ALPHA}, designed power {POWER}; decision: promote when p < alpha/2 and effect > 0"
              f" (Bonferroni over the primary metric and the latency guardrail); {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
