"""embedfill's own schema: created on first use, migrated forward, versioned."""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from . import queries as q

SCHEMA = "embedfill"


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
    cur = await conn.execute(q.SCHEMA_VERSION_EXISTS)
    row = await cur.fetchone()
    if not row or not row[0]:
        return None
    cur = await conn.execute(q.SCHEMA_VERSION)
    row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def ensure_schema(conn: psycopg.AsyncConnection[Any]) -> int:
    """Apply pending migrations, one transaction each, under an advisory lock."""
    async with conn.transaction():
        await conn.execute(q.MIGRATION_LOCK)
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
        await conn.execute(q.CREATE_SCHEMA_VERSION)
        version = await current_version(conn) or 0
        for number, body in migrations():
            if number > version:
                await conn.execute(body.encode())
                await conn.execute(q.RECORD_VERSION, {"version": number})
                version = number
    return version
