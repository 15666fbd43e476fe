"""Statistics on synthetic data with known answers: percentiles, verdicts, Poisson schedule, spread, compare."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeml.benchmarks import stats
from edgeml.errors import UsageError


def test_nearest_rank_percentiles_on_1_to_100():
    data = list(range(100, 0, -1))  # unsorted on purpose
    assert stats.percentile(data, 50) == 50
    assert stats.percentile(data, 90) == 90
    assert stats.percentile(data, 95) == 95
    assert stats.percentile(data, 99) == 99
    assert stats.percentile(data, 99.9) == 100
    assert stats.percentile(data, 0) == 1
    assert stats.percentile(data, 100) == 100


def test_nearest_rank_percentiles_on_1000_values_has_exact_tail():
    data = np.arange(1, 1001, dtype=float)
    assert stats.percentile(data, 99.9) == 999  # ceil(0.999 * 1000) = 999, no float drift to 1000
    assert stats.percentile(data, 99) == 990
    assert stats.percentile(data, 50) == 500
    assert stats.percentile([7.0], 99.9) == 7.0
    assert stats.percentile([1.0, 2.0], 50) == 1.0  # rank ceil(1.0) = 1


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(UsageError, match="no samples"):
        stats.percentile([], 50)
    with pytest.raises(UsageError, match="outside"):
        stats.percentile([1.0], 101)


def test_summarize_known_values():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert s["count"] == 4 and s["min"] == 1.0 and s["max"] == 4.0 and s["mean"] == 2.5
    assert s["stdev"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["p50"] == 2.0 and s["p90"] == 4.0 and s["p99_9"] == 4.0
    assert stats.pkey(99.9) == "p99_9" and stats.pkey(50) == "p50"


def test_cdf_points_are_monotone_and_end_at_one():
    data = np.random.default_rng(1).exponential(1.0, 10_000)
    cdf = stats.cdf_points(data, max_points=200)
    assert cdf["fraction"][-1] == 1.0
    assert cdf["latency_ms"][-1] == pytest.approx(data.max())
    assert all(a <= b for a, b in zip(cdf["latency_ms"], cdf["latency_ms"][1:]))
    assert len(cdf["latency_ms"]) <= 220


def test_verdict_valid_when_every_rule_holds():
    rules = stats.VerdictRules(min_duration_s=10, min_queries=100, latency_bound_ms=5.0)
    v = stats.verdict(rules, duration_s=10.0, queries=100, latencies_ms=[1.0] * 99 + [5.0])
    assert v.valid and v.reasons == []


def test_verdict_min_duration_failure():
    v = stats.verdict(stats.VerdictRules(min_duration_s=60, min_queries=10), duration_s=59.5, queries=1000)
    assert v.result == "INVALID"
    assert len(v.reasons) == 1 and "under the minimum duration 60 s" in v.reasons[0]


def test_verdict_min_queries_failure():
    v = stats.verdict(stats.VerdictRules(min_duration_s=1, min_queries=1024), duration_s=5, queries=1023)
    assert v.result == "INVALID" and v.reasons == ["completed 1023 queries, under the minimum 1024"]


def test_verdict_latency_bound_uses_p99():
    lat = [1.0] * 98 + [20.0, 20.0]  # p99 (rank 99) = 20
    v = stats.verdict(stats.VerdictRules(latency_bound_ms=10.0), duration_s=1, queries=100, latencies_ms=lat)
    assert not v.valid and "p99 latency 20.000 ms is over the bound 10 ms" in v.reasons[0]
    lat_ok = [1.0] * 99 + [20.0]  # p99 = 1, only p100 is slow
    assert stats.verdict(stats.VerdictRules(latency_bound_ms=10.0), duration_s=1, queries=100, latencies_ms=lat_ok).valid


def test_verdict_collects_every_broken_rule():
    rules = stats.VerdictRules(min_duration_s=10, min_queries=100, latency_bound_ms=1.0, target_qps=100)
    v = stats.verdict(rules, duration_s=1, queries=5, latencies_ms=[2.0] * 5, completed_qps=50)
    assert len(v.reasons) == 4
    assert any("90% of the target 100" in r for r in v.reasons)


def test_poisson_schedule_mean_rate_and_exponential_gaps():
    rate = 200.0
    times = stats.poisson_schedule(rate, rng=np.random.default_rng(42), duration_s=100.0)
    assert np.all(np.diff(times) > 0)
    assert times[-2] < 100.0 <= times[-1]  # runs up to and including the first arrival past the duration
    assert len(times) / times[-1] == pytest.approx(rate, rel=0.03)  # ~20000 arrivals: 1 sigma = 0.7%
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # coefficient of variation of an exponential
    # Kolmogorov-Smirnov distance to Exp(rate): critical value at alpha=0.01 is 1.63/sqrt(n)
    g = np.sort(gaps)
    n = g.size
    cdf = 1 - np.exp(-rate * g)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert d < 1.63 / math.sqrt(n)
    # a constant schedule would fail the same test: its distance is huge
    const = np.full(n, 1 / rate)
    d_const = np.max(np.abs(np.arange(1, n + 1) / n - (1 - np.exp(-rate * const))))
    assert d_const > 10 * 1.63 / math.sqrt(n)


def test_poisson_schedule_is_reproducible_and_respects_count():
    a = stats.poisson_schedule(50, rng=np.random.default_rng(7), duration_s=2.0)
    b = stats.poisson_schedule(50, rng=np.random.default_rng(7), duration_s=2.0)
    c = stats.poisson_schedule(50, rng=np.random.default_rng(8), duration_s=2.0)
    assert np.array_equal(a, b) and not np.array_equal(a[:5], c[:5])
    many = stats.poisson_schedule(50, rng=np.random.default_rng(7), duration_s=0.1, count=500)
    assert len(many) == 500 and many[-1] > 0.1
    only = stats.poisson_schedule(10, rng=np.random.default_rng(7), count=3)
    assert len(only) == 3
    with pytest.raises(UsageError):
        stats.poisson_schedule(0, rng=np.random.default_rng(0), duration_s=1)


def test_spread_min_median_max():
    s = stats.spread([10.0, 12.0, 11.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (10.0, 11.0, 12.0, 3)
    assert s["rel_range"] == pytest.approx(2 / 11)


def test_compare_overlapping_ranges_are_within_noise():
    c = stats.compare_metric([10.0, 11.0, 12.0], [11.5, 12.5, 13.0], higher_is_better=False)
    assert c["ratio"] == pytest.approx(12.5 / 11.0)
    assert c["within_noise"] and c["verdict"] == "within noise"


def test_compare_disjoint_ranges_give_direction():
    lat = stats.compare_metric([10.0, 10.2, 10.1], [8.0, 8.1, 8.2], higher_is_better=False)
    assert not lat["within_noise"] and lat["verdict"] == "better" and lat["ratio"] == pytest.approx(8.1 / 10.1)
    tput = stats.compare_metric([100.0, 101.0], [90.0, 91.0], higher_is_better=True)
    assert tput["verdict"] == "worse" and tput["ratio"] == pytest.approx(90.5 / 100.5)


def test_compare_single_repeat_uses_noise_floor():
    assert stats.compare_metric([100.0], [104.0], higher_is_better=True)["within_noise"]
    far = stats.compare_metric([100.0], [106.0], higher_is_better=True)
    assert not far["within_noise"] and far["verdict"] == "better"
    assert stats.compare_metric([100.0], [106.0], higher_is_better=True, noise_floor=0.1)["within_noise"]


@pytest.mark.parametrize("text,seconds", [("60s", 60.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
                                          ("1.5", 1.5), (" 3 s ", 3.0), (".25s", 0.25), (7, 7.0)])
def test_parse_duration(text, seconds):
    assert stats.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "ten", "5 weeks", "-3s", "1e3s"])
def test_parse_duration_rejects(bad):
    with pytest.raises(UsageError, match="duration"):
        stats.parse_duration(bad)
