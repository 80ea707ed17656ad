"""embedfill's own schema: versioned, migrated forward only when it is behind.

``ensure_schema`` is what every run calls: it reads the version (one row, no lock, no
DDL), so a role with only DML privileges runs backfills once the schema exists. When the
schema is missing or behind it migrates, if the role may; if not, it raises
``SchemaNotReady`` (exit 2) naming the missing privilege and ``embedfill migrate``.
``amigrate`` is that command: the one explicit way to create or upgrade the schema.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from ..errors import ConfigError, DatabaseError, SchemaNotReady
from . import queries as q
from .connect import Database, connect

SCHEMA = "embedfill"
JOBS_MIGRATION = 5  # installs procrastinate's queue in embedfill's schema first


def migrations() -> list[tuple[int, str]]:
    """(version, SQL) for each file in migrations/, in order."""
    files = resources.files(__package__).joinpath("migrations")
    out = []
    for f in sorted(files.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".sql"):
            out.append((int(f.name.split("_", 1)[0]), f.read_text("utf-8")))
    return out


EXPECTED_VERSION = max(v for v, _ in migrations())


async def current_version(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """The schema's version; None when embedfill's schema was never created."""
    cur = await conn.execute(q.SCHEMA_VERSION_EXISTS)
    row = await cur.fetchone()
    if not row or not row[0]:
        return None
    cur = await conn.execute(q.SCHEMA_VERSION)
    row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> int:
    """The schema at this build's version: read it, and migrate only when it is behind."""
    version = await _readable_version(conn)
    if version == EXPECTED_VERSION:
        return version
    _refuse_newer(version)
    return await migrate(conn)


async def migrate(conn: psycopg.AsyncConnection[Any]) -> int:
    """Apply pending migrations in one transaction, under an advisory lock (concurrent
    callers wait, then find the work done). SchemaNotReady when the role may not."""
    found: int | None = None
    await conn.execute(q.MIGRATION_LOCK)
    try:
        async with conn.transaction():
            found = version = await current_version(conn)
            if version is None:
                if not await _schema_exists(conn):
                    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
                await conn.execute(q.CREATE_SCHEMA_VERSION)
                version = 0
            _refuse_newer(version)
            for number, body in migrations():
                if number > version:
                    if number == JOBS_MIGRATION:
                        await _install_queue(conn)
                    await conn.execute(body.encode())
                    await conn.execute(q.RECORD_VERSION, {"version": number})
                    version = number
    except pg_errors.InsufficientPrivilege:
        raise SchemaNotReady(await _denied(conn, found)) from None
    finally:
        with contextlib.suppress(psycopg.Error):  # a broken connection drops it anyway
            await conn.execute(q.MIGRATION_UNLOCK)
    return version


async def _install_queue(conn: psycopg.AsyncConnection[Any]) -> None:
    """procrastinate's schema (the version pinned in requirements.lock), created in
    embedfill's schema rather than ``public``: its SQL names nothing qualified."""
    from procrastinate.schema import SchemaManager

    body = SchemaManager.get_schema()
    cur = await conn.execute("SELECT current_setting('search_path')")
    row = await cur.fetchone()
    assert row is not None
    await conn.execute("SELECT set_config('search_path', 'embedfill', true)")
    await conn.execute(body.encode())
    await conn.execute("SELECT set_config('search_path', %(path)s, true)", {"path": row[0]})


async def amigrate(db: Database) -> tuple[int | None, int]:
    """``embedfill migrate``: (version before, None if missing; version after)."""
    conn = await connect(db)
    try:
        before = await _readable_version(conn)
        if before == EXPECTED_VERSION:
            return before, before
        _refuse_newer(before)
        return before, await migrate(conn)
    except psycopg.Error as exc:
        lines = str(exc).strip().splitlines()
        raise DatabaseError(
            f"The database refused a migration statement: {lines[0] if lines else exc!r}"
        ) from exc
    finally:
        await conn.close()


async def _readable_version(conn: psycopg.AsyncConnection[Any]) -> int | None:
    try:
        return await current_version(conn)
    except pg_errors.InsufficientPrivilege:
        role, _ = await _who(conn)
        raise SchemaNotReady(
            f"Role {role} may not read embedfill's schema (it needs USAGE on schema "
            f"{SCHEMA} and SELECT, INSERT, UPDATE on its tables); grant them as the schema "
            "owner (the least-privilege GRANTs of docs/configuration.md)."
        ) from None


def _refuse_newer(version: int | None) -> None:
    if version is not None and version > EXPECTED_VERSION:
        raise ConfigError(
            f"embedfill's schema is at version {version}, newer than this build's "
            f"{EXPECTED_VERSION}; upgrade embedfill."
        )


async def _schema_exists(conn: psycopg.AsyncConnection[Any]) -> bool:
    # CREATE SCHEMA IF NOT EXISTS checks the database's CREATE privilege first, so a role
    # without it could not get past an existing schema: look before creating
    cur = await conn.execute(q.SCHEMA_EXISTS, {"schema": SCHEMA})
    row = await cur.fetchone()
    return bool(row and row[0])


async def _who(conn: psycopg.AsyncConnection[Any]) -> tuple[str, str]:
    cur = await conn.execute(q.WHO_AM_I)
    row = await cur.fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


async def _denied(conn: psycopg.AsyncConnection[Any], found: int | None) -> str:
    role, database = await _who(conn)
    if found is None:
        needs = (
            f"CREATE on schema {SCHEMA}"
            if await _schema_exists(conn)
            else f"CREATE on database {database}"
        )
        state, verb = "embedfill's schema is missing", "create it"
    else:
        needs = f"ownership of schema {SCHEMA} and its tables"
        state = f"embedfill's schema is at version {found}, this build needs {EXPECTED_VERSION},"
        verb = "migrate it"
    return (
        f"{state} and role {role} may not {verb} (that needs {needs}); run `embedfill "
        "migrate` once as a role that may (e.g. the database owner), then grant "
        f"{role} the least-privilege GRANTs of docs/configuration.md."
    )
