"""Mergeable latency histograms (Prometheus style cumulative buckets).

Agents report cumulative bucket counts keyed by the upper bound in ms as a
string (``"0.5"``, ..., ``"+Inf"``); the manager adds them across devices and
reads quantiles from the sum. Percentiles are never averaged.
"""

from __future__ import annotations

import math
import threading
from typing import Iterable, Mapping

from edgeml.fleet.protocol import LATENCY_BUCKETS_MS


def _key(le: float) -> str:
    return "+Inf" if math.isinf(le) else (str(int(le)) if float(le).is_integer() else str(le))


class Histogram:
    def __init__(self, edges: Iterable[float] = LATENCY_BUCKETS_MS):
        self.edges = tuple(sorted(float(e) for e in edges)) + (math.inf,)
        self.counts = [0] * len(self.edges)       # per bucket (not cumulative)
        self.sum_ms = 0.0
        self._lock = threading.Lock()

    def observe(self, ms: float) -> None:
        with self._lock:
            for i, edge in enumerate(self.edges):
                if ms <= edge:
                    self.counts[i] += 1
                    break
            self.sum_ms += ms

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> dict[str, int]:
        out, running = {}, 0
        with self._lock:
            for edge, c in zip(self.edges, self.counts):
                running += c
                out[_key(edge)] = running
        return out


def merge(histograms: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Add cumulative histograms bucket by bucket."""
    total: dict[str, int] = {}
    for h in histograms:
        for le, c in h.items():
            total[le] = total.get(le, 0) + int(c)
    return dict(sorted(total.items(), key=lambda kv: _le(kv[0])))


def subtract(now: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {le: max(0, int(c) - int(before.get(le, 0))) for le, c in now.items()}


def _le(key: str) -> float:
    return math.inf if key in ("+Inf", "inf", "Inf") else float(key)


def count_of(h: Mapping[str, int]) -> int:
    return max((int(c) for c in h.values()), default=0)


def quantile(h: Mapping[str, int], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (None when empty).

    Like Prometheus' histogram_quantile but without interpolation, so the
    answer is a bound that is never optimistic.
    """
    items = sorted(((_le(k), int(v)) for k, v in h.items()), key=lambda kv: kv[0])
    total = items[-1][1] if items else 0
    if total <= 0:
        return None
    rank = q * total
    for le, cumulative in items:
        if cumulative >= rank:
            if math.isinf(le):   # beyond the last finite bound: report that bound
                finite = [x for x, _ in items if not math.isinf(x)]
                return finite[-1] if finite else math.inf
            return le
    return items[-1][0]
