"""Check a target against the live table before any API call or write, and read status."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..config import SIDE_ROW_ID, TableName, TargetConfig
from ..errors import (
    ConfigError,
    ExtensionMissing,
    RowSecurityHides,
    SchemaMismatch,
    SideTableMissing,
)
from ..errors import first_line as _first_line
from ..models import TargetStatus, TenantStatus
from .connect import user_context
from .indexes import vector_indexes
from .target_sql import ColumnTypes, TargetSQL

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, NULL), t.typname, a.atttypmod,
       format_type(a.atttypid, a.atttypmod), a.atttypid
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = %(rel)s AND a.attnum > 0 AND NOT a.attisdropped"""

# a unique, valid, non-partial index on exactly the id column (a primary key is one)
_UNIQUE_ID = """
SELECT EXISTS (
    SELECT 1 FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = %(rel)s AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
      AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = %(column)s)"""

# id types whose values compare and sort the same in PostgreSQL and Python, and that
# the keyset scan can page through
ID_TYPES = ("int2", "int4", "int8", "numeric", "text", "varchar", "bpchar", "uuid", "citext")


# A type's base (through domains) and, for arrays, its element's base: name and category.
_TYPE = """
WITH RECURSIVE base(oid, depth) AS (
    SELECT %(oid)s::oid, 0
    UNION ALL
    SELECT t.typbasetype, b.depth + 1 FROM base b JOIN pg_type t ON t.oid = b.oid
    WHERE t.typtype = 'd' AND b.depth < 10
), root AS (SELECT oid FROM base ORDER BY depth DESC LIMIT 1)
SELECT format_type(%(oid)s::oid, NULL), t.typname, t.typcategory::text, e.typname,
       e.typcategory::text
FROM root JOIN pg_type t ON t.oid = root.oid
LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'"""

# Type categories whose text form is text to embed: strings, numbers, dates and times,
# intervals, booleans, enums, network addresses, bit strings; plus these named types.
_TEXT_CATEGORIES = frozenset("SNDTBEIV")
_TEXT_TYPES = frozenset({"json", "jsonb", "uuid", "xml", "char"})

# the first of %(columns)s that the session's role may not use with privilege %(priv)s
_DENIED = """
SELECT current_user, c.name FROM unnest(%(columns)s::text[]) WITH ORDINALITY AS c(name, n)
WHERE NOT has_column_privilege(%(rel)s::oid, c.name, %(priv)s) ORDER BY c.n LIMIT 1"""

_EXTENSION = """
SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')"""


@dataclass(frozen=True)
class TableInfo:
    oid: int
    schema: str  # the table's schema, as resolved (``resolve_table``)
    types: ColumnTypes
    dimensions: int | None  # the column's declared size, None for a bare `vector`
    vector_index: str | None

    def sql(self, target: TargetConfig) -> TargetSQL:
        """The statements on the target's table, as this database has it."""
        return TargetSQL(target, self.types, self.schema)


_SQL_TYPES = """
SELECT pg_catalog.format_type(a.atttypid, a.atttypmod), pg_catalog.format_type(e.atttypid, NULL)
FROM pg_catalog.pg_attribute a, pg_catalog.pg_attribute e
WHERE a.attrelid = %(rel)s AND a.attname = %(id)s AND e.attrelid = %(rel)s
  AND e.attname = %(emb)s"""


_QUALIFIER = re.compile(r'^(?:"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)\.')


def _shown_type(name: str) -> str:
    """A type as messages show it: without the schema a pinned search_path adds."""
    return _QUALIFIER.sub("", name, count=1)


async def _sql_types(
    conn: psycopg.AsyncConnection[Any], oid: int, target: TargetConfig
) -> ColumnTypes:
    """The id and vector columns' types as statements name them: qualified wherever
    pg_catalog's search_path does not see them (``public.vector``)."""
    cur = await conn.execute(
        _SQL_TYPES, {"rel": oid, "id": target.id_column, "emb": target.embedding_column}
    )
    row = await cur.fetchone()
    assert row is not None, "the columns were found above"
    return ColumnTypes(id_type=str(row[0]), vector_type=str(row[1]))


async def check_extension(conn: psycopg.AsyncConnection[Any]) -> str:
    cur = await conn.execute(_EXTENSION)
    row = await cur.fetchone()
    assert row is not None
    version, available = row
    if version:
        return str(version)
    if available:
        raise ExtensionMissing(
            "The pgvector extension is not enabled in this database; run "
            "CREATE EXTENSION vector; as a user allowed to create extensions, then retry."
        )
    raise ExtensionMissing(
        "The pgvector extension is not installed on this PostgreSQL server; install "
        "pgvector (https://github.com/pgvector/pgvector#installation) and run "
        "CREATE EXTENSION vector;."
    )


_RELATION = """
SELECT c.relkind::text,
       c.relkind = 'r' AND EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                                   WHERE i.inhparent = c.oid)
FROM pg_catalog.pg_class c WHERE c.oid = %(rel)s"""
_KINDS = {
    "v": "a view",
    "m": "a materialized view",
    "S": "a sequence",
    "c": "a composite type",
    "i": "an index",
    "I": "an index",
    "t": "a TOAST table",
}


async def _check_relation(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, oid: int
) -> None:
    """A relation whose vectors can be written, one row per id: refused with one sentence
    at start-up, not after the rows were paid for (a materialized view cannot be updated;
    a view's writes go where its rules say; an inheritance parent's unique index does not
    cover its children's rows, which its scan and writes include)."""
    cur = await conn.execute(_RELATION, {"rel": oid})
    row = await cur.fetchone()
    assert row is not None
    kind, parent = row
    if kind in _KINDS:
        raise SchemaMismatch(
            f"{target.table} (table of target {target.name!r}) is {_KINDS[kind]}, whose rows "
            "embedfill cannot update; point `table` at the table that holds the rows."
        )
    if parent:
        raise SchemaMismatch(
            f"{target.table} (table of target {target.name!r}) is an inheritance parent, and "
            "its unique index on the id does not cover its children's rows, which its reads "
            "and writes include; make a target of each child table, or use declarative "
            "partitioning (PARTITION BY)."
        )


# the user's name for the table, resolved with the user's search_path: to_regclass
# alone (qualified; a regclass to oid cast calls nothing), every other word of SQL with
# embedfill's pinned path (a user's `=(oid, regclass)` in public was called here)
_RESOLVE = "SELECT pg_catalog.to_regclass(%(name)s)::pg_catalog.oid"
_SCHEMA_OF = """
SELECT n.nspname FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %(rel)s"""


async def resolve_table(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig
) -> tuple[int, str]:
    """The target's table (oid and schema), its name resolved as the app resolves it:
    with the search_path the connection came with (an unqualified name, a URL's
    ``currentSchema``). Every statement after names it qualified."""
    name = TargetSQL(target).table.as_string(conn)
    async with user_context(conn):
        cur = await conn.execute(_RESOLVE, {"name": name})
        row = await cur.fetchone()
    if not row or row[0] is None:
        if target.side_of is not None:
            raise SideTableMissing(
                f"The side table {target.table} of target {target.name!r} (embedding_table) "
                "does not exist in this database: a rollback's finalize drops it (the "
                "vectors are then the live column's again: embedding_column), else name the "
                "side table that `embedfill model status` shows."
            )
        raise SchemaMismatch(
            f"Table {target.table} of target {target.name!r} does not exist in this database; "
            "check `table` in the config (schema.table, case-sensitive) and the database "
            "embedfill connects to."
        )
    oid = int(row[0])
    cur = await conn.execute(_SCHEMA_OF, {"rel": oid})
    found = await cur.fetchone()
    assert found is not None
    schema = str(found[0])
    if "%" in schema:  # found by the search_path: the config's names are checked already
        raise SchemaMismatch(
            f"Table {target.table} of target {target.name!r} is in schema {schema!r} (found "
            "by the search_path), and embedfill cannot use a name holding '%' in its "
            "statements; rename the schema, or put the table in another one and name it "
            "schema.table."
        )
    return oid, schema


_SHAPE = """
SELECT pg_catalog.md5(pg_catalog.string_agg(
           a.attnum || ':' || a.attname || ':' || a.atttypid || ':' || a.atttypmod, ','
           ORDER BY a.attnum))
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = %(rel)s AND a.attnum > 0 AND NOT a.attisdropped"""


async def table_shape(conn: psycopg.AsyncConnection[Any], oid: int) -> str | None:
    """A digest of the table's columns (names, types, sizes); None when it is gone. A
    watcher compares it at every step: a table that changed shape is inspected again."""
    cur = await conn.execute(_SHAPE, {"rel": oid})
    row = await cur.fetchone()
    return None if row is None or row[0] is None else str(row[0])


async def check_shared_columns(
    conn: psycopg.AsyncConnection[Any], targets: Sequence[TargetConfig]
) -> None:
    """Two targets that fill one vector column (the same table, however each names it)
    must name its rows by the same id: provenance is kept per row id, so each would read
    the other's as stale. ConfigError (exit 2) otherwise; a table not found is left to the
    target's own checks."""
    seen: dict[tuple[int, str], TargetConfig] = {}
    for target in targets:
        try:
            oid, _ = await resolve_table(conn, target)
        except SchemaMismatch:
            continue
        other = seen.setdefault((oid, target.embedding_column), target)
        if other is not target and other.id_column != target.id_column:
            raise ConfigError(
                f"Targets {other.name!r} and {target.name!r} both fill column "
                f"{target.embedding_column!r} of one table ({other.table}, {target.table}) "
                f"but name its rows by different id columns ({other.id_column!r}, "
                f"{target.id_column!r}); give them the same id_column."
            )


# The last change of model finalized on this live column (after a cutover: a rollback's
# finalize drops the new vectors, not the live column).
_FINALIZED_CHANGE = """
SELECT m.strategy, m.to_model ->> 'provider', m.home ->> 'column',
       m.home ->> 'schema', m.home ->> 'relation'
FROM embedfill.model_migrations AS m
WHERE m.table_oid = %(rel)s AND m.column_name = %(column)s AND m.phase = 'finalized'
ORDER BY m.id DESC LIMIT 1"""


# The change of model that made a side table (by its schema and name): its live table,
# the live id it mirrors, and how far it is.
_SIDE_TABLE_OF = """
SELECT m.table_oid, m.home ->> 'id_column', m.target, m.phase
FROM embedfill.model_migrations AS m
WHERE m.strategy = 'table' AND m.home ->> 'schema' = %(schema)s
  AND m.home ->> 'relation' = %(relation)s
ORDER BY m.id DESC LIMIT 1"""

# a side table that has rows, none of which is a live row by this id
_NO_LIVE_ROW_OF_ANY = sql.SQL(
    "SELECT EXISTS (SELECT FROM {side}) AND NOT EXISTS (SELECT FROM {side} AS t WHERE {live_row})"
)

# table-level privileges a side table's mirror needs beyond SELECT and UPDATE
_TABLE_DENIED = """
SELECT current_user, p.priv FROM unnest(%(privs)s::text[]) WITH ORDINALITY AS p(priv, n)
WHERE NOT has_table_privilege(%(rel)s::oid, p.priv) ORDER BY p.n LIMIT 1"""


async def _check_id_type(
    conn: psycopg.AsyncConnection[Any],
    target: TargetConfig,
    oid: int,
    schema: str,
    live: TargetConfig,
    live_columns: Sequence[Any],
) -> None:
    """The side table keeps its live rows' ids in the live id's type, as `model start`
    made it; the app's migration may have widened the live one since (``integer`` to
    ``bigint``), and an id beyond the side table's then failed every mirror with the
    server's "integer out of range" (helper-32)."""
    cur = await conn.execute(_COLUMNS, {"rel": oid})
    side = {r[0]: r for r in await cur.fetchall()}.get(SIDE_ROW_ID)
    mine = next((r for r in live_columns if r[0] == live.id_column), None)
    if side is None or mine is None or side[5] == mine[5]:
        return
    table = TargetSQL(target, schema=schema).table.as_string(conn)
    raise SchemaMismatch(
        f"The side table {target.table} keeps its rows' ids as {_shown_type(side[4])}, but "
        f"id column {live.id_column!r} of {live.table} is {_shown_type(mine[4])} now (the "
        f"app's migration changed it); change the side table's to match, as its owner: "
        f"ALTER TABLE {table} ALTER COLUMN {SIDE_ROW_ID} TYPE {_shown_type(mine[4])}."
    )


async def target_shape(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, info: TableInfo
) -> str | None:
    """``table_shape`` of the target's table; a side table's with its live table's, whose
    columns its text, id and tenant come from (a watcher of the side table inspects it
    again when the app's migration changes the live table). None: one of them is gone."""
    shape = await table_shape(conn, info.oid)
    live = target.side_of
    if live is None or shape is None:
        return shape
    live = dataclasses.replace(
        live, table=TableName(live.table.schema or info.schema, live.table.name)
    )
    try:
        live_oid, _ = await resolve_table(conn, live)
    except SchemaMismatch:
        return None
    live_shape = await table_shape(conn, live_oid)
    return None if live_shape is None else f"{shape} {live_shape}"


async def _check_side_table(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, oid: int, schema: str, *, write: bool
) -> None:
    """A target ``in_side_table`` (``embedding_table``): its side table must be one a
    change of model made for its live table, by the same id (a mirror's prune deletes
    every side row whose live row it does not find: pointed at another table's side
    table, or by another id, it deleted the vectors the app searches); the live table
    must have the columns the text, the id and the tenant come from, and hide no row;
    and, to write, this role must also insert and delete side rows (the mirror)."""
    live = target.side_of
    assert live is not None
    live = dataclasses.replace(live, table=TableName(live.table.schema or schema, live.table.name))
    live_oid, _ = await resolve_table(conn, live)
    cur = await conn.execute(_COLUMNS, {"rel": live_oid})
    columns = await cur.fetchall()
    names = {r[0] for r in columns}
    wanted = [("id_column", live.id_column)]
    if live.tenant_column:
        wanted.append(("tenant_column", live.tenant_column))
    wanted += [("text template", c) for c in live.text_columns]
    for role, col in wanted:
        if col not in names:
            raise SchemaMismatch(
                f"Column {col!r} ({role} of target {target.name!r}) does not exist in "
                f"{live.table}, whose rows its side table {target.table} holds the vectors "
                f"of; its columns are: {', '.join(sorted(names))}."
            )
    cur = await conn.execute(
        _DENIED, {"columns": [c for _, c in wanted], "priv": "SELECT", "rel": live_oid}
    )
    denied = await cur.fetchone()
    if denied is not None:  # its text, id and tenant are read from the live rows
        role, column = denied
        grant = sql.SQL("GRANT SELECT ON {} TO {}").format(
            TargetSQL(live).table, sql.Identifier(role)
        )
        raise SchemaMismatch(
            f"Role {role} may not SELECT column {column!r} of {live.table}, whose rows its "
            f"side table {target.table} holds the vectors of; grant it as the table's owner: "
            f"{grant.as_string(conn)}."
        )
    try:
        async with conn.transaction():  # a failure here leaves the caller's state alone
            cur = await conn.execute(
                _SIDE_TABLE_OF, {"schema": schema, "relation": target.table.name}
            )
            made = await cur.fetchone()
    except psycopg.errors.UndefinedTable:  # no embedfill schema here: no change made it
        made = None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SchemaMismatch(
            f"This role may not read embedfill.model_migrations ({_first_line(exc)}), which "
            f"says whose rows the side table {target.table} holds; grant it SELECT on "
            "embedfill's tables, as docs/configuration.md shows."
        ) from exc
    if made is None:
        raise SchemaMismatch(
            f"Table {target.table} (embedding_table of target {target.name!r}) is not a side "
            "table that a change of model made; name the side table that `embedfill model "
            "status` shows."
        )
    made_for, made_by_id, made_by_target, phase = made
    if int(made_for) != live_oid:
        raise SchemaMismatch(
            f"The side table {target.table} holds the vectors of another table's rows (a "
            f"change of model of target {made_by_target!r}), not of {live.table}'s; point "
            f"embedding_table of target {target.name!r} at {live.table}'s side table."
        )
    if made_by_id is not None and made_by_id != live.id_column:
        raise SchemaMismatch(
            f"The side table {target.table} names {live.table}'s rows by {made_by_id!r}, "
            f"not by {live.id_column!r}; set id_column = {json.dumps(made_by_id)} for target "
            f"{target.name!r}."
        )
    if made_by_id is None:  # a change started before the id was recorded: no side row
        # whose live row this id finds means another id (its prune would delete them all)
        side = TargetSQL(target, schema=schema)
        lone = _NO_LIVE_ROW_OF_ANY.format(side=side.table, live_row=side.has_live_row("t"))
        try:
            async with conn.transaction():
                row = await (await conn.execute(lone)).fetchone()
        except psycopg.errors.UndefinedFunction:  # ids of another type: not its rows' id
            row = (True,)
        if row is not None and row[0]:
            raise SchemaMismatch(
                f"No row of the side table {target.table} is a row of {live.table} by "
                f"{live.id_column!r}; set id_column to the id that `embedfill model start` "
                f"named its rows by (the target's id_column then)."
            )
    if "@" not in target.name and phase != "finalized":
        # the config's own target, before the finalize: the live column is still there
        raise SchemaMismatch(
            f"The change of {made_by_target}'s model that made {target.table} is at phase "
            f"{phase}: its side table becomes the target's vectors at the cutover's "
            "`embedfill model finalize`; until then keep embedding_column (the live column) "
            "and the old provider, without embedding_table."
        )
    await _check_id_type(conn, target, oid, schema, live, columns)
    await _check_row_security(conn, live, live_oid)
    if write:
        cur = await conn.execute(_TABLE_DENIED, {"privs": ["INSERT", "DELETE"], "rel": oid})
        denied = await cur.fetchone()
        if denied is not None:
            role, priv = denied
            grant = sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
                sql.Identifier(schema, target.table.name), sql.Identifier(role)
            )
            raise SchemaMismatch(
                f"Role {role} may not {priv} rows of {target.table}, which the live table's "
                f"new and deleted rows need; grant it as the table's owner: "
                f"{grant.as_string(conn)}."
            )


async def _dropped_by_a_finalize(conn: psycopg.AsyncConnection[Any], oid: int, column: str) -> str:
    """When a change of model's finalize dropped this embedding column: where the
    vectors are now (a sentence to add to the error), else ''."""
    try:
        async with conn.transaction():  # a failure here leaves the caller's state alone
            cur = await conn.execute(_FINALIZED_CHANGE, {"rel": oid, "column": column})
            row = await cur.fetchone()
    except psycopg.Error:  # no embedfill schema here, or no right to read it
        return ""
    if row is None:
        return ""
    strategy, provider, new_column, schema, relation = row
    if strategy == "column":
        return (
            " A change of model's finalize dropped it: point the target at its new vectors "
            f'(embedding_column = "{new_column}", provider = "{provider}").'
        )
    return (
        f" A change of model's finalize dropped it: point the target at its side table "
        f"{schema}.{relation} (embedding_table = {json.dumps(relation, ensure_ascii=False)}, "
        f"provider = {json.dumps(provider, ensure_ascii=False)}, without embedding_column)."
    )


async def inspect_target(
    conn: psycopg.AsyncConnection[Any],
    target: TargetConfig,
    provider_dims: int | None,
    provider_label: str = "",
    *,
    write: bool = False,
) -> TableInfo:
    """Raise a one-sentence ConfigError for anything that would make the backfill fail
    (``write``: the run will write the embedding column, not only read)."""
    await check_extension(conn)
    oid, schema = await resolve_table(conn, target)
    await _check_relation(conn, target, oid)
    tsql = TargetSQL(target, schema=schema)
    cur = await conn.execute(_COLUMNS, {"rel": oid})
    rows = await cur.fetchall()
    # type names as the user reads them in messages (``vector(8)``, not
    # ``public.vector(8)``); the statements use the qualified ones (``_sql_types``)
    columns = {r[0]: (_shown_type(r[1]), r[2], r[3]) for r in rows}
    shown = {r[0]: (_shown_type(str(r[4])), int(r[5])) for r in rows}

    wanted = [("id_column", target.id_column), ("embedding_column", target.embedding_column)]
    if target.tenant_column:
        wanted.append(("tenant_column", target.tenant_column))
    wanted += [("text template", c) for c in target.text_columns]
    for role, col in wanted:
        if col not in columns and target.side_of is not None:
            raise SchemaMismatch(
                f"Table {target.table} (embedding_table of target {target.name!r}) is not a "
                f"side table that a change of model made: it has no column {col!r}; name "
                "the side table that `embedfill model status` shows."
            )
        if col not in columns:
            known = ", ".join(sorted(columns))
            dropped = (
                await _dropped_by_a_finalize(conn, oid, col) if role == "embedding_column" else ""
            )
            raise SchemaMismatch(
                f"Column {col!r} ({role} of target {target.name!r}) does not exist in "
                f"{target.table}; its columns are: {known}.{dropped}"
            )
    if target.side_of is not None:  # before its text is read from the live table
        await _check_side_table(conn, target, oid, schema, write=write)
    await _check_privileges(conn, target, tsql, oid, [c for _, c in wanted], write=write)
    await _check_row_security(conn, target, oid)
    await _check_id(conn, target, tsql, oid, columns[target.id_column])
    for col in target.text_columns:
        type_shown, type_oid = shown[col]
        if not (await _type_text(conn, type_oid))[1]:
            name = _sql_name(col)
            hint = f"encode({name}, 'escape')" if type_shown == "bytea" else f"{name}::text"
            raise SchemaMismatch(
                f"Column {col!r} of {target.table} is {type_shown}, which has no text to "
                "embed; use text_sql to say how to turn it into text "
                f"(e.g. {hint})."
            )
    if tsql.target.text_sql is not None:  # a side table's too: its live rows' text
        await _check_text_sql(conn, target, tsql)
    emb_type, emb_typname, typmod = columns[target.embedding_column]
    if emb_typname not in ("vector", "halfvec"):
        raise SchemaMismatch(
            f"Column {target.embedding_column!r} of {target.table} is {emb_type}, not a pgvector "
            "vector; point embedding_column at a vector(N) or halfvec(N) column."
        )
    dims = typmod if typmod and typmod > 0 else None
    if dims is not None and provider_dims is not None and dims != provider_dims:
        raise SchemaMismatch(
            f"Column {target.embedding_column!r} of {target.table} holds {dims}-dimensional "
            f"vectors but provider {target.provider!r} ({provider_label}) makes "
            f"{provider_dims}; use a model of {dims} dimensions or set dimensions = {dims} "
            "for models that support it."
        )
    found = await vector_indexes(conn, oid, target.embedding_column)
    return TableInfo(
        oid=oid,
        schema=schema,
        # the id type with its modifier: bare `character` is char(1), and ids cast to it
        # lose all but their first character (so `= ANY` matches none of them)
        types=await _sql_types(conn, oid, target),
        dimensions=dims or provider_dims,
        vector_index=f"{found[0].name} ({found[0].method})" if found else None,
    )


async def _check_privileges(
    conn: psycopg.AsyncConnection[Any],
    target: TargetConfig,
    tsql: TargetSQL,
    oid: int,
    columns: list[str],
    *,
    write: bool,
) -> None:
    """The role must read the columns it uses and, to write, update the embedding column
    (which also covers FOR NO KEY UPDATE SKIP LOCKED): checked before anything is sent to the
    provider, rather than paid for and then refused at the first write."""
    checks = [(list(dict.fromkeys(columns)), "SELECT")]
    if write:
        checks.append(([target.embedding_column], "UPDATE"))
    for names, priv in checks:
        cur = await conn.execute(_DENIED, {"columns": names, "priv": priv, "rel": oid})
        row = await cur.fetchone()
        if row is not None:
            role, column = row
            grant = sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(
                tsql.table, sql.Identifier(role)
            )
            raise SchemaMismatch(
                f"Role {role} may not {priv} column {column!r} of {target.table}; grant it as "
                f"the table's owner: {grant.as_string(conn)}."
            )


# whether row-level security filters what this role reads of the table: on, and the
# role neither bypasses it (superuser, BYPASSRLS) nor owns the table without FORCE
_ROW_SECURITY = """
SELECT c.relrowsecurity AND NOT r.rolsuper AND NOT r.rolbypassrls
       AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')),
       c.relforcerowsecurity, current_user
FROM pg_catalog.pg_class c, pg_catalog.pg_roles r
WHERE c.oid = %(rel)s AND r.rolname = current_user"""


async def _check_row_security(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, oid: int
) -> None:
    """Row-level security that hides rows from this role would make every count a lie
    ("0 missing" over rows it cannot see) and leave those rows NULL: refused. (Every
    connection also runs with ``row_security = off``, so a policy added later fails a
    statement rather than filtering it: ``queries.PIN_TEXT_SETTINGS``.)"""
    cur = await conn.execute(_ROW_SECURITY, {"rel": oid})
    row = await cur.fetchone()
    if row is None or not row[0]:
        return
    _, forced, role = row
    why = (
        "it has FORCE ROW LEVEL SECURITY, which binds its owner too"
        if forced
        else f"role {role} is neither its owner nor BYPASSRLS"
    )
    raise RowSecurityHides(
        f"Row-level security on {target.table} hides rows from embedfill ({why}), so it "
        f"would count and fill only the rows its policies show; as a superuser, run "
        f"ALTER ROLE {sql.Identifier(str(role)).as_string(conn)} BYPASSRLS."
    )


async def _check_id(
    conn: psycopg.AsyncConnection[Any],
    target: TargetConfig,
    q: TargetSQL,
    oid: int,
    column: tuple[str, str, int],
) -> None:
    """The id column must identify one row, and its values must compare and sort."""
    id_type, typname, _ = column
    where = f"Column {target.id_column!r} (id_column of target {target.name!r})"
    if typname not in ID_TYPES:
        raise SchemaMismatch(
            f"{where} is of type {id_type}, which embedfill cannot page through safely; "
            "point id_column at an integer, numeric, text or uuid column (the primary key)."
        )
    cur = await conn.execute(_UNIQUE_ID, {"rel": oid, "column": target.id_column})
    row = await cur.fetchone()
    if not row or not row[0]:
        raise SchemaMismatch(
            f"{where} is neither the primary key of {target.table} nor covered by a unique "
            "index, so an id may name several rows; point id_column at the primary key, or "
            f"add a unique index on {target.id_column!r}."
        )
    # a unique index allows NULLs: such a row can be read but never written back, so it
    # would be paid for on every run and reported as changed by the app
    cur = await conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NULL)").format(q.table, q.id)
    )
    row = await cur.fetchone()
    if row and row[0]:
        raise SchemaMismatch(
            f"{where} is NULL in some rows, which no id can name; give those rows ids, "
            "make the column NOT NULL, or point id_column at the primary key."
        )
    if typname == "numeric":
        cur = await conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} = 'NaN'::numeric)").format(
                q.table, q.id
            )
        )
        row = await cur.fetchone()
        if row and row[0]:
            raise SchemaMismatch(
                f"{where} holds NaN, which does not compare to other ids; give those rows "
                "real ids or point id_column at another unique column."
            )


async def _type_text(conn: psycopg.AsyncConnection[Any], type_oid: int) -> tuple[str, bool]:
    """A type's name, and whether its PostgreSQL text form is text worth embedding."""
    cur = await conn.execute(_TYPE, {"oid": type_oid})
    row = await cur.fetchone()
    if row is None:
        return str(type_oid), False
    shown, name, category, elem_name, elem_category = row
    if category == "A" and elem_name is not None:
        name, category = elem_name, elem_category
    return str(shown), category in _TEXT_CATEGORIES or name in _TEXT_TYPES


def _sql_name(column: str) -> str:
    """A column as it would be written in SQL, for hints."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", column):
        return column
    return '"' + column.replace('"', '""') + '"'


async def _check_text_sql(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, tsql: TargetSQL
) -> None:
    """Plan the expression on the live table (reads no row): a typo is a config error
    naming the option, and so is an expression whose value has no text."""
    where = f"The text_sql of target {target.name!r}"
    try:
        cur = await conn.execute(tsql.check_text_sql(), {"zero": 0})
    except psycopg.Error as exc:
        if target.side_of is not None:  # its text is its live rows': they changed shape
            live = target.side_of
            raise ConfigError(
                f"The text of target {target.name!r} (its vectors in {target.table}) cannot "
                f"be read from {live.table} ({_first_line(exc)}); make its text "
                f"{'template' if live.text else 'text_sql'} fit {live.table}'s columns."
            ) from exc
        if isinstance(
            exc,
            psycopg.errors.UndefinedFunction
            | psycopg.errors.UndefinedTable
            | psycopg.errors.UndefinedObject,
        ):
            # the expression runs with pg_catalog alone on the search_path (db.connect)
            raise ConfigError(
                f"{where} does not work on {target.table} ({_first_line(exc)}); name your "
                "own functions, types, operators and tables with their schema (e.g. "
                "app.summary(body), attrs OPERATOR(extensions.->) 'k'): text_sql runs with "
                "search_path = pg_catalog."
            ) from exc
        raise ConfigError(
            f"{where} does not work on {target.table} ({_first_line(exc)}); fix the "
            "expression: SQL over the table's columns, e.g. title || ' ' || body."
        ) from exc
    assert cur.description is not None
    shown, has_text = await _type_text(conn, cur.description[0].type_code)
    if not has_text:
        raise ConfigError(
            f"{where} gives {shown}, which has no text to embed; make it give text "
            "(e.g. encode(col, 'escape') for bytea, col::text for others)."
        )


async def target_status(
    conn: psycopg.AsyncConnection[Any],
    target: TargetConfig,
    info: TableInfo,
    provenance: dict[str, Any] | None,
    failures: list[tuple[str | None, str, int]] | None = None,
) -> TargetStatus:
    """Rows, missing, unverified, outdated_model and stale, per tenant, and the rows
    failing now (``failures``: Store.failing). ``provenance``: the ``column_id`` and
    ``model_id`` parameters (freshness.py), None when embedfill's schema has no
    provenance yet (every vector is unverified)."""
    q = info.sql(target)
    cur = await conn.execute(q.status_by_tenant(provenance is not None), provenance or {})
    rows = await cur.fetchall()
    failing: dict[str | None, dict[str, int]] = {}
    if failures is not None:
        for tenant, error_class, count in failures:
            failing.setdefault(tenant, {})[error_class] = count
    tenants = tuple(
        TenantStatus(
            tenant=r[0],
            rows=int(r[1]),
            missing=int(r[2]),
            unverified=int(r[3]),
            outdated_model=int(r[4]),
            stale=int(r[5]),
            failing=sum(failing.get(r[0], {}).values()),
            failing_errors=failing.get(r[0], {}),
        )
        for r in rows
    )
    errors: dict[str, int] = {}
    for by_class in failing.values():
        for name, count in by_class.items():
            errors[name] = errors.get(name, 0) + count
    return TargetStatus(
        name=target.name,
        table=str(target.table),
        dimensions=info.dimensions or 0,
        rows=sum(t.rows for t in tenants),
        missing=sum(t.missing for t in tenants),
        stale=sum(t.stale for t in tenants),
        outdated_model=sum(t.outdated_model for t in tenants),
        unverified=sum(t.unverified for t in tenants),
        failing=sum(errors.values()),
        failing_errors=errors,
        vector_index=info.vector_index,
        tenants=tenants if target.tenant_column else (),
    )


async def count_missing(
    conn: psycopg.AsyncConnection[Any], q: TargetSQL, tenants: list[str] | None
) -> int:
    cur = await conn.execute(q.count_missing(tenants=bool(tenants)), {"tenants": tenants})
    row = await cur.fetchone()
    return int(row[0]) if row else 0


POLL_INDEX_ROWS = 100_000  # above this many rows, polling for NULL rows wants an index


async def poll_index_hint(
    conn: psycopg.AsyncConnection[Any], target: TargetConfig, info: TableInfo
) -> str | None:
    """A sentence with the CREATE INDEX that makes ``watch``'s poll for NULL rows cheap,
    when the table is big and has no partial index on the embedding being NULL."""
    cur = await conn.execute(
        "SELECT c.reltuples, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid"
        " AND i.indpred IS NOT NULL"
        " AND pg_get_expr(i.indpred, i.indrelid) LIKE '%%' || quote_ident(%(column)s)"
        " || ' IS NULL%%')"
        " FROM pg_class c WHERE c.oid = %(oid)s",
        {"oid": info.oid, "column": target.embedding_column},
    )
    row = await cur.fetchone()
    if row is None or row[1] or float(row[0]) < POLL_INDEX_ROWS:
        return None
    q = info.sql(target)
    index = q.poll_index().as_string(conn)
    return (
        f"{target.table} has about {int(row[0]):,} rows and no partial index on "
        f"{target.embedding_column} IS NULL, so each poll for new NULL rows reads the whole "
        f"key index; create one (as the table's owner): {index};"
    )


async def count_outdated(
    conn: psycopg.AsyncConnection[Any],
    q: TargetSQL,
    tenants: list[str] | None,
    provenance: dict[str, Any],
) -> tuple[int, int]:
    """(stale, outdated_model): the vectors ``--refresh`` re-embeds."""
    by_tenant = await count_outdated_by_tenant(conn, q, tenants, provenance)
    return sum(s for s, _ in by_tenant.values()), sum(o for _, o in by_tenant.values())


async def count_outdated_by_tenant(
    conn: psycopg.AsyncConnection[Any],
    q: TargetSQL,
    tenants: list[str] | None,
    provenance: dict[str, Any],
) -> dict[str | None, tuple[int, int]]:
    """Per tenant (None: no tenant column): (stale, outdated_model)."""
    cur = await conn.execute(
        q.count_outdated(tenants=bool(tenants)), {"tenants": tenants, **provenance}
    )
    return {r[0]: (int(r[1]), int(r[2])) for r in await cur.fetchall()}


async def count_missing_by_tenant(
    conn: psycopg.AsyncConnection[Any], q: TargetSQL, tenants: list[str] | None
) -> dict[str | None, int]:
    """Per tenant (None: no tenant column): rows whose embedding is NULL."""
    cur = await conn.execute(q.count_missing_by_tenant(tenants=bool(tenants)), {"tenants": tenants})
    return {r[0]: int(r[1]) for r in await cur.fetchall()}


async def table_pages(conn: psycopg.AsyncConnection[Any], oid: int) -> int:
    """The table's size in pages as the planner last estimated it (0: never analysed,
    or a partitioned table, whose pages are its partitions')."""
    cur = await conn.execute("SELECT relpages FROM pg_class WHERE oid = %(rel)s", {"rel": oid})
    row = await cur.fetchone()
    return max(0, int(row[0])) if row else 0


__all__ = [
    "TableInfo",
    "check_extension",
    "count_missing",
    "count_outdated",
    "inspect_target",
    "table_pages",
    "target_status",
]
