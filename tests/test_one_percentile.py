"""The one percentile and the one histogram (edgeml.stats): known answers, and one rule for samples and bins."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeml.errors import UsageError
from edgeml.stats import Histogram, percentile

EDGES = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100)


def test_nearest_rank_on_samples_is_an_observed_value():
    data = list(range(1, 101))
    assert [percentile(data, q) for q in (0, 50, 90, 95, 99, 99.9, 100)] == [1, 50, 90, 95, 99, 100, 100]
    assert percentile([1.0, 2.0], 50) == 1.0          # numpy's linear rule would say 1.5
    assert percentile(np.arange(1, 1001), 99.9) == 999  # no float drift to rank 1000


def test_histogram_percentile_is_the_bucket_of_the_nearest_rank_sample():
    rng = np.random.default_rng(3)
    samples = rng.lognormal(1.0, 1.0, size=997)
    hist = Histogram(EDGES)
    for v in samples:
        hist.observe(float(v))
    assert hist.count == 997 and hist.sum == pytest.approx(samples.sum())
    for q in (1, 50, 90, 95, 99):
        exact = percentile(samples, q)
        bound = hist.percentile(q)
        lower = max([e for e in EDGES if e < bound], default=-math.inf)
        # the bucket that holds the exact nearest-rank sample, clamped to the last finite bound
        assert lower < exact <= bound or (bound == EDGES[-1] and exact > bound), (q, exact, bound)


def test_histograms_merge_by_buckets_and_round_trip_through_cumulative_counts():
    a, b = Histogram(EDGES), Histogram(EDGES)
    for v in (0.1, 0.3, 3.0):
        a.observe(v)
    for v in (3.0, 7.0, 500.0):
        b.observe(v)
    a.add(b)
    cum = a.cumulative()
    assert cum == {"0.25": 1, "0.5": 2, "1": 2, "2": 2, "5": 4, "10": 5, "20": 5, "50": 5, "100": 5, "+Inf": 6}
    again = Histogram.from_cumulative(cum)
    assert again.counts == a.counts and again.percentile(50) == 5 and again.percentile(100) == 100
    with pytest.raises(ValueError):
        a.add(Histogram((1, 2)))


def test_empty_and_out_of_range_are_clear():
    assert Histogram(EDGES).percentile(95) is None
    with pytest.raises(UsageError, match="no samples"):
        percentile([], 50)
    with pytest.raises(UsageError, match="outside"):
        percentile([1.0], 101)
