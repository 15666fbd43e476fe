"""Structured JSON logs for the server (one object per line, with request ids)."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "edgeml.serve"
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", ...extra fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in record.__dict__.items()
                         if k not in _STD and not k.startswith("_"))    # figures for people: 0.1908, not 0.19083400002273265
        return f"{time.strftime('%H:%M:%S')} {record.levelname.lower():7} {record.getMessage()} {extra}".rstrip()


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
