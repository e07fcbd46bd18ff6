"""PostgreSQL round trip and migrations against the real server."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from infra import migrate
from infra.errors import InfraError
from infra.stack import Endpoints

SCHEMA_QUERY = """
SELECT table_name, column_name, data_type, is_nullable
FROM information_schema.columns WHERE table_schema = current_schema()
ORDER BY table_name, ordinal_position
"""


def test_round_trip(endpoints: Endpoints, uid: str):
    with psycopg.connect(endpoints.dsn) as conn:
        conn.execute(f"CREATE TEMP TABLE rt_{uid} (k text PRIMARY KEY, v integer)")
        conn.execute(f"INSERT INTO rt_{uid} VALUES (%s, %s)", ("a", 42))
        assert conn.execute(f"SELECT v FROM rt_{uid} WHERE k = 'a'").fetchone() == (42,)


def test_migrations_twice_leave_schema_unchanged(endpoints: Endpoints):
    migrate.apply(endpoints.dsn)
    with psycopg.connect(endpoints.dsn) as conn:
        before = conn.execute(SCHEMA_QUERY).fetchall()
        versions = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    assert migrate.apply(endpoints.dsn) == []
    with psycopg.connect(endpoints.dsn) as conn:
        assert conn.execute(SCHEMA_QUERY).fetchall() == before
        assert (
            conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == versions
        )
    assert [v for (v,) in versions] == [m.version for m in migrate.load()]
    assert any(t == "projection_offsets" for t, *_ in before)


def test_edited_migration_is_refused(endpoints: Endpoints, tmp_path: Path, uid: str):
    """An applied migration whose text changed is an error, not a silent skip."""
    with psycopg.connect(endpoints.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA mig_{uid}")
    dsn = f"{endpoints.dsn}?options=-csearch_path%3Dmig_{uid}"
    (tmp_path / "0001_first.sql").write_text(f"CREATE TABLE t_{uid} (id int);")
    assert migrate.apply(dsn, tmp_path) == [1]
    (tmp_path / "0001_first.sql").write_text(f"CREATE TABLE t_{uid} (id bigint);")
    with pytest.raises(InfraError, match="was changed after it was applied"):
        migrate.apply(dsn, tmp_path)
