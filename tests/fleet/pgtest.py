"""PostgreSQL for fleet tests: the server on 127.0.0.1:5432 (trust auth, database ``test``; override with
$EDGEML_TEST_PG), one fresh schema per test, dropped at the end. Skips with the reason when no server answers."""

from __future__ import annotations

import os
import uuid

import pytest

BASE = os.environ.get("EDGEML_TEST_PG", "postgresql://127.0.0.1:5432/test")


def server_or_skip() -> None:
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg 3 is not installed (pip install 'psycopg[binary]>=3.1'): PostgreSQL tests skipped")
    try:
        psycopg.connect(BASE, connect_timeout=3).close()
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL answers at {BASE} ({str(exc).strip()[:120]}): PostgreSQL tests skipped")


class Schemas:
    """Hands out ``postgresql://...?options=-csearch_path=<schema>`` URLs; drops every schema on close."""

    def __init__(self) -> None:
        import psycopg

        self.conn = psycopg.connect(BASE, autocommit=True)
        self.made: list[str] = []

    def url(self, name: str | None = None) -> str:
        schema = name or f"edgeml_t_{uuid.uuid4().hex[:10]}"
        if schema not in self.made:
            self.conn.execute(f"CREATE SCHEMA {schema}")
            self.made.append(schema)
        return f"{BASE}?options=-csearch_path%3D{schema}"

    def close(self) -> None:
        for schema in self.made:
            self.conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self.conn.close()


@pytest.fixture
def pg_schemas():
    server_or_skip()
    s = Schemas()
    yield s
    s.close()
