"""LoadGen-style scenarios for ``edgeml bench`` (after MLPerf Inference LoadGen).

* single-stream: one query (one batch) at a time, the next issued when the last
  completes; latency percentiles; VALID needs the minimum duration and query count.
* multi-stream: each query carries ``samples_per_query`` samples (sent as one
  batch when axis 0 is dynamic); the metric is the p99 *query* latency.
* offline: all work available at once; ``concurrency`` workers run batches of
  ``--batch`` back to back; the metric is samples/s.
* server: queries arrive as a Poisson process at ``--target-qps`` (seeded RNG);
  latency is counted from the scheduled arrival, so queueing counts; VALID needs
  p99 <= ``--latency-bound-ms``; ``find_peak`` searches the highest QPS that holds it.

The clock (``Clock.now``/``Clock.sleep``) is injected so tests can drive the
scenarios with a fake clock. ``run_benchmark`` builds the result dict whose
schema is documented in docs/bench-schema.md.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeml.benchmarks import stats
from edgeml.benchmarks.sut import BenchTarget, Runner, open_target
from edgeml.errors import UsageError
from edgeml.registry import Registry

RESULT_SCHEMA = "edgeml.bench.result"
RESULT_SCHEMA_VERSION = 1

SCENARIOS = Registry(
    "scenario",
    [
        ("single-stream", "edgeml.benchmarks.loadgen:run_single_stream"),
        ("multi-stream", "edgeml.benchmarks.loadgen:run_multi_stream"),
        ("offline", "edgeml.benchmarks.loadgen:run_offline"),
        ("server", "edgeml.benchmarks.loadgen:run_server"),
    ],
)
HEADLINE = {  # the metric MLPerf reports for each scenario
    "single-stream": ("p90_ms", "ms", False),
    "multi-stream": ("p99_ms", "ms", False),
    "offline": ("samples_per_s", "samples/s", True),
    "server": ("queries_per_s", "queries/s", True),
}


@dataclass
class Clock:
    """Injected time. ``wait_until`` sleeps, then yields in a short spin for the last ``spin_s``
    (OS sleeps overshoot by ~0.1 ms; a fake clock uses ``spin_s=0``)."""

    now: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep
    spin_s: float = 0.0002

    def wait_until(self, t: float) -> None:
        while (left := t - self.now()) > 0:
            self.sleep(left - self.spin_s if left > self.spin_s else 0)


@dataclass
class BenchSettings:
    scenario: str = "single-stream"
    duration_s: float = 10.0          # minimum measured duration of each repeat
    min_queries: int = 64             # minimum queries of each repeat
    max_duration_s: float | None = None  # hard cap per repeat (a run cut short is INVALID)
    batch: int = 1
    threads: int | None = None
    repeats: int = 3
    warmup_s: float = 1.0
    warmup_queries: int = 5
    samples_per_query: int = 8        # multi-stream
    concurrency: int = 1              # offline / server workers
    target_qps: float | None = None   # server
    latency_bound_ms: float | None = None  # server (default 100 ms)
    find_peak: bool = False           # server: search the highest QPS under the bound
    search_steps: int = 6
    probe_duration_s: float | None = None
    sweep: bool = True                # throughput against concurrency
    sweep_levels: tuple[int, ...] | None = None
    sweep_duration_s: float | None = None
    seed: int = 0
    max_trace_points: int = 4000
    input_shapes: dict[str, tuple[int, ...]] | None = None  # --input-shape: fills dynamic non-batch axes
    data: str | None = None           # --data FILE.npz: real inputs keyed by input name

    def check(self) -> "BenchSettings":
        if self.scenario not in SCENARIOS:
            raise UsageError(f"unknown scenario '{self.scenario}'", hint=f"choose one of: {', '.join(SCENARIOS.names())}")
        for name in ("batch", "repeats", "samples_per_query", "concurrency", "search_steps"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.min_queries < 0 or self.duration_s < 0:
            raise UsageError("--duration and --min-queries must not be negative")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.scenario == "server":
            if self.target_qps is None and not self.find_peak:
                raise UsageError("the server scenario needs --target-qps Q (or --find-peak to search for it)")
            if self.target_qps is not None and self.target_qps <= 0:
                raise UsageError(f"--target-qps must be positive, got {self.target_qps}")
            if self.latency_bound_ms is None:
                self.latency_bound_ms = 100.0
        if self.latency_bound_ms is not None and self.latency_bound_ms <= 0:
            raise UsageError(f"--latency-bound-ms must be positive, got {self.latency_bound_ms}")
        self._check_input_shapes()
        return self

    def _check_input_shapes(self) -> None:
        """Axis 0 of --input-shape is the batch: it sets --batch when that is left at 1, else must agree."""
        from edgeml.benchmarks.sut import shapes_batch

        if not self.input_shapes:
            return
        batch = shapes_batch(self.input_shapes)
        if batch is None or batch == self.batch:
            return
        if self.batch != 1:
            raise UsageError(f"--input-shape gives batch {batch} (axis 0) but --batch is {self.batch}",
                             hint="make them agree, or leave --batch out")
        self.batch = batch

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sweep_levels"] = list(self.sweep_levels) if self.sweep_levels else None
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()} if self.input_shapes else None
        return d


@dataclass
class RepeatRun:
    """One measured run: per-query start times (s, from the benchmark origin) and latencies (ms)."""

    starts_s: np.ndarray
    latencies_ms: np.ndarray
    duration_s: float
    queries: int
    samples: int
    verdict: stats.Verdict = field(default_factory=lambda: stats.Verdict(stats.VALID))
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        lat = stats.summarize(self.latencies_ms)
        d = self.duration_s or float("nan")
        return {"duration_s": self.duration_s, "queries": self.queries, "samples": self.samples,
                "latency_ms": lat, "queries_per_s": self.queries / d, "samples_per_s": self.samples / d,
                "verdict": self.verdict.result, "reasons": self.verdict.reasons, **self.extra}


# ----------------------------------------------------------------------------- closed loop

def closed_loop(runners: list[Runner], feeds: list[dict], clock: Clock, *, origin: float, duration_s: float,
                min_queries: int, max_duration_s: float | None = None, calls_per_query: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """Workers issue queries back to back until both minimums are met (or the cap).

    One worker runs inline (deterministic under a fake clock); more run in threads.
    Returns (starts_s from origin, latencies_ms, measured duration_s).
    """
    lock = threading.Lock()
    starts: list[float] = []
    lats: list[float] = []
    begin = clock.now()
    stop = threading.Event()

    def done(now: float) -> bool:
        elapsed = now - begin
        if max_duration_s is not None and elapsed >= max_duration_s:
            return True
        return elapsed >= duration_s and len(lats) >= min_queries

    def work(runner: Runner, offset: int) -> None:
        i = offset
        while not stop.is_set():
            t0 = clock.now()
            for _ in range(calls_per_query):
                runner(feeds[i % len(feeds)])
                i += 1
            t1 = clock.now()
            with lock:
                starts.append(t0 - origin)
                lats.append((t1 - t0) * 1e3)
                if done(t1):
                    stop.set()

    if len(runners) == 1:
        work(runners[0], 0)
    else:
        threads = [threading.Thread(target=work, args=(r, k), daemon=True) for k, r in enumerate(runners)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    duration = clock.now() - begin
    order = np.argsort(starts, kind="stable")
    return np.asarray(starts)[order], np.asarray(lats)[order], duration


def _rules(settings: BenchSettings, **extra) -> stats.VerdictRules:
    return stats.VerdictRules(min_duration_s=settings.duration_s, min_queries=settings.min_queries, **extra)


def _closed_run(target: BenchTarget, settings: BenchSettings, clock: Clock, rng: np.random.Generator, origin: float,
                *, workers: int, batch: int, calls_per_query: int = 1, samples_per_query: int | None = None) -> RepeatRun:
    feeds = target.make_feeds(batch, rng)
    starts, lats, duration = closed_loop(target.runners(workers), feeds, clock, origin=origin,
                                         duration_s=settings.duration_s, min_queries=settings.min_queries,
                                         max_duration_s=settings.max_duration_s, calls_per_query=calls_per_query)
    n = len(lats)
    spq = samples_per_query if samples_per_query is not None else batch
    run = RepeatRun(starts, lats, duration, n, n * spq)
    run.verdict = stats.verdict(_rules(settings), duration_s=duration, queries=n, latencies_ms=lats)
    return run


def run_single_stream(target, settings, clock, rng, origin) -> RepeatRun:
    return _closed_run(target, settings, clock, rng, origin, workers=1, batch=target.batch_for(settings.batch))


def run_multi_stream(target, settings, clock, rng, origin) -> RepeatRun:
    spq = settings.samples_per_query
    dynamic = any(s.shape and s.shape[0] is None for s in target.inputs)
    if dynamic:
        run = _closed_run(target, settings, clock, rng, origin, workers=1, batch=spq, samples_per_query=spq)
    else:
        static = target.batch_for(1)
        calls = max(1, math.ceil(spq / static))
        run = _closed_run(target, settings, clock, rng, origin, workers=1, batch=static,
                          calls_per_query=calls, samples_per_query=calls * static)
    run.extra["samples_per_query"] = run.samples // max(1, run.queries)
    return run


def run_offline(target, settings, clock, rng, origin) -> RepeatRun:
    batch = target.batch_for(settings.batch)
    run = _closed_run(target, settings, clock, rng, origin, workers=settings.concurrency, batch=batch)
    run.extra["concurrency"] = settings.concurrency
    return run


# ----------------------------------------------------------------------------- server (open loop)

def server_run(target: BenchTarget, settings: BenchSettings, clock: Clock, rng: np.random.Generator, origin: float,
               *, qps: float, duration_s: float, min_queries: int) -> RepeatRun:
    """Queries arrive on a Poisson schedule and wait in one FIFO queue for ``concurrency`` workers.

    No dispatcher thread: the next free worker takes the next arrival, waiting until its scheduled
    time if it is still in the future (a FIFO queue with N servers). Latency counts from the
    scheduled arrival, so time spent queued counts. One worker runs inline (exact under a fake clock).
    """
    batch = target.batch_for(settings.batch)
    feeds = target.make_feeds(batch, rng)
    schedule = stats.poisson_schedule(qps, rng=rng, duration_s=duration_s, count=min_queries)
    if settings.max_duration_s is not None:
        schedule = schedule[schedule <= settings.max_duration_s] if schedule[0] <= settings.max_duration_s else schedule[:1]
    lock = threading.Lock()
    lats = np.full(len(schedule), np.nan)
    nxt = [0]
    begin = clock.now()

    def work(runner: Runner) -> None:
        while True:
            with lock:
                i = nxt[0]
                if i >= len(schedule):
                    return
                nxt[0] += 1
            clock.wait_until(begin + schedule[i])
            runner(feeds[i % len(feeds)])
            lats[i] = (clock.now() - begin - schedule[i]) * 1e3

    runners = target.runners(settings.concurrency)
    if len(runners) == 1:
        work(runners[0])
    else:
        threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    duration = clock.now() - begin
    issued = len(schedule)
    span = float(schedule[-1])
    offered = issued / span if span > 0 else qps
    completed = issued / duration if duration > 0 else 0.0
    run = RepeatRun(begin + schedule - origin, lats, duration, issued, issued * batch)
    rules = stats.VerdictRules(min_duration_s=duration_s, min_queries=min_queries,
                               latency_bound_ms=settings.latency_bound_ms, target_qps=offered)
    run.verdict = stats.verdict(rules, duration_s=duration, queries=issued, latencies_ms=lats, completed_qps=completed)
    run.extra.update({"target_qps": qps, "offered_qps": offered, "completed_qps": completed,
                      "latency_bound_ms": settings.latency_bound_ms, "concurrency": settings.concurrency})
    return run


def run_server(target, settings, clock, rng, origin) -> RepeatRun:
    return server_run(target, settings, clock, rng, origin, qps=float(settings.target_qps),
                      duration_s=settings.duration_s, min_queries=settings.min_queries)


def find_peak_qps(target: BenchTarget, settings: BenchSettings, clock: Clock, rng: np.random.Generator, origin: float,
                  *, capacity_qps: float) -> dict[str, Any]:
    """Bisect for the highest Poisson QPS whose p99 stays under the latency bound."""
    probe_s = settings.probe_duration_s or max(0.5, min(settings.duration_s, 5.0))
    min_q = 50
    probes: list[dict[str, Any]] = []

    def probe(q: float) -> bool:
        run = server_run(target, settings, clock, rng, origin, qps=q, duration_s=probe_s, min_queries=min_q)
        lat = stats.summarize(run.latencies_ms)
        probes.append({"qps": q, "completed_qps": run.extra["completed_qps"], "p50_ms": lat["p50"],
                       "p99_ms": lat["p99"], "valid": run.verdict.valid, "reasons": run.verdict.reasons})
        return run.verdict.valid

    lo, best = 0.0, None
    top = max(1.0, 1.2 * capacity_qps)
    hi: float | None = None  # the lowest QPS that failed, once one did
    for _ in range(3):  # bracket: grow while the top still holds
        if not probe(top):
            hi = top
            break
        lo, best, top = top, top, top * 2
    if hi is not None:
        for _ in range(settings.search_steps):
            mid = (lo + hi) / 2 if lo > 0 else hi / 2
            if probe(mid):
                lo, best = mid, mid
            else:
                hi = mid
    return {"peak_qps": best, "latency_bound_ms": settings.latency_bound_ms, "probe_duration_s": probe_s,
            "capacity_estimate_qps": capacity_qps, "probes": probes}


# ----------------------------------------------------------------------------- sweep and warm-up

def concurrency_sweep(target: BenchTarget, settings: BenchSettings, clock: Clock, rng: np.random.Generator,
                      origin: float, cores: int) -> list[dict[str, Any]]:
    """Closed-loop throughput at several worker counts (the 'throughput vs concurrency' plot)."""
    levels = settings.sweep_levels or tuple(sorted({1, 2, max(1, cores), 2 * max(1, cores)}))
    per = settings.sweep_duration_s or max(0.25, min(2.0, settings.duration_s / 4))
    batch = target.batch_for(settings.batch)
    feeds = target.make_feeds(batch, rng)
    rows = []
    for n in levels:
        _, lats, duration = closed_loop(target.runners(n), feeds, clock, origin=origin, duration_s=per, min_queries=n)
        lat = stats.summarize(lats)
        rows.append({"concurrency": n, "duration_s": duration, "queries": len(lats),
                     "samples_per_s": len(lats) * batch / duration if duration else float("nan"),
                     "p50_ms": lat["p50"], "p99_ms": lat["p99"]})
    return rows


def warm_up(target: BenchTarget, settings: BenchSettings, clock: Clock, rng: np.random.Generator, origin: float) -> dict[str, Any]:
    """Runs excluded from the statistics but reported."""
    batch = target.batch_for(settings.batch)
    feeds = target.make_feeds(batch, rng)
    _, lats, duration = closed_loop(target.runners(1), feeds, clock, origin=origin,
                                    duration_s=settings.warmup_s, min_queries=settings.warmup_queries)
    out = {"duration_s": duration, "queries": int(len(lats))}
    if len(lats):
        out.update({"first_ms": float(lats[0]), "p50_ms": stats.percentile(lats, 50), "max_ms": float(lats.max())})
    return out


# ----------------------------------------------------------------------------- orchestration

def _trace(runs: list[RepeatRun], max_points: int) -> dict[str, Any]:
    starts = np.concatenate([r.starts_s for r in runs]) if runs else np.array([])
    lats = np.concatenate([r.latencies_ms for r in runs]) if runs else np.array([])
    repeat = np.concatenate([np.full(len(r.latencies_ms), i) for i, r in enumerate(runs)]) if runs else np.array([])
    stride = max(1, math.ceil(len(lats) / max_points)) if len(lats) else 1
    return {"stride": stride, "t_s": [round(float(x), 6) for x in starts[::stride]],
            "latency_ms": [round(float(x), 6) for x in lats[::stride]], "repeat": [int(x) for x in repeat[::stride]]}


def run_benchmark(model: str | Path | BenchTarget, settings: BenchSettings | None = None, *, clock: Clock | None = None,
                  progress: Callable[[str], None] | None = None, system: dict[str, Any] | None = None,
                  **open_kw) -> dict[str, Any]:
    """Open ``model``, warm up, run the scenario ``repeats`` times, return the result dict."""
    from edgeml.benchmarks.sysinfo import peak_rss_mb, system_info
    from edgeml.runtime.model import resident_memory_mb

    settings = (settings or BenchSettings()).check()
    clock = clock or Clock()
    say = progress or (lambda msg: None)
    system = system if system is not None else system_info()
    rng = np.random.default_rng(settings.seed)
    own = not isinstance(model, BenchTarget)
    target = model if isinstance(model, BenchTarget) else open_target(
        model, threads=settings.threads, clock=clock.now, rng=rng, input_shapes=settings.input_shapes,
        data=Path(settings.data) if settings.data else None, **open_kw)
    try:
        origin = clock.now()
        say(f"warm-up ({settings.warmup_s:g}s / {settings.warmup_queries} queries)")
        warm = warm_up(target, settings, clock, rng, origin)
        search = None
        if settings.scenario == "server" and settings.find_peak:
            capacity = settings.concurrency * 1000.0 / max(warm.get("p50_ms") or 1.0, 1e-6)
            say(f"searching the peak QPS under p99 <= {settings.latency_bound_ms:g} ms")
            search = find_peak_qps(target, settings, clock, np.random.default_rng([settings.seed, 99]), origin,
                                   capacity_qps=capacity)
            if settings.target_qps is None:
                if search["peak_qps"] is None:
                    raise UsageError(f"no QPS tried held p99 <= {settings.latency_bound_ms:g} ms",
                                     hint="raise --latency-bound-ms or use fewer --threads")
                settings.target_qps = search["peak_qps"]
        fn = SCENARIOS.get(settings.scenario)
        runs = []
        for r in range(settings.repeats):
            say(f"{settings.scenario} repeat {r + 1}/{settings.repeats}")
            runs.append(fn(target, settings, clock, np.random.default_rng([settings.seed, r]), origin))
        sweep = None
        if settings.sweep:
            cores = (system.get("cpu") or {}).get("usable_cores") or 1
            say("concurrency sweep")
            sweep = concurrency_sweep(target, settings, clock, np.random.default_rng([settings.seed, 7]), origin, cores)
        memory = dict(target.memory)
        memory["rss_after_run_mb"] = round(resident_memory_mb(), 1)
        memory["peak_rss_mb"] = round(peak_rss_mb() or 0.0, 1)
        return build_result(target, settings, runs, warm, sweep, search, memory, system)
    finally:
        if own:
            target.close()


def build_result(target: BenchTarget, settings: BenchSettings, runs: list[RepeatRun], warm: dict, sweep, search,
                 memory: dict, system: dict) -> dict[str, Any]:
    import edgeml

    all_lat = np.concatenate([r.latencies_ms for r in runs])
    per = [dict(index=i, **r.metrics()) for i, r in enumerate(runs)]
    total_d = sum(r.duration_s for r in runs)
    reasons = [f"repeat {p['index'] + 1}: {why}" for p in per for why in p["reasons"]]
    spread_keys = {"p50_ms": lambda p: p["latency_ms"]["p50"], "p90_ms": lambda p: p["latency_ms"]["p90"],
                   "p99_ms": lambda p: p["latency_ms"]["p99"], "mean_ms": lambda p: p["latency_ms"]["mean"],
                   "queries_per_s": lambda p: p["queries_per_s"], "samples_per_s": lambda p: p["samples_per_s"]}
    spread = {k: stats.spread([f(p) for p in per]) for k, f in spread_keys.items()}
    head_key, head_unit, higher = HEADLINE[settings.scenario]
    metrics: dict[str, Any] = {
        "latency_ms": stats.summarize(all_lat), "queries": sum(r.queries for r in runs),
        "samples": sum(r.samples for r in runs), "duration_s": total_d,
        "queries_per_s": sum(r.queries for r in runs) / total_d if total_d else None,
        "samples_per_s": sum(r.samples for r in runs) / total_d if total_d else None,
        "batch": target.batch_for(settings.batch),
        "headline": {"metric": head_key, "unit": head_unit, "higher_is_better": higher,
                     "value": spread[head_key]["median"], "spread": spread[head_key]},
    }
    if settings.scenario == "server":
        metrics["server"] = {k: per[-1].get(k) for k in ("target_qps", "latency_bound_ms")}
        metrics["server"]["completed_qps"] = stats.spread([p["completed_qps"] for p in per])
    if settings.scenario == "multi-stream":
        metrics["samples_per_query"] = per[0].get("samples_per_query")
    dynamic = any(s.shape and s.shape[0] is None for s in target.inputs)
    fed = settings.samples_per_query if settings.scenario == "multi-stream" and dynamic else metrics["batch"]
    used = target.inputs_used(fed)
    seq = used["sequence_length"]
    if seq:  # token inputs: throughput in tokens (padding included), as transformer benchmarks report it
        metrics["sequence_length"] = seq
        metrics["tokens_per_s"] = metrics["samples_per_s"] * seq if metrics["samples_per_s"] else None
        spread["tokens_per_s"] = stats.spread([p["samples_per_s"] * seq for p in per])
    return {
        "schema": RESULT_SCHEMA, "schema_version": RESULT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "edgeml bench", "version": edgeml.__version__},
        "scenario": settings.scenario,
        "verdict": {"result": stats.INVALID if reasons else stats.VALID, "reasons": reasons},
        "model": target.info, "settings": settings.to_dict(), "inputs_used": used["inputs"], "metrics": metrics, "repeats": per, "spread": spread,
        "warmup": warm, "cold_start": target.cold_start, "memory": memory,
        "concurrency_sweep": sweep, "qps_search": search,
        "latency_cdf": stats.cdf_points(all_lat), "trace": _trace(runs, settings.max_trace_points),
        "system": system,
    }
