"""Dynamic batching for one model version.

Requests are queued from the server's event-loop thread. A batch is cut when
the model is free and one of these holds:

* the queue holds ``max_batch`` rows;
* the event loop has read all that was waiting on the sockets and no new
  request for this model arrived in the last loop pass (waiting would gain
  nothing: a lone request on an idle server is never held back);
* every client that could still add a request (``peers()``: the server's open
  connections) already has one queued here: no loop pass is spent waiting;
* the oldest queued request has waited ``max_delay_ms``.

Requests that arrive while the model is busy simply queue, and go together in
the next batch. Inputs are concatenated along axis 0 and results split back.
Requests whose non-batch dimensions differ are not mixed in one run. When a
batched run fails, each request is re-run alone so only the one at fault gets
the error.

Two ways to run a batch: ``inline`` on the event-loop thread (no thread
hand-off: best for sub-millisecond models) and ``thread`` on a dedicated worker
thread (the loop keeps parsing requests while the backend computes: best for
larger models; ONNX Runtime and OpenVINO release the GIL while they run).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from edgeml.runtime.server.metrics import ModelStats

Callback = Callable[[Any, float], None]   # (outputs dict or the exception, queue_ms)


class _Item:
    __slots__ = ("feeds", "rows", "sig", "callback", "t_enqueue")

    def __init__(self, feeds, rows, sig, callback, t_enqueue):
        self.feeds = feeds
        self.rows = rows
        self.sig = sig
        self.callback = callback
        self.t_enqueue = t_enqueue


class Batcher:
    def __init__(
        self,
        run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        loop: asyncio.AbstractEventLoop,
        stats: ModelStats,
        *,
        max_batch: int = 32,
        max_delay_ms: float = 2.0,
        batchable: bool = True,
        mode: str = "inline",
        clock: Callable[[], float] = time.monotonic,
        name: str = "model",
        max_queue_ms: float | None = None,
        expired: Callable[[], BaseException] | None = None,
        on_compute: Callable[[float], None] | None = None,
        peers: Callable[[], int] | None = None,
    ):
        if mode not in ("inline", "thread"):
            raise ValueError(f"batch mode must be 'inline' or 'thread', not {mode!r}")
        self._run = run
        self._loop = loop
        self._stats = stats
        self.max_batch = max(1, int(max_batch)) if batchable else 1
        self.max_delay_s = max(0.0, float(max_delay_ms)) / 1000.0
        self.batchable = batchable
        self.mode = mode
        self._clock = clock
        # admission control's backstop: requests queued longer than this get ``expired()`` instead of a run
        self.max_queue_s = None if max_queue_ms is None else max_queue_ms / 1000.0
        self._expired = expired or (lambda: TimeoutError("the request waited too long in the queue"))
        self._on_compute = on_compute     # backend ms per batch, for admission control's queue estimate
        self._peers = peers               # clients that could still send a request (None: unknown, always wait)
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._busy = False
        self._scheduled = False
        self._seen = 0
        self._reserved = 0
        self._idle_waiters: list[Callable[[], None]] = []
        self._worker: threading.Thread | None = None
        self._work: deque = deque()
        self._work_ready = threading.Condition()
        if mode == "thread":
            self._worker = threading.Thread(target=self._worker_main, name=f"edgeml-batch-{name}", daemon=True)
            self._worker.start()

    # -- event-loop side -------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray], rows: int, callback: Callback) -> None:
        """Queue one request (loop thread only). ``callback(result, queue_ms)`` runs on the loop thread.

        For a batchable model the row count is read from the request's own arrays (``rows`` is only
        used for models that run one request at a time)."""
        sig = None
        if len(feeds) == 1:
            for a in feeds.values():
                sig = a.shape[1:]
                if self.batchable:
                    rows = a.shape[0]
        else:
            sig = tuple(a.shape[1:] for a in feeds.values())
            if self.batchable:
                rows = next(iter(feeds.values())).shape[0]
        self._queue.append(_Item(feeds, rows, sig, callback, self._clock()))
        self._queued_rows += rows
        if not self._busy and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._tick)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def pending(self) -> int:
        return len(self._queue) + (1 if self._busy else 0)

    def idle(self) -> bool:
        return not self._queue and not self._busy and not self._reserved

    def reserve(self) -> None:
        """A request for this batcher is being decoded off the loop: do not count it idle yet."""
        self._reserved += 1

    def release(self) -> None:
        """The reserved request was submitted or refused (loop thread)."""
        self._reserved -= 1
        if self.idle():
            self._wake_idle_waiters()

    def _wake_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fn in waiters:
            fn()

    def when_idle(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the loop thread once nothing is queued or running."""
        if self.idle():
            fn()
        else:
            self._idle_waiters.append(fn)

    def _tick(self) -> None:
        self._scheduled = False
        if self._busy or not self._queue:
            return
        n = len(self._queue)
        if (
            self.max_delay_s > 0.0
            and self._queued_rows < self.max_batch
            and n > self._seen
            and self._clock() - self._queue[0].t_enqueue < self.max_delay_s
            and (self._peers is None or n < self._peers())
        ):
            # Requests are still arriving: give the loop one more pass to read them.
            self._seen = n
            self._scheduled = True
            self._loop.call_soon(self._tick)
            return
        self._seen = 0
        if self.max_queue_s is not None and not self._drop_expired():
            return
        batch = self._take()
        if self.mode == "inline":
            t_start = self._clock()
            results, compute_s = self._compute(batch)
            self._finish(batch, results, t_start, compute_s)
        else:
            self._busy = True
            with self._work_ready:
                self._work.append(batch)
                self._work_ready.notify()

    def _drop_expired(self) -> bool:
        """Answer the requests that waited past ``max_queue_s`` (oldest first); True if any are left."""
        q, limit, now = self._queue, self.max_queue_s, self._clock()
        while q and now - q[0].t_enqueue > limit:
            item = q.popleft()
            self._queued_rows -= item.rows
            try:
                item.callback(self._expired(), (now - item.t_enqueue) * 1000.0)
            except Exception:  # a broken callback must not stall the batcher
                import logging

                logging.getLogger("edgeml.serve").exception("response callback failed")
        if not q and self._idle_waiters and not self._reserved:
            self._wake_idle_waiters()
        return bool(q)

    def _take(self) -> list[_Item]:
        q = self._queue
        first = q.popleft()
        batch = [first]
        rows = first.rows
        if self.batchable:
            skipped = []
            while q and rows < self.max_batch:
                item = q[0]
                if item.sig != first.sig:
                    skipped.append(q.popleft())
                    continue
                if rows + item.rows > self.max_batch:
                    break
                q.popleft()
                batch.append(item)
                rows += item.rows
            if skipped:
                q.extendleft(reversed(skipped))
        self._queued_rows -= rows
        return batch

    def _finish(self, batch: list[_Item], results: list[Any], t_start: float, compute_s: float) -> None:
        st = self._stats
        rows = 0
        for item, result in zip(batch, results):
            queue_ms = (t_start - item.t_enqueue) * 1000.0
            st.queue_ms.observe(queue_ms)
            rows += item.rows
            try:
                item.callback(result, queue_ms)
            except Exception:  # a broken callback must not stall the batcher
                import logging

                logging.getLogger("edgeml.serve").exception("response callback failed")
        st.rows += rows
        st.batch_size.observe(rows)
        st.compute_ms.observe(compute_s * 1000.0)
        if self._on_compute is not None:
            self._on_compute(compute_s * 1000.0)
        if self._queue:
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._tick)
        elif self._idle_waiters and not self._reserved:
            self._wake_idle_waiters()

    # -- compute (loop thread in inline mode, worker thread otherwise) ----
    def _compute(self, batch: list[_Item]) -> tuple[list[Any], float]:
        clock = self._clock
        t0 = clock()
        if len(batch) == 1:
            try:
                results: list[Any] = [self._run(batch[0].feeds)]
            except Exception as exc:
                results = [exc]
            return results, clock() - t0
        names = list(batch[0].feeds)
        feeds = {n: np.concatenate([it.feeds[n] for it in batch], axis=0) for n in names}
        try:
            out = self._run(feeds)
        except Exception:
            # Isolate the request at fault: run each alone.
            results = []
            for it in batch:
                try:
                    results.append(self._run(it.feeds))
                except Exception as exc:
                    results.append(exc)
            return results, clock() - t0
        return _split(out, batch, feeds[names[0]].shape[0]), clock() - t0

    def _worker_main(self) -> None:
        while True:
            with self._work_ready:
                while not self._work:
                    self._work_ready.wait()
                batch = self._work.popleft()
            if batch is None:
                return
            t_start = self._clock()
            results, compute_s = self._compute(batch)
            try:
                self._loop.call_soon_threadsafe(self._done, batch, results, t_start, compute_s)
            except RuntimeError:  # loop closed during shutdown
                return

    def _done(self, batch, results, t_start, compute_s) -> None:
        self._busy = False
        self._finish(batch, results, t_start, compute_s)

    def close(self) -> None:
        """Stop the worker thread (call once idle)."""
        if self._worker is not None:
            with self._work_ready:
                self._work.append(None)
                self._work_ready.notify()
            self._worker.join(timeout=5.0)


def _split(out: dict[str, np.ndarray], batch: list[_Item], total: int) -> list[Any]:
    """Give each request its own slice of the batched outputs.

    The offsets come from each request's own input arrays (axis 0 as concatenated), never from a
    count claimed elsewhere, so no mix of sizes (0 rows included) can shift one client's rows into
    another's answer. An output whose axis 0 does not match the batch cannot be split safely: every
    request in the batch gets an error instead of somebody else's rows.
    """
    wrong = [k for k, v in out.items() if v.ndim == 0 or v.shape[0] != total]
    if wrong:
        err = BatchSplitError(f"output {wrong[0]!r} has {out[wrong[0]].shape[:1]} rows for a batch of {total} rows")
        return [err] * len(batch)
    results: list[Any] = []
    start = 0
    for it in batch:
        end = start + next(iter(it.feeds.values())).shape[0]
        results.append({k: v[start:end] for k, v in out.items()})
        start = end
    return results


class BatchSplitError(RuntimeError):
    """A batched run returned outputs whose rows do not line up with the requests."""
