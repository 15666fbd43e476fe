"""Admission control for one model version: refuse fast instead of queueing without bound.

Two limits, both off unless configured (``ServerConfig.max_inflight`` / ``max_queue_ms``):

* **in flight**: requests admitted to this version and not yet answered. Past the limit a
  request is refused at once with 429 and ``Retry-After`` (the client should back off; the
  server keeps its latency for the requests it did admit).
* **queue time**: a request that would wait longer than ``max_queue_ms`` for its batch to
  start is refused with 503 and ``Retry-After``: up front when the queue already ahead of it
  is predicted to take longer (queued batches x the measured compute time per batch), and,
  as a backstop, by the batcher when a queued request's wait passes the limit.

Everything runs on the server's event-loop thread: plain ints, no locks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeml.runtime.server.protocol import RequestError

EMA_WEIGHT = 0.2           # weight of the newest batch in the moving average of compute time


class Overloaded(RequestError):
    """The model version is at its limit: 429 (in flight) or 503 (queue time), with ``Retry-After``."""

    default_status = 429

    def __init__(self, message: str, status: int = 429, retry_after_s: int = 1):
        super().__init__(message, status, hint="retry after the number of seconds in the Retry-After header")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class AdmissionLimits:
    max_inflight: int | None = None      # requests admitted and not answered, per model version
    max_queue_ms: float | None = None    # longest a request may wait for its batch to start

    @property
    def active(self) -> bool:
        return self.max_inflight is not None or self.max_queue_ms is not None


class Admission:
    """The gate in front of one model version's batcher (loop thread only)."""

    __slots__ = ("limits", "inflight", "refused_inflight", "refused_queue", "batch_ms", "max_batch")

    def __init__(self, limits: AdmissionLimits, max_batch: int, first_batch_ms: float | None = None):
        self.limits = limits
        self.inflight = 0
        self.refused_inflight = 0       # 429s
        self.refused_queue = 0          # 503s: predicted or actual queue wait over the limit
        self.batch_ms = float(first_batch_ms or 0.0)   # moving average of backend time per batch
        self.max_batch = max(1, max_batch)

    def enter(self, queued_rows: int, busy: bool) -> None:
        """Admit one request or raise ``Overloaded``; every admitted request must ``leave()``."""
        lim = self.limits
        if lim.max_inflight is not None and self.inflight >= lim.max_inflight:
            self.refused_inflight += 1
            raise Overloaded(f"the model has {self.inflight} requests in flight, its limit (--max-inflight); "
                             "retry later", 429, self.retry_after_s())
        if lim.max_queue_ms is not None and self.batch_ms > 0.0:
            ahead = math.ceil(queued_rows / self.max_batch) + (1 if busy else 0)
            wait_ms = ahead * self.batch_ms
            if wait_ms > lim.max_queue_ms:
                self.refused_queue += 1
                raise Overloaded(f"the model's queue would hold this request about {wait_ms:.0f} ms, over its limit "
                                 f"of {lim.max_queue_ms:g} ms (--max-queue-ms); retry later", 503,
                                 self.retry_after_s())
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1

    def observe_batch(self, compute_ms: float) -> None:
        self.batch_ms += EMA_WEIGHT * (compute_ms - self.batch_ms) if self.batch_ms else compute_ms

    def expired(self) -> Overloaded:
        """The error for a request that waited in the queue past ``max_queue_ms`` (the batcher's backstop)."""
        self.refused_queue += 1
        return Overloaded(f"the request waited over {self.limits.max_queue_ms:g} ms in the model's queue "
                          "(--max-queue-ms); retry later", 503, self.retry_after_s())

    def retry_after_s(self) -> int:
        """Whole seconds (HTTP delta-seconds) until the work ahead should be done; at least 1."""
        backlog_ms = (self.inflight / self.max_batch + 1) * self.batch_ms
        return max(1, math.ceil(backlog_ms / 1000.0))
