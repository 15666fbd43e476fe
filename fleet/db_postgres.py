"""PostgreSQL backend of the fleet database (psycopg 3), for managers that outgrow one SQLite file.

The manager writes one dialect (SQLite's, with ``?`` placeholders); ``to_postgres`` rewrites the few
constructs that differ, once per statement text (cached):

* ``?`` -> ``%s`` (and a literal ``%`` -> ``%%``);
* ``INSERT OR IGNORE INTO t ...`` -> ``INSERT INTO t ... ON CONFLICT DO NOTHING``;
* ``INSERT OR REPLACE INTO t VALUES (...)`` -> ``... ON CONFLICT (primary key) DO UPDATE SET every column``;
* scalar ``MAX(a, b)`` -> ``GREATEST(a, b)``;
* an ``INSERT INTO commands`` gets ``RETURNING id`` so ``cursor.lastrowid`` works as in sqlite3.

The schema is the SAME versioned migration list as SQLite (fleet/db.py ``MIGRATIONS``): DDL types are mapped
(REAL -> DOUBLE PRECISION, BLOB -> BYTEA, AUTOINCREMENT -> BIGSERIAL) and v3's enum triggers become CHECK
constraints. The version lives in ``edgeml_schema``; migrations run under an advisory transaction lock, so
replicas starting together migrate once.

One connection per ``FleetDB`` in autocommit mode; ``FleetDB.tx()`` opens an explicit transaction.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from edgeml.errors import FleetError

MIGRATION_LOCK = 0x6564676D6C01     # pg_advisory_xact_lock key while migrating ("edgml" + 1)
UPSERT_KEYS = {"telemetry": ("device_id", "name", "version"), "device_telemetry": ("device_id",),
               "desired": ("device_id",), "devices": ("device_id",), "meta": ("key",)}
_SCALAR_MAX = re.compile(r"\bMAX\(\s*([^(),]+?)\s*,\s*([^(),]+?)\s*\)")
_OR_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\s", re.I)
_OR_REPLACE = re.compile(r"^\s*INSERT\s+OR\s+REPLACE\s+INTO\s+(\w+)\s", re.I)


def is_postgres_url(db: object) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc[-1]}"))


class PgRow(dict):
    """A row readable by column name and by position, like ``sqlite3.Row`` (``dict(row)`` gives the columns)."""

    __slots__ = ("_values",)
    _values: tuple[Any, ...]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return self._values[key]
        return dict.__getitem__(self, key)


def _row_factory(cursor: Any) -> Any:
    names = [c.name for c in cursor.description or ()]

    def make(values: Sequence[Any]) -> PgRow:
        row = PgRow(zip(names, values))
        row._values = tuple(values)
        return row

    return make


class PgCursor:
    """What the manager uses of ``sqlite3.Cursor``: fetchone/fetchall/rowcount/lastrowid.

    Inside ``PgConnection.pipeline()`` a statement is only sent; its result (rows, rowcount) is waited for when
    first read (``_ready``: one pipeline sync for everything sent so far)."""

    def __init__(self, cursor: Any, returning_id: bool, pipeline: Any = None):
        self._cursor = cursor
        self._pipeline = pipeline
        self.lastrowid: int | None = None
        self._rows: list[PgRow] | None = None
        if returning_id:
            self._ready()
            row = cursor.fetchone()
            self.lastrowid = row[0] if row else None
            self._rows = []

    def _ready(self) -> None:
        if self._pipeline is not None:
            self._pipeline.sync()
            self._pipeline = None

    @property
    def rowcount(self) -> int:
        self._ready()
        return int(self._cursor.rowcount)

    def fetchone(self) -> PgRow | None:
        if self._rows is not None:
            return self._rows.pop(0) if self._rows else None
        self._ready()
        return self._cursor.fetchone() if self._cursor.description else None

    def fetchall(self) -> list[PgRow]:
        if self._rows is not None:
            rows, self._rows = self._rows, []
            return rows
        self._ready()
        return self._cursor.fetchall() if self._cursor.description else []


class PgConnection:
    """The subset of ``sqlite3.Connection`` the fleet code uses, on psycopg 3 (autocommit + explicit tx)."""

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise FleetError("--db postgresql://... needs psycopg 3",
                             hint="pip install 'edgeml[fleet-pg]' (or: pip install 'psycopg[binary]>=3.1')") from None
        self.url = url
        try:
            self.raw = psycopg.connect(url, autocommit=True, row_factory=_row_factory, connect_timeout=10)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FleetError(f"cannot connect to PostgreSQL at {redact(url)}: {first}",
                             hint="check --db (postgresql://USER@HOST:PORT/DATABASE) and that the server runs") from None
        self._columns: dict[str, list[str]] = {}
        self._tx: Any = None
        self._pipeline: Any = None

    def execute(self, sql: str, args: Iterable[Any] = ()) -> PgCursor:
        text, returning_id = to_postgres(sql)
        if "{upsert:" in text:
            text = self._expand_upsert(text)
        return PgCursor(self.raw.execute(text, tuple(args), prepare=True), returning_id, self._pipeline)

    @contextmanager
    def pipeline(self) -> Iterator[None]:
        """libpq pipeline mode for a burst of statements (the ingest writer's batch): each is sent without
        waiting for its answer; a read waits (one sync). Before, every heartbeat/telemetry write was its own
        round trip -- the PostgreSQL ingest rate was bound by them (profile in docs/scale.md)."""
        if self._pipeline is not None:
            yield
            return
        with self.raw.pipeline() as p:
            self._pipeline = p
            try:
                yield
            finally:
                self._pipeline = None

    def begin(self) -> None:
        self._tx = self.raw.transaction()
        self._tx.__enter__()

    def end(self, failed: bool) -> None:
        tx, self._tx = self._tx, None
        if failed:
            tx.__exit__(RuntimeError, RuntimeError("rolled back"), None)   # psycopg rolls back on an exception
        else:
            tx.__exit__(None, None, None)

    def columns(self, table: str) -> list[str]:
        if table not in self._columns:
            rows = self.raw.execute("SELECT column_name FROM information_schema.columns WHERE table_schema ="
                                    " current_schema() AND table_name = %s ORDER BY ordinal_position", (table,))
            self._columns[table] = [r[0] for r in rows.fetchall()]
        return self._columns[table]

    def _expand_upsert(self, text: str) -> str:
        table = re.search(r"\{upsert:(\w+)\}", text).group(1)    # type: ignore[union-attr] # to_postgres put it there
        keys = UPSERT_KEYS[table]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in self.columns(table) if c not in keys)
        return text.replace(f"{{upsert:{table}}}", f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}")

    def close(self) -> None:
        self.raw.close()


@lru_cache(maxsize=512)
def to_postgres(sql: str) -> tuple[str, bool]:
    """SQLite-dialect statement -> (PostgreSQL statement, whether it returns the new row id)."""
    text = sql.replace("%", "%%").replace("?", "%s")
    text = _SCALAR_MAX.sub(r"GREATEST(\1, \2)", text)
    text = text.replace("BEGIN IMMEDIATE", "BEGIN")
    if _OR_IGNORE.match(text):
        text = _OR_IGNORE.sub("INSERT INTO ", text).rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    m = _OR_REPLACE.match(text)
    if m:
        table = m.group(1)
        if table not in UPSERT_KEYS:
            raise FleetError(f"INSERT OR REPLACE INTO {table}: no conflict key known for PostgreSQL")
        text = _OR_REPLACE.sub(f"INSERT INTO {table} ", text).rstrip().rstrip(";") + f" {{upsert:{table}}}"
    returning = bool(re.match(r"^\s*INSERT\s+INTO\s+commands\b", text, re.I))
    if returning:
        text = text.rstrip().rstrip(";") + " RETURNING id"
    return text, returning


def ddl(script: str) -> list[str]:
    """An SQLite DDL migration -> PostgreSQL statements (types mapped; same tables, columns and keys)."""
    text = re.sub(r"INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY", script)
    text = re.sub(r"\bINTEGER\b", "BIGINT", text)
    text = re.sub(r"\bREAL\b", "DOUBLE PRECISION", text)
    text = re.sub(r"\bBLOB\b", "BYTEA", text)
    return [s.strip() for s in text.split(";") if s.strip()]


def enum_checks(columns: list[tuple[str, str, str]]) -> list[str]:
    """v3 on PostgreSQL: the enum rule as real CHECK constraints ((table, column, 'a','b',... list))."""
    return [f"ALTER TABLE {table} ADD CONSTRAINT {table}_{column}_check CHECK ({column} IN {values})"
            for table, column, values in columns]


def migrate(conn: PgConnection, steps: list[list[str]], url: str) -> None:
    """Bring the schema to ``len(steps)``; each step in one transaction, under the migration lock."""
    raw = conn.raw
    with raw.transaction():
        raw.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        raw.execute("CREATE TABLE IF NOT EXISTS edgeml_schema (version INTEGER NOT NULL)")
        row = raw.execute("SELECT version FROM edgeml_schema").fetchone()
        if row is None:
            tables = raw.execute("SELECT table_name FROM information_schema.tables WHERE table_schema ="
                                 " current_schema() AND table_name <> 'edgeml_schema'").fetchall()
            if tables:
                raise FleetError(f"{redact(url)} holds tables {sorted(t[0] for t in tables)[:5]} but no edgeml"
                                 " fleet schema", hint="give the fleet its own database or schema"
                                 " (e.g. ?options=-csearch_path%3Dfleet)")
            raw.execute("INSERT INTO edgeml_schema VALUES (0)")
            version = 0
        else:
            version = row[0]
        if version > len(steps):
            raise FleetError(f"{redact(url)} has schema version {version}; this edgeml knows up to {len(steps)}",
                             hint="upgrade edgeml on the manager host")
        for v in range(version, len(steps)):
            for stmt in steps[v]:
                raw.execute(stmt)
            raw.execute("UPDATE edgeml_schema SET version = %s", (v + 1,))


def schema_version(conn: PgConnection) -> int:
    return schema_version_or_none(conn) or 0


def schema_version_or_none(conn: PgConnection) -> int | None:
    """The fleet schema's version, or None where this database/schema has none (yet)."""
    found = conn.raw.execute("SELECT to_regclass('edgeml_schema')").fetchone()
    if found is None or found[0] is None:
        return None
    row = conn.raw.execute("SELECT version FROM edgeml_schema").fetchone()
    return int(row[0]) if row else None
