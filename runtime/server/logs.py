"""The server's logs: JSON lines (one object per line, with request ids) or text lines for people."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

LOGGER = "edgeml.serve"
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

try:  # orjson: a base dependency; ~10x json.dumps on a log line
    import orjson

    def _dumps(doc: dict[str, Any]) -> str:
        return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
except ImportError:  # pragma: no cover - only without orjson
    def _dumps(doc: dict[str, Any]) -> str:
        return json.dumps(doc, default=str, separators=(",", ":"))


class _Clock:
    """``ts`` text of a log line; the date part is formatted once per second."""

    __slots__ = ("sec", "prefix")

    def __init__(self) -> None:
        self.sec, self.prefix = -1, ""

    def ts(self, created: float) -> str:
        sec = int(created)
        if sec != self.sec:
            self.sec, self.prefix = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self.prefix}.{int((created - sec) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", ...extra fields}``."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self._clock.ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return _dumps(doc)

    def line(self, created: float, event: str, fields: dict[str, Any]) -> str:
        """What ``format`` writes for an INFO record of ``event`` with ``fields`` as its extras."""
        return _dumps({"ts": self._clock.ts(created), "level": "info", "logger": LOGGER, "event": event, **fields})

    def request_line(self, created: float, rid: str, method: str, path: str, status: int, latency_ms: float,
                     model: str | None, version: str | None) -> str:
        """``line(created, "request", fields)`` for the access log's fields, without building the dict first."""
        doc = {"ts": self._clock.ts(created), "level": "info", "logger": LOGGER, "event": "request",
               "request_id": rid, "method": method, "path": path, "status": status, "latency_ms": latency_ms}
        if model is not None:
            doc["model"], doc["version"] = model, version
        return _dumps(doc)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._sec, self._hms = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")}
        return self._text(record.created, record.levelname.lower(), record.getMessage(), extra)

    def line(self, created: float, event: str, fields: dict[str, Any]) -> str:
        """What ``format`` writes for an INFO record of ``event`` with ``fields`` as its extras."""
        return self._text(created, "info", event, fields)

    def request_line(self, created: float, rid: str, method: str, path: str, status: int, latency_ms: float,
                     model: str | None, version: str | None) -> str:
        """``line(created, "request", fields)`` for the access log's fields: one template, no loop."""
        sec = int(created)
        if sec != self._sec:
            self._sec, self._hms = sec, time.strftime("%H:%M:%S", time.localtime(sec))
        if model is None:
            return "%s info    request request_id=%s method=%s path=%s status=%d latency_ms=%.4g" % (
                self._hms, rid, method, path, status, latency_ms)
        return "%s info    request request_id=%s method=%s path=%s status=%d latency_ms=%.4g model=%s version=%s" % (
            self._hms, rid, method, path, status, latency_ms, model, version)

    def _text(self, created: float, level: str, event: str, fields: dict[str, Any]) -> str:
        sec = int(created)
        if sec != self._sec:            # the clock text changes once a second: format it once
            self._sec, self._hms = sec, time.strftime("%H:%M:%S", time.localtime(sec))
        extra = " ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in fields.items())
        return f"{self._hms} {level:7} {event} {extra}".rstrip()   # figures for people: 0.1908, not 0.190834000022


def configure_logging(json_lines: bool = True, level: int = logging.INFO, stream=None) -> logging.Logger:
    """Attach one handler to the ``edgeml.serve`` logger (idempotent)."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if getattr(h, "_edgeml", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._edgeml = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


class AccessLog:
    """The per-request access log (``--access-log``) without the logging machinery on the hot path.

    The same line the server's formatter (JSON or text) writes for ``log.info("request", extra=fields)``, built
    directly and
    written to the server's own log handler once per event-loop pass (one write for every request the pass
    answered) instead of a LogRecord, a format and a flushed write per request. Used only while that handler
    is the logger's only one and INFO is enabled; otherwise (a test's or an application's own handlers)
    requests go through ``logging`` as before. Loop thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lines: list[str] = []
        self._handler: logging.Handler | None = None
        self._checked = -1.0

    def _direct(self) -> logging.StreamHandler | None:
        """The server's own JSON handler when it is the only way out for INFO lines (rechecked each second)."""
        now = time.monotonic()
        if now - self._checked > 1.0:
            self._checked = now
            logger = logging.getLogger(LOGGER)
            hs = logger.handlers
            ok = (len(hs) == 1 and getattr(hs[0], "_edgeml", False)
                  and isinstance(hs[0].formatter, (JsonFormatter, TextFormatter))
                  and not logger.propagate and logger.isEnabledFor(logging.INFO) and hs[0].level <= logging.INFO)
            self._handler = hs[0] if ok else None
        return self._handler  # type: ignore[return-value]

    def request(self, rid: str, method: str, path: str, status: int, latency_ms: float, model: str | None,
                version: str | None) -> None:
        h = self._direct()
        if h is None:
            fields: dict[str, Any] = {"request_id": rid, "method": method, "path": path, "status": status,
                                      "latency_ms": latency_ms}
            if model is not None:
                fields["model"], fields["version"] = model, version
            logging.getLogger(LOGGER).info("request", extra=fields)
            return
        self._lines.append(h.formatter.request_line(  # type: ignore[union-attr]
            time.time(), rid, method, path, status, latency_ms, model, version))
        if len(self._lines) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        h = self._handler
        if not lines or h is None:
            return
        with h.lock:  # type: ignore[union-attr]
            try:
                h.stream.write("\n".join(lines) + "\n")  # type: ignore[attr-defined]
                h.flush()
            except (OSError, ValueError):    # a closed or broken log stream must not stop serving
                pass
