"""Serving, side by side: the same MLP served by each code version (and by a raw echo server), interleaved rounds.

Each variant is one server process (``edgeml serve ART --threads 1`` on that version's code, the artifact built
by that version's own ``serve_bench.build_mlp`` recipe, or the echo server below); the load is ``wrk -t1`` (or the
Python keep-alive client of serve_bench without wrk) on loopback, a POST of the same JSON body. Every round runs
every (concurrency, variant) once, the variant order rotating per round, so load changes on the box hit all alike.

The echo variant is the limit of this design: uvloop + httptools, one parser feed per read, answering every
request with the same bytes an edgeml answer has (status line, headers, JSON body of the same size) and no
model run; see docs/serving.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeml.benchmarks import serve_bench as sb
from edgeml.benchmarks.regress_sides import Side

ECHO_SERVER = r'''
import asyncio, sys
import httptools, uvloop

RESPONSE = open(sys.argv[2], "rb").read()


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.p = httptools.HttpRequestParser(self)

    def data_received(self, data):
        try:
            self.p.feed_data(data)
        except httptools.HttpParserError:
            self.t.close()

    def on_message_complete(self):
        self.t.write(RESPONSE)


async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(Echo, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    print("ready", flush=True)
    async with srv:
        await srv.serve_forever()

uvloop.run(main())
'''

BUILD = ("import sys; from pathlib import Path; from edgeml.benchmarks.serve_bench import build_mlp; "
         "print(build_mlp(Path(sys.argv[1]))[1])")


@dataclass
class Variant:
    name: str
    start: Callable[[], subprocess.Popen]
    url: str
    proc: subprocess.Popen | None = None


def _edgeml_variant(name: str, side: Side, work: Path, extra: list[str]) -> Variant:
    folder = work / f"art-{side.label}"
    folder.mkdir(parents=True, exist_ok=True)
    pkg = folder / "mlp.edgepkg"
    if not pkg.exists():
        pkg = Path(side.python(BUILD, str(folder), timeout=300).strip().splitlines()[-1])
    port = sb.free_port()
    cache = work / f"cache-{name}"

    def start() -> subprocess.Popen:
        env = {**side.env, "XDG_CACHE_HOME": str(cache)}
        proc = subprocess.Popen([sys.executable, "-m", "edgeml.cli", "serve", str(pkg), "--port", str(port),
                                 "--threads", "1", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, cwd=side.root)
        try:
            sb.wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        except RuntimeError as exc:
            sb.stop(proc)
            raise RuntimeError(f"{side.label} ({side.commit[:10]}): edgeml serve did not start: {exc}") from None
        return proc

    return Variant(name, start, f"http://127.0.0.1:{port}/v2/models/mlp/infer")


def _echo_variant(work: Path, response: bytes) -> Variant:
    script, resp = work / "echo_server.py", work / "echo_response.bin"
    script.write_text(ECHO_SERVER)
    resp.write_bytes(response)
    port = sb.free_port()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(resp)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            proc.kill()
            raise RuntimeError("the echo server did not start")
        return proc

    return Variant("echo", start, f"http://127.0.0.1:{port}/v2/models/mlp/infer")


def _raw_answer(url: str, body: bytes) -> bytes:
    """One edgeml answer as it goes on the wire (status line, headers, body), for the echo server to repeat."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        payload = r.read()
        # urllib asks for Connection: close; the keep-alive answer wrk gets has no Connection header
        head = [f"HTTP/1.1 {r.status} OK"] + [f"{k}: {v}" for k, v in r.getheaders() if k.lower() != "connection"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def _cpu_s(proc: subprocess.Popen | None) -> float:
    """User + system CPU seconds of a running process (Linux /proc; 0 elsewhere)."""
    if proc is None:
        return 0.0
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(sides: list[Side], work: Path, *, levels: tuple[int, ...] = (1, 32), rounds: int = 3,
        duration: float = 4.0, echo: bool = False, features: bool = False, say=print) -> dict:
    """Per-round req/s and latency of every variant at every concurrency (interleaved)."""
    work.mkdir(parents=True, exist_ok=True)
    body = work / "body.json"
    lua = work / "bench.lua"
    lua.write_text(sb.WRK_LUA)
    use_wrk = shutil.which("wrk") is not None
    variants: list[Variant] = []
    off = ["--breaker-failures", "0", "--cache-mb", "0"]
    for side in sides:
        variants.append(_edgeml_variant(side.label, side, work, off if side.label == "head" else []))
    head = next(s for s in sides if s.label == "head")
    if features:   # head with each optional feature on, against head with all off
        on = {"head+breaker": ["--cache-mb", "0"], "head+cache": ["--breaker-failures", "0", "--cache-mb", "16"],
              "head+admission": ["--breaker-failures", "0", "--cache-mb", "0", "--max-inflight", "1000",
                                 "--max-queue-ms", "1000"],
              "head+access-log": [*off, "--access-log"]}
        variants += [_edgeml_variant(name, head, work, extra) for name, extra in on.items()]
    results: dict[str, dict[int, list[dict]]] = {v.name: {c: [] for c in levels} for v in variants}
    try:
        for v in variants:
            v.proc = v.start()
        sample = json.loads(head.python(
            "import json, sys; from pathlib import Path; import numpy as np; "
            "from sklearn.datasets import load_breast_cancer; X, _ = load_breast_cancer(return_X_y=True); "
            "x = (X - X.mean(0)) / (X.std(0) + 1e-9); print(json.dumps([round(float(v), 5) for v in x[0]]))"))
        body.write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": sample}]}))
        if echo:
            ev = _echo_variant(work, _raw_answer(variants[0].url, body.read_bytes()))
            ev.proc = ev.start()
            variants.append(ev)
            results[ev.name] = {c: [] for c in levels}
        say(f"serving: {len(variants)} variants x {levels} connections x {rounds} rounds x {duration:g} s, "
            f"load: {'wrk -t1' if use_wrk else 'python keep-alive client'}")
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for c in levels:
                for v in order:
                    time.sleep(0.2)
                    cpu0 = _cpu_s(v.proc)
                    res = (sb.run_wrk(v.url, body, lua, c, duration) if use_wrk
                           else sb.run_pyloadgen(v.url, body, c, duration))
                    # the server process's CPU per request: much steadier than req/s on a shared box
                    res["cpu_us"] = (_cpu_s(v.proc) - cpu0) * 1e6 / max(1, res["requests"])
                    results[v.name][c].append(res)
                    say(f"  round {r + 1} c={c:<3} {v.name:<16} {res['rps']:8.0f} req/s  p50 {res['p50']:.2f} ms"
                        f"  p99 {res['p99']:.2f} ms  server CPU {res['cpu_us']:.1f} us/request" + (f"  ({res['errors']} errors)" if res["errors"] else ""))
    finally:
        for v in variants:
            if v.proc is not None:
                sb.stop(v.proc)
    return {"levels": list(levels), "rounds": rounds, "duration_s": duration,
            "loadgen": "wrk -t1" if use_wrk else "python", "results": {k: {str(c): v for c, v in d.items()}
                                                                      for k, d in results.items()}}
