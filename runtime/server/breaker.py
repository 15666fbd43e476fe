"""A circuit breaker around one backend (one loaded model version).

closed -> open    after ``failures`` consecutive backend failures, or when at least
                  ``min_requests`` ran in the last ``window_s`` seconds and the share that
                  failed is ``error_rate`` or more;
open -> half_open once ``open_s`` has passed (doubled at each re-open, up to ``max_open_s``:
                  the primary is retried with backoff);
half_open         lets ``probes`` requests through: one success closes the breaker (and
                  resets the backoff), one failure opens it again.

While open, requests go to the model's fallback when it has one, else they are refused
with 503 and ``Retry-After``. Only backend failures count (a 4xx is the client's fault).
The clock is injected, so tests drive the states without sleeping. Loop thread only.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

from edgeml.errors import ServeError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}       # the /metrics gauge


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5               # consecutive failures that open it (0 = the breaker is off)
    error_rate: float = 0.5         # ... or this share of failures in the window
    min_requests: int = 20          # ... once the window holds at least this many results
    window_s: float = 30.0
    open_s: float = 5.0             # first wait before a half-open probe
    max_open_s: float = 300.0       # backoff cap
    probes: int = 1                 # requests let through while half-open

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    def validate(self) -> None:
        """Refuse settings that cannot work, as ``ServerConfig.validate`` does for the other fields."""
        ok = (type(self.failures) is int and 0 <= self.failures <= 1 << 20 and type(self.min_requests) is int
              and 1 <= self.min_requests <= 1 << 20 and type(self.probes) is int and 1 <= self.probes <= 1000)
        for value, lo, hi in ((self.error_rate, 0.0, 1.0), (self.window_s, 0.001, 86_400.0),
                              (self.open_s, 0.001, 86_400.0), (self.max_open_s, 0.001, 86_400.0)):
            ok = ok and not isinstance(value, bool) and isinstance(value, (int, float)) and lo <= value <= hi
        if not ok or self.max_open_s < self.open_s:
            raise ServeError(f"ServerConfig.breaker is {self!r}: failures 0 (off) to 2^20, error_rate 0-1, "
                             "min_requests and probes >= 1, window_s/open_s/max_open_s positive, "
                             "max_open_s >= open_s")


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self.state = CLOSED
        self.consecutive = 0
        self.opened = 0                 # times it went to open (a counter for /metrics)
        self.open_until = 0.0
        self._open_s = config.open_s
        self._probing = 0
        self._buckets: deque[list[int]] = deque()   # [second, ok, failed], oldest first

    # -- decisions ----------------------------------------------------------
    def allow(self) -> bool:
        """May a request go to this backend now? (half-open: counts the probe it lets through)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock() < self.open_until:
                return False
            self.state, self._probing = HALF_OPEN, 0
        if self._probing < self.config.probes:
            self._probing += 1
            return True
        return False

    def record(self, ok: bool) -> None:
        """The result of a request that ``allow()`` let through."""
        now = self.clock()
        if ok and self.state == CLOSED:      # the every-request case: one counter (pruning runs once a second)
            b = self._buckets
            if b and b[-1][0] == int(now):
                b[-1][1] += 1
                self.consecutive = 0
                return
        self._count(now, ok)
        if ok:
            self.consecutive = 0
            if self.state == HALF_OPEN:
                self.state, self._open_s = CLOSED, self.config.open_s
                self._buckets.clear()
            return
        self.consecutive += 1
        if self.state == HALF_OPEN:
            self._open_s = min(self._open_s * 2.0, self.config.max_open_s)
            return self._trip(now)
        if self.state == CLOSED and (self.consecutive >= self.config.failures or self._rate_tripped(now)):
            self._trip(now)

    def cancel(self) -> None:
        """A request ``allow()`` let through never reached the backend (refused first): free its probe."""
        if self.state == HALF_OPEN and self._probing > 0:
            self._probing -= 1

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.open_until - self.clock()))

    # -- internals ----------------------------------------------------------
    def _trip(self, now: float) -> None:
        self.state = OPEN
        self.opened += 1
        self.open_until = now + self._open_s
        self._probing = 0

    def _count(self, now: float, ok: bool) -> None:
        second = int(now)
        b = self._buckets
        if not b or b[-1][0] != second:
            b.append([second, 0, 0])
        b[-1][1 if ok else 2] += 1
        horizon = now - self.config.window_s
        while b and b[0][0] < horizon:
            b.popleft()

    def _rate_tripped(self, now: float) -> bool:
        ok = failed = 0
        for _, o, f in self._buckets:
            ok += o
            failed += f
        total = ok + failed
        return total >= self.config.min_requests and failed >= self.config.error_rate * total
