"""The v2 (Open Inference Protocol) HTTP endpoints, on the event-loop thread.

Wire format only: lookup, validation, batching, in-flight counting, statistics, the access
log and the error mapping live in ``dataplane.DataPlane``, shared with gRPC.

GET  /v2/health/live | /v2/health/ready | /v2 | /metrics
GET  /v2/models/{m}[/versions/{v}] [/ready | /config | /stats]
POST /v2/models/{m}[/versions/{v}]/infer
POST /v2/models/{m}/feedback            (experiments: {"id": request id, "label" | "reward"})
POST /v2/repository/index | /v2/repository/models/{m}/load | /unload
"""

from __future__ import annotations

import hmac
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from edgeml.errors import EdgemlError
from edgeml.runtime.server import generate
from edgeml.runtime.server.http import CT_JSON, CT_OCTET, CT_TEXT, build_response
from edgeml.runtime.server.logs import LOGGER
from edgeml.runtime.server.metrics import render_prometheus, render_resilience
from edgeml.runtime.server.dataplane import Call
from edgeml.runtime.server.protocol import (
    BadRequest,
    InferRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestError,
    encode_infer_response,
    json_dumps,
    json_loads,
    parse_header_length,
    parse_infer_request,
)

if TYPE_CHECKING:  # pragma: no cover
    from edgeml.runtime.server.app import ModelServer

log = logging.getLogger(LOGGER)
_OK_LIVE = b'{"live":true}'
_OK_READY = b'{"ready":true}'
_NOT_READY = b'{"ready":false}'


def _clean_id(raw: bytes | None) -> str | None:
    if not raw or len(raw) > 128:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() and '"' not in text else None


class Router:
    def __init__(self, server: "ModelServer"):
        self.s = server
        self.plane = server.plane

    # -- plumbing -----------------------------------------------------------
    def _send(self, conn, slot, call: Call, status: int, body: bytes, ctype: bytes = CT_JSON, extra: bytes = b"",
              error: str | None = None) -> None:
        codes = self.s.http_codes
        codes[status] = codes.get(status, 0) + 1
        conn.respond(slot, build_response(status, body, ctype,
                                          b"X-Request-ID: " + call.rid.encode() + b"\r\n" + extra, slot[1]))
        self.plane.end(call, status, error)

    def _error(self, conn, slot, call: Call, status: int, message: str, extra: bytes = b"") -> None:
        if call.retry_after_s is not None:
            extra += b"Retry-After: %d\r\n" % call.retry_after_s
        self._send(conn, slot, call, status, json_dumps({"error": message}), extra=extra, error=message)

    def too_big(self, conn, slot, method: bytes, url: bytes, headers) -> None:
        call = self.plane.begin(_clean_id(headers.get(b"x-request-id")), method.decode("latin-1"),
                                url.split(b"?", 1)[0].decode("latin-1"))
        self._error(conn, slot, call, 413, f"request body is over the server's limit of {self.s.max_body_bytes} "
                    "bytes (--max-body-mb); split the request")

    # -- dispatch -----------------------------------------------------------
    def dispatch(self, conn, slot, method: bytes, url: bytes, headers: dict, body: bytes, keep_alive: bool) -> None:
        # The hot path, POST /v2/models/{name}/infer with a plain name, goes straight to _infer; every other
        # URL (versions, escapes, a query) takes the general route below, which gives the same answer.
        if method == b"POST" and url[-6:] == b"/infer" and url[:11] == b"/v2/models/":
            name = url[11:-6]
            if name and b"/" not in name and b"%" not in name and b"?" not in name:
                call = self.plane.begin(_clean_id(headers.get(b"x-request-id")), "POST", url.decode("latin-1"))
                try:
                    return self._infer(conn, slot, call, name.decode("latin-1"), None, headers, body)
                except Exception as exc:  # noqa: BLE001 - never let one request kill the connection
                    status, message = self.plane.error_of(exc, call)
                    return self._error(conn, slot, call, status, message)
        path = url.split(b"?", 1)[0].decode("latin-1")
        if "%" in path:
            path = unquote(path)
        call = self.plane.begin(_clean_id(headers.get(b"x-request-id")), method.decode("latin-1"), path)
        try:
            self._route(conn, slot, call, method, path.strip("/").split("/"), headers, body)
        except MethodNotAllowed as exc:
            self._error(conn, slot, call, 405, exc.message, b"Allow: " + exc.allow.encode() + b"\r\n")
        except Exception as exc:  # noqa: BLE001 - never let one request kill the connection
            status, message = self.plane.error_of(exc, call)
            self._error(conn, slot, call, status, message)

    def _route(self, conn, slot, call: Call, method: bytes, parts: list[str], headers: dict, body: bytes) -> None:
        path = call.path
        n = len(parts)
        if parts[0] in ("v1", "v2") and generate.handles(parts):     # text generation (runtime/server/generate.py)
            return generate.dispatch(self, conn, slot, call, method, parts, body)
        if parts[0] == "v2":
            if n >= 3 and parts[1] == "models":
                return self._models(conn, slot, call, method, parts[2], parts[3:], headers, body)
            if n >= 3 and parts[1] == "repository":
                self._check_admin(headers)
                _need(method, b"POST", path)
                return self._repository(conn, slot, call, parts[2:], body)
            if n == 1:
                _need(method, b"GET", path)
                return self._send(conn, slot, call, 200, self.plane.server_metadata_bytes())
            if n == 3 and parts[1] == "health" and parts[2] in ("live", "ready"):
                _need(method, b"GET", path)
                if parts[2] == "live":
                    return self._send(conn, slot, call, 200, _OK_LIVE)
                ready = self.plane.ready()
                return self._send(conn, slot, call, 200 if ready else 503, _OK_READY if ready else _NOT_READY)
        elif parts == ["metrics"]:
            _need(method, b"GET", path)
            s = self.s
            loaded = [lm for lm, _ in s.repo.all()]
            models = [(lm.name, lm.version, lm.ready, lm.stats) for lm in loaded]
            text = render_prometheus(models, s.http_codes, s.inflight) + render_resilience(
                [(lm.name, lm.version, lm.resilience()) for lm in loaded]) + generate.metrics_text(s)
            return self._send(conn, slot, call, 200, text, CT_TEXT)
        raise NotFound(f"no such endpoint {path}")

    def _models(self, conn, slot, call: Call, method: bytes, name: str, rest: list[str], headers, body) -> None:
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "infer", "ready", "config", "stats", "feedback"):
            raise NotFound(f"no such endpoint {call.path}")
        if action == "feedback":       # an application's outcome for an answered request (runtime/experiments.py)
            _need(method, b"POST", call.path)
            return self._send(conn, slot, call, 200, self.plane.feedback(name, body))
        if action == "infer":
            _need(method, b"POST", call.path)
            return self._infer(conn, slot, call, name, version, headers, body)
        _need(method, b"GET", call.path)
        return self._model_get(conn, slot, call, name, version, action)

    def _check_admin(self, headers: dict) -> None:
        """The repository API changes what is served: off without a token, else Bearer token required."""
        token = self.s.config.admin_token
        if token is None:
            raise RequestError("repository API is disabled; start the server with --admin-token", 403)
        given = headers.get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), token.encode()):
            raise RequestError("the repository API needs the header 'Authorization: Bearer <admin token>'", 401)

    # -- inference (hot path) ---------------------------------------------
    def _infer(self, conn, slot, call: Call, name, version, headers, body) -> None:
        enc = headers.get(b"content-encoding")
        raw_hl = headers.get(b"inference-header-content-length")
        hl = parse_header_length(raw_hl) if raw_hl is not None else None

        def decode(lm, max_rows: int | None) -> InferRequest:
            data = self._decompress(enc, body) if enc is not None else body
            return parse_infer_request(data, hl, lm, max_rows)

        # what decoding costs: the JSON part (binary tensors are read in place) or the whole compressed body
        cost = hl if hl is not None and enc is None else len(body)
        if self.s.experiments is not None:     # the sticky A/B key matters only while an experiment runs
            call.key = _clean_id(headers.get(b"x-experiment-key"))
        self.plane.infer(call, name, version, decode, _HttpReply(self, conn, slot), cost)

    def _decompress(self, enc: bytes, body: bytes) -> bytes:
        enc = enc.strip().lower()
        if enc in (b"identity", b""):
            return body
        if enc not in (b"gzip", b"deflate"):
            raise BadRequest(f"Content-Encoding {enc.decode('latin-1')!r} is not supported; use gzip, deflate or none")
        d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == b"gzip" else zlib.MAX_WBITS)
        try:
            out = d.decompress(body, self.s.max_body_bytes + 1)
        except zlib.error as exc:
            raise BadRequest(f"request body is not valid {enc.decode()} data: {exc}") from None
        if len(out) > self.s.max_body_bytes or d.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed request body is over the server's limit of {self.s.max_body_bytes}"
                                  " bytes (--max-body-mb); split the request")
        return out

    # -- metadata -------------------------------------------------------------
    def _model_get(self, conn, slot, call: Call, name, version, action) -> None:
        if action == "":
            return self._send(conn, slot, call, 200, self.plane.model_metadata(name, version))
        lm = self.plane.resolve(name, version)
        if action == "ready":   # not ready while its breaker is open and no fallback can answer
            ready = lm.available(self.s.clock())
            body = json_dumps({"name": lm.name, "version": lm.version, "ready": ready})
            return self._send(conn, slot, call, 200 if ready else 503, body)
        if action == "config":
            return self._send(conn, slot, call, 200, json_dumps(self._config(lm)))
        st = {"name": lm.name, "version": lm.version, **lm.stats.to_dict()}
        return self._send(conn, slot, call, 200, json_dumps({"model_stats": [st]}))

    def _config(self, lm) -> dict[str, Any]:
        def dims(spec):
            shape = spec.shape[1:] if lm.batchable else spec.shape
            return [-1 if d is None else d for d in shape]

        b = lm.batcher
        return {
            "name": lm.name, "platform": lm.backend_name, "backend": lm.backend_name,
            "max_batch_size": b.max_batch if lm.batchable else 0,
            "input": [{"name": s.name, "data_type": "TYPE_" + s.datatype, "dims": dims(s)} for s in lm.input_specs.values()],
            "output": [{"name": s.name, "data_type": "TYPE_" + s.datatype, "dims": dims(s)} for s in lm.output_specs.values()],
            "dynamic_batching": {"max_queue_delay_microseconds": int(b.max_delay_s * 1e6)} if lm.batchable else None,
            "parameters": {"precision": lm.precision, "batch_mode": lm.mode, "version": lm.version},
        }


    # -- repository extension ----------------------------------------------
    def _repository(self, conn, slot, call: Call, parts: list[str], body: bytes) -> None:
        s = self.s
        if parts == ["index"]:
            rows = [{"name": lm.name, "version": lm.version, "state": "READY" if lm.ready else "UNAVAILABLE",
                     "default": default} for lm, default in s.repo.all()]
            return self._send(conn, slot, call, 200, json_dumps(rows))
        if len(parts) != 3 or parts[0] != "models" or parts[2] not in ("load", "unload"):
            raise NotFound(f"no such endpoint {call.path}")
        params = _load_params(body)
        name, op = parts[1], parts[2]
        version = params.get("version")
        if version is not None and (not isinstance(version, (str, int)) or isinstance(version, bool)):
            raise BadRequest(f"parameters.version must be a string, got {version!r}")
        version = str(version) if version is not None else None
        if op == "unload":
            fut = s.load_async(lambda: s.unload(name, version))
        else:
            artifact = self._artifact_for(name, params.get("artifact"))
            make_default = params.get("make_default", True)
            if type(make_default) is not bool:
                raise BadRequest(f"parameters.make_default must be true or false, got {make_default!r}")
            fut = s.load_async(lambda: s.load(artifact, name=name, version=version, make_default=make_default))

        def finished(f) -> None:
            exc = f.exception()
            if exc is None:
                return self._send(conn, slot, call, 200, b"{}")
            if isinstance(exc, RequestError):
                return self._error(conn, slot, call, exc.status, exc.message)
            if isinstance(exc, EdgemlError):
                return self._error(conn, slot, call, 400, f"cannot {op} model {name!r}: {exc.message}")
            log.error("repository call crashed", exc_info=exc, extra={"request_id": call.rid})
            return self._error(conn, slot, call, 500, f"cannot {op} model {name!r}: {type(exc).__name__}")

        fut.add_done_callback(finished)

    def _artifact_for(self, name: str, given: Any) -> Path:
        s = self.s
        if given is None:
            entry = s.repo.entries.get(name)
            if entry is None or entry.source is None:
                raise NotFound(
                    f"model {name!r} was never loaded here; give parameters.artifact, the path of an .edgepkg"
                    " inside the server's repository folder")
            return entry.source
        if not isinstance(given, str):
            raise BadRequest("parameters.artifact must be a path string")
        root = s.config.repository_dir
        if root is None:
            raise BadRequest("this server loads new artifact paths over HTTP only from a repository folder",
                             hint="start it with --repository DIR")
        root = Path(root).resolve()
        path = (root / given).resolve()
        if not path.is_relative_to(root):
            raise BadRequest(f"artifact {given!r} is outside the repository folder {root}")
        if not path.is_file():
            raise NotFound(f"artifact {given!r} does not exist in the repository folder {root}")
        return path


def _load_params(body: bytes) -> dict[str, Any]:
    """The repository load/unload body: ``{"parameters": {...}}``, with tritonclient's ``config`` JSON string."""
    if not body.strip():
        return {}
    try:
        doc = json_loads(body)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object {\"parameters\": {...}}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    cfg = params.get("config")
    if isinstance(cfg, str):   # tritonclient's load_model(config=json string)
        try:
            extra = json_loads(cfg)
        except ValueError as exc:
            raise BadRequest(f"parameters.config is not valid JSON: {exc}") from None
        if isinstance(extra, dict):
            params = {**extra, **{k: v for k, v in params.items() if k != "config"}}
    return params


def _need(method: bytes, allowed: bytes, path: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(f"{path} answers {allowed.decode()} only, not {method.decode('latin-1')}",
                               allowed.decode())


class _HttpReply:
    """How an inference result or error goes back on an HTTP connection."""

    __slots__ = ("router", "conn", "slot")

    def __init__(self, router: Router, conn, slot: list):
        self.router, self.conn, self.slot = router, conn, slot

    def ok(self, call: Call, req: InferRequest, outputs) -> None:
        lm = call.lm
        data, hlen = encode_infer_response(lm.name, lm.version, req.id, outputs, req, lm.output_order)
        if hlen is None:
            self.router._send(self.conn, self.slot, call, 200, data)
        else:
            self.router._send(self.conn, self.slot, call, 200, data, CT_OCTET,
                              b"Inference-Header-Content-Length: %d\r\n" % hlen)

    def error(self, call: Call, status: int, message: str) -> None:
        self.router._error(self.conn, self.slot, call, status, message)
