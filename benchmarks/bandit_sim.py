"""Thompson sampling on simulated arms with known rewards, through the device code that serves real traffic.

Each simulated device runs ``edgeml.runtime.experiments.Experiment`` (the same ``route`` / ``answered`` /
``feedback`` calls the v2 server makes); every ``--sync`` requests the fleet's outcomes are merged and sent
back as priors, as the manager does (fleet/experiments.py). Regret is the expected reward lost against always
serving the best arm; uniform splitting is the 50/50 A/B baseline.

    python -m edgeml.benchmarks.bandit_sim [--steps 4000] [--devices 4] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from edgeml.runtime.experiments import ArmPrior, Experiment, ExperimentSpec

ARMS = ("1", "2")


@dataclass
class Scenario:
    name: str
    reward: str                  # binary | continuous
    means: tuple[float, float]   # arm "1", arm "2"
    sd: float = 1.0


SCENARIOS = (
    Scenario("binary 0.30 vs 0.50", "binary", (0.30, 0.50)),
    Scenario("binary 0.10 vs 0.12", "binary", (0.10, 0.12)),
    Scenario("binary 0.60 vs 0.40", "binary", (0.60, 0.40)),
    Scenario("gaussian 1.0 vs 1.2 (sd 1)", "continuous", (1.0, 1.2)),
)


def _draw(rng: np.random.Generator, sc: Scenario, arm: str) -> float:
    mean = sc.means[ARMS.index(arm)]
    if sc.reward == "binary":
        return float(rng.random() < mean)
    return float(rng.normal(mean, sc.sd))


def simulate(sc: Scenario, *, steps: int, devices: int, sync: int, seed: int) -> dict[str, float]:
    """One run: ``steps`` requests spread over ``devices``; returns regret and the share on the best arm."""
    rng = np.random.default_rng(seed)
    exps = [Experiment(ExperimentSpec(id="sim", model="m", champion="1", challenger="2", mode="bandit",
                                      reward=sc.reward), None, rng=random.Random(seed * 100 + d))
            for d in range(devices)]
    best = max(sc.means)
    regret, late_best, late = 0.0, 0, 0
    out = {"y": np.zeros((1, 1), np.float32)}
    for t in range(steps):
        exp = exps[t % devices]
        arm = exp.route("m", None, f"r{t}", None)
        assert arm is not None
        exp.answered(SimpleNamespace(name="m", version=arm), f"r{t}", {}, out, 1.0)
        exp.feedback("m", json.dumps({"id": f"r{t}", "reward": _draw(rng, sc, arm)}).encode())
        regret += best - sc.means[ARMS.index(arm)]
        if t >= steps * 0.8:
            late += 1
            late_best += sc.means[ARMS.index(arm)] == best
        if (t + 1) % sync == 0:
            _merge(exps)
    return {"regret": regret, "uniform_regret": steps * (best - min(sc.means)) / 2, "late_best_share": late_best / late}


def _merge(exps: list[Experiment]) -> None:
    """The manager's job: each device gets the others' outcomes as its prior."""
    per_device = [{v: (a.feedback, a.reward_sum, a.reward_sq) for v, a in e.arms.items()} for e in exps]
    for i, e in enumerate(exps):
        priors = {}
        for v in ARMS:
            rows = [p[v] for j, p in enumerate(per_device) if j != i]
            priors[v] = ArmPrior(sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows))
        e.set_priors(priors)


def run(steps: int = 4000, devices: int = 4, sync: int = 50, seeds: int = 5) -> list[dict[str, Any]]:
    rows = []
    for sc in SCENARIOS:
        runs = [simulate(sc, steps=steps, devices=devices, sync=sync, seed=s) for s in range(seeds)]
        rows.append({"scenario": sc.name, "steps": steps, "devices": devices,
                     "regret": float(np.mean([r["regret"] for r in runs])),
                     "uniform_regret": float(np.mean([r["uniform_regret"] for r in runs])),
                     "late_best_share": float(np.mean([r["late_best_share"] for r in runs]))})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--sync", type=int, default=50, help="requests between fleet merges of the posteriors")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows = run(a.steps, a.devices, a.sync, a.seeds)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"Thompson sampling, {a.devices} devices merged every {a.sync} requests, mean of {a.seeds} seeds")
    print(f"{'scenario':<28} {'steps':>6} {'regret':>9} {'uniform':>9} {'ratio':>6} {'best arm, last 20%':>19}")
    for r in rows:
        print(f"{r['scenario']:<28} {r['steps']:>6} {r['regret']:>9.1f} {r['uniform_regret']:>9.1f}"
              f" {r['regret'] / r['uniform_regret']:>6.2f} {r['late_best_share']:>18.1%}")


if __name__ == "__main__":
    main()
