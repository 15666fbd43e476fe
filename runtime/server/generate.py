"""Text generation over HTTP: the KServe v2 generate extension and the OpenAI-compatible endpoints.

POST /v2/models/{m}[/versions/{v}]/generate          {"text_input": ..., "parameters": {...}} -> {"text_output"}
POST /v2/models/{m}[/versions/{v}]/generate_stream   the same, answered as server-sent events (Triton's form)
POST /v1/completions                                 OpenAI completions (``"stream": true``: SSE, ``data: [DONE]``)
POST /v1/chat/completions                            OpenAI chat completions (stream or not)
GET  /v1/models                                      the text-generation models loaded

Everything runs on the event-loop thread except the model, whose ``Generator`` thread calls back with
``loop.call_soon_threadsafe``. Streams are written as chunked ``text/event-stream`` responses directly on the
connection while the request is the first one the connection owes (a pipelined stream behind another response
is refused). Every token checks that the client is still there: a closed connection cancels the sequence and
frees its KV-cache reservation, and so does a client that reads too slowly (more than ``MAX_UNSENT_BYTES``
waiting in the socket's write buffer). Limits: ``max_tokens`` 1..context, the prompt's characters and tokens,
at most 4 stop sequences of 256 characters, UTF-8 only; each refusal is a one-line JSON error (4xx).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeml.errors import ServeError, UsageError
from edgeml.runtime.server.logs import LOGGER
from edgeml.runtime.server.protocol import BadRequest, ModelNotFound, NotFound, RequestError, json_dumps, json_loads
from edgeml.stats import Histogram

if TYPE_CHECKING:  # pragma: no cover
    from edgeml.runtime.server.app import ModelServer
    from edgeml.runtime.textgen import Event, TextGenModel

log = logging.getLogger(LOGGER)
MAX_UNSENT_BYTES = 1 << 20           # a client this far behind is dropped (its sequence cancelled)
PROMPT_CHARS_PER_TOKEN = 32          # prompts longer than context * this are refused before tokenizing
CT_SSE = b"text/event-stream"
_MS_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
_ids = itertools.count(1)


class TextGenEntry:
    """A loaded text-generation model and its serving metrics."""

    def __init__(self, model: "TextGenModel", source: Path):
        self.model, self.source = model, source
        self.name, self.version = model.name, model.version
        self.ttft_ms = Histogram(_MS_BOUNDS)
        self.itl_ms = Histogram(_MS_BOUNDS)
        self.tokens = 0
        self.requests: dict[int, int] = {}

    def stats(self) -> dict[str, Any]:
        def pct(h: Histogram) -> dict[str, float | None]:
            return {"p50": h.percentile(50), "p99": h.percentile(99), "count": h.count}

        return {"name": self.name, "version": self.version, "time_to_first_token_ms": pct(self.ttft_ms),
                "inter_token_ms": pct(self.itl_ms), "completion_tokens": self.tokens,
                "responses": {str(k): v for k, v in sorted(self.requests.items())}, **self.model.generator.load()}


def registry(server: "ModelServer") -> dict[str, TextGenEntry]:
    reg = getattr(server, "_textgen", None)
    if reg is None:
        reg = {}
        server._textgen = reg
    return reg


# -- loading (the server's API thread) ------------------------------------------------------------------
def load_text_generation(server: "ModelServer", path: Path, name: str | None, version: str | None) -> Any:
    """Load ``path`` as a text-generation model when its manifest says so; None for any other artifact."""
    from edgeml.runtime.textgen import TextGenModel, is_text_generation

    if not is_text_generation(path):
        return None
    cfg = server.config
    model = TextGenModel.open(path, trusted_keys=[Path(k) for k in cfg.trusted_keys],
                              require_signature=cfg.require_signature, threads=cfg.threads, cache_dir=cfg.cache_dir)
    if name:
        model.name = name
    if version:
        model.version = str(version)
    entry = TextGenEntry(model, Path(path))

    def install() -> None:
        old = registry(server).get(model.name)
        registry(server)[model.name] = entry
        if old is not None:
            old.model.close()

    server.in_loop(install)
    log.info("text-generation model loaded", extra={"model": model.name, "version": model.version,
                                                    "precision": model.precision, "context": model.context})
    return entry


def text_generation_rows(server: "ModelServer") -> list[dict[str, Any]]:
    """The loaded text-generation models, as ``ModelServer.models()`` lists them."""
    return [{"name": e.name, "version": e.version, "task": "text-generation", "precision": e.model.precision,
             "backend": e.model.backend_name, "context": e.model.context, "source": str(e.source)}
            for e in registry(server).values()]


def close_all(server: "ModelServer") -> None:
    for entry in registry(server).values():
        entry.model.close()
    registry(server).clear()


def metrics_text(server: "ModelServer") -> bytes:
    """Prometheus lines for /metrics: tokens, time to first token and inter-token latency per model (each
    family one group, with its TYPE line)."""
    entries = list(registry(server).values())
    if not entries:
        return b""
    lines = ["# HELP edgeml_generated_tokens_total Tokens generated (text generation).",
             "# TYPE edgeml_generated_tokens_total counter"]
    lines += [f'edgeml_generated_tokens_total{{model="{e.name}",version="{e.version}"}} {e.tokens}' for e in entries]
    for metric, what in (("edgeml_time_to_first_token_ms", "Time from request to first token"),
                         ("edgeml_inter_token_ms", "Time between consecutive tokens of a sequence")):
        lines += [f"# HELP {metric} {what} (ms).", f"# TYPE {metric} histogram"]
        for e in entries:
            h = e.ttft_ms if metric == "edgeml_time_to_first_token_ms" else e.itl_ms
            label = f'model="{e.name}",version="{e.version}"'
            for bound, count in h.cumulative().items():
                lines.append(f'{metric}_bucket{{{label},le="{bound}"}} {count}')
            lines.append(f"{metric}_sum{{{label}}} {h.sum:.3f}")
            lines.append(f"{metric}_count{{{label}}} {h.count}")
    return ("\n".join(lines) + "\n").encode()


# -- requests (the event-loop thread) -----------------------------------------------------------------------
def handles(parts: list[str]) -> bool:
    """Is this path one of the generation endpoints (so the router hands it here)?"""
    if parts[0] == "v1":
        return True
    return len(parts) >= 4 and parts[0] == "v2" and parts[1] == "models" and parts[-1] in ("generate", "generate_stream")


def dispatch(router: Any, conn: Any, slot: list, call: Any, method: bytes, parts: list[str], body: bytes) -> None:
    server = router.s
    if parts == ["v1", "models"]:
        _need(method, b"GET", call.path)
        data = [{"id": e.name, "object": "model", "owned_by": "edgeml", "created": 0} for e in registry(server).values()]
        return _send(router, conn, slot, call, 200, json_dumps({"object": "list", "data": data}))
    if parts in (["v1", "completions"], ["v1", "chat", "completions"]):
        _need(method, b"POST", call.path)
        doc = _json_object(body)
        chat = parts[1] == "chat"
        entry = _entry(server, doc.get("model"), None, openai=True)
        prompt = _chat_prompt(doc.get("messages")) if chat else _completion_prompt(doc.get("prompt"))
        params = _params(doc, entry, default_max=16, default_temperature=1.0)
        stream = doc.get("stream", False)
        if type(stream) is not bool:
            raise BadRequest(f"'stream' must be true or false, got {_show(stream)}")
        fmt = _OpenAIFormat(entry, chat)
        return _start(router, conn, slot, call, entry, prompt, params, fmt, stream)
    if parts[0] == "v2":
        version: str | None = None
        rest = parts[3:]
        if len(rest) == 3 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) != 1:
            raise NotFound(f"no such endpoint {call.path}")
        _need(method, b"POST", call.path)
        doc = _json_object(body)
        entry = _entry(server, parts[2], version, openai=False)
        text_input = doc.get("text_input")
        if not isinstance(text_input, str):
            raise BadRequest(f"'text_input' must be a string, got {_show(text_input)}")
        raw = doc.get("parameters", {})
        if not isinstance(raw, dict):
            raise BadRequest("'parameters' must be an object")
        params = _params(raw, entry, default_max=64, default_temperature=0.0)
        return _start(router, conn, slot, call, entry, text_input, params, _V2Format(entry), rest[0] == "generate_stream")
    raise NotFound(f"no such endpoint {call.path}")


def _need(method: bytes, allowed: bytes, path: str) -> None:
    from edgeml.runtime.server.protocol import MethodNotAllowed

    if method != allowed:
        raise MethodNotAllowed(f"{path} answers {allowed.decode()} only, not {method.decode('latin-1')}",
                               allowed.decode())


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json_loads(body)
    except (ValueError, UnicodeDecodeError) as exc:    # orjson refuses invalid UTF-8 and lone surrogates
        raise BadRequest(f"request body is not valid UTF-8 JSON: {str(exc).splitlines()[0][:160]}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def _entry(server: Any, name: Any, version: str | None, openai: bool) -> TextGenEntry:
    reg = registry(server)
    if not isinstance(name, str) or not name:
        raise BadRequest(f"'model' must name a loaded text-generation model: {sorted(reg) or 'none is loaded'}")
    entry = reg.get(name)
    if entry is None or (version is not None and version != entry.version):
        known = sorted(reg) or "none is loaded"
        if not openai and entry is None and name in getattr(server.repo, "entries", {}):
            raise BadRequest(f"model {name!r} is not a text-generation model; use /v2/models/{name}/infer")
        what = f"model {name!r}" + (f" version {version!r}" if version else "")
        raise ModelNotFound(f"{what} is not a loaded text-generation model (loaded: {known})")
    return entry


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (or a list of one string)")
    return prompt


def _chat_prompt(messages: Any) -> str:
    """A plain transcript: 'role: content' lines, then 'assistant:' (docs/generation.md)."""
    if not isinstance(messages, list) or not messages or len(messages) > 256:
        raise BadRequest("'messages' must be a list of 1 to 256 {role, content} objects")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer") \
                or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{role: system|user|assistant, content: string}}")
        lines.append(f"{m['role']}: {m['content']}")
    return "\n".join(lines) + "\nassistant:"


def _params(doc: dict[str, Any], entry: TextGenEntry, default_max: int, default_temperature: float) -> Any:
    from edgeml.runtime.textgen import SamplingParams

    model = entry.model
    max_new = model.context - 1
    max_tokens = doc.get("max_tokens", doc.get("max_completion_tokens", default_max))
    if max_tokens is None:
        max_tokens = default_max
    temperature = doc.get("temperature", default_temperature)
    top_p = doc.get("top_p", 1.0)
    seed = doc.get("seed")
    stop = doc.get("stop", doc.get("stop_sequences"))
    n = doc.get("n", 1)
    if n not in (1, None):
        raise BadRequest(f"'n' must be 1 (one completion per request), got {_show(n)}")
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"'{key}' must be a number, got {_show(value)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
        raise BadRequest(f"'seed' must be a non-negative integer, got {_show(seed)}")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest(f"'max_tokens' must be an integer from 1 to {max_new}, got {_show(max_tokens)}")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                            stop=tuple(stop))
    try:
        params.check(max_new)
    except UsageError as exc:
        raise BadRequest(exc.message) from None
    return params


class _V2Format:
    """KServe v2 generate extension bodies (Triton's field names)."""

    def __init__(self, entry: TextGenEntry):
        self.head = {"model_name": entry.name, "model_version": entry.version}

    def chunk(self, text: str, finish: str | None, usage: dict[str, int] | None) -> bytes:
        doc: dict[str, Any] = {**self.head, "text_output": text}
        if finish is not None:
            doc["finish_reason"] = finish
            doc["usage"] = usage
        return b"data: " + json_dumps(doc) + b"\n\n"

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> bytes:
        return json_dumps({**self.head, "text_output": text, "finish_reason": finish, "usage": usage})

    done = b""


class _OpenAIFormat:
    def __init__(self, entry: TextGenEntry, chat: bool):
        self.chat, self.model = chat, entry.name
        self.id = ("chatcmpl-" if chat else "cmpl-") + format(next(_ids), "x") + format(int(time.time() * 1000), "x")
        self.created = int(time.time())
        self.first = True

    def _doc(self, obj: str, choice: dict[str, Any], usage: dict[str, int] | None) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                               "choices": [{"index": 0, **choice}]}
        if usage is not None:
            doc["usage"] = usage
        return doc

    def chunk(self, text: str, finish: str | None, usage: dict[str, int] | None) -> bytes:
        reason = _openai_reason(finish)
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if self.first:
                delta["role"] = "assistant"
            doc = self._doc("chat.completion.chunk", {"delta": delta, "finish_reason": reason, "logprobs": None}, usage)
        else:
            doc = self._doc("text_completion", {"text": text, "finish_reason": reason, "logprobs": None}, usage)
        self.first = False
        return b"data: " + json_dumps(doc) + b"\n\n"

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> bytes:
        if self.chat:
            choice = {"message": {"role": "assistant", "content": text}, "finish_reason": _openai_reason(finish),
                      "logprobs": None}
            return json_dumps(self._doc("chat.completion", choice, usage))
        return json_dumps(self._doc("text_completion", {"text": text, "finish_reason": _openai_reason(finish),
                                                        "logprobs": None}, usage))

    done = b"data: [DONE]\n\n"


def _openai_reason(finish: str | None) -> str | None:
    return None if finish is None else "length" if finish == "length" else "stop"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _send(router: Any, conn: Any, slot: list, call: Any, status: int, body: bytes) -> None:
    router._send(conn, slot, call, status, body)


def _start(router: Any, conn: Any, slot: list, call: Any, entry: TextGenEntry, prompt: str, params: Any,
           fmt: Any, stream: bool) -> None:
    model = entry.model
    server = router.s
    if len(prompt) > model.context * PROMPT_CHARS_PER_TOKEN:
        raise BadRequest(f"the prompt has {len(prompt)} characters; this model takes at most "
                         f"{model.context * PROMPT_CHARS_PER_TOKEN} (context {model.context} tokens)")
    try:
        prompt.encode("utf-8")
        ids = model.encode(prompt)
        if len(ids) + params.max_tokens > model.context:
            raise UsageError(f"the prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) is over the "
                             f"context of {model.context} tokens; shorten the prompt or lower max_tokens")
    except UnicodeEncodeError:
        raise BadRequest("the prompt is not valid UTF-8 text (a lone surrogate)") from None
    except UsageError as exc:
        raise BadRequest(exc.message) from None
    if stream and (not conn.pending or conn.pending[0] is not slot):
        raise BadRequest("a streaming request must not be pipelined behind another request on the connection; "
                         "wait for the previous answer or use another connection")
    loop = server.loop
    state = _Stream(router, conn, slot, call, entry, fmt, stream)
    try:
        job = model.generator.submit(ids, params, lambda event: loop.call_soon_threadsafe(state.deliver, event),
                                     gone=lambda: conn.closed)
    except UsageError as exc:
        raise BadRequest(exc.message) from None
    except ServeError as exc:
        call.retry_after_s = 1
        raise RequestError(exc.message, 503) from None
    state.job = job
    if stream:
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                             b"Transfer-Encoding: chunked\r\nX-Request-ID: " + call.rid.encode() + b"\r\n"
                             + (b"" if slot[1] else b"Connection: close\r\n") + b"\r\n")


class _Stream:
    """One request's answer as its events arrive (event-loop thread)."""

    __slots__ = ("router", "conn", "slot", "call", "entry", "fmt", "stream", "job", "parts", "last", "t0", "over",
                 "dropped")

    def __init__(self, router: Any, conn: Any, slot: list, call: Any, entry: TextGenEntry, fmt: Any, stream: bool):
        self.router, self.conn, self.slot, self.call, self.entry, self.fmt, self.stream = (
            router, conn, slot, call, entry, fmt, stream)
        self.job: Any = None
        self.parts: list[str] = []
        self.t0 = time.monotonic()
        self.last: float | None = None
        self.over = False
        self.dropped = False

    def deliver(self, event: "Event") -> None:
        if self.over:
            return
        conn, job = self.conn, self.job
        if self.dropped or conn.closed or (self.stream and conn.transport.get_write_buffer_size() > MAX_UNSENT_BYTES):
            if job is not None:
                job.cancel()
            if not conn.closed and not self.dropped:     # too slow a reader: drop it
                self.dropped = True
                conn.transport.abort()
            if event.finish is not None:
                self._end(499, "the client went away")
            return
        now = time.monotonic()
        if event.text:
            if self.last is None:
                self.entry.ttft_ms.observe((now - self.t0) * 1000)
            else:
                self.entry.itl_ms.observe((now - self.last) * 1000)
            self.last = now
        if event.finish is not None:
            self.entry.tokens += event.completion_tokens
        if event.error is not None:
            if self.stream:
                conn.transport.write(_chunked(b"data: " + json_dumps({"error": event.error}) + b"\n\n"))
                return self._close_stream(500, event.error)
            self.router._error(conn, self.slot, self.call, 500, f"generation failed: {event.error}")
            return self._end(500, event.error, sent=True)
        usage = None
        if event.finish is not None:
            usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                     "total_tokens": event.prompt_tokens + event.completion_tokens}
        if self.stream:
            if event.text or event.finish is not None:
                conn.transport.write(_chunked(self.fmt.chunk(event.text, event.finish, usage)))
            if event.finish is not None:
                if self.fmt.done:
                    conn.transport.write(_chunked(self.fmt.done))
                self._close_stream(200, None)
            return
        self.parts.append(event.text)
        if event.finish is not None:
            assert usage is not None
            body = self.fmt.whole("".join(self.parts), event.finish, usage)
            self.router._send(conn, self.slot, self.call, 200, body)
            self._end(200, None, sent=True)

    def _close_stream(self, status: int, error: str | None) -> None:
        self.conn.respond(self.slot, b"0\r\n\r\n")
        self._end(status, error)

    def _end(self, status: int, error: str | None, sent: bool = False) -> None:
        self.over = True
        counts = self.entry.requests
        counts[status] = counts.get(status, 0) + 1
        if not sent:
            codes = self.router.s.http_codes
            codes[status] = codes.get(status, 0) + 1
            self.router.plane.end(self.call, status, error)

