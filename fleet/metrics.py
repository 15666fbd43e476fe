"""Mergeable latency histograms (Prometheus style cumulative buckets).

Agents report cumulative bucket counts keyed by the upper bound in ms as a
string (``"0.5"``, ..., ``"+Inf"``); the manager adds them across devices and
reads quantiles from the sum. Percentiles are never averaged.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping

from edgeml.fleet.protocol import BUCKET_KEYS, LATENCY_BUCKETS_MS
from edgeml.stats import Histogram as _Histogram


class Histogram(_Histogram):
    """The one histogram (edgeml.stats) on the fleet protocol's fixed latency edges."""

    __slots__ = ()

    def __init__(self, edges: Iterable[float] = LATENCY_BUCKETS_MS):
        super().__init__(edges)

    @property
    def sum_ms(self) -> float:
        return self.sum


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
    """Quantile ``q`` (0..1) of cumulative buckets: the one nearest-rank rule of edgeml.stats on binned data
    (the upper bound of the bucket holding the sample, never optimistic); None when empty."""
    return _Histogram.from_cumulative(h).percentile(q * 100.0)
