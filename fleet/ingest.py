"""Batched ingest of device messages: the MQTT thread only queues; one writer applies them in batches.

Why: one transaction (and on SQLite one WAL commit, on PostgreSQL one round trip + commit) per heartbeat capped
the manager near 700 messages/s, less than 1,000 devices send in the background, so events queued behind
heartbeats and a rollout's waves waited on them: cost grew faster than the fleet. The writer takes whatever is
queued (up to ``max_batch``) and hands it to ``Manager.on_messages`` -- one commit per batch. No timer adds
delay: a lone message is applied at once, a burst becomes one batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

log = logging.getLogger("edgeml.fleet.ingest")


class IngestQueue:
    def __init__(self, apply: Callable[[list[tuple[str, bytes]]], None], *, max_batch: int = 2000,
                 max_queued: int = 100_000):
        self.apply = apply
        self.max_batch = max_batch
        self._q: queue.Queue[tuple[str, bytes] | None] = queue.Queue(max_queued)   # full: the MQTT thread waits
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        self.messages = 0
        self.batches = 0

    def start(self) -> "IngestQueue":
        self._thread.start()
        return self

    def put(self, topic: str, payload: bytes, retained: bool = False) -> None:
        self._q.put((topic, payload))

    def stop(self, timeout: float = 5.0) -> None:
        """Apply what is queued, then end the writer."""
        self._q.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._q.get()
            batch = [] if first is None else [first]
            done = first is None
            while not done and len(batch) < self.max_batch:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                else:
                    batch.append(item)
            if batch:
                try:
                    self.apply(batch)
                except Exception:  # noqa: BLE001 - the writer must outlive one bad batch
                    log.exception("ingest batch of %d message(s) failed", len(batch))
                self.messages += len(batch)
                self.batches += 1
            if done:
                return
