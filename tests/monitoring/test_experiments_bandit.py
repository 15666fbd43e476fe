"""Thompson sampling (the device code) on simulated arms with known rewards: it converges to the best arm
and its regret is below uniform splitting, with fleet-merged posteriors (benchmarks/bandit_sim.py)."""

from __future__ import annotations

import pytest

from edgeml.benchmarks.bandit_sim import Scenario, simulate


@pytest.mark.parametrize("scenario", [Scenario("binary", "binary", (0.3, 0.5)),
                                      Scenario("binary, best is the champion", "binary", (0.6, 0.4)),
                                      Scenario("gaussian", "continuous", (1.0, 1.3))], ids=lambda s: s.name)
def test_thompson_sampling_converges_and_beats_uniform_splitting(scenario):
    r = simulate(scenario, steps=1500, devices=3, sync=25, seed=7)
    assert r["late_best_share"] >= 0.9
    assert r["regret"] < 0.25 * r["uniform_regret"]


def test_fleet_merged_posteriors_learn_faster_than_devices_alone():
    sc = Scenario("binary", "binary", (0.3, 0.5))
    merged = sum(simulate(sc, steps=1200, devices=6, sync=20, seed=s)["regret"] for s in range(4))
    alone = sum(simulate(sc, steps=1200, devices=6, sync=10 ** 9, seed=s)["regret"] for s in range(4))
    assert merged < alone
