"""Rate-limited logging: a device (or a stuck rollout) that misbehaves every tick must not flood the log."""

from __future__ import annotations

import logging
import time
from typing import Any


class RateLimitedLog:
    """At most one line per key (topic, rollout) every ``every_s``; says how many were held back."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, max_keys: int = 4096):
        self.logger, self.every_s, self.max_keys = logger, every_s, max_keys
        self._last: dict[str, tuple[float, int]] = {}

    def _emit(self, level: int, key: str, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        last, held = self._last.get(key, (-1e18, 0))
        if now - last < self.every_s:
            self._last[key] = (last, held + 1)
            return
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        self.logger.log(level, fmt + (f" ({held} more like this held back)" if held else ""), *args)

    def warning(self, key: str, fmt: str, *args: Any) -> None:
        self._emit(logging.WARNING, key, fmt, *args)

    def error(self, key: str, fmt: str, *args: Any) -> None:
        self._emit(logging.ERROR, key, fmt, *args)
