"""The manager's SQLite database: schema (versioned), and small helpers.

WAL mode so the CLI can read while the manager writes; ``PRAGMA user_version``
holds the schema version and ``MIGRATIONS[i]`` upgrades i -> i+1, each in one
transaction (v3 adds the enum checks on every status column). Every row the manager needs after a restart is here: devices,
artifacts, rollouts with their per-device state, deployments (deployment id ->
device / rollout / kind), idempotent events, latest telemetry, the last desired
message per device, audit log, and the commands queue the CLI writes into.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from edgeml.errors import FleetError
from edgeml.fleet.db_postgres import is_postgres_url, redact
from edgeml.fleet.states import (CommandStatus, DeploymentKind, DeviceStatus, InstallState, RollbackStatus,
                                 RolloutState, sql_in)

SCHEMA = [
    # v1
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY, labels TEXT NOT NULL DEFAULT '{}', online INTEGER NOT NULL DEFAULT 0,
        first_seen REAL, last_seen REAL, active TEXT, committed_seq INTEGER NOT NULL DEFAULT -1,
        state TEXT, agent_version TEXT, last_failed TEXT, refused INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE artifacts (
        sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, size INTEGER NOT NULL,
        signed INTEGER NOT NULL, target TEXT, published_at REAL, published_by TEXT, UNIQUE(name, version));
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL,
        selector TEXT NOT NULL, waves TEXT NOT NULL, max_failure_rate REAL NOT NULL, bake_s REAL NOT NULL,
        gates TEXT NOT NULL, state TEXT NOT NULL, wave INTEGER NOT NULL DEFAULT 0, wave_started_at REAL,
        bake_started_at REAL, created_at REAL NOT NULL, created_by TEXT NOT NULL, updated_at REAL NOT NULL,
        reason TEXT, gate_results TEXT, health_window_s REAL);
    CREATE TABLE rollout_devices (
        rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, status TEXT NOT NULL,
        deployment_id TEXT, seq INTEGER, sent_at REAL, updated_at REAL, reason TEXT,
        prev_sha TEXT, prev_name TEXT, prev_version TEXT,
        rollback_deployment_id TEXT, rollback_status TEXT, rollback_sent_at REAL,
        PRIMARY KEY (rollout_id, device_id));
    CREATE TABLE deployments (
        deployment_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, seq INTEGER NOT NULL, rollout_id TEXT,
        kind TEXT NOT NULL, sha256 TEXT, status TEXT NOT NULL, reason TEXT, last_event_seq INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE events (
        device_id TEXT NOT NULL, event_seq INTEGER NOT NULL, deployment_id TEXT, deploy_seq INTEGER, attempt INTEGER,
        state TEXT, reason TEXT, ts REAL, received_at REAL, PRIMARY KEY (device_id, event_seq));
    CREATE TABLE telemetry (
        device_id TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, ts REAL NOT NULL,
        requests INTEGER NOT NULL, failures INTEGER NOT NULL, buckets TEXT NOT NULL, sum_ms REAL NOT NULL,
        PRIMARY KEY (device_id, name, version));
    CREATE TABLE device_telemetry (
        device_id TEXT PRIMARY KEY, ts REAL NOT NULL, cpu_percent REAL, memory_mb REAL, throughput_rps REAL,
        active TEXT, stubbed INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE desired (device_id TEXT PRIMARY KEY, deployment_id TEXT NOT NULL, seq INTEGER NOT NULL,
        payload BLOB NOT NULL);
    CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, target TEXT, detail TEXT);
    CREATE TABLE commands (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL,
        command TEXT NOT NULL, args TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', result TEXT,
        error TEXT, done_at REAL);
    CREATE INDEX rollout_devices_by_device ON rollout_devices(device_id);
    CREATE INDEX deployments_by_device ON deployments(device_id);
    INSERT INTO meta VALUES ('seq', '0');
    """,
    # v2: where a device serves (announced in its presence message)
    """
    ALTER TABLE devices ADD COLUMN endpoint TEXT;
    """,
]


ENUM_COLUMNS = [("rollouts", "state", RolloutState), ("rollout_devices", "status", DeviceStatus),
                ("rollout_devices", "rollback_status", RollbackStatus), ("deployments", "status", DeviceStatus),
                ("deployments", "kind", DeploymentKind), ("commands", "status", CommandStatus),
                ("devices", "state", InstallState)]


def _enum_triggers() -> list[str]:
    """v3: every status column holds a value of its enum (fleet/states.py). SQLite cannot add a CHECK to an
    existing table, so the same rule is a pair of BEFORE INSERT / UPDATE triggers: existing databases keep
    their rows and upgrade in place; a write of an unknown status is refused (``sqlite3.IntegrityError``)."""
    out = []
    for table, column, enum in ENUM_COLUMNS:
        for op, when in (("insert", "INSERT"), ("update", f"UPDATE OF {column}")):
            out.append(f"CREATE TRIGGER {table}_{column}_{op}_check BEFORE {when} ON {table}"
                       f" WHEN NEW.{column} NOT IN {sql_in(enum)}"
                       f" BEGIN SELECT RAISE(ABORT, '{table}.{column}: not a {enum.__name__}'); END")
    return out


# a migration is one SQL script (split on ';') or a list of statements (triggers hold ';' themselves)
MIGRATIONS: list[str | list[str]] = [*SCHEMA, _enum_triggers()]
SCHEMA_VERSION = len(MIGRATIONS)


def postgres_migrations() -> list[list[str]]:
    """The same versions for PostgreSQL: v1/v2 DDL with mapped types, v3 as CHECK constraints."""
    from edgeml.fleet import db_postgres as pg

    steps = [pg.ddl(script) for script in SCHEMA]
    steps.append(pg.enum_checks([(t, c, sql_in(e)) for t, c, e in ENUM_COLUMNS]))
    assert len(steps) == SCHEMA_VERSION, "every migration needs its PostgreSQL form"
    return steps


class FleetDB:
    """The fleet database: an SQLite file (default) or PostgreSQL (``postgresql://...``, fleet/db_postgres.py).

    ``conn.execute(sql, args)`` takes SQLite-dialect SQL on both; ``tx()`` is one transaction."""

    def __init__(self, path: Path | str, *, readonly: bool = False):
        self.postgres = is_postgres_url(path)
        self.location = redact(str(path)) if self.postgres else str(path)
        self.lock = threading.RLock()
        self._depth = 0          # nesting of tx(): only the outermost begins and commits
        self.conn: Any
        if self.postgres:
            self.path = Path("postgresql")       # not a file; ``location`` names the database
            self._open_postgres(str(path), readonly)
            return
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise FleetError(f"fleet database {self.path} does not exist",
                             hint="start the manager first: edgeml fleet manager --db FILE")
        check_database(self.path)    # before anything writes to it: never "upgrade" someone else's file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA busy_timeout = 30000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.migrate()

    def _open_postgres(self, url: str, readonly: bool) -> None:
        from edgeml.fleet import db_postgres as pg

        self.conn = pg.PgConnection(url)
        if readonly and pg.schema_version_or_none(self.conn) is None:
            self.conn.close()
            raise FleetError(f"{self.location} holds no edgeml fleet schema yet",
                             hint="start the manager first: edgeml fleet manager --db postgresql://...")
        self.migrate()

    def migrate(self) -> None:
        if self.postgres:
            from edgeml.fleet import db_postgres as pg

            with self.lock:
                pg.migrate(self.conn, postgres_migrations(), str(self.location))
            return
        with self.lock:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FleetError(f"{self.path} has schema version {version}; this edgeml knows up to {SCHEMA_VERSION}",
                                 hint="upgrade edgeml on the manager host")
            for v in range(version, SCHEMA_VERSION):
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    step = MIGRATIONS[v]
                    for stmt in [s for s in step.split(";") if s.strip()] if isinstance(step, str) else step:
                        self.conn.execute(stmt)
                    self.conn.execute(f"PRAGMA user_version = {v + 1}")
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise

    def schema_version(self) -> int:
        if self.postgres:
            from edgeml.fleet import db_postgres as pg

            return pg.schema_version(self.conn)
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    # ---------------------------------------------------------------- helpers
    def tx(self):
        return _Tx(self)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """PostgreSQL: statements inside are sent without waiting for each answer (fleet/db_postgres.py); a
        read waits. SQLite: nothing to do (no round trips)."""
        if not self.postgres:
            yield
            return
        with self.lock, self.conn.pipeline():
            yield

    def q(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        with self.lock:
            return self.conn.execute(sql, tuple(args)).fetchall()

    def one(self, sql: str, args: Iterable[Any] = ()) -> Any:
        with self.lock:
            return self.conn.execute(sql, tuple(args)).fetchone()

    def x(self, sql: str, args: Iterable[Any] = ()) -> Any:
        with self.lock:
            return self.conn.execute(sql, tuple(args))

    def next_seq(self) -> int:
        with self.lock:
            row = self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'seq' RETURNING value").fetchone()
            return int(row[0])

    def audit(self, ts: float, actor: str, action: str, target: str | None, detail: Any = None) -> None:
        self.x("INSERT INTO audit (ts, actor, action, target, detail) VALUES (?,?,?,?,?)",
               (ts, actor, action, target, json.dumps(detail, sort_keys=True, default=str) if detail is not None else None))

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def check_database(path: Path | str) -> None:
    """An existing ``path`` must be an edgeml fleet database (or empty); FleetError otherwise, file untouched.

    Opened read-only: a garbage file, another program's SQLite database or one of a newer schema is refused
    with one line, instead of a traceback or (worse) our schema written into it."""
    if is_postgres_url(path):
        return     # checked when connecting (db_postgres.migrate refuses a foreign schema)
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise FleetError(f"fleet database {path} is a folder", hint="pass the manager's SQLite file with --db")
    if path.stat().st_size == 0:
        return
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise FleetError(f"{path} is not a fleet database ({exc})",
                         hint="pass the manager's SQLite file with --db (default $EDGEML_FLEET_DB or fleet.db)") from None
    if not tables:
        return
    if version < 1 or not {"meta", "devices", "rollouts"} <= tables:
        raise FleetError(f"{path} is an SQLite database, but not an edgeml fleet database"
                         f" (schema version {version}, tables {sorted(tables)[:5]})",
                         hint="pass the manager's SQLite file with --db")
    if version > SCHEMA_VERSION:
        raise FleetError(f"{path} has schema version {version}; this edgeml knows up to {SCHEMA_VERSION}",
                         hint="upgrade edgeml on the manager host")


class _Tx:
    """One transaction; a ``tx()`` inside another joins it (the outer one commits or rolls back everything).
    The manager's ingest wraps a whole batch of device messages in one outer transaction: one commit per batch,
    not per message."""

    def __init__(self, db: FleetDB):
        self.db = db

    def __enter__(self):
        self.db.lock.acquire()
        if self.db._depth == 0:
            try:
                if self.db.postgres:
                    self.db.conn.begin()
                else:
                    self.db.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.db.lock.release()
                raise
        self.db._depth += 1
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.db._depth -= 1
            if self.db._depth == 0:
                if self.db.postgres:
                    self.db.conn.end(failed=exc_type is not None)
                else:
                    self.db.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.db.lock.release()
        return False


def row_dict(row: Any, json_fields: tuple[str, ...] = ()) -> dict[str, Any] | None:
    if row is None:
        return None
    d = dict(row)
    for f in json_fields:
        if d.get(f) is not None:
            d[f] = json.loads(d[f])
    return d
