"""Mergeable latency histograms (Prometheus style cumulative buckets).

Agents report cumulative bucket counts keyed by the upper bound in ms as a
string (``"0.5"``, ..., ``"+Inf"``); the manager adds them across devices and
reads quantiles from the sum. Percentiles are never averaged.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Iterable, Mapping

from edgeml.fleet.protocol import BUCKET_KEYS, LATENCY_BUCKETS_MS


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
    """Add cumulative histograms bucket by bucket.

    Input was validated at the protocol edge; rows stored before that check (or
    edited by hand) may still hold junk, so a bucket that is not a fixed edge with
    a non-negative int count is skipped here rather than stopping a rollout.
    """
    total: dict[str, int] = {}
    for h in histograms:
        if not isinstance(h, Mapping):
            continue
        for le, c in h.items():
            if le in BUCKET_KEYS and isinstance(c, int) and not isinstance(c, bool) and c >= 0:
                total[le] = total.get(le, 0) + c
    return dict(sorted(total.items(), key=lambda kv: _le(kv[0])))


def stored_buckets(text: str | bytes | None) -> dict[str, int]:
    """A histogram as stored in the telemetry table; an unreadable row (hand-edited, pre-validation) is empty."""
    try:
        value = json.loads(text) if text else {}
    except (ValueError, TypeError, RecursionError):
        return {}
    return merge([value]) if isinstance(value, dict) else {}


def _le(key: str) -> float:
    return math.inf if key in ("+Inf", "inf", "Inf") else float(key)


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
