"""One request path for every transport (HTTP and gRPC), as MLServer's DataPlane.

The transports (``routes.Router`` for HTTP, ``grpc_server`` for gRPC) only translate wire
format: they build a ``Call``, hand the model lookup, validation, batching, in-flight
counting, per-model statistics, the access log and the error mapping to this class, and
write what it answers. Everything here runs on the server's event-loop thread except the
``*_from_thread`` helpers, which marshal onto it.

Large request bodies are decoded off the loop (a small thread pool), so one client's
big request does not stall every other connection while its JSON is parsed; the model's
batcher is reserved meanwhile, so a hot swap does not close that version under it.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from edgeml.errors import EdgemlError
from edgeml.runtime.server.admission import Overloaded
from edgeml.runtime.server.breaker import CLOSED
from edgeml.runtime.server.logs import LOGGER, AccessLog
from edgeml.runtime.server.protocol import InferRequest, RequestError, json_dumps

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from edgeml.runtime.server.app import ModelServer
    from edgeml.runtime.server.repository import LoadedModel

log = logging.getLogger(LOGGER)

OFFLOAD_BYTES = 256 * 1024     # decode bodies at least this big on the decode pool, not on the loop
DECODE_WORKERS = 2


@dataclass(slots=True)
class Call:
    """One request's bookkeeping, from arrival to its response."""

    rid: str
    t0: float
    method: str                      # HTTP method, or "grpc"
    path: str                        # HTTP path, or the RPC name
    lm: "LoadedModel | None" = None
    retry_after_s: int | None = None     # set on 429/503 refusals: the Retry-After header
    key: str | None = None               # X-Experiment-Key: the sticky key of A/B routing (runtime/experiments.py)


class InferReply(Protocol):
    """What a transport gives ``DataPlane.infer``: how to write a success and an error."""

    def ok(self, call: Call, req: InferRequest, outputs: "dict[str, np.ndarray]") -> None: ...

    def error(self, call: Call, status: int, message: str) -> None: ...


Decode = Callable[["LoadedModel", int | None], InferRequest]   # (model, max rows) -> request


class DataPlane:
    def __init__(self, server: "ModelServer"):
        self.s = server
        self.clock = server.clock
        self.inflight = 0
        self._access: AccessLog | None = None
        self._decoder = concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_WORKERS,
                                                              thread_name_prefix="edgeml-decode")

    # -- bookkeeping ---------------------------------------------------------
    def begin(self, rid: str | None, method: str, path: str) -> Call:
        self.inflight += 1
        return Call(rid or self.s.next_request_id(), self.clock(), method, path)

    def end(self, call: Call, status: int, error: str | None = None) -> None:
        """The response is written: count it, record the model's stats, log it."""
        self.inflight -= 1
        ms = (self.clock() - call.t0) * 1000.0
        lm = call.lm
        if lm is not None:
            lm.stats.record(status, ms)
        if error is None:
            if not self.s.config.access_log:
                return
            if self._access is None:
                self._access = AccessLog(self.s.loop)
            self._access.request(call.rid, call.method, call.path, status, round(ms, 3),
                                 lm.name if lm is not None else None, lm.version if lm is not None else None)
            return
        fields: dict[str, Any] = {"request_id": call.rid, "method": call.method, "path": call.path,
                                  "status": status, "latency_ms": round(ms, 3)}
        if lm is not None:
            fields["model"], fields["version"] = lm.name, lm.version
        fields["error"] = error
        log.log(logging.ERROR if status >= 500 else logging.WARNING, "request failed", extra=fields)

    @staticmethod
    def error_of(exc: BaseException, call: Call) -> tuple[int, str]:
        """The one mapping from an exception to (status, message)."""
        if isinstance(exc, RequestError):
            return exc.status, exc.message
        if call.lm is not None:
            msg = exc.message if isinstance(exc, EdgemlError) else f"{type(exc).__name__}: {exc}"
            return 500, f"model {call.lm.name!r} version {call.lm.version!r} failed: {msg}"
        log.error("handler crashed", exc_info=exc, extra={"request_id": call.rid, "path": call.path})
        return 500, f"internal server error: {type(exc).__name__}"

    # -- lookups -------------------------------------------------------------
    def resolve(self, name: str, version: str | None) -> "LoadedModel":
        return self.s.repo.resolve(name, version)

    def ready(self) -> bool:
        return not self.s.draining and all(lm.ready for lm, _ in self.s.repo.all())

    def model_metadata(self, name: str, version: str | None) -> bytes:
        return self.s.repo.metadata_bytes(name, version)

    def server_metadata(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("edgeml")
        except PackageNotFoundError:  # pragma: no cover
            v = "0"
        return {"name": self.s.config.server_name, "version": v,
                "extensions": ["binary_tensor_data", "model_repository", "statistics", "metrics"]}

    def server_metadata_bytes(self) -> bytes:
        return json_dumps(self.server_metadata())

    def max_rows(self, lm: "LoadedModel") -> int | None:
        if not lm.batchable:
            return None
        limit = self.s.config.max_request_rows
        return int(limit) if limit else (lm.batcher.max_batch if lm.batcher is not None else None)

    # -- inference -------------------------------------------------------------
    def infer(self, call: Call, name: str, version: str | None, decode: Decode, reply: InferReply,
              size: int) -> None:
        """Resolve, decode (off the loop when ``size`` is large), batch, answer through ``reply``."""
        exp = self.s.experiments        # A/B or bandit: which version answers (runtime/experiments.py)
        if exp is not None:
            version = exp.route(name, version, call.rid, call.key)
        try:
            lm = call.lm = self.resolve(name, version)
        except RequestError as exc:
            return self._refuse(call, reply, exc)
        limit = self.max_rows(lm)
        if size < OFFLOAD_BYTES:
            try:
                req = decode(lm, limit)
            except Exception as exc:  # noqa: BLE001 - mapped to one response
                return self._refuse(call, reply, exc)
            return self._submit(call, lm, req, reply)
        batcher = lm.batcher
        assert batcher is not None
        batcher.reserve()
        fut = self.s.loop.run_in_executor(self._decoder, decode, lm, limit)

        def decoded(f: "concurrent.futures.Future[InferRequest]") -> None:
            try:
                exc = f.exception()
                if exc is not None:
                    return self._refuse(call, reply, exc)
                self._submit(call, lm, f.result(), reply)
            finally:
                batcher.release()
                self.s.note_large_request()

        fut.add_done_callback(decoded)

    def _refuse(self, call: Call, reply: InferReply, exc: BaseException) -> None:
        status, message = self.error_of(exc, call)
        if isinstance(exc, Overloaded):
            call.retry_after_s = exc.retry_after_s
        reply.error(call, status, message)

    def _answer(self, call: Call, req: InferRequest, outputs: "dict[str, np.ndarray]", reply: InferReply) -> None:
        observe = self.s.observer     # drift sampling (edgeml.runtime.drift): one random draw, binning elsewhere
        if observe is not None and call.lm is not None:
            observe(call.lm, req.feeds, outputs)
        exp = self.s.experiments      # arm counters, feedback ids, shadow mirroring: a counter and a put_nowait
        if exp is not None and call.lm is not None:
            exp.answered(call.lm, call.rid, req.feeds, outputs, (self.clock() - call.t0) * 1000.0)
        try:
            reply.ok(call, req, outputs)
        except Exception as exc:  # noqa: BLE001 - an output the wire format cannot carry
            reply.error(call, 500, f"could not encode the outputs: {exc}")

    def _submit(self, call: Call, lm: "LoadedModel", req: InferRequest, reply: InferReply) -> None:
        """Cache, breaker (primary or fallback), admission, then the batcher of the version chosen."""
        cache, key = lm.cache, None
        if cache is not None:
            key = cache.key(req.feeds)
            hit = cache.get(key)
            if hit is not None:
                # With other clients connected, answer after this loop pass has read them all, as a batch's
                # answers go out: hits written one by one between reads cost 20-25 % more CPU per request
                # at 32 connections (the kernel wakes the client for each); a lone client is answered at once.
                if len(self.s.connections) > 1:
                    self.s.loop.call_soon(self._answer, call, req, hit, reply)
                    return None
                return self._answer(call, req, hit, reply)
        try:
            target = self._route(lm)
            if target.admission is not None:
                assert target.batcher is not None
                try:
                    target.admission.enter(target.batcher.queued_rows, target.batcher.busy)
                except Overloaded:
                    if target.breaker is not None:
                        target.breaker.cancel()
                    raise
        except RequestError as exc:
            return self._refuse(call, reply, exc)
        admission, breaker = target.admission, target.breaker
        if target is not lm:
            key = None            # only the primary's own answers go in its cache

        def done(result: Any, queue_ms: float) -> None:
            if admission is not None:
                admission.leave()
            if isinstance(result, BaseException):
                if breaker is not None:
                    breaker.cancel() if isinstance(result, RequestError) else breaker.record(False)
                return self._refuse(call, reply, result)
            if breaker is not None:
                breaker.record(True)
            if key is not None:
                cache.put(key, result)
            self._answer(call, req, result, reply)

        assert target.batcher is not None
        target.batcher.submit(req.feeds, req.rows, done)

    def _route(self, lm: "LoadedModel") -> "LoadedModel":
        """The version that runs this request: the primary, or its fallback while the primary's breaker is open."""
        b = lm.breaker
        if b is None or b.allow():
            if lm.on_fallback and (b is None or b.state == CLOSED):   # back once a probe closed it
                self._switch(lm, False)
            return lm
        fb = lm.fallback
        if fb is not None and fb.ready and (fb.breaker is None or fb.breaker.allow()):
            if not lm.on_fallback:
                self._switch(lm, True)
            lm.fallback_requests += 1
            return fb
        raise Overloaded(f"model {lm.name!r} version {lm.version!r} is failing (circuit breaker open after "
                         f"{b.consecutive} consecutive failures) and has no working fallback; retry later",
                         503, b.retry_after_s())

    @staticmethod
    def _switch(lm: "LoadedModel", to_fallback: bool) -> None:
        lm.on_fallback = to_fallback
        lm.fallback_switches += 1
        fb = lm.fallback
        log.warning("switched to the fallback" if to_fallback else "switched back to the primary", extra={
            "model": lm.name, "version": lm.version, "breaker": lm.breaker.state if lm.breaker else "off",
            "fallback": str(fb.source) if fb is not None and fb.source else None})

    def feedback(self, name: str, body: bytes) -> bytes:
        """``POST /v2/models/{m}/feedback``: an application's outcome for an answered request (experiments)."""
        exp = self.s.experiments
        if exp is None:
            raise RequestError(f"no experiment runs on this server, so feedback for model {name!r} has nowhere to"
                               " go", 404)
        return json_dumps(exp.feedback(name, body))

    # -- other threads (gRPC handlers) ---------------------------------------
    def call_from_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop and return its result (errors are re-raised here)."""
        return self.s.in_loop(fn)

    def submit_from_thread(self, fn: Callable[[], None]) -> None:
        self.s.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        self._decoder.shutdown(wait=False)
        if self._access is not None:
            self._access.flush()
