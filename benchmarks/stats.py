"""Statistics for ``edgeml bench``: percentiles, verdict rules, spread, noise, Poisson schedules.

Everything here is pure (no clock, no model) so it can be tested on synthetic
latencies with known answers.

Percentile definition (documented in docs/bench-schema.md): **nearest rank**, as
MLPerf LoadGen reports it; the one implementation is ``edgeml.stats.percentile``, also
used by the compiler's selection and (on histograms) by fleet telemetry. For ``n`` sorted latencies ``x[1..n]`` the q-th
percentile is ``x[ceil(q/100 * n)]`` (rank clamped to ``1..n``), so it is always
a latency that was actually observed. For 1..100 ms, p50 = 50 ms, p90 = 90 ms,
p99 = 99 ms, p99.9 = 100 ms.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from edgeml.errors import UsageError
from edgeml.stats import percentile  # the one definition (nearest rank), re-exported for bench

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
VALID = "VALID"
INVALID = "INVALID"
# Without repeats there is no measured spread; differences under this are called noise.
DEFAULT_NOISE_FLOOR = 0.05


def pkey(q: float) -> str:
    """Key of a percentile in result dicts: 50 -> 'p50', 99.9 -> 'p99_9'."""
    text = f"{q:g}".replace(".", "_")
    return f"p{text}"


def summarize(latencies_ms: Sequence[float] | np.ndarray, percentiles: Iterable[float] = PERCENTILES) -> dict[str, float]:
    """min/mean/max/stdev plus the nearest-rank percentiles, all in ms."""
    data = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    if data.size == 0:
        raise UsageError("no latencies were recorded", hint="run longer (--duration) or with more queries (--min-queries)")
    out = {
        "count": int(data.size),
        "min": float(data[0]),
        "max": float(data[-1]),
        "mean": float(data.mean()),
        "stdev": float(data.std(ddof=1)) if data.size > 1 else 0.0,
    }
    for q in percentiles:
        out[pkey(q)] = percentile(data, q)
    return out


def cdf_points(latencies_ms: Sequence[float] | np.ndarray, max_points: int = 400) -> dict[str, list[float]]:
    """A compact empirical CDF: latency at evenly spaced ranks plus the exact tail."""
    data = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    n = data.size
    if n == 0:
        return {"latency_ms": [], "fraction": []}
    if n <= max_points:
        idx = np.arange(n)
    else:
        idx = np.unique(np.concatenate([np.linspace(0, n - 1, max_points).round().astype(int),
                                        np.arange(max(0, n - 20), n)]))
    return {"latency_ms": [round(float(data[i]), 6) for i in idx],
            "fraction": [round((int(i) + 1) / n, 6) for i in idx]}


# ----------------------------------------------------------------------------- verdicts

@dataclass
class VerdictRules:
    """The validity rules of one run (MLPerf LoadGen style)."""

    min_duration_s: float = 0.0
    min_queries: int = 0
    latency_bound_ms: float | None = None      # Server / bounded runs: the percentile below must hold it
    bound_percentile: float = 99.0
    target_qps: float | None = None             # Server: completed rate must reach this share of the target
    min_qps_ratio: float = 0.9


@dataclass
class Verdict:
    result: str
    reasons: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.result == VALID

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "reasons": list(self.reasons)}


def verdict(rules: VerdictRules, *, duration_s: float, queries: int, latencies_ms: Sequence[float] | np.ndarray | None = None,
            completed_qps: float | None = None) -> Verdict:
    """VALID when every rule holds; otherwise INVALID with one reason per broken rule."""
    reasons: list[str] = []
    if duration_s < rules.min_duration_s:
        reasons.append(f"ran {duration_s:.3f} s, under the minimum duration {rules.min_duration_s:g} s")
    if queries < rules.min_queries:
        reasons.append(f"completed {queries} queries, under the minimum {rules.min_queries}")
    if rules.latency_bound_ms is not None:
        if latencies_ms is None or len(latencies_ms) == 0:
            reasons.append("no latencies recorded to check the latency bound")
        else:
            got = percentile(latencies_ms, rules.bound_percentile)
            if got > rules.latency_bound_ms:
                reasons.append(f"{pkey(rules.bound_percentile)} latency {got:.3f} ms is over the bound {rules.latency_bound_ms:g} ms")
    if rules.target_qps is not None and completed_qps is not None:
        floor = rules.min_qps_ratio * rules.target_qps
        if completed_qps < floor:
            reasons.append(f"completed {completed_qps:.2f} queries/s, under {rules.min_qps_ratio:.0%} of the target {rules.target_qps:g} QPS")
    return Verdict(INVALID if reasons else VALID, reasons)


# ----------------------------------------------------------------------------- Poisson arrivals

def poisson_schedule(rate_qps: float, *, rng: np.random.Generator, duration_s: float | None = None,
                     count: int | None = None) -> np.ndarray:
    """Arrival times (s, from 0) of a Poisson process at ``rate_qps``.

    Gaps are exponential with mean ``1/rate`` drawn from the injected ``rng``.
    The schedule runs up to and including the first arrival at or after
    ``duration_s`` (so its span is at least the duration) and holds at least
    ``count`` arrivals, whichever is longer; at least one of the two must be given.
    """
    if rate_qps <= 0 or not math.isfinite(rate_qps):
        raise UsageError(f"target QPS must be a positive number, got {rate_qps}")
    if duration_s is None and count is None:
        raise UsageError("a Poisson schedule needs a duration or a query count")
    need = int(count or 0)
    times: list[np.ndarray] = []
    total, last = 0, 0.0
    chunk = max(64, int(rate_qps * (duration_s or 0) * 1.2) + 16, need + 16)
    while True:
        gaps = rng.exponential(1.0 / rate_qps, size=chunk)
        arr = last + np.cumsum(gaps)
        times.append(arr)
        total += arr.size
        last = float(arr[-1])
        if total >= need and (duration_s is None or last >= duration_s):
            break
    allt = np.concatenate(times)
    keep = 0 if duration_s is None else int(np.searchsorted(allt, duration_s, side="left")) + 1
    keep = max(keep, need)
    return allt[:keep]


# ----------------------------------------------------------------------------- spread and comparison

def spread(values: Sequence[float]) -> dict[str, float | int]:
    """min/median/max over repeats, and the range relative to the median."""
    vals = [float(v) for v in values]
    if not vals:
        raise UsageError("no repeats to summarise")
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    return {"min": lo, "median": med, "max": hi, "n": len(vals),
            "rel_range": (hi - lo) / med if med else 0.0}


def compare_metric(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool,
                   noise_floor: float = DEFAULT_NOISE_FLOOR) -> dict[str, Any]:
    """Compare one metric of B against baseline A (values over repeats).

    ``ratio`` = median(B) / median(A). The difference is *within noise* when
    both sides have two or more repeats and their [min, max] ranges overlap, or
    (with a single repeat on either side, so no measured spread) when
    ``|ratio - 1|`` is under ``noise_floor``.
    """
    sa, sb = spread(a), spread(b)
    ratio = sb["median"] / sa["median"] if sa["median"] else float("inf")
    if sa["n"] >= 2 and sb["n"] >= 2:
        overlap = sa["min"] <= sb["max"] and sb["min"] <= sa["max"]
        within = bool(overlap)
        rule = "ranges over repeats overlap" if overlap else "ranges over repeats do not overlap"
    else:
        within = abs(ratio - 1.0) < noise_floor
        rule = f"single repeat: |ratio-1| {'<' if within else '>='} noise floor {noise_floor:.0%}"
    if within:
        call = "within noise"
    else:
        better = ratio > 1.0 if higher_is_better else ratio < 1.0
        call = "better" if better else "worse"
    return {"a": sa, "b": sb, "ratio": ratio, "within_noise": within, "verdict": call, "rule": rule,
            "higher_is_better": higher_is_better}


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|min)?\s*$", re.IGNORECASE)


def parse_duration(text: str | float | int) -> float:
    """'60s', '500ms', '2m', '1h' or a bare number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise UsageError(f"cannot read duration {text!r}", hint="write it like 60s, 500ms, 2m or 1h")
        number, unit = float(m.group(1)), (m.group(2) or "s").lower()
        value = number * {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[unit]
    if value < 0 or not math.isfinite(value):
        raise UsageError(f"duration {text!r} must be zero or positive")
    return value
