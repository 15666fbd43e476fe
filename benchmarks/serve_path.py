"""The server's request path in one process, without sockets: microseconds of Python per request.

    python -m edgeml.benchmarks.serve_path ARTIFACT [--requests 20000] [--profile out.prof] [--serve-args ...]

A ``ModelServer`` is built (not bound to a port) and its ``HttpConnection`` is fed the bytes of a keep-alive
POST through a stand-in transport that only keeps what is written: the same parser callbacks, routing,
decoding, batching, backend run, encoding and response assembly as a real connection, minus the kernel's
socket work (which wrk runs measure, in regress_serve.py). One request at a time (c=1), interleaved with a
bare backend call of the same input, so the path's own cost is ``per request - backend``. Prints one JSON
line: wall-clock medians and ``cpu_request_us`` (the thread's CPU time per request, the steadier figure on a
shared machine). ``--profile`` writes a cProfile of the measured loop (for flame graphs: ``flameprof``/snakeviz).
The same file runs against an older checkout (regress.py), so it only uses long-standing server API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path


class _Transport:
    """What HttpConnection needs of an asyncio transport; keeps the last write."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None: ...


def _config(cls, extra: dict):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in {"port": 0, "threads": 1, "configure_logs": False, **extra}.items() if k in names}
    cfg = cls(**kwargs)
    if "breaker" in names and "breaker_failures" in extra:
        cfg.breaker = dataclasses.replace(cfg.breaker, failures=extra["breaker_failures"])
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeml.benchmarks.serve_path", description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=1,
                   help="connections each sending one request per step (batches form as under wrk -c N)")
    p.add_argument("--body", type=Path, default=None, help="request body (default: the MLP's 30 features)")
    p.add_argument("--config", default="{}", help='ServerConfig fields as JSON, e.g. {"cache_mb": 0}')
    p.add_argument("--profile", type=Path, default=None, help="write a cProfile of the measured requests here")
    a = p.parse_args(argv)

    import numpy as np

    from edgeml.runtime.server.app import ModelServer, ServerConfig
    from edgeml.runtime.server.http import HttpConnection

    server = ModelServer(_config(ServerConfig, json.loads(a.config)))
    lm = server.load(a.artifact)
    name = lm.name
    if a.body is not None:
        body = a.body.read_bytes()
    else:
        x = [round(float(v), 5) for v in np.random.default_rng(0).standard_normal(30)]
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": x}]}).encode()
    raw = (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    feeds = {k: np.zeros((1, *[d or 1 for d in s.shape[1:]]), s.np_dtype) for k, s in lm.input_specs.items()}
    backend = lm.model.backend
    loop = server.loop if hasattr(server, "loop") else server._loop
    clock = time.perf_counter

    c = max(1, a.concurrency)
    thread_clock = time.thread_time       # CPU of this thread: steadier than wall time on a shared machine
    cpu = [0.0]

    async def measure(n: int, prof) -> tuple[list[float], list[float]]:
        conns = []
        for _ in range(c):
            transport = _Transport()
            conn = HttpConnection(server)
            conn.connection_made(transport)
            conns.append((conn, transport))
        path_s, backend_s = [], []
        cpu[0] = 0.0
        for i in range(max(1, n // c)):
            t0 = clock()
            backend.run(feeds)
            t1 = clock()
            for _, transport in conns:
                transport.out.clear()
            if prof is not None:
                prof.enable()
            c0 = thread_clock()
            for conn, _ in conns:
                conn.data_received(raw)
            while not all(t.out for _, t in conns):
                await asyncio.sleep(0)
            cpu[0] += thread_clock() - c0
            if prof is not None:
                prof.disable()
            t2 = clock()
            if i == 0 and b" 200 " not in conns[0][1].out[0][:16]:
                raise SystemExit(f"the server answered {conns[0][1].out[0][:300]!r}")
            backend_s.append(t1 - t0)
            path_s.append((t2 - t1) / c)       # per request
        return path_s, backend_s

    asyncio.set_event_loop(loop)
    loop.run_until_complete(measure(min(2000, a.requests), None))      # warm-up
    prof = None
    if a.profile is not None:
        import cProfile

        prof = cProfile.Profile()
    path_s, backend_s = loop.run_until_complete(measure(a.requests, prof))
    if prof is not None:
        prof.dump_stats(str(a.profile))
    path_s.sort()
    backend_s.sort()
    med = lambda v: v[len(v) // 2] * 1e6  # noqa: E731
    print(json.dumps({"requests": a.requests, "concurrency": c, "request_us": round(med(path_s), 2),
                      "backend_us": round(med(backend_s), 2),
                      "path_us": round(med(path_s) - med(backend_s), 2),
                      "mean_request_us": round(sum(path_s) / len(path_s) * 1e6, 2),
                      "cpu_request_us": round(cpu[0] / (len(path_s) * c) * 1e6, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
