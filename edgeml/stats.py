"""One percentile definition and one histogram for the whole project.

**Percentile (nearest rank).** The q-th percentile of n samples is the
``ceil(q/100 * n)``-th smallest sample (rank clamped to 1..n): always a value
that was observed, never an interpolation. The compiler's candidate selection,
``edgeml bench`` and fleet telemetry all use it, so a manifest's p50 is bench's p50.

**Histogram.** Fixed bucket upper bounds (``le``), per-bucket counts, a sum and a
count; histograms with the same bounds add up bucket by bucket (devices ->
manager), never by averaging percentiles. ``Histogram.percentile`` applies the
same nearest-rank rule to binned data: the upper bound of the bucket that holds
the nearest-rank sample (a bound that is never optimistic); a sample above the
last finite bound reports that bound.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Iterable, Mapping, Sequence

import numpy as np

from edgeml.errors import UsageError


def nearest_rank(n: int, q: float) -> int:
    """1-based rank of the q-th percentile (q in 0..100) among n sorted samples."""
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise UsageError(f"percentile {q} is outside 0..100")
    # round() first so that e.g. 95 * 20 / 100 = 19.000000000000004 stays rank 19
    return min(max(math.ceil(round(q * n / 100.0, 9)), 1), n)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """Nearest-rank percentile of raw samples (see the module doc); ``q`` in [0, 100]."""
    data = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if data.size == 0:
        raise UsageError("no samples were recorded; cannot compute a percentile",
                         hint="run longer or with more queries")
    return float(data[nearest_rank(int(data.size), q) - 1])


def bound_key(le: float) -> str:
    """Text key of a bucket bound: 0.5 -> '0.5', 2.0 -> '2', inf -> '+Inf' (the Prometheus spelling)."""
    if math.isinf(le):
        return "+Inf"
    return str(int(le)) if float(le).is_integer() else repr(float(le))


def _bound_of(key: str) -> float:
    return math.inf if key in ("+Inf", "inf", "Inf") else float(key)


class Histogram:
    """Mergeable fixed-bucket histogram; ``observe`` is safe from several threads."""

    __slots__ = ("bounds", "counts", "sum", "_lock")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(sorted(float(b) for b in bounds if not math.isinf(float(b))))
        self.counts = [0] * (len(self.bounds) + 1)   # the last bucket is +Inf (overflow)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect_left(self.bounds, value)      # bucket i holds bounds[i-1] < v <= bounds[i]
        with self._lock:
            self.counts[index] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: "Histogram") -> None:
        if other.bounds != self.bounds:
            raise ValueError("histograms with different bucket bounds cannot be added")
        with self._lock:
            self.counts = [a + b for a, b in zip(self.counts, other.counts)]
            self.sum += other.sum

    def cumulative(self) -> dict[str, int]:
        """Cumulative counts keyed by bound text, ending with '+Inf' (Prometheus ``le`` buckets)."""
        with self._lock:
            counts = list(self.counts)
        out, running = {}, 0
        for le, c in zip((*self.bounds, math.inf), counts):
            running += c
            out[bound_key(le)] = running
        return out

    @classmethod
    def from_cumulative(cls, buckets: Mapping[str, int]) -> "Histogram":
        """Rebuild from cumulative ``{le: count}`` (bounds taken from the keys; the sum is unknown: 0)."""
        items = sorted(((_bound_of(k), int(v)) for k, v in buckets.items()), key=lambda kv: kv[0])
        hist = cls(le for le, _ in items)
        previous = 0
        per_bound = dict(items)
        for i, le in enumerate((*hist.bounds, math.inf)):
            total = per_bound.get(le, previous)
            hist.counts[i] = max(total - previous, 0)
            previous = max(total, previous)
        return hist

    def percentile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the nearest-rank sample; None when empty."""
        n = self.count
        if n == 0:
            return None
        rank = nearest_rank(n, q)
        running = 0
        for i, c in enumerate(self.counts):
            running += c
            if running >= rank:
                if i < len(self.bounds):
                    return self.bounds[i]
                return self.bounds[-1] if self.bounds else math.inf
        return self.bounds[-1] if self.bounds else math.inf
