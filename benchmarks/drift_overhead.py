"""Serving throughput with drift sampling on vs off, side by side, on the MLP and MobileNetV2.

    python -m edgeml.benchmarks.drift_overhead [--seconds 1] [--rounds 12] [--rate 0.05] [--concurrency 4]
                                              [--models mlp,mobilenetv2] [--json]

One in-process ``ModelServer`` (the real v2 HTTP server) per model, closed-loop keep-alive HTTP
clients. Each round runs three arms back to back: sampling off, off again (an A/A control) and on,
the order reversed every other round so slow drift of the machine hits all alike. Reported: the
median of the rounds' on/off throughput ratios and their range (each ratio compares runs seconds
apart); the same for off-again/off, which shows how far two identical arms differ on this machine
(on a busy shared machine, more than 3 %); and the cost accounted for directly, which that noise
does not blur: the per-request hook timed alone (us per call) times the "on" request rate, plus
the sampler worker's own CPU time per second of the "on" runs. This process's CPU per request
(server and clients) off and on is printed too.
"On" is exactly what the agent installs: ``server.observer`` -> ``Monitor.offer`` with the
model's profile at ``--rate`` (default: the agent's default, edgeml.runtime.drift.DEFAULT_RATE).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _body(name: str, rows: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.astype(np.float32).ravel().tolist()}]}).encode()


def _load(port: int, path: str, body: bytes, seconds: float, concurrency: int) -> tuple[float, float]:
    """(requests per second, CPU seconds of this process per request: server and clients together)."""
    counts = [0] * concurrency
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    t0, cpu0 = time.monotonic(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = max(1, sum(counts))
    return sum(counts) / (time.monotonic() - t0), (time.process_time() - cpu0) / done


ARMS = ("off", "off again", "on")   # "off again": an A/A control, the noise floor of the comparison


def measure(model: str, *, seconds: float, rounds: int, rate: float, concurrency: int, work: Path) -> dict[str, Any]:
    from edgeml.benchmarks.serve_bench import build_mlp, build_mobilenet
    from edgeml.compiler.profile import build_profile
    from edgeml.runtime import drift as D
    from edgeml.runtime.server import ModelServer, ServerConfig

    folder = work / model
    folder.mkdir(parents=True, exist_ok=True)
    _, pkg, rows = build_mlp(folder) if model == "mlp" else build_mobilenet(folder, threads=1)
    server = ModelServer(ServerConfig(port=0, configure_logs=False, cache_dir=folder / "cache"))
    port = server.start()[1]
    try:
        lm = server.load(pkg, warmup=True)
        inp, out = lm.model.inputs[0].name, lm.model.outputs[0].name
        ref_out = lm.model.predict({inp: rows})
        manifest = {"name": lm.name, "version": lm.version,
                    "drift_profile": build_profile(ref_out, {inp: rows}, [out])}
        monitor = D.Monitor(rate)
        monitor.attach(lm.name, lm.version, manifest)
        hook = lambda m, i, o: monitor.offer(m.name, m.version, i, o)  # noqa: E731 - what the agent installs
        body, path = _body(inp, rows[:1]), f"/v2/models/{lm.name}/infer"
        _load(port, path, body, min(seconds, 2.0), concurrency)       # warm up
        runs: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
        for r in range(rounds):
            for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):        # alternate the order: no arm always first
                server.observer = hook if arm == "on" else None
                runs[arm].append(_load(port, path, body, seconds, concurrency))
        server.observer = None
        worker_s = monitor.busy_s()          # before flush: only what the worker did while serving
        monitor.flush()
        window = monitor.windows()
        monitor.close()
        hook_s = _hook_seconds(D.Monitor(rate), manifest, lm, {inp: rows[:1]}, {k: v[:1] for k, v in ref_out.items()})
    finally:
        server.stop(drain_timeout=2)
    return _summary(model, rate, rounds, seconds, concurrency, runs, worker_s, hook_s, window)


def _hook_seconds(monitor: Any, manifest: dict[str, Any], lm: Any, feeds: dict[str, Any], outs: dict[str, Any],
                  calls: int = 100_000) -> float:
    """Seconds of one call of the per-request hook (random draw; at ``rate`` a list append), timed alone."""
    monitor.attach(lm.name, lm.version, manifest)
    t0 = time.perf_counter()
    for _ in range(calls):
        monitor.offer(lm.name, lm.version, feeds, outs)
    spent = (time.perf_counter() - t0) / calls
    monitor.close()
    return spent


def _paired(runs: dict[str, list[tuple[float, float]]], arm: str, col: int = 0) -> list[float]:
    return sorted(a[col] / b[col] for a, b in zip(runs[arm], runs["off"]))


def _summary(model: str, rate: float, rounds: int, seconds: float, concurrency: int,
             runs: dict[str, list[tuple[float, float]]], worker_s: float, hook_s: float,
             window: list[dict[str, Any]]) -> dict[str, Any]:
    on, aa = _paired(runs, "on"), _paired(runs, "off again")
    rps = {arm: statistics.median(x[0] for x in runs[arm]) for arm in ARMS}
    cpu = {arm: statistics.median(x[1] for x in runs[arm]) for arm in ARMS}
    worker_share = worker_s / (rounds * seconds)
    # the cost that can be accounted for: the hook's time per request plus the worker's CPU share,
    # both taken from a server whose interpreter (one GIL) they share
    accounted = hook_s * rps["on"] + worker_share
    return {"model": model, "rate": rate, "off_rps": round(rps["off"], 1), "on_rps": round(rps["on"], 1),
            "ratio": round(statistics.median(on), 4), "overhead_percent": round(100 * (1 - statistics.median(on)), 2),
            "ratio_range": [round(on[0], 4), round(on[-1], 4)],
            "aa_ratio": round(statistics.median(aa), 4), "aa_range": [round(aa[0], 4), round(aa[-1], 4)],
            "hook_us": round(1e6 * hook_s, 2), "worker_cpu_percent": round(100 * worker_share, 2),
            "accounted_percent": round(100 * accounted, 2),
            "cpu_us_per_request_off": round(1e6 * cpu["off"], 1), "cpu_us_per_request_on": round(1e6 * cpu["on"], 1),
            "rounds": rounds, "seconds": seconds, "concurrency": concurrency,
            "rows_sampled": sum(row["n"] for row in window), "dropped": sum(row["dropped"] for row in window),
            "each": {arm: [round(x[0], 1) for x in runs[arm]] for arm in ARMS}}


def main(argv: list[str] | None = None) -> int:
    from edgeml.runtime.drift import DEFAULT_RATE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--rate", type=float, default=DEFAULT_RATE)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--models", default="mlp,mobilenetv2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeml-drift-overhead-") as tmp:
        results = [measure(m, seconds=args.seconds, rounds=args.rounds, rate=args.rate,
                           concurrency=args.concurrency, work=Path(tmp)) for m in args.models.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| model | sampling rate | off req/s | on req/s | on/off (median of rounds) | overhead | on/off range |"
          " A/A: off/off (range) | hook µs/request | worker CPU | accounted cost | CPU µs/request off, on |"
          " rows sampled | dropped |")
    print("|" + " --- |" * 14)
    for r in results:
        (lo, hi), (alo, ahi) = r["ratio_range"], r["aa_range"]
        print(f"| {r['model']} | {r['rate']} | {r['off_rps']} | {r['on_rps']} | {r['ratio']} |"
              f" {r['overhead_percent']} % | {lo}-{hi} | {r['aa_ratio']} ({alo}-{ahi}) | {r['hook_us']} |"
              f" {r['worker_cpu_percent']} % | {r['accounted_percent']} % | {r['cpu_us_per_request_off']},"
              f" {r['cpu_us_per_request_on']} | {r['rows_sampled']} | {r['dropped']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
