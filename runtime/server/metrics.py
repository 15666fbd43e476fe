"""Counters and histograms per model version, rendered as Prometheus text.

Everything is a raw, mergeable counter (bucket counts, sums): the fleet agent
adds them up across devices; percentiles are never averaged here.
Updated from the server's event-loop thread only; reads from other threads see
ints that are at worst one request stale.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, fields

from edgeml.stats import Histogram, bound_key

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS_MS", "Histogram", "ModelStats", "ResilienceSample",
           "render_prometheus", "render_resilience"]

# A superset of the fleet protocol's edges (edgeml.fleet.protocol.LATENCY_BUCKETS_MS), so the
# agent can read its buckets straight out of these cumulative counts.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 50.0, 100.0, 200.0, 500.0,
                      1000.0, 2000.0, 5000.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class LoopHistogram(Histogram):
    """A ``Histogram`` written by one thread only (the server's event loop): ``observe`` takes no lock.

    Readers on the loop (``/metrics``, ``stats()``) see consistent counts; ``cumulative`` still copies under
    the lock, which writers here never hold, so a read from another thread is at worst one request stale."""

    __slots__ = ()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class ModelStats:
    """Telemetry of one loaded model version (written on the server's event-loop thread only)."""

    __slots__ = ("requests", "failures", "rejected", "latency_ms", "queue_ms", "compute_ms", "batch_size", "rows")

    def __init__(self) -> None:
        self.requests = 0            # answered inference requests (any status)
        self.failures = 0            # backend / server failures (5xx)
        self.rejected = 0            # bad input (4xx)
        self.latency_ms = LoopHistogram(LATENCY_BUCKETS_MS)
        self.queue_ms = LoopHistogram(LATENCY_BUCKETS_MS)
        self.compute_ms = LoopHistogram(LATENCY_BUCKETS_MS)   # per batch run
        self.batch_size = LoopHistogram(BATCH_BUCKETS)        # rows per batch run
        self.rows = 0

    def record(self, status: int, latency_ms: float) -> None:
        self.requests += 1
        if status >= 400:
            if status >= 500:
                self.failures += 1
            else:
                self.rejected += 1
        h = self.latency_ms
        h.counts[bisect_left(h.bounds, latency_ms)] += 1
        h.sum += latency_ms

    def to_dict(self) -> dict:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "rejected": self.rejected,
            "latency_buckets_ms": dict(self.latency_ms.cumulative()),
            "latency_sum_ms": self.latency_ms.sum,
            "latency_count": self.latency_ms.count,
            "batch_sizes": dict(self.batch_size.cumulative()),
            "batches": self.batch_size.count,
            "rows": self.rows,
            "queue_ms_sum": self.queue_ms.sum,
            "queue_ms_buckets": dict(self.queue_ms.cumulative()),
            "compute_ms_sum": self.compute_ms.sum,
            "compute_ms_buckets": dict(self.compute_ms.cumulative()),
        }


def _labels(**kw: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in kw.items())
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _hist_lines(name: str, h: Histogram, labels: dict[str, str], scale: float = 1.0) -> list[str]:
    lines = []
    for le, c in h.cumulative().items():   # edgeml.stats.Histogram: {le text: cumulative count}
        le_s = le if le == "+Inf" else bound_key(float(le) * scale)
        lines.append(f"{name}_bucket{_labels(**labels, le=le_s)} {c}")
    lines.append(f"{name}_sum{_labels(**labels)} {h.sum * scale!r}")
    lines.append(f"{name}_count{_labels(**labels)} {h.count}")
    return lines


def render_prometheus(models: list[tuple[str, str, bool, ModelStats]], http_codes: dict[int, int], inflight: int) -> bytes:
    """Prometheus text exposition format 0.0.4."""
    out = [
        "# HELP edgeml_http_responses_total HTTP responses by status code.",
        "# TYPE edgeml_http_responses_total counter",
    ]
    out += [f'edgeml_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(http_codes.items())]
    out += ["# HELP edgeml_inflight_requests Requests received and not yet answered.",
            "# TYPE edgeml_inflight_requests gauge", f"edgeml_inflight_requests {inflight}"]
    sections = [
        ("edgeml_model_ready", "gauge", "1 when the model version is loaded and warmed up."),
        ("edgeml_inference_requests_total", "counter", "Inference requests answered, per model version."),
        ("edgeml_inference_failures_total", "counter", "Inference requests that failed in the backend or server (5xx)."),
        ("edgeml_inference_rejected_total", "counter", "Inference requests rejected as bad input (4xx)."),
    ]
    for metric, kind, help_ in sections:
        out += [f"# HELP {metric} {help_}", f"# TYPE {metric} {kind}"]
        for name, version, ready, st in models:
            value = {"edgeml_model_ready": int(ready), "edgeml_inference_requests_total": st.requests,
                     "edgeml_inference_failures_total": st.failures, "edgeml_inference_rejected_total": st.rejected}[metric]
            out.append(f"{metric}{_labels(model=name, version=version)} {value}")
    hists = [
        ("edgeml_request_duration_seconds", "End-to-end request latency (parse, queue, compute, encode).", "latency_ms", 1e-3),
        ("edgeml_queue_duration_seconds", "Time a request waited for its batch to start.", "queue_ms", 1e-3),
        ("edgeml_compute_duration_seconds", "Backend run time per batch.", "compute_ms", 1e-3),
        ("edgeml_batch_size", "Rows per backend run (dynamic batching).", "batch_size", 1.0),
    ]
    for metric, help_, attr, scale in hists:
        out += [f"# HELP {metric} {help_}", f"# TYPE {metric} histogram"]
        for name, version, _ready, st in models:
            out += _hist_lines(metric, getattr(st, attr), {"model": name, "version": version}, scale)
    return ("\n".join(out) + "\n").encode()


@dataclass(frozen=True)
class ResilienceSample:
    """One model version's admission, breaker, cache and fallback counters (``LoadedModel.resilience``)."""

    breaker_state: str              # closed | open | half_open | off
    breaker_opens: int
    admitted: int                   # requests admitted and not answered
    refused_inflight: int           # 429: over max in flight
    refused_queue: int              # 503: over the queue-time limit
    cache_hits: int
    cache_misses: int
    cache_evictions: int
    cache_bytes: int
    cache_entries: int
    fallback_active: bool
    fallback_switches: int
    fallback_requests: int


_RESILIENCE = {   # field -> (metric, type, help)
    "breaker_opens": ("edgeml_breaker_opens_total", "counter", "Times the model's circuit breaker opened."),
    "admitted": ("edgeml_admitted_requests", "gauge", "Requests admitted to the model and not yet answered."),
    "refused_inflight": ("edgeml_admission_refused_total{reason=\"inflight\"}", "counter",
                         "Requests refused by admission control (429 in flight, 503 queue time)."),
    "refused_queue": ("edgeml_admission_refused_total{reason=\"queue_time\"}", "counter", ""),
    "cache_hits": ("edgeml_cache_hits_total", "counter", "Response cache hits."),
    "cache_misses": ("edgeml_cache_misses_total", "counter", "Response cache misses."),
    "cache_evictions": ("edgeml_cache_evictions_total", "counter", "Response cache entries evicted (LRU)."),
    "cache_bytes": ("edgeml_cache_bytes", "gauge", "Bytes held by the response cache."),
    "cache_entries": ("edgeml_cache_entries", "gauge", "Entries in the response cache."),
    "fallback_active": ("edgeml_fallback_active", "gauge", "1 while requests go to the model's fallback."),
    "fallback_switches": ("edgeml_fallback_switches_total", "counter", "Switches between primary and fallback."),
    "fallback_requests": ("edgeml_fallback_requests_total", "counter", "Requests answered by the fallback."),
}


def render_resilience(models: list[tuple[str, str, ResilienceSample]]) -> bytes:
    """The breaker state (0 closed, 1 open, 2 half-open, -1 off) and the counters above, per model version."""
    from edgeml.runtime.server.breaker import STATE_CODES

    out = ["# HELP edgeml_breaker_state Circuit breaker: 0 closed, 1 open, 2 half-open, -1 off.",
           "# TYPE edgeml_breaker_state gauge"]
    out += [f"edgeml_breaker_state{_labels(model=n, version=v)} {STATE_CODES.get(r.breaker_state, -1)}"
            for n, v, r in models]
    for f in fields(ResilienceSample):
        if f.name == "breaker_state":
            continue
        metric, kind, help_ = _RESILIENCE[f.name]
        base, _, extra = metric.partition("{")
        if help_:
            out += [f"# HELP {base} {help_}", f"# TYPE {base} {kind}"]
        for n, v, r in models:
            labels = _labels(model=n, version=v)
            if extra:
                labels = labels[:-1] + "," + extra
            out.append(f"{base}{labels} {int(getattr(r, f.name))}")
    return ("\n".join(out) + "\n").encode()
