"""The manager tests of test_manager.py, run again on PostgreSQL: every ``FleetDB(<sqlite path>)`` the manager
opens becomes a fresh PostgreSQL schema (the same path -> the same schema, so "restart" tests reopen it).
Tests that poke SQLite itself (PRAGMA, sqlite3) stay SQLite-only; their PostgreSQL forms are in test_postgres.py."""

from __future__ import annotations

import pytest

import test_manager
from pgtest import pg_schemas  # noqa: F401 - fixture
from test_manager import *  # noqa: F401,F403 - the same tests, collected again here

from edgeml.fleet import db as fleet_db
from edgeml.fleet import manager as fleet_manager
from edgeml.fleet import service as fleet_service

SQLITE_ONLY = {"test_schema_migration_from_v1_and_newer_schema_refused"}
for _name in SQLITE_ONLY & set(globals()):
    del globals()[_name]


@pytest.fixture(autouse=True)
def on_postgres(pg_schemas, monkeypatch):  # noqa: F811 - pg_schemas is the imported fixture
    names: dict[str, str] = {}

    def open_db(path, **kw):
        key = str(path)
        if key not in names:
            names[key] = pg_schemas.url()
        return fleet_db.FleetDB(names[key], **kw)

    monkeypatch.setattr(fleet_manager, "FleetDB", open_db)
    monkeypatch.setattr(fleet_service, "FleetDB", open_db)    # the CLI's command queue: same database
    yield
    assert names, "the test opened no database: it did not run on PostgreSQL"


def test_runs_on_postgres(tmp_path):
    m = test_manager.Manager(test_manager.ManagerConfig(db=tmp_path / "x.db"), None)
    assert m.db.postgres and m.db.schema_version() == fleet_db.SCHEMA_VERSION
