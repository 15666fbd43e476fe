"""Serving throughput with drift sampling on vs off, side by side, on the MLP and MobileNetV2.

    python -m edgeml.benchmarks.drift_overhead [--seconds 2] [--rounds 8] [--rate 0.05] [--concurrency 4]
                                              [--models mlp,mobilenetv2] [--json]

One in-process ``ModelServer`` (the real v2 HTTP server) per model, closed-loop keep-alive HTTP
clients; each round runs sampling off then on (order alternating between rounds so slow drift of
the machine hits both alike). Reported: the median of the rounds' on/off ratios (each ratio compares
two runs seconds apart, so a load change elsewhere on a shared machine hits few of them), their
range, the sampler worker's own CPU time per second of the "on" runs, and this process's CPU time
per request (server and clients) off and on, with the median of the rounds' on/off CPU ratios: on
a busy shared machine the throughput swings with other work, the CPU per request much less.
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
        body, path = _body(inp, rows[:1]), f"/v2/models/{lm.name}/infer"
        on_rps: list[float] = []
        off_rps: list[float] = []
        cpu: dict[bool, list[float]] = {True: [], False: []}
        _load(port, path, body, min(seconds, 2.0), concurrency)       # warm up
        for r in range(rounds):
            for sampling in ((False, True) if r % 2 == 0 else (True, False)):
                server.observer = (lambda m, i, o: monitor.offer(m.name, m.version, i, o)) if sampling else None
                rps, cpu_per_request = _load(port, path, body, seconds, concurrency)
                (on_rps if sampling else off_rps).append(rps)
                cpu[sampling].append(cpu_per_request)
        server.observer = None
        worker_s = monitor.busy_s()          # before flush: only what the worker did while serving
        monitor.flush()
        window = monitor.windows()
        monitor.close()
    finally:
        server.stop(drain_timeout=2)
    ratios = sorted(on / off for on, off in zip(on_rps, off_rps))
    ratio = statistics.median(ratios)
    cpu_ratio = statistics.median(on / off for on, off in zip(cpu[True], cpu[False]))
    return {"model": model, "rate": rate, "off_rps": round(statistics.median(off_rps), 1),
            "on_rps": round(statistics.median(on_rps), 1), "ratio": round(ratio, 4),
            "overhead_percent": round(100 * (1 - ratio), 2),
            "ratio_range": [round(ratios[0], 4), round(ratios[-1], 4)],
            "worker_cpu_percent": round(100 * worker_s / (rounds * seconds), 2),
            "cpu_us_per_request_off": round(1e6 * statistics.median(cpu[False]), 1),
            "cpu_us_per_request_on": round(1e6 * statistics.median(cpu[True]), 1),
            "cpu_overhead_percent": round(100 * (cpu_ratio - 1), 2),
            "rounds": rounds, "seconds": seconds, "concurrency": concurrency,
            "rows_sampled": sum(row["n"] for row in window), "dropped": sum(row["dropped"] for row in window),
            "off_each": [round(x, 1) for x in off_rps], "on_each": [round(x, 1) for x in on_rps]}


def main(argv: list[str] | None = None) -> int:
    from edgeml.runtime.drift import DEFAULT_RATE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=8)
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
    print("| model | sampling rate | off req/s | on req/s | on/off (median of rounds) | overhead |"
          " on/off range | worker CPU | CPU µs/request off, on | CPU overhead | rows sampled | dropped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        lo, hi = r["ratio_range"]
        print(f"| {r['model']} | {r['rate']} | {r['off_rps']} | {r['on_rps']} | {r['ratio']} |"
              f" {r['overhead_percent']} % | {lo}-{hi} | {r['worker_cpu_percent']} % | {r['cpu_us_per_request_off']},"
              f" {r['cpu_us_per_request_on']} | {r['cpu_overhead_percent']} % | {r['rows_sampled']} |"
              f" {r['dropped']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
