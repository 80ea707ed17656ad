"""Index-aware mode: set a table's vector indexes aside during a large backfill.

Every row written into an HNSW index costs milliseconds of server CPU, so a large
backlog fills many times faster with the index dropped and rebuilt once afterwards
(``CREATE INDEX CONCURRENTLY``, so the table stays writable). While it is gone, vector
searches on the table still answer, by sequential scan: correct but slow. The
definitions are kept in the run's audit row, and a later run rebuilds any that a killed
run left dropped.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from .connect import user_context

_LIST = """
SELECT n.nspname, ic.relname, am.amname, pg_get_indexdef(i.indexrelid)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
JOIN pg_am am ON am.oid = ic.relam
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = %(rel)s AND a.attname = %(column)s AND am.amname IN ('hnsw', 'ivfflat')
ORDER BY ic.relname"""

# vector indexes on an expression of the column (a cast to halfvec, say), as _LIST reads
# them: pg_depend ties them to the column, not indkey (0 for an expression)
_ON_EXPRESSIONS = """
SELECT DISTINCT n.nspname, ic.relname, am.amname, pg_get_indexdef(i.indexrelid)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
JOIN pg_am am ON am.oid = ic.relam
JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
    AND d.refclassid = 'pg_class'::regclass AND d.refobjid = i.indrelid
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = d.refobjsubid
WHERE i.indrelid = %(rel)s AND a.attname = %(column)s AND am.amname IN ('hnsw', 'ivfflat')
  AND NOT (a.attnum = ANY(i.indkey))
ORDER BY 2"""

_STATE = """
SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%(name)s)"""


@dataclass(frozen=True)
class VectorIndex:
    schema: str
    name: str
    method: str
    definition: str  # pg_get_indexdef: the server's own, correctly quoted, CREATE INDEX

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def concurrent_definition(self) -> str:
        return re.sub(
            r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", self.definition, count=1
        )


async def vector_indexes(
    conn: psycopg.AsyncConnection[Any], table_oid: int, column: str
) -> list[VectorIndex]:
    cur = await conn.execute(_LIST, {"rel": table_oid, "column": column})
    return [VectorIndex(*row) for row in await cur.fetchall()]


async def expression_indexes(
    conn: psycopg.AsyncConnection[Any], table_oid: int, column: str
) -> list[VectorIndex]:
    """The vector indexes on an expression of ``column`` (not among ``vector_indexes``:
    no index-aware drop; a twin only for a cast to halfvec, migration.cast_parts)."""
    cur = await conn.execute(_ON_EXPRESSIONS, {"rel": table_oid, "column": column})
    return [VectorIndex(*row) for row in await cur.fetchall()]


def plan_message(indexes: list[VectorIndex], table: str, missing: int) -> str:
    names = ", ".join(f"{i.name} ({i.method})" for i in indexes)
    return (
        f"Index-aware mode will DROP the vector index{'es' if len(indexes) > 1 else ''} "
        f"{names} on {table}, fill {missing:,} rows without {'them' if len(indexes) > 1 else 'it'}"
        ", then rebuild with CREATE INDEX CONCURRENTLY. Until the rebuild finishes, "
        f"vector searches on {table} still work but scan the whole table (slow)."
    )


async def drop(conn: psycopg.AsyncConnection[Any], index: VectorIndex) -> None:
    await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index.identifier))


async def state(conn: psycopg.AsyncConnection[Any], index: VectorIndex) -> str:
    """ "valid", "invalid" (a CONCURRENTLY build that died half-way leaves the index there
    but unusable: ``indisvalid = false``, never used by queries, still written to) or
    "missing"."""
    name = index.identifier.as_string(conn)
    cur = await conn.execute(_STATE, {"name": name})
    row = await cur.fetchone()
    if row is None:
        return "missing"
    return "valid" if row[0] else "invalid"


async def rebuild(conn: psycopg.AsyncConnection[Any], index: VectorIndex) -> float:
    """Recreate a dropped index without blocking writes; returns seconds taken."""
    started = time.monotonic()
    # a failed CONCURRENTLY build leaves an INVALID index of that name behind
    await drop(conn, index)
    # the server's own definition, as the app's search_path reads it (an operator class
    # named unqualified, recorded by an earlier embedfill or a dead run)
    async with user_context(conn, transaction=False):
        await conn.execute(index.concurrent_definition().encode())
    return time.monotonic() - started
