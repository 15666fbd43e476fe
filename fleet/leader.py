"""Which manager replica drives rollouts: a PostgreSQL session advisory lock, nothing home-made.

Every replica ingests telemetry and serves the CLI's reads; only the holder of the advisory lock
``LEADER_LOCK`` runs ``Manager.tick()`` (commands, waves, gates, rollback). The lock is held by one dedicated
connection: when the leader dies (even kill -9) the kernel closes its socket, PostgreSQL ends the session and
frees the lock, and the next replica's ``pg_try_advisory_lock`` (tried every ``retry_s``) wins. Take-over bound:
``retry_s`` + one manager tick after PostgreSQL notices the dead session (immediate on a closed socket; for a
vanished host, TCP keepalive -- ``keepalives_idle`` below -- bounds it).

A wave's rows and its start mark commit in one transaction (Manager._sending), so a new leader never sends a
wave twice; it republishes every retained desired state once (agents ignore sequence numbers they have seen),
which covers messages the old leader committed but had not yet published. SQLite has one manager: always leader.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("edgeml.fleet.leader")
LEADER_LOCK = 0x6564676D6C02        # "edgml" + 2 (the migration lock is + 1)


def replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership:
    """``is_leader()``: True while this replica holds the lock; tries to take it at most every ``retry_s``."""

    def __init__(self, db_url: str | None, *, retry_s: float = 1.0):
        self.url = db_url
        self.retry_s = retry_s
        self.name = replica_name()
        self._conn: Any = None
        self._held = db_url is None          # SQLite: the only manager
        self._next_try = 0.0

    def is_leader(self) -> bool:
        if self._held and self._conn is not None:
            try:
                self._conn.execute("SELECT 1")     # still our session (lock) after a network blip?
            except Exception:  # noqa: BLE001 - any failure: we no longer know we hold it
                log.warning("lost the leader connection; stepping down")
                self._held, self._conn = False, None
        if self._held or self.url is None or time.monotonic() < self._next_try:
            return self._held
        self._next_try = time.monotonic() + self.retry_s
        try:
            if self._conn is None:
                import psycopg

                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5, keepalives_idle=5,
                                             keepalives_interval=2, keepalives_count=3)
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
            self._held = bool(row and row[0])
        except Exception as exc:  # noqa: BLE001 - retried; a follower keeps ingesting meanwhile
            log.warning("leader election: %s", str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            self._conn = None
        return self._held

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()     # frees the lock at once: a follower takes over within retry_s
            except Exception:  # noqa: BLE001
                pass
        self._conn, self._held = None, False
