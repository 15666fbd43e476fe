"""Benchmark candidates fairly and pick one.

Benchmark: batch 1 (or the model's fixed batch), a warm-up per candidate, then
interleaved rounds (each round runs every candidate a few times, in a rotated
order) until the time budget is spent, so machine noise hits all candidates
alike. Reports p50/p90 (nearest rank, edgeml.stats.percentile) and mean in ms over all timed runs. Candidates over 5x slower
than the fastest after warm-up are screened out of the rounds.

Selection: where this host executes the target, the fastest passing candidate
by p50; when others are within ``FINALIST_MARGIN`` of it, those finalists are timed
again, interleaved, for twice as long, and that second measurement decides. Otherwise (cross targets) the documented static order ``STATIC_ORDER``:
precision int8 > fp16 = bf16 > fp32, then the order of backends in the target file,
and an untuned TVM build (recipe ``tuned`` false) after every other backend.
When no candidate runs on this host at all (an OpenCL / Intel GPU target), none
has a measured accuracy, and int8 goes last: fp16 = bf16 > fp32 > int8.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from edgeml.backends.base import CandidateSkipped  # noqa: F401 - re-exported for callers of the old place
from edgeml.stats import percentile


PRECISION_RANK = {"int8": 0, "fp16": 1, "bf16": 1, "fp32": 2}
UNVERIFIED_PRECISION_RANK = {"fp16": 0, "bf16": 0, "fp32": 1, "int8": 2}
SCREEN_FACTOR = 5.0
STATIC_ORDER = ("precision: int8 > fp16 = bf16 > fp32; then the target file's backend order; "
                "untuned TVM builds last")
UNVERIFIED_ORDER = ("precision: fp16 = bf16 > fp32 > int8 (int8 needs a measured accuracy); then the target file's "
                    "backend order; untuned TVM builds last")


class _CallableTimer:
    """Times a zero-argument callable in this process (the benchmark's own runners and tests)."""

    def __init__(self, fn: Callable[[], Any], clock: Callable[[], float]):
        self.fn, self.clock = fn, clock

    def _once(self) -> float:
        t0 = self.clock()
        self.fn()
        return self.clock() - t0

    def warmup(self, count: int, max_s: float) -> list[float]:
        self.fn()
        times: list[float] = []
        while len(times) < count and sum(times) < max_s:
            times.append(self._once())
        return times

    def timed(self, reps: int) -> list[float]:
        # Untimed settle call: the previous candidate's runtime may still hold the cores
        # (ONNX Runtime's worker threads spin after a run), which would bias against whoever runs next.
        self.fn()
        return [self._once() for _ in range(reps)]


def benchmark(runners: dict[str, Any], seconds: float = 3.0, warmup: int = 3,
              min_rounds: int = 5, max_runs: int = 2000, screen_factor: float = SCREEN_FACTOR,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """``runners`` maps label -> a zero-argument callable running one inference, or a timer with
    ``warmup(count, max_s)`` and ``timed(reps)`` (a candidate in a worker process times itself there,
    so the pipe to it is never in a timed interval).

    Each candidate runs once untimed (cold), then up to ``warmup`` timed warm-up
    runs (at most ~1 s). A candidate whose warm-up median is over
    ``screen_factor`` times the fastest one's is screened out: it cannot win, so
    its figures are the warm-up runs (``"screened": true``) and the rounds are
    spent on the contenders.
    """
    if not runners:
        return {}
    timers = {label: r if hasattr(r, "timed") else _CallableTimer(r, clock) for label, r in runners.items()}
    warm = {label: list(timer.warmup(warmup, 1.0)) for label, timer in timers.items()}
    per_run = {label: max(float(np.median(t)), 1e-7) if t else 1e-7 for label, t in warm.items()}
    fastest = min(per_run.values())
    contenders = [label for label in runners if per_run[label] <= screen_factor * fastest]
    # Rounds of ~50 ms per candidate, at least one run each.
    reps = {label: max(1, min(50, int(0.05 / per_run[label]))) for label in contenders}
    samples: dict[str, list[float]] = {label: [] for label in contenders}
    start = clock()
    rounds = 0
    while True:
        shift = rounds % len(contenders)
        for label in contenders[shift:] + contenders[:shift]:
            samples[label].extend(timers[label].timed(reps[label]))
        rounds += 1
        elapsed = clock() - start
        if rounds >= min_rounds and (elapsed >= seconds or all(len(s) >= max_runs for s in samples.values())):
            break
        if elapsed >= 10 * seconds:  # very slow candidates: stop anyway
            break
    result: dict[str, dict[str, Any]] = {}
    for label in runners:
        screened = label not in samples
        ms = np.asarray(warm[label] if screened else samples[label]) * 1000.0
        p50 = percentile(ms, 50)
        result[label] = {"p50": round(p50, 4), "p90": round(percentile(ms, 90), 4),
                         "mean": round(float(ms.mean()), 4), "runs": int(ms.size),
                         "rounds": 0 if screened else rounds,
                         # the interquartile range relative to the median: how far apart two figures must be
                         # before they say more than this run's noise
                         "spread_pct": round(100.0 * (percentile(ms, 75) - percentile(ms, 25)) / max(p50, 1e-9), 1)}
        if screened:
            result[label]["screened"] = True
    return result


FINALIST_MARGIN = 0.10   # candidates within 10 % of the fastest p50 are timed again, longer, before one wins
MAX_FINALISTS = 3


def finalists(timings: dict[str, dict[str, Any]], margin: float = FINALIST_MARGIN,
              most: int = MAX_FINALISTS) -> list[str]:
    """Labels whose p50 is within ``margin`` of the fastest (at most ``most``, fastest first); one or none
    means the first measurement already separated the winner beyond the margin."""
    ranked = sorted((t["p50"], label) for label, t in timings.items() if not t.get("screened"))
    if not ranked:
        return []
    best = ranked[0][0]
    return [label for p50, label in ranked if p50 <= best * (1.0 + margin)][:most]


def static_rank(candidate: Any, backend_order: list[str], ranks: dict[str, int] = PRECISION_RANK) -> tuple:
    spec = candidate.spec
    untuned_tvm = spec.backend == "tvm" and not bool((candidate.recipe or {}).get("tuned", False))
    backend_pos = backend_order.index(spec.backend) if spec.backend in backend_order else len(backend_order)
    return (1 if untuned_tvm else 0, ranks.get(spec.precision, 9), backend_pos, candidate.index)


def select(passing: list[Any], *, measured: bool, backend_order: list[str],
           verified: bool = True) -> tuple[Any, dict[str, Any]]:
    """Return (chosen candidate, selection record for the manifest).

    ``verified=False``: no candidate could be run here, so none has a measured accuracy; then int8
    (whose accuracy must be measured, never assumed) comes last: fp16 > fp32 > int8.
    """
    if measured and verified and all(c.latency for c in passing):
        best = min(passing, key=lambda c: (c.latency["p50"], c.index))
        return best, {"method": "fastest-measured",
                      "reason": f"lowest p50 latency among {len(passing)} candidates within the accuracy tolerance"}
    if not verified:
        # A candidate whose indicative check on this host's own kernels lost too much accuracy goes last.
        best = min(passing, key=lambda c: (1 if getattr(c, "host_check", None) == "rejected" else 0,
                                           *static_rank(c, backend_order, UNVERIFIED_PRECISION_RANK)))
        return best, {"method": "static-order-unverified", "order": UNVERIFIED_ORDER,
                      "reason": "no candidate could be verified with the target's own code on this host, so "
                                "accuracy and speed on the target were not measured"}
    best = min(passing, key=lambda c: static_rank(c, backend_order))
    return best, {"method": "static-order", "order": STATIC_ORDER,
                  "reason": "this host cannot execute the target, so candidates were not timed"
                  if not measured else "benchmarking disabled"}
