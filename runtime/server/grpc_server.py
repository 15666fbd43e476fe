"""Optional gRPC endpoint for the Open Inference Protocol (``inference.GRPCInferenceService``).

The service is the one Triton and KServe expose, built on the protobuf modules that
``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``), so
``tritonclient.grpc.InferenceServerClient`` works against it unchanged. Implemented RPCs:
ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer (typed
``contents`` and ``raw_input_contents``; outputs always come back as ``raw_output_contents``,
as Triton does). The others answer UNIMPLEMENTED.

No logic of its own: a request is turned into the same v2 request document the HTTP route
decodes, then resolved, validated (``protocol.parse_infer_doc``), queued on the model's
``Batcher`` and recorded in its ``ModelStats`` on the server's event-loop thread, exactly as
``routes.Router._infer`` does. gRPC runs its handlers on a small thread pool; each handler
marshals its work onto the loop and waits for the batcher's callback.

    server = ModelServer(ServerConfig(port=0, grpc_port=0)); server.start()
    server.grpc_address   # (host, port)
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeml.errors import EdgemlError, MissingDependency
from edgeml.runtime.server.logs import LOGGER
from edgeml.runtime.server.protocol import DTYPE_TO_DATATYPE, BadRequest, json_loads, parse_infer_doc

if TYPE_CHECKING:  # pragma: no cover
    from edgeml.runtime.server.app import ModelServer

log = logging.getLogger(LOGGER)

GRPC_WORKERS = 16   # handler threads; each waits for its batch, so concurrency above this queues in gRPC

# v2 datatype -> the InferTensorContents field that carries it (FP16 only travels raw)
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _import_grpc() -> tuple[Any, Any, Any]:
    """Return (grpc, service_pb2, service_pb2_grpc) or raise MissingDependency."""
    try:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except ImportError as exc:
        raise MissingDependency(
            f"the gRPC endpoint needs grpcio and tritonclient[grpc], which are not installed ({exc})",
            hint="pip install 'edgeml[serve]'") from exc
    except RuntimeError as exc:   # tritonclient installed without its grpc extra
        raise MissingDependency(f"the gRPC endpoint needs tritonclient[grpc]: {exc}",
                                hint="pip install 'edgeml[serve]'") from exc
    return grpc, service_pb2, service_pb2_grpc


def request_doc(request: Any) -> tuple[dict[str, Any], bytes | None]:
    """A ``ModelInferRequest`` as the v2 JSON document + binary tail that ``parse_infer_doc`` checks."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"the request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                         "give raw contents for every input or for none")
    inputs = []
    for i, t in enumerate(request.inputs):
        tensor: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if raw:
            tensor["parameters"] = {"binary_data_size": len(raw[i])}
        elif t.HasField("contents"):
            field = _CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise BadRequest(f"input {t.name!r}: datatype {t.datatype} must be sent in raw_input_contents")
            tensor["data"] = list(getattr(t.contents, field))
        inputs.append(tensor)
    doc: dict[str, Any] = {"inputs": inputs}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [{"name": o.name} for o in request.outputs]
    return doc, (b"".join(raw) if raw else None)


def _grpc_code(grpc: Any, status: int) -> Any:
    codes = grpc.StatusCode
    return {400: codes.INVALID_ARGUMENT, 404: codes.NOT_FOUND, 405: codes.UNIMPLEMENTED,
            503: codes.UNAVAILABLE}.get(status, codes.INTERNAL if status >= 500 else codes.INVALID_ARGUMENT)


class GrpcEndpoint:
    """The gRPC server of one ``ModelServer`` (start after the server's loop runs)."""

    def __init__(self, server: "ModelServer", host: str, port: int):
        """Import grpc and bind ``host:port`` (0 = a free port); serving starts with ``start()``."""
        from edgeml.errors import ServeError

        self.s = server
        grpc, self._pb, pb_grpc = _import_grpc()
        self._grpc = grpc
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="edgeml-grpc"),
            options=[("grpc.max_receive_message_length", int(server.max_body_bytes)),
                     ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_make_servicer(self), self._server)
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = "the port is taken or the address is not local"
        try:
            bound = self._server.add_insecure_port(bind)
        except RuntimeError as exc:
            bound, reason = 0, str(exc)
        if not bound:
            self._server = None
            raise ServeError(f"cannot listen for gRPC on {bind}: {reason}",
                             hint="pick another --grpc-port (0 picks a free one)")
        self.address: tuple[str, int] = (host, bound)

    def start(self) -> tuple[str, int]:
        self._server.start()
        return self.address

    def stop(self, grace: float) -> Any:
        """Stop accepting RPCs; return an Event set once in-flight ones finished (or ``grace`` passed)."""
        if self._server is None:
            return None
        server, self._server = self._server, None
        return server.stop(grace)

    # -- loop-thread work ------------------------------------------------
    def _ready(self) -> bool:
        return not self.s.draining and all(lm.ready for lm, _ in self.s.repo.all())

    def infer(self, request: Any) -> concurrent.futures.Future:
        """Any thread: start one inference; the future resolves to (status, response or message)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        t0 = self.s.clock()
        try:
            doc, binary = request_doc(request)
        except BadRequest as exc:
            fut.set_result((exc.status, exc.message, None))
            return fut
        self.s._loop.call_soon_threadsafe(self._infer_on_loop, request, doc, binary, fut, t0)
        return fut

    def _infer_on_loop(self, request, doc, binary, fut, t0) -> None:
        s = self.s
        s.inflight += 1
        lm = None
        rid = request.id or s.next_request_id()

        def finish(status: int, payload: Any) -> None:
            s.inflight -= 1
            ms = (s.clock() - t0) * 1000.0
            if lm is not None:
                lm.stats.record(status, ms)
            if status != 200 or s.config.access_log:
                fields = {"request_id": rid, "rpc": "ModelInfer", "model": request.model_name,
                          "status": status, "latency_ms": round(ms, 3)}
                if lm is not None:
                    fields["version"] = lm.version
                if status != 200:
                    fields["error"] = payload
                    log.log(logging.ERROR if status >= 500 else logging.WARNING, "request failed", extra=fields)
                else:
                    log.info("request", extra=fields)
            fut.set_result((status, payload, lm))

        try:
            lm = s.repo.resolve(request.model_name, request.model_version or None)
            req = parse_infer_doc(doc, binary, lm)
        except BadRequest as exc:
            return finish(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - one request only
            log.exception("gRPC handler crashed", extra={"request_id": rid})
            return finish(500, f"internal server error: {exc}")

        def done(result: Any, queue_ms: float) -> None:
            if isinstance(result, BaseException):
                msg = result.message if isinstance(result, EdgemlError) else f"{type(result).__name__}: {result}"
                return finish(500, f"model {lm.name!r} version {lm.version!r} failed: {msg}")
            try:
                finish(200, self._response(lm, request.id, result, req.outputs or lm.output_order))
            except Exception as exc:  # noqa: BLE001
                finish(500, f"could not encode the outputs: {exc}")

        lm.batcher.submit(req.feeds, req.rows, done)

    def _response(self, lm, request_id: str, outputs: dict[str, np.ndarray], names) -> Any:
        resp = self._pb.ModelInferResponse(model_name=lm.name, model_version=lm.version, id=request_id)
        for name in names:
            arr = outputs[name]
            dt = DTYPE_TO_DATATYPE.get(arr.dtype.name)
            if dt is None:
                raise EdgemlError(f"output {name!r} has dtype {arr.dtype}, which the v2 protocol cannot carry")
            resp.outputs.add(name=name, datatype=dt, shape=list(arr.shape))
            resp.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
        return resp

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        def do() -> dict[str, Any]:
            return json_loads(self.s.repo.metadata_bytes(name, version or None))
        return self.s._in_loop(do)

    def model_ready(self, name: str, version: str) -> bool:
        return self.s._in_loop(lambda: self.s.repo.resolve(name, version or None).ready)


def _make_servicer(ep: GrpcEndpoint) -> Any:
    grpc, pb = ep._grpc, ep._pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    def fail(context, status: int, message: str):
        context.abort(_grpc_code(grpc, status), message)

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return pb.ServerReadyResponse(ready=ep.s._in_loop(ep._ready))

        def ServerMetadata(self, request, context):
            meta = json_loads(ep.s.router._server_metadata())
            return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                             extensions=meta["extensions"])

        def ModelReady(self, request, context):
            try:
                return pb.ModelReadyResponse(ready=ep.model_ready(request.name, request.version))
            except BadRequest as exc:
                fail(context, exc.status, exc.message)

        def ModelMetadata(self, request, context):
            try:
                meta = ep.model_metadata(request.name, request.version)
            except BadRequest as exc:
                fail(context, exc.status, exc.message)
            tm = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
                outputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

        def ModelInfer(self, request, context):
            fut = ep.infer(request)
            while True:
                try:
                    status, payload, _ = fut.result(timeout=1.0)
                    break
                except concurrent.futures.TimeoutError:
                    if not context.is_active():   # client gone or server stopped: the batcher still answers fut
                        fail(context, 503, "request cancelled")
            if status != 200:
                fail(context, status, payload)
            return payload

    return Servicer()
