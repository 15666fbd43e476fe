"""The v2 (Open Inference Protocol) endpoints, on the event-loop thread.

GET  /v2/health/live | /v2/health/ready | /v2 | /metrics
GET  /v2/models/{m}[/versions/{v}] [/ready | /config | /stats]
POST /v2/models/{m}[/versions/{v}]/infer
POST /v2/repository/index | /v2/repository/models/{m}/load | /unload
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from edgeml.errors import EdgemlError
from edgeml.runtime.server.http import CT_JSON, CT_OCTET, CT_TEXT, build_response
from edgeml.runtime.server.logs import LOGGER
from edgeml.runtime.server.metrics import render_prometheus
from edgeml.runtime.server.protocol import BadRequest, encode_infer_response, json_dumps, json_loads, parse_infer_request

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
        self.perf = server.clock

    # -- plumbing -----------------------------------------------------------
    def _send(self, conn, slot, status: int, body: bytes, rid: str, t0: float, method: bytes, path: str,
              ctype: bytes = CT_JSON, extra: bytes = b"", lm=None, error: str | None = None) -> None:
        s = self.s
        s.inflight -= 1
        codes = s.http_codes
        codes[status] = codes.get(status, 0) + 1
        ms = (self.perf() - t0) * 1000.0
        if lm is not None:
            lm.stats.record(status, ms)
        conn.respond(slot, build_response(status, body, ctype, b"X-Request-ID: " + rid.encode() + b"\r\n" + extra,
                                          slot[1]))
        if error is not None or s.config.access_log:
            fields = {"request_id": rid, "method": method.decode("latin-1"), "path": path, "status": status,
                      "latency_ms": round(ms, 3)}
            if lm is not None:
                fields["model"], fields["version"] = lm.name, lm.version
            if error is not None:
                fields["error"] = error
                log.log(logging.ERROR if status >= 500 else logging.WARNING, "request failed", extra=fields)
            else:
                log.info("request", extra=fields)

    def _error(self, conn, slot, status, message, rid, t0, method, path, lm=None) -> None:
        self._send(conn, slot, status, json_dumps({"error": message}), rid, t0, method, path, lm=lm, error=message)

    def too_big(self, conn, slot, method, url, headers) -> None:
        rid = _clean_id(headers.get(b"x-request-id")) or self.s.next_request_id()
        self._error(conn, slot, 400, f"request body is over the server's limit of {self.s.max_body_bytes} bytes",
                    rid, self.perf(), method, url.decode("latin-1"))

    # -- dispatch -----------------------------------------------------------
    def dispatch(self, conn, slot, method: bytes, url: bytes, headers: dict, body: bytes, keep_alive: bool) -> None:
        t0 = self.perf()
        rid = _clean_id(headers.get(b"x-request-id")) or self.s.next_request_id()
        raw_path = url.split(b"?", 1)[0]
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        parts = path.strip("/").split("/")
        try:
            if parts[0] == "v2":
                n = len(parts)
                if n >= 3 and parts[1] == "models":
                    name = parts[2]
                    version = None
                    rest = parts[3:]
                    if len(rest) >= 2 and rest[0] == "versions":
                        version, rest = rest[1], rest[2:]
                    action = rest[0] if rest else ""
                    if len(rest) > 1:
                        raise BadRequest(f"no such endpoint {path}", 404)
                    if action == "infer":
                        if method != b"POST":
                            raise BadRequest("infer needs POST", 405)
                        return self._infer(conn, slot, name, version, headers, body, rid, t0, method, path)
                    if method != b"GET":
                        raise BadRequest(f"{path} needs GET", 405)
                    return self._model_get(conn, slot, name, version, action, rid, t0, method, path)
                if n == 1:
                    return self._send(conn, slot, 200, self._server_metadata(), rid, t0, method, path)
                if n == 3 and parts[1] == "health":
                    if parts[2] == "live":
                        return self._send(conn, slot, 200, _OK_LIVE, rid, t0, method, path)
                    if parts[2] == "ready":
                        ready = not self.s.draining and all(lm.ready for lm, _ in self.s.repo.all())
                        return self._send(conn, slot, 200 if ready else 503, _OK_READY if ready else _NOT_READY,
                                          rid, t0, method, path)
                if n >= 3 and parts[1] == "repository":
                    if method != b"POST":
                        raise BadRequest(f"{path} needs POST", 405)
                    return self._repository(conn, slot, parts[2:], body, rid, t0, method, path)
            elif parts == ["metrics"]:
                s = self.s
                models = [(lm.name, lm.version, lm.ready, lm.stats) for lm, _ in s.repo.all()]
                return self._send(conn, slot, 200, render_prometheus(models, s.http_codes, s.inflight), rid, t0,
                                  method, path, ctype=CT_TEXT)
            raise BadRequest(f"no such endpoint {path}", 404)
        except BadRequest as exc:
            self._error(conn, slot, exc.status, exc.message, rid, t0, method, path)
        except Exception as exc:  # noqa: BLE001 - never let one request kill the connection
            log.exception("handler crashed", extra={"request_id": rid, "path": path})
            self._error(conn, slot, 500, f"internal server error: {exc}", rid, t0, method, path)

    # -- inference (hot path) ---------------------------------------------
    def _infer(self, conn, slot, name, version, headers, body, rid, t0, method, path) -> None:
        lm = self.s.repo.resolve(name, version)
        try:
            enc = headers.get(b"content-encoding")
            if enc is not None:
                body = self._decompress(enc, body)
            hl = headers.get(b"inference-header-content-length")
            if hl is not None:
                try:
                    hl = int(hl)
                except ValueError:
                    raise BadRequest(f"Inference-Header-Content-Length {hl!r} is not an integer") from None
            req = parse_infer_request(body, hl, lm)
        except BadRequest as exc:
            return self._error(conn, slot, exc.status, exc.message, rid, t0, method, path, lm=lm)

        def done(result: Any, queue_ms: float) -> None:
            if isinstance(result, BaseException):
                msg = result.message if isinstance(result, EdgemlError) else f"{type(result).__name__}: {result}"
                return self._error(conn, slot, 500, f"model {lm.name!r} version {lm.version!r} failed: {msg}",
                                   rid, t0, method, path, lm=lm)
            try:
                data, hlen = encode_infer_response(lm.name, lm.version, req.id, result, req, lm.output_order)
            except Exception as exc:  # noqa: BLE001
                return self._error(conn, slot, 500, f"could not encode the outputs: {exc}", rid, t0, method, path, lm=lm)
            if hlen is None:
                self._send(conn, slot, 200, data, rid, t0, method, path, lm=lm)
            else:
                self._send(conn, slot, 200, data, rid, t0, method, path, ctype=CT_OCTET,
                           extra=b"Inference-Header-Content-Length: %d\r\n" % hlen, lm=lm)

        lm.batcher.submit(req.feeds, req.rows, done)

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
            raise BadRequest(f"decompressed request body is over the server's limit of {self.s.max_body_bytes} bytes")
        return out

    # -- metadata -------------------------------------------------------------
    def _server_metadata(self) -> bytes:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("edgeml")
        except PackageNotFoundError:  # pragma: no cover
            v = "0"
        return json_dumps({"name": self.s.config.server_name, "version": v,
                           "extensions": ["binary_tensor_data", "model_repository", "statistics", "metrics"]})

    def _model_get(self, conn, slot, name, version, action, rid, t0, method, path) -> None:
        repo = self.s.repo
        if action == "":
            return self._send(conn, slot, 200, repo.metadata_bytes(name, version), rid, t0, method, path)
        lm = repo.resolve(name, version)
        if action == "ready":
            body = json_dumps({"name": lm.name, "version": lm.version, "ready": lm.ready})
            return self._send(conn, slot, 200 if lm.ready else 503, body, rid, t0, method, path)
        if action == "config":
            return self._send(conn, slot, 200, json_dumps(self._config(lm)), rid, t0, method, path)
        if action == "stats":
            st = {"name": lm.name, "version": lm.version, **lm.stats.to_dict()}
            return self._send(conn, slot, 200, json_dumps({"model_stats": [st]}), rid, t0, method, path)
        raise BadRequest(f"no such endpoint {path}", 404)

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
    def _repository(self, conn, slot, parts, body, rid, t0, method, path) -> None:
        s = self.s
        if parts == ["index"]:
            rows = [{"name": lm.name, "version": lm.version, "state": "READY" if lm.ready else "UNAVAILABLE",
                     "default": default} for lm, default in s.repo.all()]
            return self._send(conn, slot, 200, json_dumps(rows), rid, t0, method, path)
        if len(parts) != 3 or parts[0] != "models" or parts[2] not in ("load", "unload"):
            raise BadRequest(f"no such endpoint {path}", 404)
        name, op = parts[1], parts[2]
        params: dict[str, Any] = {}
        if body.strip():
            try:
                doc = json_loads(body)
            except ValueError as exc:
                raise BadRequest(f"request body is not valid JSON: {exc}") from None
            params = (doc.get("parameters") if isinstance(doc, dict) else None) or {}
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
        version = params.get("version")
        version = str(version) if version is not None else None
        if op == "unload":
            fut = s.load_async(lambda: s.unload(name, version))
        else:
            artifact = self._artifact_for(name, params.get("artifact"))
            make_default = bool(params.get("make_default", True))
            fut = s.load_async(lambda: s.load(artifact, name=name, version=version, make_default=make_default))

        def finished(f) -> None:
            exc = f.exception()
            if exc is None:
                return self._send(conn, slot, 200, b"{}", rid, t0, method, path)
            if isinstance(exc, BadRequest):
                return self._error(conn, slot, exc.status, exc.message, rid, t0, method, path)
            if isinstance(exc, EdgemlError):
                return self._error(conn, slot, 400, f"cannot {op} model {name!r}: {exc.message}", rid, t0, method, path)
            return self._error(conn, slot, 500, f"cannot {op} model {name!r}: {exc}", rid, t0, method, path)

        fut.add_done_callback(finished)

    def _artifact_for(self, name: str, given: Any) -> Path:
        s = self.s
        if given is None:
            entry = s.repo.entries.get(name)
            if entry is None or entry.source is None:
                raise BadRequest(
                    f"model {name!r} was never loaded here; give parameters.artifact, the path of an .edgepkg"
                    " inside the server's repository folder", 404)
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
            raise BadRequest(f"artifact {given!r} does not exist in the repository folder {root}", 404)
        return path
