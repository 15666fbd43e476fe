"""The fleet schema on PostgreSQL: versioned migrations (the same versions as SQLite), enum CHECKs, refusals."""

from __future__ import annotations

import psycopg
import pytest
from pgtest import pg_schemas  # noqa: F401 - fixture

from edgeml.errors import FleetError
from edgeml.fleet import db_postgres as pg
from edgeml.fleet.db import SCHEMA_VERSION, FleetDB, postgres_migrations


def test_migrates_from_v1_keeps_rows_and_refuses_newer(pg_schemas):  # noqa: F811
    url = pg_schemas.url()
    conn = pg.PgConnection(url)
    pg.migrate(conn, postgres_migrations()[:1], url)          # an old manager made a v1 database
    conn.execute("INSERT INTO devices (device_id, labels) VALUES (?, ?)", ("old-1", '{"hw": "x"}'))
    conn.close()
    db = FleetDB(url)
    assert db.schema_version() == SCHEMA_VERSION == 3
    row = db.one("SELECT device_id, endpoint FROM devices")
    assert row["device_id"] == "old-1" and row["endpoint"] is None
    db.conn.raw.execute("UPDATE edgeml_schema SET version = %s", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(FleetError, match="this edgeml knows up to"):
        FleetDB(url)


def test_enum_checks_refuse_unknown_states(pg_schemas):  # noqa: F811
    db = FleetDB(pg_schemas.url())
    db.x("INSERT INTO rollouts (id, name, version, sha256, selector, waves, max_failure_rate, bake_s, gates, state,"
         " created_at, created_by, updated_at) VALUES ('1','t','1','x','{}','[1]',0.1,0,'[]','running',0,'me',0)")
    with pytest.raises(psycopg.errors.CheckViolation, match="rollouts_state_check"):
        db.x("UPDATE rollouts SET state = 'exploded' WHERE id = '1'")
    assert db.one("SELECT state FROM rollouts")["state"] == "running"


def test_foreign_schema_readonly_and_bad_url_refused(pg_schemas):  # noqa: F811
    url = pg_schemas.url()
    with pytest.raises(FleetError, match="no edgeml fleet schema yet"):
        FleetDB(url, readonly=True)
    raw = psycopg.connect(url, autocommit=True)
    raw.execute("CREATE TABLE someone_elses (x int)")
    raw.close()
    with pytest.raises(FleetError, match="no edgeml fleet schema") as err:
        FleetDB(url)
    assert "someone_elses" in err.value.message
    with pytest.raises(FleetError, match="cannot connect to PostgreSQL at postgresql://me:\\*\\*\\*@127.0.0.1:1/x"):
        FleetDB("postgresql://me:secret@127.0.0.1:1/x")


def test_dialect_rewrites():
    assert pg.to_postgres("INSERT OR IGNORE INTO events VALUES (?,?)") == (
        "INSERT INTO events VALUES (%s,%s) ON CONFLICT DO NOTHING", False)
    assert pg.to_postgres("UPDATE d SET s = MAX(s, ?) WHERE x LIKE 'a%'")[0] == (
        "UPDATE d SET s = GREATEST(s, %s) WHERE x LIKE 'a%%'")
    assert pg.to_postgres("INSERT INTO commands (a) VALUES (?)") == ("INSERT INTO commands (a) VALUES (%s) RETURNING id", True)
