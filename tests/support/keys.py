"""A tenant's key stored as `embedfill keys set` stores it (embedfill's schema made first)."""

from __future__ import annotations

import asyncio

from embedfill import Database
from embedfill.db.connect import connect
from embedfill.db.schema import ensure_schema
from embedfill.db.store import Store
from embedfill.keys import encrypt


def store_key(db_url: str, tenant: str, key: str, env: dict[str, str]) -> None:
    async def go() -> None:
        conn = await connect(Database(db_url))
        try:
            await ensure_schema(conn)
            await Store(conn).put_key(tenant, encrypt(key, env), "***")
        finally:
            await conn.close()

    asyncio.run(go())
