"""A small HTTP/1.1 server on an asyncio Protocol with httptools parsing.

Chosen by measurement (see docs/serving.md): per request it does one parser
feed, one dict of the few headers the v2 protocol needs, and one
``transport.write`` of a pre-assembled response. Keep-alive and pipelining
are supported; responses on a connection are written in request order even
when a later request finishes first. Bodies over the limit are read and
dropped (never buffered) and answered with 413 and ``Connection: close``.

Read deadlines run from the first byte of a request's head and from the end of
its head (a trickle of bytes does not extend them); the server's sweep closes
connections past them with 408. A protocol error (malformed request, CONNECT,
``Upgrade``) gets exactly one error response, queued after the responses the
connection already owes, and the connection is closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

import httptools

STATUS_TEXT = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error", 503: "Service Unavailable",
}
_STATUS_LINE = {code: f"HTTP/1.1 {code} {text}\r\n".encode() for code, text in STATUS_TEXT.items()}
WANTED_HEADERS = frozenset({
    b"content-type", b"content-encoding", b"inference-header-content-length", b"x-request-id", b"expect",
    b"content-length", b"authorization", b"x-experiment-key",
})
MAX_HEAD_BYTES = 64 * 1024
CT_JSON = b"application/json"
CT_OCTET = b"application/octet-stream"
CT_TEXT = b"text/plain; version=0.0.4; charset=utf-8"


class _HeadTooLarge(Exception):
    pass


def build_response(status: int, body: bytes, content_type: bytes = CT_JSON, extra: bytes = b"",
                   keep_alive: bool = True) -> bytes:
    line = _STATUS_LINE.get(status) or f"HTTP/1.1 {status} Status\r\n".encode()
    return b"".join((
        line, b"Content-Type: ", content_type, b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n",
        extra, b"" if keep_alive else b"Connection: close\r\n", b"\r\n", body,
    ))


def error_response(status: int, message: str, extra: bytes = b"") -> bytes:
    """A JSON error that closes the connection."""
    from edgeml.runtime.server.protocol import json_dumps

    return build_response(status, json_dumps({"error": message}), extra=extra, keep_alive=False)


class Handler(Protocol):
    max_body_bytes: int
    draining: bool

    def handle(self, conn: "HttpConnection", slot: list, method: bytes, url: bytes,
               headers: dict[bytes, bytes], body: bytes, keep_alive: bool) -> None: ...

    def reject_too_big(self, conn: "HttpConnection", slot: list, method: bytes, url: bytes,
                       headers: dict[bytes, bytes]) -> None: ...

    def connection_opened(self, conn: "HttpConnection") -> bool: ...

    def loop_time(self) -> float: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def connection_closed(self, conn: "HttpConnection") -> None: ...

    def protocol_error(self, conn: "HttpConnection", status: int, message: str) -> None: ...

    def take_body_bytes(self, n: int) -> bool: ...

    def give_body_bytes(self, n: int) -> None: ...


IDLE, HEAD, BODY = 0, 1, 2     # where a connection is in reading a request


class HttpConnection(asyncio.Protocol):
    """One client connection. ``slot`` = [response bytes or None, keep_alive]."""

    MAX_PIPELINE = 128
    LINGER_S = 2.0      # after a closing answer: how long unread client bytes are drained before the socket closes

    __slots__ = ("app", "parser", "transport", "url", "headers", "body", "body_size", "too_big",
                 "pending", "closed", "paused", "limit", "last_active", "head_size", "phase", "phase_started",
                 "held", "upgrade", "failed")

    def __init__(self, app: Handler):
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_big = False
        self.pending: deque[list] = deque()
        self.closed = False
        self.paused = False
        self.limit = app.max_body_bytes
        self.last_active = 0.0
        self.head_size = 0
        self.phase = IDLE
        self.phase_started = 0.0
        self.held = 0            # body bytes counted against the server's budget for partial bodies
        self.upgrade = False
        self.failed = False      # a protocol error was answered: read nothing more

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_active = self.app.loop_time()
        if not self.app.connection_opened(self):
            transport.write(error_response(  # type: ignore[attr-defined]
                503, "the server has too many open connections; retry later"))
            transport.close()
            self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self._drop_body()
        self.app.connection_closed(self)

    def data_received(self, data: bytes) -> None:
        if self.failed or self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.parser.get_method() == b"CONNECT":
                self._fail(405, "CONNECT is not supported by this server", b"Allow: GET, POST\r\n")
            else:
                self._fail(400, "protocol upgrade is not supported; send plain HTTP/1.1 requests")
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _HeadTooLarge):
                self._fail(400, str(cause))
            else:
                self._fail(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        self._pause()

    def resume_writing(self) -> None:
        self._resume()

    # -- httptools callbacks ---------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []
        self.body_size = 0
        self.too_big = False
        self.head_size = 0
        self.upgrade = False
        self.phase = HEAD
        self.phase_started = self.app.loop_time()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_HEAD_BYTES:
            raise _HeadTooLarge(f"the request URL is over {MAX_HEAD_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD_BYTES:
            raise _HeadTooLarge(f"the request headers are over {MAX_HEAD_BYTES} bytes")
        name = name.lower()
        if name in WANTED_HEADERS:
            self.headers[name] = value

    def on_headers_complete(self) -> None:
        self.phase = BODY
        self.phase_started = self.app.loop_time()
        if self.parser.should_upgrade():
            self.upgrade = True      # answered once, by data_received, when the parser stops
            return
        cl = self.headers.get(b"content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.limit:
            self.too_big = True
        if self.headers.get(b"expect", b"").lower() == b"100-continue" and not self.too_big:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        if self.too_big or self.failed:
            return
        n = len(body)
        self.body_size += n
        if self.body_size > self.limit:
            self.too_big = True
            self._drop_body()
            return
        if not self.app.take_body_bytes(n):
            self._fail(503, "the server is receiving too many large request bodies at once; retry later")
            return
        self.held += n
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.phase = IDLE
        self.last_active = self.app.loop_time()
        if self.upgrade or self.failed:
            return
        keep_alive = self.parser.should_keep_alive() and not self.app.draining
        slot = [None, keep_alive]
        self.pending.append(slot)
        if len(self.pending) > self.MAX_PIPELINE:
            self._pause()
        if self.too_big:
            slot[1] = False
            self.app.reject_too_big(self, slot, self.parser.get_method(), self.url, self.headers)
            return
        body = self.body
        self.body = []
        self.app.give_body_bytes(self.held)     # complete: no longer a partial body
        self.held = 0
        self.app.handle(self, slot, self.parser.get_method(), self.url, self.headers,
                        body[0] if len(body) == 1 else b"".join(body), keep_alive)

    # -- responses ----------------------------------------------------------
    def respond(self, slot: list, data: bytes) -> None:
        slot[0] = data
        if self.closed:
            return
        self.last_active = self.app.loop_time()
        pending = self.pending
        write = self.transport.write  # type: ignore[union-attr]
        while pending and pending[0][0] is not None:
            s = pending.popleft()
            write(s[0])
            if not s[1]:
                pending.clear()
                self._linger_close()
                return
        if self.paused and not self.failed and len(pending) <= self.MAX_PIPELINE // 2:
            self._resume()

    def _linger_close(self) -> None:
        """Close after the last answer without losing it: closing a socket that still holds unread client bytes
        (a slow client's trickle) makes the kernel send RST, which can discard the answer before the client reads
        it. So shut the write side (the client reads the answer, then EOF), drain and discard what still
        arrives for LINGER_S, then close (Apache's "lingering close")."""
        transport = self.transport
        self.closed = True                      # data_received discards from now on
        if transport is None:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        self.app.loop.call_later(self.LINGER_S, transport.close)

    def _fail(self, status: int, message: str, extra: bytes = b"") -> None:
        """Answer one error after what the connection already owes, then close; read nothing more."""
        self.app.protocol_error(self, status, message)
        self._drop_body()
        if self.closed or self.failed:
            return
        self.failed = True
        self.phase = IDLE
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        slot: list = [None, False]
        self.pending.append(slot)     # after the responses the connection already owes
        self.respond(slot, error_response(status, message, extra))

    def _drop_body(self) -> None:
        if self.held:
            self.app.give_body_bytes(self.held)
            self.held = 0
        self.body = []

    def check_deadlines(self, now: float, header_s: float, body_s: float) -> None:
        """Sweep: a request whose head or body is not in within its deadline gets 408."""
        if self.phase == HEAD and now - self.phase_started > header_s:
            self._fail(408, f"the request headers did not arrive within {header_s:g} s")
        elif self.phase == BODY and now - self.phase_started > body_s:
            self._fail(408, f"the request body did not arrive within {body_s:g} s")

    def _pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def close_if_idle(self) -> bool:
        if not self.pending and not self.closed:
            self.transport.close()  # type: ignore[union-attr]
            self.closed = True
            return True
        return self.closed
