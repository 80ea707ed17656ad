"""Change triggers (``embedfill triggers install``): the DDL on a user's table that queues
each changed row for ``embedfill watch``.

What is installed for one target (its vector column has number N in
``embedfill.vector_columns``):

- ``embedfill.changed_N()``: a trigger function, ``SECURITY DEFINER`` (it runs as the
  role that installed it, so the application's role needs no right on embedfill's
  schema), ``SET search_path = pg_catalog, pg_temp`` and every name qualified. Per row it
  appends ``(N, NEW.<id>::text)`` to ``embedfill.changes``, and nothing else: no NOTIFY
  (a notifying commit holds a cluster-wide lock until its WAL is flushed, and a full
  NOTIFY queue would fail the app's commit); a watch process looks at the queue several
  times a second instead (watch.py).
- ``embedfill_changed_N_ins``: ``AFTER INSERT ... REFERENCING NEW TABLE ... FOR EACH
  STATEMENT`` running ``embedfill.changed_N_rows()``, which queues the statement's rows
  with one INSERT ... SELECT (per row on a partition or an inheritance child, where
  PostgreSQL allows no transition table).
- ``embedfill_changed_N_upd``: ``AFTER UPDATE ... FOR EACH ROW``, skipping embedfill's
  own writes in its WHEN (a session setting, ``WRITER_SETTING``); the function queues the
  row when one of the text's columns changed, compared by their stored bytes (``*=`` on
  records, which also works for types without ``=``, e.g. json), so that a no-op update
  and an update of another column queue nothing.

No trigger definition names a column: the app's ``ALTER TABLE`` (a column's type,
RENAME, DROP) never fails for them, and the function copes with a table that changed
shape (``function_sql``).

Never failing the application's write is the rule. The function's queue INSERT is in no
EXCEPTION block (a block that writes takes a subtransaction id per row: past 64 in one
transaction the subtransaction cache overflows, a known performance cliff; the one block
it has only reads); instead it queues only while
``embedfill.changes`` exists and its owner may write it, and the queue table has no
index or constraint, so the INSERT cannot conflict. What remains is documented in
``FAILURE_MODES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .target_sql import TargetSQL

SCHEMA = "embedfill"
CHANNEL = "embedfill_changes"  # what the triggers of an earlier install NOTIFY
QUEUE = sql.Identifier(SCHEMA, "changes")
# set to 'on' by every embedfill session (db.queries.PIN_TEXT_SETTINGS): they write
# vectors alone, so the UPDATE trigger skips their rows in its WHEN
WRITER_SETTING = "embedfill.writer"

FAILURE_MODES = (
    "A statement on the table waits while embedfill.changes is locked by a migration "
    "(ALTER TABLE takes an exclusive lock), then goes on.",
    "Dropping embedfill.changes or embedfill's schema while the application writes can "
    "fail the statements that were waiting for that DROP's lock: uninstall first.",
)


@dataclass(frozen=True)
class TriggerNames:
    """The deterministic names of what is installed for vector column ``column_id``."""

    column_id: int

    @property
    def function(self) -> sql.Identifier:
        return sql.Identifier(SCHEMA, f"changed_{self.column_id}")

    @property
    def rows_function(self) -> sql.Identifier:
        """The statement-level INSERT trigger's function (a transition table of rows)."""
        return sql.Identifier(SCHEMA, f"changed_{self.column_id}_rows")

    @property
    def insert(self) -> str:
        return f"embedfill_changed_{self.column_id}_ins"

    @property
    def update(self) -> str:
        return f"embedfill_changed_{self.column_id}_upd"

    @property
    def triggers(self) -> tuple[str, str]:
        return (self.insert, self.update)


@dataclass
class TriggerPlan:
    """What ``install`` or ``uninstall`` runs, in one transaction, and why."""

    target: str
    table: str
    column_id: int | None  # None: the column has no number yet (install records one)
    statements: list[sql.Composed] = field(default_factory=list)
    watched: list[str] = field(default_factory=list)  # an UPDATE of these queues the row
    notes: list[str] = field(default_factory=list)  # said as SQL comments and on stderr

    @property
    def trigger_names(self) -> list[str]:
        return [] if self.column_id is None else list(TriggerNames(self.column_id).triggers)

    def script(self, conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> str:
        """The plan as an SQL script: exactly the statements run, in their transaction."""
        lines = [f"-- {note}" for note in self.notes]
        if not self.statements:
            return "\n".join([*lines, "-- nothing to do"]) + "\n"
        lines.append("BEGIN;")
        lines += [f"{s.as_string(conn)};" for s in self.statements]
        lines.append("COMMIT;")
        return "\n".join(lines) + "\n"


def _dollar_quote(body: str) -> tuple[str, str]:
    """A dollar-quote tag that does not occur in ``body`` (identifiers from config are in
    it, and one could hold ``$embedfill$``)."""
    tag, n = "$embedfill$", 0
    while tag in body:
        n += 1
        tag = f"$embedfill{n}$"
    return tag, body


def function_sql(
    tsql: TargetSQL,
    column_id: int,
    watched: Sequence[str],
    conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
    *,
    rows: bool = False,
) -> sql.Composed:
    """``CREATE OR REPLACE FUNCTION embedfill.changed_N()``: queue the row's id.

    Nothing else per row or statement: no NOTIFY. A notifying commit holds a
    cluster-wide lock until its WAL is flushed (notifying commits are serialized); even
    from one transaction in flight at a time (an advisory lock), the NOTIFY was a third
    of the trigger's server time per single-row INSERT (measured: 14 µs, 10 without),
    and a full NOTIFY queue (a listener stuck in a transaction) fails the app's commits.
    A watch process looks at the queue every ``CHANGES_POLL_S`` instead (watch.py).

    Guards, each a catalog lookup without a lock: the owner's USAGE on embedfill's
    schema (``to_regclass`` of a qualified name raises without it), the queue table's
    existence (a manual DROP), the owner's INSERT on it (a REVOKE). When one fails the
    row is not queued and the application's write goes on (``watch``'s sweep still finds
    the row's new text).

    The app's schema changes never break its writes. No trigger definition names a
    column (``ALTER COLUMN ... TYPE``, ``RENAME`` and ``DROP`` of any column go
    through), and the function reads the row's columns by name in a block that only
    reads: when the table changed shape since install (a column renamed or dropped, or
    a type changed under this session's cached plan), the block's error is caught and
    the same is done with dynamic SQL over the columns still there (a renamed id: the
    row is not queued, and ``watch`` reports the target). The block writes nothing, so
    its subtransaction takes no transaction id (no subtransaction-cache overflow past
    64 rows in a transaction); the queue INSERT comes after it.

    ``rows``: the statement-level variant for INSERT, which queues every row of the
    statement's transition table ``embedfill_inserted`` with one INSERT ... SELECT: a
    500-row INSERT pays one trigger call, not 500 (measured: 0.69 of the speed without a
    trigger per row, about 0.95 per statement)."""
    id_col = sql.Identifier(tsql.target.id_column)
    cols = [sql.Identifier(c) for c in watched]
    present = (
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a WHERE a.attrelid = TG_RELID"
        " AND a.attname OPERATOR(pg_catalog.=) {id_name} AND a.attnum > 0"
        " AND NOT a.attisdropped)"
    )
    if rows:
        declare = "DECLARE\n    keys text[];\n"
        read = (
            "            BEGIN\n"
            "                SELECT pg_catalog.array_agg(n.{id}::text) INTO keys"
            " FROM embedfill_inserted AS n;\n"
            "            EXCEPTION WHEN OTHERS THEN  -- the table changed shape since install\n"
            "                IF (" + present + ") THEN\n"
            "                    EXECUTE pg_catalog.format('SELECT pg_catalog.array_agg(n.%I::text)"
            " FROM embedfill_inserted AS n', {id_name}) INTO keys;\n"
            "                END IF;\n"
            "            END;\n"
            "            IF keys IS NOT NULL THEN\n"
            "                INSERT INTO {queue} (column_id, row_key)"
            " SELECT {column}, k FROM pg_catalog.unnest(keys) AS k;\n"
        )
    else:
        declare = "DECLARE\n    k text;\n    was text;\n    now text;\n"
        read = (
            "            BEGIN\n"
            "                IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN\n"
            "                    k := NEW.{id}::text;\n"
            "                ELSIF NOT (ROW({old})::record *= ROW({new})::record) THEN\n"
            "                    k := NEW.{id}::text;\n"
            "                END IF;\n"
            "            EXCEPTION WHEN OTHERS THEN  -- the table changed shape since install\n"
            "                k := NULL;\n"
            "                IF (" + present + ") THEN\n"
            "                    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN\n"
            "                        EXECUTE pg_catalog.format('SELECT ($1).%I::text', {id_name})"
            " INTO k USING NEW;\n"
            "                    ELSE\n"
            "                        SELECT pg_catalog.string_agg(pg_catalog.format('($1).%I',"
            " a.attname), ', ' ORDER BY a.attnum),\n"
            "                               pg_catalog.string_agg(pg_catalog.format('($2).%I',"
            " a.attname), ', ' ORDER BY a.attnum)\n"
            "                          INTO was, now FROM pg_catalog.pg_attribute AS a\n"
            "                         WHERE a.attrelid = TG_RELID AND a.attnum > 0"
            " AND NOT a.attisdropped\n"
            "                           AND a.attname OPERATOR(pg_catalog.=) ANY ({watched});\n"
            "                        IF was IS NOT NULL THEN\n"
            "                            EXECUTE pg_catalog.format('SELECT ($2).%I::text WHERE NOT"
            " (ROW(%s)::record *= ROW(%s)::record)', {id_name}, was, now)"
            " INTO k USING OLD, NEW;\n"
            "                        END IF;\n"
            "                    END IF;\n"
            "                END IF;\n"
            "            END;\n"
            "            IF k IS NOT NULL THEN\n"
            "                INSERT INTO {queue} (column_id, row_key) VALUES ({column}, k);\n"
        )
    body = (
        sql.SQL(
            "\n" + declare + "BEGIN\n"
            "    IF pg_catalog.has_schema_privilege({schema}, 'USAGE') THEN\n"
            "        IF pg_catalog.has_table_privilege(pg_catalog.to_regclass({queue_name}),"
            " 'INSERT') THEN\n" + read + "            END IF;\n"
            "        END IF;\n"
            "    END IF;\n"
            "    RETURN NULL;\n"
            "END\n"
        )
        .format(
            schema=sql.Literal(SCHEMA),
            queue_name=sql.Literal(f"{SCHEMA}.changes"),
            queue=QUEUE,
            column=sql.Literal(column_id),
            id=id_col,
            id_name=sql.Literal(tsql.target.id_column),
            old=sql.SQL(", ").join(sql.SQL("OLD.{}").format(c) for c in cols),
            new=sql.SQL(", ").join(sql.SQL("NEW.{}").format(c) for c in cols),
            watched=sql.SQL("{}::text[]").format(sql.Literal(list(watched))),
        )
        .as_string(conn)
    )
    tag, body = _dollar_quote(body)
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n"
        "LANGUAGE plpgsql SECURITY DEFINER\n"
        "SET search_path = pg_catalog, pg_temp\n"
        "AS {tag}{body}{tag}"
    ).format(
        function=(
            TriggerNames(column_id).rows_function if rows else TriggerNames(column_id).function
        ),
        tag=sql.SQL(tag),
        body=sql.SQL(body),
    )


def install_statements(
    tsql: TargetSQL,
    column_id: int,
    watched: Sequence[str],
    conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
    *,
    per_statement: bool = True,
) -> list[sql.Composed]:
    """Create or replace the functions and both triggers (idempotent: a second install,
    or one after the template changed, replaces them in place). The INSERT trigger is
    per statement, with a transition table, unless the table is partitioned (a row
    trigger on it is also a trigger on every partition, present and future, so an INSERT
    made straight into a partition is queued too), a partition or an inheritance child
    (PostgreSQL allows no transition table there): then per row.

    The UPDATE trigger skips embedfill's own writes (its sessions set ``WRITER_SETTING``:
    they write the vector alone), tested in C before any function is called."""
    names = TriggerNames(column_id)
    what = f"change trigger of embedfill target {tsql.target.name!r}"
    functions = [names.function, names.rows_function] if per_statement else [names.function]
    out: list[sql.Composed] = [function_sql(tsql, column_id, watched, conn)]
    if per_statement:
        out.append(function_sql(tsql, column_id, watched, conn, rows=True))
    for function in functions:
        out += [
            sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(function),
            sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
                function, sql.Literal(f"{what}; remove with `embedfill triggers uninstall`")
            ),
        ]
    if per_statement:
        insert = sql.SQL(
            "CREATE OR REPLACE TRIGGER {name} AFTER INSERT ON {table}"
            " REFERENCING NEW TABLE AS embedfill_inserted"
            " FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        ).format(name=sql.Identifier(names.insert), table=tsql.table, function=names.rows_function)
    else:
        insert = sql.SQL(
            "CREATE OR REPLACE TRIGGER {name} AFTER INSERT ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION {function}()"
        ).format(name=sql.Identifier(names.insert), table=tsql.table, function=names.function)
    return [
        *out,
        insert,
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {name} AFTER UPDATE ON {table} FOR EACH ROW"
            " WHEN (pg_catalog.current_setting({setting}, true) IS DISTINCT FROM 'on')"
            " EXECUTE FUNCTION {function}()"
        ).format(
            name=sql.Identifier(names.update),
            table=tsql.table,
            setting=sql.Literal(WRITER_SETTING),
            function=names.function,
        ),
    ]


def uninstall_statements(tsql: TargetSQL, column_id: int) -> list[sql.Composed]:
    """Drop both triggers and the function (each only if it is there)."""
    names = TriggerNames(column_id)
    return [
        *(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), tsql.table)
            for name in names.triggers
        ),
        sql.SQL("DROP FUNCTION IF EXISTS {}()").format(names.function),
        sql.SQL("DROP FUNCTION IF EXISTS {}()").format(names.rows_function),
    ]


# ---------------------------------------------------------------------------- the catalog

# the columns an UPDATE of which may change a text_sql target's text: every column but
# the embedding (generated ones change only with the columns they are made of)
_TABLE_COLUMNS = """
SELECT a.attname FROM pg_attribute a
WHERE a.attrelid = %(rel)s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
  AND a.attname <> %(embedding)s
ORDER BY a.attnum"""

_CHILD = """
SELECT c.relispartition OR c.relkind = 'p'
       OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)
FROM pg_class c WHERE c.oid = %(rel)s"""

_INSTALLED = """
SELECT t.tgname FROM pg_trigger t
WHERE t.tgrelid = %(rel)s AND t.tgname = ANY(%(names)s) ORDER BY t.tgname"""

# whether the session's role may drop the column's trigger functions (owns them, or is a
# member of their owner's role); NULL when there are none
_FUNCTIONS_OURS = """
SELECT pg_catalog.bool_and(pg_catalog.pg_has_role(p.proowner, 'MEMBER'))
FROM pg_catalog.pg_proc AS p
JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
WHERE n.nspname OPERATOR(pg_catalog.=) 'embedfill'
  AND p.proname OPERATOR(pg_catalog.=) ANY(%(names)s::pg_catalog.name[])"""

# what the session's role may do, for a one-sentence refusal before anything runs
_MAY = """
SELECT current_user,
       has_table_privilege(%(rel)s::oid, 'TRIGGER'),
       pg_has_role(c.relowner, 'USAGE'),
       pg_get_userbyid(c.relowner),
       has_schema_privilege(n.oid, 'USAGE') AND has_schema_privilege(n.oid, 'CREATE'),
       coalesce(has_schema_privilege(n.oid, 'USAGE')
                AND has_table_privilege(to_regclass('embedfill.changes'), 'INSERT'), false),
       pg_get_userbyid(p.proowner),
       p.oid IS NULL OR pg_has_role(p.proowner, 'USAGE')
FROM pg_class c
LEFT JOIN pg_namespace n ON n.nspname = 'embedfill'
LEFT JOIN pg_proc p ON p.oid = to_regprocedure(%(function)s)
WHERE c.oid = %(rel)s"""


async def watched_columns(
    conn: psycopg.AsyncConnection[Any], tsql: TargetSQL, oid: int
) -> tuple[list[str], bool]:
    """The columns whose UPDATE queues a row, and whether they are every column of the
    table now (a text_sql target: its columns are unknown, so all but the embedding)."""
    if tsql.target.text_sql is None:
        return list(tsql.target.text_columns), False
    cur = await conn.execute(
        _TABLE_COLUMNS, {"rel": oid, "embedding": tsql.target.embedding_column}
    )
    return [str(r[0]) for r in await cur.fetchall()], True


async def installed(conn: psycopg.AsyncConnection[Any], oid: int, column_id: int) -> list[str]:
    """Which of the column's two triggers are on the table now."""
    names = list(TriggerNames(column_id).triggers)
    cur = await conn.execute(_INSTALLED, {"rel": oid, "names": names})
    return [str(r[0]) for r in await cur.fetchall()]


async def functions_ours(conn: psycopg.AsyncConnection[Any], column_id: int) -> bool:
    """Whether this role may drop the column's trigger functions (``uninstall``)."""
    names = [f"changed_{column_id}", f"changed_{column_id}_rows"]
    cur = await conn.execute(_FUNCTIONS_OURS, {"names": names})
    row = await cur.fetchone()
    return row is None or row[0] is None or bool(row[0])


async def refusal(
    conn: psycopg.AsyncConnection[Any],
    tsql: TargetSQL,
    oid: int,
    column_id: int | None,
    *,
    install: bool,
) -> str | None:
    """Why the session's role may not install (or uninstall) the column's triggers, in one
    sentence; None when it may."""
    function = TriggerNames(column_id or 0).function.as_string(conn) + "()"
    cur = await conn.execute(_MAY, {"rel": oid, "function": function})
    row = await cur.fetchone()
    assert row is not None
    role, trigger, owner, table_owner, schema, queue, fn_owner, owns_fn = row
    table = tsql.table.as_string(conn)
    who = sql.Identifier(str(role)).as_string(conn)
    if install and not trigger:
        return (
            f"Role {role} may not create triggers on {table} (that needs the TRIGGER privilege "
            f"or ownership); run this as the table's owner ({table_owner}) or grant it: "
            f"GRANT TRIGGER ON {table} TO {who}."
        )
    if not install and not owner and await installed(conn, oid, column_id or 0):
        return (
            f"Role {role} may not drop triggers on {table} (that needs ownership of the "
            f"table); run this as its owner ({table_owner})."
        )
    if install and not schema:
        return (
            f"Role {role} may not create functions in schema embedfill (that needs USAGE "
            "and CREATE on it); run this as the owner of embedfill's schema, or grant it: "
            f"GRANT USAGE, CREATE ON SCHEMA embedfill TO {who}."
        )
    if install and not queue:
        return (
            f"Role {role} may not insert into embedfill.changes, so a trigger it installs "
            "(which runs with its rights) could queue nothing; run this as the owner of "
            f"embedfill's schema, or grant it: GRANT INSERT ON embedfill.changes TO {who}."
        )
    if not owns_fn:
        return (
            f"{function} was installed by role {fn_owner}, and only its owner may "
            f"{'replace' if install else 'drop'} it; run this as {fn_owner}."
        )
    return None


# ---------------------------------------------------------------------------- install

UNNUMBERED = 2_147_483_647  # stands for the number install records, in a printed plan


async def plan(
    conn: psycopg.AsyncConnection[Any],
    tsql: TargetSQL,
    oid: int,
    column_id: int | None,
    *,
    install: bool,
    vectors: str | None = None,
) -> TriggerPlan:
    """The statements ``install`` (or ``uninstall``) runs on ``tsql``'s table for vector
    column ``column_id``, with the notes a reviewer needs. ``column_id`` None: the column
    has no number yet, and ``N`` stands for the one install records. ``vectors``: where
    that column is, when not on the table (a side table's, whose rows follow it)."""
    target = tsql.target
    table = tsql.table.as_string(conn)
    out = TriggerPlan(target.name, table, column_id)
    place = vectors or f"{table}.{sql.Identifier(target.embedding_column).as_string(conn)}"
    side = (
        []
        if vectors is None
        else [
            f"its vectors are in a side table: the triggers are on {table}, whose rows the "
            "side table's follow, and a row they queue gets its side row when the watch "
            "takes it"
        ]
    )
    if not install:
        out.notes.append(
            f"embedfill triggers uninstall --target {target.name}: {place}"
            + (f" (column {column_id})" if column_id is not None else "")
        )
        out.notes += side
        if column_id is None:
            out.notes.append("this column has no number in embedfill.vector_columns")
        elif not await installed(conn, oid, column_id):
            out.notes.append("no change trigger of this column is installed")
        else:
            out.statements = uninstall_statements(tsql, column_id)
        return out
    watched, everything = await watched_columns(conn, tsql, oid)
    if vectors is not None:
        # a side row is its live row's by id, and keeps its tenant (its counts, a
        # tenant's job, the key that pays): a row whose id or tenant changed, its text
        # as it was, is queued too (its new id's side row made, its tenant brought over)
        for column in (target.id_column, target.tenant_column):
            if column is not None and column not in watched:
                watched = [*watched, column]
    out.watched = watched
    number = f"column {column_id}" if column_id is not None else "column N"
    out.notes.append(f"embedfill triggers install --target {target.name}: {place} ({number})")
    out.notes += side
    if column_id is None:
        out.notes.append(
            "this column has no number in embedfill.vector_columns yet: install records one "
            "(in the same transaction) and uses it where N stands below"
        )
    key = f"NEW.{sql.Identifier(target.id_column).as_string(conn)}::text"
    out.notes.append(
        f"queues ({'N' if column_id is None else column_id}, {key}) in "
        f"{QUEUE.as_string(conn)} on INSERT, and on UPDATE when one of "
        + ", ".join(sql.Identifier(c).as_string(conn) for c in watched)
        + " changed (embedfill's own writes skipped); no trigger names a column, so the "
        "app's ALTER TABLE on any column goes through"
    )
    if everything:
        out.notes.append(
            "text_sql target: its columns are unknown, so an UPDATE of any column but the "
            "embedding queues the row; columns added to the table later are not covered "
            "(run install again after adding one)"
        )
    cur = await conn.execute(_CHILD, {"rel": oid})
    row = await cur.fetchone()
    per_statement = not (row and row[0])
    if not per_statement:
        out.notes.append(
            "the table is partitioned, a partition or an inheritance child: its INSERT "
            "trigger is per row (on a partitioned table it is on every partition too, so "
            "an INSERT made straight into one is queued; PostgreSQL allows no transition "
            "table on a partition)"
        )
    out.statements = install_statements(
        tsql,
        UNNUMBERED if column_id is None else column_id,
        watched,
        conn,
        per_statement=per_statement,
    )
    return out


def printed(plan: TriggerPlan, conn: psycopg.AsyncConnection[Any]) -> str:
    """``--print-sql``: the plan as the script install would run (``N`` for a number not
    recorded yet)."""
    script = plan.script(conn)
    return script if plan.column_id is not None else script.replace(str(UNNUMBERED), "N")
