"""``ModelServer``: the Python API (used by ``edgeml serve`` and the fleet agent).

The server runs one event loop (uvloop when installed) in a background thread.
API calls from other threads (load, unload, models, stats) are marshalled onto
that loop, so a hot swap is one assignment there: every request resolves either
the old version or the new one, and requests already queued on the old version
finish on it before it is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeml.errors import EdgemlError, ServeError
from edgeml.runtime.server.admission import Admission, AdmissionLimits
from edgeml.runtime.server.batching import Batcher
from edgeml.runtime.server.breaker import BreakerConfig, CircuitBreaker
from edgeml.runtime.server.cache import cache_for
from edgeml.runtime.server.dataplane import DataPlane
from edgeml.runtime.server.fallback import PrimaryRetry, check_compatible, declared_fallback, stand_in_reason
from edgeml.runtime.server.generate import close_all as close_text_generation, load_text_generation, text_generation_rows
from edgeml.runtime.server.http import HttpConnection
from edgeml.runtime.server.logs import LOGGER, configure_logging
from edgeml.runtime.server.repository import LoadedModel, Repository
from edgeml.runtime.server.routes import Router

log = logging.getLogger(LOGGER)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000                      # 0 = pick a free port
    max_batch: int = 32                   # rows per backend run
    max_delay_ms: float = 2.0             # longest a request waits for its batch to fill
    max_body_bytes: int = 16 << 20       # one request body (413 past it, before it is decoded)
    max_request_rows: int | None = None  # rows per request (413 past it); None = max_batch
    max_buffered_body_bytes: int = 64 << 20   # all request bodies being received at once (503 past it)
    max_connections: int = 1024          # open HTTP connections (503 + close past it)
    header_timeout_s: float = 10.0       # from a request's first byte to the end of its head (408 past it)
    body_timeout_s: float = 60.0         # from the end of the head to the end of the body (408 past it)
    admin_token: str | None = None       # repository API: None = off (403); else Bearer token required
    trusted_keys: list[str | Path] = field(default_factory=list)
    require_signature: bool | None = None
    threads: int | None = None            # backend intra-op threads (None = artifact's choice)
    log_json: bool = True
    configure_logs: bool = True           # attach a handler to the edgeml.serve logger
    access_log: bool = False              # log every request (errors are always logged)
    batch_mode: str = "auto"              # inline | thread | auto (inline when batch-1 run <= inline_below_ms)
    inline_below_ms: float = 1.0          # (and a full batch <= 4x this)
    keepalive_timeout_s: float = 75.0     # idle keep-alive connections are closed after this
    max_versions: int = 2                 # versions kept per model; older non-default ones are drained
    repository_dir: str | Path | None = None   # where HTTP repository loads may read artifacts from
    check_host: bool = True
    cache_dir: str | Path | None = None
    event_loop: str = "auto"              # auto | uvloop | asyncio
    server_name: str = "edgeml"
    grpc_port: int | None = None          # also serve the v2 gRPC protocol here (None = off, 0 = a free port)
    # resilience (docs/serving.md "Admission control, circuit breaker, cache, fallback")
    max_inflight: int | None = None       # per model version: requests admitted and not answered (429 past it)
    max_queue_ms: float | None = None     # per model version: longest wait for a batch to start (503 past it)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)   # failures=0: no breaker
    cache_mb: float | None = None         # response cache per model version; None = the artifact's choice, 0 = off

    def validate(self) -> None:
        """Refuse limits that cannot work (zero, negative, not finite, out of range), naming the field."""
        ints = {"max_batch": (1, 1 << 16), "max_body_bytes": (1, 1 << 40), "max_buffered_body_bytes": (1, 1 << 42),
                "max_connections": (1, 1 << 20), "max_versions": (1, 1000), "port": (0, 65535)}
        optional_ints = {"max_request_rows": (1, 1 << 24), "threads": (1, 4096), "grpc_port": (0, 65535),
                         "max_inflight": (1, 1 << 20)}
        optional_floats = {"max_queue_ms": (0.001, 3_600_000.0), "cache_mb": (0.0, float(1 << 16))}
        floats = {"max_delay_ms": (0.0, 60_000.0), "header_timeout_s": (0.001, 86_400.0),
                  "body_timeout_s": (0.001, 86_400.0), "keepalive_timeout_s": (0.001, 86_400.0),
                  "inline_below_ms": (0.0, 60_000.0)}
        for name, (lo, hi) in {**ints, **optional_ints}.items():
            value = getattr(self, name)
            if value is None and name in optional_ints:
                continue
            if type(value) is not int or not lo <= value <= hi:
                raise ServeError(f"ServerConfig.{name} is {value!r}; it must be an integer from {lo} to {hi}")
        for name, (flo, fhi) in {**floats, **optional_floats}.items():
            value = getattr(self, name)
            if value is None and name in optional_floats:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not flo <= value <= fhi:
                raise ServeError(f"ServerConfig.{name} is {value!r}; it must be a number from {flo:g} to {fhi:g}")
        if not isinstance(self.breaker, BreakerConfig):
            raise ServeError(f"ServerConfig.breaker must be a BreakerConfig, not {type(self.breaker).__name__}")
        self.breaker.validate()
        if self.admin_token is not None and (not isinstance(self.admin_token, str) or len(self.admin_token) < 8):
            raise ServeError("ServerConfig.admin_token must be a string of at least 8 characters",
                             hint="use a long random token, e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`")


class ModelServer:
    def __init__(self, config: ServerConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or ServerConfig()
        self.config.validate()
        self.clock = clock
        self.repo = Repository()
        self.max_body_bytes = int(self.config.max_body_bytes)
        self.draining = False
        self.http_codes: dict[int, int] = {}
        self.connections: set[HttpConnection] = set()
        self.buffered_body_bytes = 0       # bytes of request bodies still being received
        self._trim_wanted = False
        self.started_at = time.time()
        self._loop = _new_loop(self.config.event_loop)
        self.loop_time = self._loop.time
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._address: tuple[str, int] | None = None
        self._grpc = None                      # grpc_server.GrpcEndpoint when config.grpc_port is set
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}-"
        self._api_lock = threading.RLock()
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeml-load")
        self.plane = DataPlane(self)
        # (LoadedModel, inputs, outputs) after each answered inference: the fleet agent's drift sampler
        self.observer: Callable[[Any, dict[str, Any], dict[str, Any]], None] | None = None
        self.experiments: Any = None           # edgeml.runtime.experiments.Experiment while one runs here
        self.router = Router(self)
        if self.config.configure_logs:
            configure_logging(self.config.log_json)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; return the bound (host, port)."""
        if self._thread is not None:
            return self._address  # type: ignore[return-value]
        grpc_ep = None
        if self.config.grpc_port is not None:   # bind first: a missing package or a taken port fails early
            from edgeml.runtime.server.grpc_server import GrpcEndpoint

            grpc_ep = GrpcEndpoint(self, self.config.host, self.config.grpc_port)
        ready: concurrent.futures.Future[tuple[str, int]] = concurrent.futures.Future()

        def main() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(self._loop.create_server(
                    lambda: HttpConnection(self), self.config.host, self.config.port,
                    reuse_address=True, backlog=2048))
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                ready.set_exception(exc)
                return
            sock = self._server.sockets[0].getsockname()
            ready.set_result((sock[0], sock[1]))
            self._loop.call_later(1.0, self._sweep_idle)
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="edgeml-serve", daemon=True)
        self._thread.start()
        try:
            self._address = ready.result(timeout=30)
        except OSError as exc:
            self._thread = None
            if grpc_ep is not None:
                grpc_ep.stop(0)
            raise ServeError(f"cannot listen on {self.config.host}:{self.config.port}: {exc}",
                             hint="pick another --port (0 picks a free one)") from exc
        if grpc_ep is not None:
            self._grpc = grpc_ep
            grpc_ep.start()
        log.info("server started", extra={"host": self._address[0], "port": self._address[1],
                                          "grpc_port": self.grpc_address[1] if self._grpc else None,
                                          "models": [m["name"] + ":" + m["version"] for m in self.models()]})
        return self._address

    @property
    def address(self) -> tuple[str, int] | None:
        return self._address

    @property
    def grpc_address(self) -> tuple[str, int] | None:
        return self._grpc.address if self._grpc is not None else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._loop.is_running()

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, finish in-flight requests (up to ``drain_timeout`` s), close."""
        if self._thread is None:
            self._close_models()
            return
        grpc_done = self._grpc.stop(drain_timeout) if self._grpc is not None else None
        self._in_loop(self._begin_drain)
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and self._in_loop(lambda: self.inflight) > 0:
            time.sleep(0.005)
        left = self._in_loop(lambda: self.inflight)
        self._in_loop(self._close_connections)
        # transport.close() flushes what is buffered before the socket closes: let it finish.
        flush_deadline = max(deadline, time.monotonic() + 1.0)
        while time.monotonic() < flush_deadline and self._in_loop(lambda: len(self.connections)) > 0:
            time.sleep(0.005)
        self._in_loop(self._abort_connections)
        if grpc_done is not None:
            grpc_done.wait(max(0.0, deadline - time.monotonic()) + 1.0)
            self._grpc = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._close_models()
        self._loader.shutdown(wait=False)
        self.plane.close()
        self._loop.close()
        log.info("server stopped", extra={"abandoned_requests": left})

    def _sweep_idle(self) -> None:
        """Loop thread: enforce read deadlines, close idle keep-alive connections, return freed memory."""
        cfg = self.config
        limit, head_s, body_s = cfg.keepalive_timeout_s, cfg.header_timeout_s, cfg.body_timeout_s
        now = self._loop.time()
        for conn in list(self.connections):
            conn.check_deadlines(now, head_s, body_s)
            if now - conn.last_active > limit:
                conn.close_if_idle()
        if self._trim_wanted and not self.buffered_body_bytes:
            self._trim_wanted = False
            self._loader.submit(_malloc_trim)
        if not self.draining:
            self._loop.call_later(min(1.0, max(0.05, min(limit, head_s, body_s) / 4)), self._sweep_idle)

    def note_large_request(self) -> None:
        """A large body was handled: give freed heap back to the OS at the next sweep (glibc keeps it)."""
        self._trim_wanted = True

    def _begin_drain(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    def _close_connections(self) -> None:
        for conn in list(self.connections):
            if not conn.closed and conn.transport is not None:
                conn.transport.close()
                conn.closed = True

    def _abort_connections(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    def _close_models(self) -> None:
        close_text_generation(self)
        for lm, _ in self.repo.all():
            _close(lm)

    # -- connection bookkeeping (loop thread) ------------------------------
    def connection_opened(self, conn: HttpConnection) -> bool:
        """Register a connection; False (refused with 503) past max_connections or while draining."""
        if len(self.connections) >= self.config.max_connections or self.draining:
            self.http_codes[503] = self.http_codes.get(503, 0) + 1
            log.warning("connection refused", extra={"status": 503, "open_connections": len(self.connections)})
            return False
        self.connections.add(conn)
        return True

    def connection_closed(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)

    def take_body_bytes(self, n: int) -> bool:
        """Count ``n`` more bytes of a body being received; False past max_buffered_body_bytes."""
        if self.buffered_body_bytes + n > self.config.max_buffered_body_bytes:
            return False
        self.buffered_body_bytes += n
        if n >= 65536:
            self._trim_wanted = True
        return True

    def give_body_bytes(self, n: int) -> None:
        self.buffered_body_bytes -= n

    def protocol_error(self, conn: HttpConnection, status: int, message: str) -> None:
        self.http_codes[status] = self.http_codes.get(status, 0) + 1
        log.warning("bad HTTP request", extra={"status": status, "error": message})

    def handle(self, conn, slot, method, url, headers, body, keep_alive) -> None:
        if len(body) >= 65536:
            self._trim_wanted = True
        self.router.dispatch(conn, slot, method, url, headers, body, keep_alive)

    def reject_too_big(self, conn, slot, method, url, headers) -> None:
        self.router.too_big(conn, slot, method, url, headers)

    @property
    def inflight(self) -> int:
        return self.plane.inflight

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _peer_count(self) -> int:
        """Clients that could still add a request to a forming batch: the open HTTP connections (gRPC
        callers are not counted, so with gRPC on the batcher always waits its one loop pass)."""
        return len(self.connections) if self._grpc is None else 1 << 30

    def next_request_id(self) -> str:
        return self._id_prefix + format(next(self._ids), "x")

    # -- model management -----------------------------------------------------
    def load(self, artifact: str | Path, *, name: str | None = None, version: str | None = None,
             warmup: bool = True, make_default: bool = True, fallback: str | Path | None = None) -> LoadedModel:
        """Verify, open and warm up an artifact, then switch to it atomically.

        A version already loaded under the same name is replaced; in-flight
        requests on the replaced copy finish before it is closed. Versions past
        ``max_versions`` (oldest, non-default first) are drained and unloaded.
        ``fallback`` (or the manifest's ``runtime.fallback``) is loaded beside it and
        answers while its breaker is open; if the artifact itself fails to load, the
        fallback is served in its place and the artifact is retried with backoff.
        """
        path = Path(artifact)
        with self._api_lock:
            t0 = time.perf_counter()
            textgen = load_text_generation(self, path, name, version)    # a decoder: served by generate.py
            if textgen is not None:
                return textgen
            try:
                model = self._open(path)
            except EdgemlError as exc:
                fb = Path(fallback) if fallback is not None else declared_fallback(path)
                if fb is None:
                    raise
                return self._load_stand_in(path, fb, exc, name, version, warmup, make_default)
            lm = self._prepare(model, name or model.name, str(version or model.version), path, warmup)
            try:
                fb = Path(fallback) if fallback is not None else declared_fallback(path, model.spec)
                if fb is not None:
                    lm.fallback = self._prepare(self._open(fb), lm.name, lm.version, fb, warmup, cache=False)
                    check_compatible(lm, lm.fallback)
            except BaseException:
                _close(lm)
                raise
            return self._finish_load(lm, make_default, t0)

    def _finish_load(self, lm: LoadedModel, make_default: bool, t0: float) -> LoadedModel:
        lm.ready = True
        if lm.fallback is not None:
            lm.fallback.ready = True
        retired = self._in_loop(lambda: self._install(lm, make_default))
        log.info("model loaded", extra={"model": lm.name, "version": lm.version, "default": make_default,
                                        "batch_mode": lm.mode, "warmup_ms": lm.warmup_ms,
                                        "load_ms": round((time.perf_counter() - t0) * 1000, 1),
                                        "retired": [r.version for r in retired], "cache": lm.cache is not None,
                                        "fallback": str(lm.fallback.source) if lm.fallback else None,
                                        "stand_in_for": lm.stand_in_for})
        return lm

    def _open(self, path: Path) -> Any:
        import edgeml

        return edgeml.load(
            path, trusted_keys=[Path(k) for k in self.config.trusted_keys],
            require_signature=self.config.require_signature, threads=self.config.threads,
            check_host=self.config.check_host, cache_dir=self.config.cache_dir)

    def _load_stand_in(self, path: Path, fb: Path, exc: EdgemlError, name: str | None, version: str | None,
                       warmup: bool, make_default: bool) -> LoadedModel:
        """The primary failed to load: serve its fallback instead and retry the primary with backoff."""
        t0 = time.perf_counter()
        log.error("primary failed to load; serving its fallback", extra={
            "artifact": str(path), "fallback": str(fb), "error": stand_in_reason(exc)})
        model = self._open(fb)
        lm = self._prepare(model, name or model.name, str(version or model.version), fb, warmup, cache=False)
        lm.stand_in_for = stand_in_reason(exc)
        lm.fallback_switches = 1
        self._finish_load(lm, make_default, t0)
        cfg = self.config.breaker

        def attempt() -> None:
            primary = self.load(path, name=name, version=version, warmup=warmup, make_default=make_default)
            if primary.version != lm.version and not lm.retired:
                self.unload(lm.name, lm.version, wait=False)

        lm.retry = PrimaryRetry(path, attempt, lambda: lm.ready and not lm.retired,
                                first_s=cfg.open_s, max_s=cfg.max_open_s)
        lm.retry.schedule()
        return lm

    def _prepare(self, model: Any, name: str, version: str, path: Path, warmup: bool,
                 cache: bool = True) -> LoadedModel:
        """Warm up, pick the batch mode, attach the batcher, admission, breaker and cache."""
        cfg = self.config
        lm = LoadedModel(model, name, version, path)
        try:
            mode = cfg.batch_mode
            if warmup or mode == "auto":
                one, full = lm.warmup(cfg.max_batch)
                if mode == "auto":
                    # inline only when neither a lone request nor a full batch would stall the loop
                    limit = cfg.inline_below_ms
                    mode = "inline" if one <= limit and full <= 4 * limit else "thread"
            lm.mode = mode
            limits = AdmissionLimits(cfg.max_inflight, cfg.max_queue_ms)
            adm = lm.admission = Admission(limits, cfg.max_batch, lm.warmup_ms) if limits.active else None
            lm.batcher = Batcher(lm.model.backend.run, self._loop, lm.stats, max_batch=cfg.max_batch,
                                 max_delay_ms=cfg.max_delay_ms, batchable=lm.batchable,
                                 mode=mode, clock=self.clock, name=f"{lm.name}:{lm.version}",
                                 max_queue_ms=cfg.max_queue_ms, expired=adm.expired if adm else None,
                                 on_compute=adm.observe_batch if adm else None, peers=self._peer_count)
        except EdgemlError:
            model.close()
            raise
        except Exception as exc:
            model.close()
            raise ServeError(f"{path}: warm-up run failed: {exc}",
                             hint="run `edgeml run` on the artifact to see the backend error") from exc
        lm.breaker = CircuitBreaker(cfg.breaker, self.clock) if cfg.breaker.enabled else None
        if cache:
            lm.cache = cache_for(model, cfg.cache_mb, name, version)
        return lm

    def _install(self, lm: LoadedModel, make_default: bool) -> list[LoadedModel]:
        retired = []
        old = self.repo.add(lm, make_default)
        if old is not None and old is not lm:
            retired.append(old)
        entry = self.repo.entries[lm.name]
        keep = max(1, int(self.config.max_versions))
        while len(entry.order) > keep:
            victim = next((v for v in entry.order if v != entry.default and v != lm.version), None)
            if victim is None:
                break
            retired.append(self.repo.remove(lm.name, victim))
        for r in retired:
            self._retire(r)
        return retired

    def _retire(self, lm: LoadedModel, done: Callable[[], None] | None = None) -> None:
        """Loop thread: the version is no longer resolvable; close it once its queue is empty."""
        lm.retired = True

        def closed() -> None:
            _close(lm)
            if done is not None:
                done()

        fb = lm.fallback.batcher if lm.fallback is not None else None
        if fb is not None:   # the fallback may still hold requests of this version
            inner = closed

            def closed() -> None:
                fb.when_idle(inner)

        if lm.batcher is None:
            closed()
        else:
            lm.batcher.when_idle(closed)

    def unload(self, name: str, version: str | None = None, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Remove a version (or every version of ``name``); its queued requests finish first."""
        from edgeml.runtime.server.protocol import ModelNotFound

        with self._api_lock:
            drained = threading.Event()
            counter = {"left": 0}

            def one_done() -> None:
                counter["left"] -= 1
                if counter["left"] <= 0:
                    drained.set()

            def do() -> list[str]:
                entry = self.repo.entries.get(name)
                if entry is None or not entry.versions:
                    raise ModelNotFound(f"unknown model {name!r}")
                if version is not None and version not in entry.versions:
                    raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {list(entry.versions)}")
                versions = [version] if version is not None else list(entry.versions)
                counter["left"] = len(versions)
                for v in versions:
                    self._retire(self.repo.remove(name, v), one_done)
                return versions

            versions = self._in_loop(do)
            if wait and self.running:
                drained.wait(timeout)
            log.info("model unloaded", extra={"model": name, "versions": versions})

    def set_default(self, name: str, version: str) -> None:
        """Make an already loaded version the one that unversioned requests reach (instant rollback)."""
        def do() -> None:
            lm = self.repo.resolve(name, version)
            self.repo.entries[name].default = lm.version
            self.repo._meta_cache.clear()

        self._in_loop(do)
        log.info("default version set", extra={"model": name, "version": version})

    def models(self) -> list[dict[str, Any]]:
        return self._in_loop(lambda: [lm.info(default) for lm, default in self.repo.all()] + text_generation_rows(self))

    def stats(self, name: str, version: str | None = None) -> dict[str, Any]:
        def do() -> dict[str, Any]:
            lm = self.repo.resolve(name, version)
            # "resilience": breaker state, admission refusals, cache and fallback counters (fleet telemetry)
            return {"name": lm.name, "version": lm.version, **lm.stats.to_dict(),
                    "resilience": dataclasses.asdict(lm.resilience())}

        return self._in_loop(do)

    def load_async(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Loop thread: run a blocking call (artifact load) off the loop."""
        return self._loop.run_in_executor(self._loader, fn)

    # -- helpers ------------------------------------------------------------
    def in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread and return its result (directly when not serving)."""
        if not self.running or threading.current_thread() is self._thread:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return fut.result(timeout=60)

    _in_loop = in_loop

    def __enter__(self) -> "ModelServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _close(lm: LoadedModel) -> None:
    lm.ready = False
    if lm.retry is not None:
        lm.retry.cancel()
    if lm.batcher is not None:
        lm.batcher.close()
    try:
        lm.model.close()
    except Exception:  # pragma: no cover - best effort
        log.exception("closing model failed", extra={"model": lm.name, "version": lm.version})
    if lm.fallback is not None:
        _close(lm.fallback)


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc only; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                raise ServeError("event_loop='uvloop' but uvloop is not installed", hint="pip install uvloop") from None
    return asyncio.new_event_loop()
