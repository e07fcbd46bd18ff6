"""Projection tables in a schema of their own: for replays, benchmarks and tests.

The projections' tables are created by the numbered migrations in infra/migrations; this
applies the projection ones (``PROJECTION_MIGRATIONS``) to a fresh schema, so a replay can
rebuild every read model next to the live ones and compare, and drop it afterwards.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from infra import migrate

# Migrations that create or change projection tables (the others belong to the edge).
PROJECTION_MIGRATIONS = (1, 2, 4, 5, 9, 12, 13, 15)
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _checked(schema: str) -> str:
    if not _NAME.match(schema) or schema in ("public", "pg_catalog", "information_schema"):
        raise ValueError(f"{schema!r} is not a name for a scratch schema (a-z, 0-9, _)")
    return schema


def create(dsn: str, schema: str) -> None:
    """Create ``schema`` with empty projection tables; it must not exist yet."""
    name = sql.Identifier(_checked(schema))
    wanted = [m for m in migrate.load() if m.version in PROJECTION_MIGRATIONS]
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(name))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(name))
        for migration in wanted:
            conn.execute(migration.sql.encode())


def drop(dsn: str, schema: str) -> None:
    """Drop ``schema`` and everything in it (nothing if it is gone)."""
    name = sql.Identifier(_checked(schema))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name))
