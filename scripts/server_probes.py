"""Raw-HTTP probes of a real ``edgeml serve`` subprocess (used by scripts/fault_table.py).

The server runs the probe model y = x @ W on a free loopback port; each probe opens its own socket with
a timeout, so a server that hangs costs seconds, never the run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fault_probes import Observed

INFER = "/v2/models/probe/infer"
TOKEN_FLAG = "--admin-token"


class ServerUnderTest:
    """``edgeml serve ARTIFACT --port 0`` with short timeouts where the CLI offers them."""

    def __init__(self, artifact: Path, work: Path):
        self.artifact, self.work = artifact, work
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.header_timeout = 10.0

    def __enter__(self) -> "ServerUnderTest":
        help_text = subprocess.run([sys.executable, "-m", "edgeml.cli", "serve", "--help"], capture_output=True,
                                   text=True, timeout=30).stdout
        args = [sys.executable, "-m", "edgeml.cli", "serve", str(self.artifact), "--port", "0"]
        if "--header-timeout" in help_text:
            flag = re.search(r"(--header-timeout[-a-z]*)", help_text)
            assert flag is not None
            args += [flag.group(1), "2"]
            self.header_timeout = 2.0
        self.stderr = open(self.work / "serve.stderr", "w+")
        env = {**os.environ, "XDG_CACHE_HOME": str(self.work / "cache")}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
                                     start_new_session=True)
        line = self._read_line(30)
        match = re.search(r"http://[\d.]+:(\d+)", line)
        if not match:
            raise RuntimeError(f"edgeml serve did not report its address: {line!r}")
        self.port = int(match.group(1))
        return self

    def _read_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore
        reader.start()
        reader.join(timeout)
        return box[0] if box else ""

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.stderr.close()

    def rss_mib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
        return -1

    def threads(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return sock

    def exchange(self, raw: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes, read until the server closes or goes quiet for ``timeout``."""
        with self.connect(timeout) as sock:
            sock.sendall(raw)
            return read_all(sock, timeout)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                timeout: float = 5.0) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        data = self.exchange(head.encode() + b"\r\n" + body, timeout)
        return status_of(data), data.partition(b"\r\n\r\n")[2]

    def final_check(self) -> Observed:
        assert self.proc is not None
        alive = self.proc.poll() is None
        status = self.request("GET", "/v2/health/ready")[0] if alive else 0
        self.stderr.seek(0)
        log = self.stderr.read()
        ok = alive and status == 200 and "Traceback" not in log
        return Observed("after every probe: process, readiness, log", "alive, ready 200, no traceback in the log",
                        f"alive={alive}, ready={status}, tracebacks in log={log.count('Traceback')}, "
                        f"RSS {self.rss_mib() if alive else -1} MiB, threads {self.threads() if alive else -1}", ok)


def read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(chunks)


def status_of(data: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else 0


def infer_body(x: Any, idx_name: str = "x", datatype: str = "FP32", shape: Any = None) -> bytes:
    arr = np.asarray(x, np.float32) if datatype == "FP32" and not isinstance(x, list) else x
    if isinstance(arr, np.ndarray):
        shape, data = list(arr.shape), arr.reshape(-1).tolist()
    else:
        data = arr
    return json.dumps({"inputs": [{"name": idx_name, "datatype": datatype, "shape": shape, "data": data}]}).encode()


def status_row(srv: ServerUnderTest, label: str, method: str, path: str, body: bytes, want: tuple[int, ...],
               headers: dict[str, str] | None = None) -> Observed:
    status, payload = srv.request(method, path, body, headers)
    text = payload[:100].decode(errors="replace")
    return Observed(label, " or ".join(map(str, want)), f"{status} {text}", status in want)


def server_cases(srv: ServerUnderTest, w: np.ndarray) -> list[Observed]:
    one = np.ones((1, 4), np.float32)
    rows = [
        status_row(srv, "valid request (control)", "POST", INFER, infer_body(one), (200,)),
        status_row(srv, "body is not JSON", "POST", INFER, b"{not json", (400,)),
        status_row(srv, '`"name": {"x": 1}`', "POST", INFER, infer_body([0] * 4, {"x": 1}, shape=[1, 4]), (400,)),  # type: ignore[arg-type]
        status_row(srv, "shape `\"abc\"`", "POST", INFER, infer_body([0] * 4, shape="abc"), (400,)),
        status_row(srv, 'data `["nan", 0, 0, 0]`', "POST", INFER, infer_body(["nan", 0, 0, 0], shape=[1, 4]), (400,)),
        status_row(srv, "data `[null, 0, 0, 0]`", "POST", INFER, infer_body([None, 0, 0, 0], shape=[1, 4]), (400,)),
        status_row(srv, "data `[true, 0, 0, 0]`", "POST", INFER, infer_body([True, 0, 0, 0], shape=[1, 4]), (400,)),
        status_row(srv, "Inference-Header-Content-Length `1_2`", "POST", INFER, infer_body(one), (400,),
                   {"Inference-Header-Content-Length": "1_2"}),
        status_row(srv, "Inference-Header-Content-Length 2^70", "POST", INFER, infer_body(one), (400,),
                   {"Inference-Header-Content-Length": str(2 ** 70)}),
        status_row(srv, "deep JSON (100,000 `[`)", "POST", INFER, b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                   (400,)),
        status_row(srv, "OPTIONS /v2", "OPTIONS", "/v2", b"", (404, 405)),
        status_row(srv, "repository unload without token", "POST", "/v2/repository/models/probe/unload", b"{}",
                   (401, 403)),
        status_row(srv, "repository index without token", "POST", "/v2/repository/index", b"{}", (401, 403)),
        _declared_oversize(srv),
        _one_response(srv, "CONNECT 127.0.0.1:443", b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        _one_response(srv, "Upgrade: h2c", b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, "
                      b"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
        _zero_row_leak(srv, w),
        _big_request(srv),
        _slowloris(srv),
        status_row(srv, "model still serves after the repository probes", "POST", INFER, infer_body(one), (200,)),
    ]
    return rows


def _declared_oversize(srv: ServerUnderTest, declared: int = 100 << 20, send_max: int = 100 << 20) -> Observed:
    """Row 6: a body over --max-body-mb is answered 413 and never buffered (RSS flat)."""
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    before, sent, start = srv.rss_mib(), 0, time.monotonic()
    chunk = b"0" * (1 << 20)
    with srv.connect(timeout=5) as sock:
        sock.sendall(head)
        try:
            while sent < send_max:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed after answering: what we want
        data = read_all(sock, 5)
    grown = srv.rss_mib() - before
    status = status_of(data)
    return Observed(f"Content-Length {declared >> 20} MiB, body streamed", "413 (at once or when the body ends), body never buffered (RSS +< 50 MiB)",
                    f"{status} after {sent >> 20} MiB sent, {time.monotonic() - start:.1f}s, RSS +{grown} MiB",
                    status == 413 and grown < 50)


def _one_response(srv: ServerUnderTest, label: str, raw: bytes) -> Observed:
    data = srv.exchange(raw, timeout=3)
    count = len(re.findall(rb"HTTP/1\.[01] \d{3}", data))
    return Observed(label, "exactly one response, then close", f"{count} response(s), first {status_of(data)}",
                    count == 1)


def _zero_row_leak(srv: ServerUnderTest, w: np.ndarray, rounds: int = 30) -> Observed:
    """Row 1: concurrent 1-row requests beside 0-row ones; every answer must be its own x @ W."""
    wrong = errors = 0
    zero_status: set[int] = set()
    lock = threading.Lock()

    def client(k: int) -> None:
        nonlocal wrong, errors
        if k % 3 == 1:
            status, _ = srv.request("POST", INFER, infer_body(np.zeros((0, 4), np.float32)))
            with lock:
                zero_status.add(status)
            return
        x = np.full((1, 4), k, np.float32)
        status, body = srv.request("POST", INFER, infer_body(x))
        try:
            got = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)
            ok = status == 200 and np.allclose(got, (x @ w).reshape(-1), rtol=1e-4)
        except (ValueError, KeyError, IndexError):
            ok = False
        with lock:
            wrong += 0 if ok else 1

    for r in range(rounds):
        threads = [threading.Thread(target=client, args=(r * 3 + i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    actual = f"{wrong} of {rounds * 2} answers not their own; 0-row status {sorted(zero_status)}"
    return Observed(f"0-row requests concurrent with 1-row ones ({rounds} rounds)",
                    "every answer is its own x@W; 0 rows -> 400 or an empty 200", actual,
                    wrong == 0 and zero_status <= {200, 400})


def _big_request(srv: ServerUnderTest, rows: int = 300_000) -> Observed:
    """Row 6: a 4.6 MiB binary request of 300k rows: refused or answered, memory bounded, others served."""
    before = srv.rss_mib()
    x = np.ones((rows, 4), np.float32)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    result: dict[str, Any] = {}

    def big() -> None:
        result["status"] = srv.request("POST", INFER, header + x.tobytes(),
                                       {"Inference-Header-Content-Length": str(len(header))}, timeout=30)[0]

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.05)
    start = time.monotonic()
    small = srv.request("POST", INFER, infer_body(np.ones((1, 4), np.float32)), timeout=10)[0]
    small_ms = (time.monotonic() - start) * 1000
    thread.join(40)
    grown = srv.rss_mib() - before
    ok = result.get("status") in (200, 400, 413) and small == 200 and grown < 200
    return Observed(f"{rows:,}-row binary request beside a 1-row one",
                    "4xx or 200; the 1-row client still answered; RSS growth < 200 MiB",
                    f"big {result.get('status')}, small {small} in {small_ms:.0f} ms, RSS +{grown} MiB", ok)


def _slowloris(srv: ServerUnderTest) -> Observed:
    """Row 7: one header byte every 0.5 s must not hold the connection past the header timeout."""
    limit = srv.header_timeout + 3
    start = time.monotonic()
    closed_after = None
    with srv.connect(timeout=1) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\n".encode())
        while time.monotonic() - start < limit:
            try:
                sock.sendall(b"X")
                sock.settimeout(0.5)
                if sock.recv(4096) == b"":
                    closed_after = time.monotonic() - start
                    break
                closed_after = time.monotonic() - start   # an answer (408) counts as refused
                break
            except socket.timeout:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
    actual = f"closed after {closed_after:.1f}s" if closed_after is not None else f"still open after {limit:.0f}s"
    return Observed("slowloris: one header byte every 0.5 s", f"closed within the header timeout "
                    f"({srv.header_timeout:.0f}s)", actual, closed_after is not None)
