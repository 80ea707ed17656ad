"""Where a change of model puts the new vectors (``embedfill model start``), as SQL.

- a **side table** (strategy ``table``) in the target table's schema, keyed by the row
  id: ``embedfill_row_id`` (the live id's type, primary key), ``embedfill_tenant`` (the
  row's tenant as text, copied) and ``embedding``. Its rows are made from the live
  table's ids (``mirror``); the text is read from the live row at each scan
  (``TargetSQL`` of a target ``in_side_table``: a text_sql over the side row), so the
  scan, the guarded write, provenance and verify work on it unchanged. Column names
  start with ``embedfill_`` so that the text_sql's unqualified names cannot mean a live
  column. Who may read the live table may read it (``grant_like``), and with row-level
  security on the live table, only the rows whose live row they may see
  (``secure_like``); a deleted live row's side row goes at the next full ``mirror``;
- a **shadow column** (strategy ``column``) on the live table: ``ALTER TABLE … ADD
  COLUMN`` (nullable, no default: catalog only), under a short ``lock_timeout``.

Each vector index of the live column gets a twin on the new vectors: the same method,
operator class and parameters, built ``CONCURRENTLY``.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from ..config import SIDE_ROW_ID, SIDE_TENANT, SIDE_VECTOR
from .target_sql import TargetSQL, unquoted

ROW_ID, TENANT, VECTOR = SIDE_ROW_ID, SIDE_TENANT, SIDE_VECTOR

log = logging.getLogger(__name__)


def create_side_table(
    schema: str, relation: str, id_type: str, vector_type: str, dimensions: int
) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE {table} ({row_id} {id_type} PRIMARY KEY,"
        " {tenant} text, {vector} {vector_type}({dims}))"
    ).format(
        table=sql.Identifier(schema, relation),
        row_id=sql.Identifier(ROW_ID),
        id_type=sql.SQL(id_type),
        tenant=sql.Identifier(TENANT),
        vector=sql.Identifier(VECTOR),
        vector_type=sql.SQL(vector_type),
        dims=sql.Literal(dimensions),
    )


# a poll's mirror looks this far below the side table's highest (integer) id for live
# rows without a side row: rows committed out of id order are found there, not left
# to the sweep
MIRROR_WINDOW = 10_000


def mirror(side_sql: TargetSQL, *, newer: bool = False, keys: bool = False) -> sql.Composed:
    """For a target ``in_side_table``: a side row for each live row that has none, a
    moved row's tenant (whose key pays for it) brought up to date, and the side rows of
    deleted live rows deleted (the live table is only read; a side row already right is
    not written, nor locked);
    ``newer`` (each poll): only the side rows live rows lack, among the integer ids above
    the side table's highest less ``MIRROR_WINDOW`` (a range scan of the key); with
    other ids an anti-join of the keys, writing only the new rows;
    ``keys`` (what the change triggers queued, drained by the watch): the side rows of
    the live rows %(keys)s (ids as text), made where missing and their tenant brought up
    to date, before they are embedded: a new row at once (not at the next poll, or at
    the sweep when its id is below the poll's window), a row moved to another tenant
    along with its edit on its new tenant's key."""
    live, side = side_sql.live, side_sql.table
    assert live is not None, "a target in a side table"
    names = {
        "side": side,
        "live": live.table,
        "row_id": sql.Identifier(ROW_ID),
        "tenant": sql.Identifier(TENANT),
        "id": sql.Identifier(live.target.id_column),
        "tenant_text": live.tenant_text("t"),
    }
    only: sql.Composable = sql.SQL("")
    if keys:
        only = sql.SQL(" AND t.{id} = ANY(CAST(CAST(%(keys)s AS text[]) AS {id_type}[]))").format(
            id_type=sql.SQL(live.types.id_type), **names
        )
    moved = sql.SQL(
        "embedfill_moved AS (UPDATE {side} AS m SET {tenant} = {tenant_text}"
        " FROM {live} AS t WHERE t.{id} = m.{row_id}{only}"
        " AND m.{tenant} IS DISTINCT FROM {tenant_text}) "
    ).format(only=only, **names)
    changes: sql.Composable = sql.SQL("")
    if keys:
        changes = sql.SQL("WITH {}").format(moved)
    elif not newer:  # every embedfill session runs with row_security off: no row is hidden
        changes = sql.SQL(
            "WITH embedfill_gone AS (DELETE FROM {side} AS g WHERE NOT {live_row}), {moved}"
        ).format(live_row=side_sql.has_live_row("g"), moved=moved, **names)
    window: sql.Composable = sql.SQL("")
    if newer and live.integer_ids:  # a bound of its own: an index condition on the key
        window = sql.SQL(
            " AND t.{id} >= coalesce((SELECT pg_catalog.max(s.{row_id}) FROM {side} AS s)"
            " - {window}, (SELECT pg_catalog.min(l.{id}) FROM {live} AS l))"
        ).format(window=sql.Literal(MIRROR_WINDOW), **names)
    return sql.SQL(
        "{changes}INSERT INTO {side} ({row_id}, {tenant}) SELECT t.{id}, {tenant_text}"
        " FROM {live} AS t WHERE NOT {side_row}{only}{window} ON CONFLICT ({row_id}) DO NOTHING"
    ).format(
        changes=changes, only=only, window=window, side_row=side_sql.has_side_row("t"), **names
    )


# the roles that may read the live table (PUBLIC too), and its owner; and whether each
# may UPDATE it
_READERS = """
SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
       pg_catalog.bool_or(a.privilege_type = 'UPDATE')
FROM pg_catalog.pg_class c, pg_catalog.aclexplode(
    coalesce(c.relacl, pg_catalog.acldefault('r', c.relowner))) AS a
WHERE c.oid = %(rel)s AND a.privilege_type IN ('SELECT', 'UPDATE')
GROUP BY 1
HAVING pg_catalog.bool_or(a.privilege_type = 'SELECT')"""


async def grant_like(
    conn: psycopg.AsyncConnection[Any], live_oid: int, schema: str, relation: str
) -> list[str]:
    """Let every role that may read the live table read the side table (the app
    searches it after the cutover), and every one that may also update it (embedfill's
    own role, least-privileged: it writes the live vectors) keep the side table too: a
    watch gives it the live table's new rows, drops those of deleted ones and fills
    their vectors. Grants are added, never revoked. Returns the readers that still may
    not read the side table: a role that does not own it grants nothing (PostgreSQL only
    warns)."""
    side = sql.Identifier(schema, relation)
    cur = await conn.execute(_READERS, {"rel": live_oid})
    unreadable: list[str] = []
    for role, writes in await cur.fetchall():
        grantee = sql.SQL("PUBLIC") if role is None else sql.Identifier(role)
        await conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(side, grantee))
        if writes:
            await conn.execute(
                sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO {}").format(side, grantee)
            )
        may = await conn.execute(
            "SELECT pg_catalog.has_table_privilege(%s, %s::pg_catalog.regclass, 'SELECT')",
            ("public" if role is None else role, side.as_string(conn)),
        )
        got = await may.fetchone()
        if not (got and got[0]):
            unreadable.append("PUBLIC" if role is None else str(role))
    return unreadable


_ROW_SECURITY = """
SELECT c.relrowsecurity, c.relforcerowsecurity FROM pg_catalog.pg_class c
WHERE c.oid = %(rel)s"""
_SIDE_SECURITY = """
SELECT c.relrowsecurity, c.relforcerowsecurity,
       EXISTS (SELECT 1 FROM pg_catalog.pg_policy p
               WHERE p.polrelid = c.oid AND p.polname = 'embedfill_live_rows')
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(relation)s"""


async def secure_like(
    conn: psycopg.AsyncConnection[Any], live: TargetSQL, live_oid: int, schema: str, relation: str
) -> bool:
    """With row-level security on the live table, the side table gets it too: one
    policy that shows a side row to a role only where that role may see its live row
    (the policy's subquery runs under the live table's policies, as the reader). Run at
    each `model start` and at the cutover, so RLS turned on after the side table was
    made reaches it too; what is there already is left as it is. False when the live
    table has none."""
    cur = await conn.execute(_ROW_SECURITY, {"rel": live_oid})
    row = await cur.fetchone()
    if row is None or not row[0]:
        return False
    cur = await conn.execute(_SIDE_SECURITY, {"schema": schema, "relation": relation})
    has = await cur.fetchone()
    if has is None:
        return False  # no side table (yet)
    side = sql.Identifier(schema, relation)
    if not has[0]:
        await conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(side))
    if row[1] and not has[1]:
        await conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(side))
    if has[2]:
        return True
    await conn.execute(
        sql.SQL("CREATE POLICY embedfill_live_rows ON {} USING ({})").format(
            side, live.row_exists(sql.Identifier(schema, relation, ROW_ID))
        )
    )
    return True


_OID = "SELECT pg_catalog.to_regclass(%(name)s)::pg_catalog.oid"
_SHORT_LOCK_TIMEOUT = "SELECT pg_catalog.set_config('lock_timeout', '200ms', true)"


async def relation_oid(conn: psycopg.AsyncConnection[Any], table: sql.Composable) -> int | None:
    """The oid of the (qualified) table, None when there is none."""
    cur = await conn.execute(_OID, {"name": table.as_string(conn)})
    row = await cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def secure_side(conn: psycopg.AsyncConnection[Any], side_sql: TargetSQL) -> None:
    """A target ``in_side_table``: row-level security turned on for the live table since
    its change of model's cutover reaches the side table too (``secure_like``), when this
    role may alter the side table (its owner); else a warning, once a run or a sweep:
    the app's readers of the side table alone would see every tenant's rows."""
    live = side_sql.live
    assert live is not None and side_sql.schema is not None, "a resolved side table"
    live_oid = await relation_oid(conn, live.table)
    if live_oid is None:
        return
    relation = side_sql.target.table.name
    try:
        async with conn.transaction():
            # the app's searches of the side table would queue behind a waiting ALTER
            await conn.execute(_SHORT_LOCK_TIMEOUT)
            await secure_like(conn, live, live_oid, side_sql.schema, relation)
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.LockNotAvailable) as exc:
        busy = isinstance(exc, psycopg.errors.LockNotAvailable)
        log.warning(
            "row-level security is on for %s but not for its side table %s.%s, whose readers "
            "see every tenant's rows; %s",
            live.table.as_string(conn),
            side_sql.schema,
            relation,
            "the side table was busy: the next backfill or sweep tries again"
            if busy
            else f"run `embedfill backfill --target {side_sql.target.name}` once as the side "
            "table's owner (it adds the policy)",
        )


def add_column(live: TargetSQL, column: str, vector_type: str, dimensions: int) -> sql.Composed:
    return sql.SQL("ALTER TABLE {table} ADD COLUMN {column} {type}({dims})").format(
        table=live.table,
        column=sql.Identifier(column),
        type=sql.SQL(vector_type),
        dims=sql.Literal(dimensions),
    )


def create_index(
    name: str,
    schema: str,
    relation: str,
    column: str,
    method: str,
    opclass: str,
    params: str,
    cast: str = "",
    dimensions: int = 0,
) -> sql.Composed:
    """``CREATE INDEX CONCURRENTLY``: the twin of a live vector index (``opclass``,
    ``params`` and ``cast`` as the server's own definition of it writes them; with
    ``cast``, the index is on the column cast to that type of ``dimensions``)."""
    with_params = sql.SQL(" WITH ({})").format(sql.SQL(params)) if params else sql.SQL("")
    return sql.SQL(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} USING {method}"
        " ({column} {opclass}){with_params}"
    ).format(
        name=sql.Identifier(name),
        table=sql.Identifier(schema, relation),
        method=sql.SQL(method),
        column=indexed(column, cast, dimensions),
        opclass=sql.SQL(opclass),
        with_params=with_params,
    )


def indexed(column: str, cast: str = "", dimensions: int = 0) -> sql.Composable:
    """What a twin index holds: the column, or (``cast``) the column cast to that type
    (``public.halfvec``) of ``dimensions``, as an index and a search both write it."""
    if not cast:
        return sql.Identifier(column)
    return sql.SQL("(({})::{}({}))").format(
        sql.Identifier(column), sql.SQL(cast), sql.Literal(int(dimensions))
    )


_INDEX_VALID = """
SELECT i.indisvalid FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(name)s"""


async def index_state(conn: psycopg.AsyncConnection[Any], schema: str, name: str) -> str:
    """``none``, ``valid`` or ``invalid`` (a concurrent build that failed or is under way)."""
    cur = await conn.execute(_INDEX_VALID, {"schema": schema, "name": name})
    row = await cur.fetchone()
    if row is None:
        return "none"
    return "valid" if row[0] else "invalid"


def drop_index(schema: str, name: str) -> sql.Composed:
    return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, name))


_MAY = """
SELECT pg_catalog.has_schema_privilege(%(schema)s, 'CREATE'),
       pg_catalog.pg_has_role(c.relowner, 'USAGE'), pg_catalog.pg_get_userbyid(c.relowner),
       current_user
FROM pg_catalog.pg_class c WHERE c.oid = %(rel)s"""


async def missing_privilege(
    conn: psycopg.AsyncConnection[Any], live_oid: int, schema: str, strategy: str
) -> str | None:
    """What the session's role lacks to make the home, in words; None when it may."""
    cur = await conn.execute(_MAY, {"schema": schema, "rel": live_oid})
    row = await cur.fetchone()
    assert row is not None
    may_create, owns, owner, me = row
    if strategy == "table" and not may_create:
        return (
            f"role {me} may not create the side table in schema {schema}: grant it "
            f"CREATE on that schema (GRANT CREATE ON SCHEMA {schema} TO {me})"
        )
    if strategy == "column" and not owns:
        return (
            f"role {me} may not add a column to the table: only its owner ({owner}) or a "
            "member of that role may; run it as the owner, or use --strategy table"
        )
    return None


# a home column's type: its name (vector, halfvec) and modifier (the declared size)
_COLUMN_TYPE = """
SELECT t.typname, a.atttypmod FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
WHERE n.nspname = %(schema)s AND c.relname = %(relation)s AND a.attname = %(column)s
  AND NOT a.attisdropped"""


async def _column_type(
    conn: psycopg.AsyncConnection[Any], schema: str, relation: str, column: str
) -> tuple[str, int] | None:
    cur = await conn.execute(
        _COLUMN_TYPE, {"schema": schema, "relation": relation, "column": column}
    )
    row = await cur.fetchone()
    return (str(row[0]), int(row[1])) if row else None


async def declared_dimensions(
    conn: psycopg.AsyncConnection[Any], schema: str, relation: str, column: str
) -> int | None:
    """The size the home's column type enforces (``vector(16)``: 16); None without one."""
    found = await _column_type(conn, schema, relation, column)
    return found[1] if found and found[1] > 0 else None


async def vector_kind(
    conn: psycopg.AsyncConnection[Any], schema: str, relation: str, column: str
) -> str | None:
    """The column's type name (``vector``, ``halfvec``); None when it is not there."""
    found = await _column_type(conn, schema, relation, column)
    return found[0] if found else None


# each operator class's distance operator (pgvector)
DISTANCE = {
    "l2": "<->",
    "ip": "<#>",
    "cosine": "<=>",
    "l1": "<+>",
    "hamming": "<~>",
    "jaccard": "<%>",
}


def distance_operator(opclass: str) -> sql.Composable | None:
    """``OPERATOR(schema.<=>)`` for an operator class as an index definition names it
    (``public.vector_cosine_ops``, ``"My Ext".vector_l2_ops``: the server quotes a
    schema name that needs it); None for one this does not know."""
    schema, _, name = opclass.rpartition(".")
    kind = name.removesuffix("_ops").rsplit("_", 1)[-1]
    op = DISTANCE.get(kind)
    if op is None:
        return None
    return sql.SQL("OPERATOR({}.{})").format(
        sql.Identifier(unquoted(schema) or "pg_catalog"), sql.SQL(op)
    )


def sample_vectors(schema: str, relation: str, column: str) -> sql.Composed:
    """Up to %(limit)s stored vectors, as text, from a random %(percent)s of the pages."""
    return sql.SQL(
        "SELECT {col}::text FROM {table} TABLESAMPLE SYSTEM (%(percent)s)"
        " WHERE {col} IS NOT NULL ORDER BY random() LIMIT %(limit)s"
    ).format(col=sql.Identifier(column), table=sql.Identifier(schema, relation))


def nearest(
    schema: str,
    relation: str,
    column: str,
    id_column: str,
    operator: sql.Composable,
    vector_type: str,
    cast: str = "",
    dimensions: int = 0,
) -> sql.Composed:
    """The ten rows nearest to %(q)s (a vector as text), as the app searches them, with
    their distances (``cast``: on the column cast as an index on it is, create_index)."""
    query = (
        sql.SQL("%(q)s::{}").format(sql.SQL(vector_type))
        if not cast
        else sql.SQL("%(q)s::{}({})").format(sql.SQL(cast), sql.Literal(int(dimensions)))
    )
    return sql.SQL(
        "SELECT {id}, {col} {op} {q} FROM {table} ORDER BY {col} {op} {q} LIMIT 10"
    ).format(
        id=sql.Identifier(id_column),
        table=sql.Identifier(schema, relation),
        col=indexed(column, cast, dimensions),
        op=operator,
        q=query,
    )


def drop_column(live: TargetSQL, column: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
        live.table, sql.Identifier(column)
    )


def drop_table(schema: str, relation: str) -> sql.Composed:
    return sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, relation))


def unmirrored(side_sql: TargetSQL) -> sql.Composed:
    """For a target ``in_side_table``: the live rows with text to embed (not blank:
    %(blank)s) that have no side row yet (a poll or a backfill gives them one)."""
    live = side_sql.live
    assert live is not None, "a target in a side table"
    return sql.SQL(
        "SELECT pg_catalog.count(*) FROM {live} AS t WHERE btrim({text}, %(blank)s) <> ''"
        " AND NOT {side_row}"
    ).format(live=live.table, text=live.rendered("t"), side_row=side_sql.has_side_row("t"))


_EXISTS = """
SELECT CASE WHEN %(column)s::text IS NULL
            THEN pg_catalog.to_regclass(pg_catalog.format('%%I.%%I', %(schema)s::text,
                                                         %(relation)s::text)) IS NOT NULL
            ELSE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                         WHERE a.attrelid = %(rel)s AND a.attname = %(column)s
                           AND NOT a.attisdropped) END"""


async def taken(
    conn: psycopg.AsyncConnection[Any], live_oid: int, home: dict[str, Any], strategy: str
) -> bool:
    """Whether the new vectors' home already names something: a table of that name (a
    side table), a column of the live table (a shadow column)."""
    cur = await conn.execute(
        _EXISTS,
        {
            "schema": home["schema"],
            "relation": home["relation"],
            "column": home["column"] if strategy == "column" else None,
            "rel": live_oid,
        },
    )
    row = await cur.fetchone()
    return bool(row and row[0])
