"""Optional gRPC endpoint for the Open Inference Protocol (``inference.GRPCInferenceService``).

The service is the one Triton and KServe expose, built on the protobuf modules that
``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``), so
``tritonclient.grpc.InferenceServerClient`` works against it unchanged. Implemented RPCs:
ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer (typed
``contents`` and ``raw_input_contents``; outputs always come back as ``raw_output_contents``,
as Triton does). The others answer UNIMPLEMENTED.

No logic of its own: a request is turned into the same v2 request document the HTTP route
decodes and handed to the server's ``DataPlane`` (lookup, validation, batching, in-flight
counting, statistics, access log and error mapping, the same code HTTP uses). gRPC runs its
handlers on a small thread pool; each handler marshals its work onto the loop through the
data plane and waits for the reply.

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
from edgeml.runtime.server.dataplane import Call
from edgeml.runtime.server.protocol import (
    DTYPE_TO_DATATYPE,
    BadRequest,
    InferRequest,
    RequestError,
    json_loads,
    parse_infer_doc,
)

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
    return {400: codes.INVALID_ARGUMENT, 401: codes.UNAUTHENTICATED, 403: codes.PERMISSION_DENIED,
            404: codes.NOT_FOUND, 405: codes.UNIMPLEMENTED, 413: codes.RESOURCE_EXHAUSTED, 429: codes.RESOURCE_EXHAUSTED,
            503: codes.UNAVAILABLE}.get(status, codes.INTERNAL if status >= 500 else codes.INVALID_ARGUMENT)


class GrpcEndpoint:
    """The gRPC server of one ``ModelServer`` (start after the server's loop runs)."""

    def __init__(self, server: "ModelServer", host: str, port: int):
        """Import grpc and bind ``host:port`` (0 = a free port); serving starts with ``start()``."""
        from edgeml.errors import ServeError

        self.plane = server.plane
        grpc, self._pb, pb_grpc = _import_grpc()
        self._grpc = grpc
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="edgeml-grpc"),
            options=[("grpc.max_receive_message_length", int(server.max_body_bytes)),
                     ("grpc.max_concurrent_streams", 100),
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

    # -- requests (any gRPC handler thread) ------------------------------
    def infer(self, request: Any) -> concurrent.futures.Future:
        """Start one inference; the future resolves to (status, response or message)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            doc, binary = request_doc(request)
        except BadRequest as exc:
            fut.set_result((exc.status, exc.message))
            return fut
        plane = self.plane
        reply = _GrpcReply(self, fut)

        def decode(lm: Any, max_rows: int | None) -> InferRequest:
            return parse_infer_doc(doc, binary, lm, max_rows)

        def start() -> None:
            call = plane.begin(request.id or None, "grpc", "ModelInfer")
            plane.infer(call, request.model_name, request.model_version or None, decode, reply,
                        request.ByteSize() - (len(binary) if binary is not None else 0))

        plane.submit_from_thread(start)
        return fut

    def response(self, lm: Any, request_id: str, outputs: dict[str, np.ndarray], names: Any) -> Any:
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
        return json_loads(self.plane.call_from_thread(lambda: self.plane.model_metadata(name, version or None)))

    def model_ready(self, name: str, version: str) -> bool:
        return self.plane.call_from_thread(lambda: self.plane.resolve(name, version or None).available(self.plane.clock()))

    def ready(self) -> bool:
        return self.plane.call_from_thread(self.plane.ready)


class _GrpcReply:
    """How an inference result or error goes back to the waiting gRPC handler thread."""

    __slots__ = ("ep", "fut")

    def __init__(self, ep: GrpcEndpoint, fut: concurrent.futures.Future):
        self.ep, self.fut = ep, fut

    def ok(self, call: Call, req: InferRequest, outputs: dict[str, np.ndarray]) -> None:
        lm = call.lm
        resp = self.ep.response(lm, req.id or "", outputs, req.outputs or lm.output_order)
        self.ep.plane.end(call, 200)
        self.fut.set_result((200, resp))

    def error(self, call: Call, status: int, message: str) -> None:
        self.ep.plane.end(call, status, message)
        self.fut.set_result((status, message))


def _make_servicer(ep: GrpcEndpoint) -> Any:
    grpc, pb = ep._grpc, ep._pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    def fail(context, status: int, message: str):
        context.abort(_grpc_code(grpc, status), message)

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return pb.ServerReadyResponse(ready=ep.ready())

        def ServerMetadata(self, request, context):
            meta = ep.plane.server_metadata()
            return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                             extensions=meta["extensions"])

        def ModelReady(self, request, context):
            try:
                return pb.ModelReadyResponse(ready=ep.model_ready(request.name, request.version))
            except RequestError as exc:
                fail(context, exc.status, exc.message)

        def ModelMetadata(self, request, context):
            try:
                meta = ep.model_metadata(request.name, request.version)
            except RequestError as exc:
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
                    status, payload = fut.result(timeout=1.0)
                    break
                except concurrent.futures.TimeoutError:
                    if not context.is_active():   # client gone or server stopped: the batcher still answers fut
                        fail(context, 503, "request cancelled")
            if status != 200:
                fail(context, status, payload)
            return payload

    return Servicer()
