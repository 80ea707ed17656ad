"""The one builder for SQL on users' tables.

Schema, table and column names come from configuration and are composed with
``sql.Identifier``; type names come from the live catalog (``format_type``, which quotes
what needs quoting); every value is a bound parameter.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

from psycopg import sql

from ..config import SIDE_ROW_ID, TargetConfig
from .queries import FAILING

INTEGER_TYPES = ("smallint", "integer", "bigint")
PROVENANCE = sql.Identifier("embedfill", "provenance")
# the write's tally of a job's rows (see ``_write_names``); nothing without a job
TALLY = (
    ", embedfill_tally AS ("
    "INSERT INTO embedfill.tallies AS y (run_id, worker, writer, tenant_key, tenant, embedded)"
    " SELECT %(run_id)s, %(worker)s, pg_catalog.pg_backend_pid(),"
    " CASE WHEN w.tenant IS NULL THEN 'n' ELSE 't' OPERATOR(pg_catalog.||) w.tenant END,"
    " w.tenant, pg_catalog.count(*) FROM embedfill_written AS w"
    " WHERE %(run_id)s::bigint IS NOT NULL GROUP BY w.tenant"
    " ON CONFLICT (run_id, worker, writer, tenant_key)"
    " DO UPDATE SET embedded = y.embedded OPERATOR(pg_catalog.+) excluded.embedded)"
)
# the characters Python's str.strip() removes (str.isspace): a text made only of these is
# blank to the engine (planning.prepare_text), so the watch's poll must not queue it
BLANK = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)


@dataclass(frozen=True)
class ColumnTypes:
    id_type: str  # e.g. "bigint", "uuid", "text", "character(6)": with its modifier
    vector_type: str  # e.g. "vector" or "extensions.vector"

    @property
    def kind(self) -> str:
        """``vector`` or ``halfvec``: the vector type without its schema."""
        return base_type(self.vector_type)


def unquoted(name: str) -> str:
    """An identifier as the server writes it (``"My Ext"``, ``public``): the name itself."""
    if len(name) > 1 and name[0] == name[-1] == '"':
        return name[1:-1].replace('""', '"')
    return name


def base_type(vector_type: str) -> str:
    """``vector`` or ``halfvec`` from a column type as statements name it
    (``public.vector``, ``halfvec``)."""
    return vector_type.rsplit(".", 1)[-1].strip('"')


def _side_text(live: TargetSQL) -> str:
    """A side row's text, as a text_sql over it: rendered by the server exactly as the
    live target renders it, from the live row of the side row's id. The live text_sql
    as written (a text_sql's % is escaped once, where it is used)."""
    return (
        sql.SQL("(SELECT {text} FROM {table} AS embedfill_live WHERE {id} = {row_id})")
        .format(
            text=live.rendered("embedfill_live", escape=False),
            table=live.table,
            id=sql.Identifier("embedfill_live", live.target.id_column),
            # the side row as every statement on a target names it (``t``): unqualified,
            # a live column of that name would be taken instead
            row_id=sql.Identifier("t", SIDE_ROW_ID),
        )
        .as_string()
    )


# the md5 recorded for a vector ``verify`` found wrong: no text hashes to it
WRONG_MD5 = "00000000-0000-0000-0000-000000000000"


class TargetSQL:
    def __init__(
        self, target: TargetConfig, types: ColumnTypes | None = None, schema: str | None = None
    ) -> None:
        """``schema``: where the table was found (``catalog.resolve_table``); every
        statement names the table qualified, since connections see only pg_catalog on
        their search_path (``db.connect``). A target ``in_side_table`` reads its text
        from the live row (``_side_text``): to every statement, a text_sql target."""
        self.types = types or ColumnTypes("bigint", "vector")
        # a side table's live table, in its schema; its ids are the side row ids' type
        self.live = None if target.side_of is None else TargetSQL(target.side_of, types, schema)
        if self.live is not None:
            target = dataclasses.replace(target, text_sql=_side_text(self.live))
        self.target = target
        t = target.table
        schema = t.schema or schema
        self.schema = schema  # None: not resolved yet (catalog.resolve_table)
        self.table = sql.Identifier(schema, t.name) if schema else sql.Identifier(t.name)
        self.id = sql.Identifier(target.id_column)
        self.emb = sql.Identifier(target.embedding_column)
        self.tenant = sql.Identifier(target.tenant_column) if target.tenant_column else None

    def _tenant_text(self, alias: str | None = None) -> sql.Composable:
        if self.tenant is None:
            return sql.SQL("NULL::text")
        assert self.target.tenant_column is not None
        col = sql.Identifier(alias, self.target.tenant_column) if alias else self.tenant
        return sql.SQL("{}::text").format(col)

    def tenant_text(self, alias: str | None = None) -> sql.Composable:
        """The row's tenant as text (``NULL::text`` without a tenant column)."""
        return self._tenant_text(alias)

    def row_exists(self, row_id: sql.Composable) -> sql.Composed:
        """Whether this table has the row whose id is ``row_id`` (the outer statement's
        column, qualified). A side table's two questions: a side row's live row exists
        (``live.row_exists``: the prune of deleted rows, the side table's row-level
        security, the counts); a live row has its side row (a side target's
        ``row_exists``: the mirror, the counts of rows not mirrored yet)."""
        return sql.SQL(
            "EXISTS (SELECT FROM {table} AS embedfill_row WHERE embedfill_row.{id} = {row_id})"
        ).format(table=self.table, id=self.id, row_id=row_id)

    def failing(self) -> sql.Composed:
        """``queries.FAILING`` of this target: the failures of rows still there (a side
        target's: of live rows that exist), params ``rel`` and ``column``."""
        rows = self.live or self
        row_id = sql.SQL("CAST(f.row_id AS {})").format(sql.SQL(self.types.id_type))
        return sql.SQL(FAILING).format(exists=rows.row_exists(row_id))

    def _text_sql(self, escape: bool = True) -> sql.Composable:
        """The target's text_sql, verbatim (trusted configuration, like tenant_key_sql),
        parenthesised and on lines of its own so a trailing comment cannot swallow what
        follows. ``%`` is doubled: every builder query runs with parameters."""
        assert self.target.text_sql is not None
        text = self.target.text_sql.replace("%", "%%") if escape else self.target.text_sql
        return sql.SQL("(\n{}\n)").format(sql.SQL(text))

    def _values(self, alias: str | None = None) -> list[sql.Composable]:
        """What the text is made of, as the server's text: each template column cast
        ``::text`` (so jsonb is JSON, booleans ``true``, dates ISO, arrays ``{a,b}``), or
        the one value of the text_sql expression."""
        if self.target.text_sql is not None:
            return [sql.SQL("{}::text").format(self._text_sql())]
        return [
            sql.SQL("{}::text").format(sql.Identifier(alias, c) if alias else sql.Identifier(c))
            for c in self.target.text_columns
        ]

    def _as_read(self) -> sql.Composable:
        """The write's guard that row ``t`` still holds what the scan read: the md5 of its
        text as rendered now (the template's columns, or the text_sql expression's value,
        so the guard covers whatever the expression reads) is the batch row's
        ``embedfill_md5``, and so is its tenant. A row the app changed meanwhile is not
        overwritten; one whose sources changed into the same text is written, the vector
        being the text's. (It compared an md5 of the sources' record, which cost the scan
        and the write each a record's text a row.)"""
        same = sql.SQL("md5({})::uuid = b.embedfill_md5").format(self.rendered("t"))
        if self.tenant is None:
            return same
        return sql.SQL("{} AND {} IS NOT DISTINCT FROM b.embedfill_tenant").format(
            same, self._tenant_text("t")
        )

    def rendered(self, alias: str = "t", *, escape: bool = True) -> sql.Composable:
        """The text as embedfill embeds it, rendered by the server exactly as Python
        renders it (config.text_renderer over the ``_values``): the template's literal
        parts and each column's text, NULL as ''; or the text_sql value. Literal parts go
        in as hex (``decode``), so no quote, backslash or ``%`` in a template can change
        the statement."""
        if self.target.text_sql is not None:
            return sql.SQL("coalesce({}::text, '')").format(self._text_sql(escape))
        assert self.target.text is not None
        parts: list[sql.Composable] = []
        for literal, field, _, _ in string.Formatter().parse(self.target.text):
            if literal:
                hexed = literal.encode("utf-8").hex()
                parts.append(
                    sql.SQL("convert_from(decode('{}', 'hex'), 'UTF8')").format(sql.SQL(hexed))
                )
            if field is not None:
                parts.append(sql.SQL("coalesce({}::text, '')").format(sql.Identifier(alias, field)))
        if not parts:
            return sql.SQL("''::text")
        return sql.SQL("concat({})").format(sql.SQL(", ").join(parts))

    def text_md5(self, alias: str = "t") -> sql.Composable:
        """The provenance fingerprint of a row's text: md5 of the rendered text (before
        any truncation), as a uuid (16 bytes)."""
        return sql.SQL("md5({})::uuid").format(self.rendered(alias))

    def _provenance_of(self, alias: str = "t") -> sql.Composable:
        """The row's provenance record (params ``column_id``), joined on the id's text."""
        return sql.SQL("p.column_id = %(column_id)s AND p.row_key = {}::text").format(
            sql.Identifier(alias, self.target.id_column)
        )

    def outdated(self, alias: str = "t") -> sql.Composable:
        """A non-NULL vector that embedfill wrote from other text than the row holds now,
        or with another model than configured now (params ``column_id``, ``model_id``)."""
        return sql.SQL(
            "EXISTS (SELECT 1 FROM {prov} AS p WHERE {of}"
            " AND (p.model_id <> %(model_id)s OR p.text_md5 <> {md5}))"
        ).format(prov=PROVENANCE, of=self._provenance_of(alias), md5=self.text_md5(alias))

    def _needs(self, refresh: bool, keys: bool) -> sql.Composable:
        """Which rows a scan (or a chunk's plan) takes: NULL ones, and with ``refresh``
        the outdated ones too; with ``keys``, only the ids in %(keys)s (a watch chunk)."""
        emb = sql.Identifier("t", self.target.embedding_column)
        need: sql.Composable = sql.SQL("{} IS NULL").format(emb)
        if refresh:
            need = sql.SQL("({} OR ({} IS NOT NULL AND {}))").format(need, emb, self.outdated())
        if keys:
            need = sql.SQL("{} = ANY(CAST(CAST(%(keys)s AS text[]) AS {}[])) AND {}").format(
                sql.Identifier("t", self.target.id_column), sql.SQL(self.types.id_type), need
            )
        return need

    def _tenant_filter(self, tenants: bool) -> sql.Composable:
        if not tenants:
            return sql.SQL("")
        return sql.SQL(" AND {} = ANY(%(tenants)s::text[])").format(self._tenant_text())

    def scan(
        self,
        *,
        first_page: bool,
        tenants: bool,
        upto: bool = False,
        refresh: bool = False,
        keys: bool = False,
    ) -> sql.Composed:
        """Keyset page of rows to embed (``_needs``: NULL ones, and outdated ones with
        ``refresh``), in id order (walks the PK index), after %(after)s (unless
        ``first_page``) and up to %(hi)s (with ``upto``: a job's chunk). Bounds are
        compared by the server, in the column's type and collation. The table is aliased
        ``t`` here, in the write and in ``check_text_sql``, so a text_sql expression sees
        the same names in all three. The row's columns: id, tenant, whether it held a
        vector (a refresh), the md5 of the text as read (its provenance, the write's
        guard and, with the tenant, the de-duplication key: 16 bytes, which cost the
        client nothing to load, where a uuid costs a Python object a row), then the
        text's values."""
        after = sql.SQL("") if first_page else sql.SQL(" AND {} > %(after)s").format(self.id)
        if upto:
            after += sql.SQL(" AND {} <= %(hi)s").format(self.id)
        source: sql.Composable = sql.SQL("{} AS t").format(self.table)
        md5: sql.Composable = sql.SQL("decode(md5({}), 'hex')").format(self.rendered("t"))
        values: sql.Composable = sql.SQL(", ").join(self._values())
        if self.target.text_sql is not None:
            # the expression once a row, not twice (its value, its md5): a side table's
            # text is a subquery on the live table (migration.py)
            text = sql.SQL("embedfill_lateral.embedfill_scan_text")
            source = sql.SQL(
                "{} AS t CROSS JOIN LATERAL (SELECT {}::text AS embedfill_scan_text)"
                " AS embedfill_lateral"
            ).format(self.table, self._text_sql())
            md5 = sql.SQL("decode(md5(coalesce({}, '')), 'hex')").format(text)
            values = text
        return sql.SQL(
            "SELECT {id}, {tenant}, {emb} IS NOT NULL, {md5}, {values} FROM {source}"
            " WHERE {needs}{after}{tenants} ORDER BY {id} LIMIT %(limit)s"
        ).format(
            id=self.id,
            tenant=self._tenant_text(),
            md5=md5,
            values=values,
            source=source,
            emb=self.emb,
            needs=self._needs(refresh, keys),
            after=after,
            tenants=self._tenant_filter(tenants),
        )

    def chunk_end(self, *, first: bool, tenants: bool, refresh: bool = False) -> sql.Composed:
        """The id that ends a chunk of %(step)s + 1 rows needing an embedding after
        %(after)s (unless ``first``): no row when fewer are left. Ids only, from the key
        index (a refresh also reads the text of rows that hold a vector, to compare)."""
        after = sql.SQL("") if first else sql.SQL(" AND {} > %(after)s").format(self.id)
        return sql.SQL(
            "SELECT {id} FROM {table} AS t WHERE {needs}{after}{tenants}"
            " ORDER BY {id} OFFSET %(step)s LIMIT 1"
        ).format(
            id=self.id,
            table=self.table,
            needs=self._needs(refresh, False),
            after=after,
            tenants=self._tenant_filter(tenants),
        )

    def check_text_sql(self) -> sql.Composed:
        """Plan the text_sql expression without reading a row: a typo fails here, and the
        cursor's description tells the expression's type. Run it with ``{"zero": 0}``: a
        query without parameters goes out in the simple protocol, which runs every
        statement a ``;`` in the expression smuggles in; a bound one allows exactly one."""
        return sql.SQL("SELECT {} FROM {} AS t LIMIT %(zero)s").format(self._text_sql(), self.table)

    def absent_tenants(self) -> sql.Composed:
        """Which of %(tenants)s have no row at all (each stops at its first row)."""
        return sql.SQL(
            "SELECT w.tenant FROM unnest(%(tenants)s::text[]) AS w(tenant)"
            " WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {tenant} = w.tenant)"
            " ORDER BY 1"
        ).format(table=self.table, tenant=self._tenant_text())

    @property
    def integer_ids(self) -> bool:
        return self.types.id_type in INTEGER_TYPES

    @property
    def _citext_ids(self) -> bool:
        """citext ids (the extension's type) reach the client as text, whose arrays it
        cannot read: an array of them came back as one string, whose characters were
        taken for the ids written (counts went wrong, locked rows were written twice)."""
        return base_type(self.types.id_type) == "citext"

    def write(self, refresh: bool = False) -> sql.Composed:
        """One bulk UPDATE per batch, written only where the embedding is still NULL (or,
        ``refresh``, whatever it holds) and the source text is unchanged since it was
        read; the provenance of every row written is recorded in the same statement.

        Rows are locked first with ``FOR NO KEY UPDATE … SKIP LOCKED``, the lock the
        UPDATE itself takes (so a row the app only KEY SHARE-locks, inserting a row that
        references it, is written, as the plain UPDATE writes it; ``FOR UPDATE`` skipped
        it for as long as another row of its batch was held): a row the application
        holds locked is never waited for (so the backfill never queues behind the app,
        holds its batch's rows meanwhile, or joins a deadlock); it is tried again later.
        The answer is one row: how many rows were locked, and the ids written (NULL when
        every row of the batch was); when fewer were locked than sent, ``still_owed``
        tells the app's rows from rows it changed, filled or deleted.

        Only the batch's own rows are locked (a join with the batch). Integer ids are
        bounded by ``BETWEEN lo AND hi`` (one range scan of the key index; without it the
        planner may hash-join each batch against the whole table). Other id types are
        bounded by ``= ANY(ids)`` instead: Python's order of strings is not the column
        collation's, and a range computed in Python silently skips rows.
        The batch's columns have names a table is unlikely to use, so an unqualified name
        in text_sql means the table's.
        """
        return sql.SQL(
            "WITH embedfill_batch AS ("
            "SELECT * FROM unnest({ids}, %(vecs)b::{vec_type}[], %(md5s)b::uuid[],"
            " %(tenants)b::text[])"
            " AS u(embedfill_id, embedfill_vec, embedfill_md5, embedfill_tenant)"
            "), embedfill_locked AS ("
            "SELECT {t_id} AS id FROM {table} AS t"
            " JOIN embedfill_batch AS b ON {t_id} = b.embedfill_id"
            " WHERE {keys} FOR NO KEY UPDATE OF t SKIP LOCKED"
            "), embedfill_written AS ("
            "UPDATE {table} AS t SET {emb} = b.embedfill_vec FROM embedfill_batch AS b"
            " WHERE {t_id} = b.embedfill_id AND {keys}"
            " AND {t_id} IN (SELECT id FROM embedfill_locked)"
            "{guard} AND {same}"
            " RETURNING {t_id} AS id, b.embedfill_md5 AS text_md5, b.embedfill_tenant AS tenant"
            "){provenance}{tally} SELECT (SELECT count(*) FROM embedfill_locked), {written}"
        ).format(**self._write_names(refresh))

    def write_fast(self, refresh: bool = False) -> sql.Composed:
        """The common case of ``write``, one plain bulk UPDATE that waits for row locks:
        run under a very short ``lock_timeout``, so that when the app holds one of the
        rows it gives up (releasing what it took) before anyone waits long, and ``write``
        takes over. Same answer shape: the batch size as "locked", and the ids written."""
        return sql.SQL(
            "WITH embedfill_written AS ("
            "UPDATE {table} AS t SET {emb} = b.embedfill_vec"
            " FROM unnest({ids}, %(vecs)b::{vec_type}[], %(md5s)b::uuid[], %(tenants)b::text[])"
            " AS b(embedfill_id, embedfill_vec, embedfill_md5, embedfill_tenant)"
            " WHERE {t_id} = b.embedfill_id AND {keys}"
            "{guard} AND {same}"
            " RETURNING {t_id} AS id, b.embedfill_md5 AS text_md5, b.embedfill_tenant AS tenant"
            "){provenance}{tally} SELECT cardinality({ids}), {written}"
        ).format(**self._write_names(refresh))

    def _write_names(self, refresh: bool) -> dict[str, sql.Composable]:
        """The pieces both writes are made of. ``keys`` bounds a batch's rows for an index
        scan (see ``write``); ``provenance`` records, for each row written, the md5 of the
        text the scan read and embedded (``md5s``, computed by the server as the scan read
        the row: not re-rendered from the row as written, which an app's BEFORE UPDATE
        trigger may have rewritten), with params ``column_id`` and ``model_id``; ``tally``
        adds the rows written, per tenant, to the writer's own row of the job's tallies
        (params ``run_id``, ``worker``; the writer is its server process), so a job's
        counts are committed with the rows they count."""
        ids = sql.SQL("%(ids)b::{}[]").format(sql.SQL(self.types.id_type))
        t_id = sql.Identifier("t", self.target.id_column)
        if self.integer_ids:
            keys = sql.SQL("{} BETWEEN %(lo)b AND %(hi)b").format(t_id)
        else:
            keys = sql.SQL("{} = ANY({})").format(t_id, ids)
        t_emb = sql.Identifier("t", self.target.embedding_column)
        return {
            "table": self.table,
            "emb": self.emb,
            "ids": ids,
            "vec_type": sql.SQL(self.types.vector_type),
            "t_id": t_id,
            "keys": keys,
            "guard": sql.SQL("") if refresh else sql.SQL(" AND {} IS NULL").format(t_emb),
            "same": self._as_read(),
            "provenance": sql.SQL(
                ", embedfill_provenance AS ("
                "INSERT INTO {prov} AS p (column_id, model_id, text_md5, embedded_at, row_key)"
                " SELECT %(column_id)s, %(model_id)s, w.text_md5, now(), w.id::text"
                " FROM embedfill_written AS w"
                " ON CONFLICT (column_id, row_key) DO UPDATE SET model_id = excluded.model_id,"
                " text_md5 = excluded.text_md5, embedded_at = excluded.embedded_at)"
            ).format(prov=PROVENANCE),
            "tally": sql.SQL(TALLY),
            # the ids written, only when some of the batch's were not (most often all
            # were: NULL, and neither side builds a thousand ids to compare)
            "written": sql.SQL(
                "CASE WHEN (SELECT count(*) FROM embedfill_written) < cardinality({ids})"
                " THEN coalesce((SELECT array_agg(id{as_read}) FROM embedfill_written), '{{}}')"
                " END"
            ).format(ids=ids, as_read=sql.SQL("::text" if self._citext_ids else "")),
        }

    def still_owed(self, refresh: bool = False) -> sql.Composed:
        """Of a batch's rows, those still NULL (any, ``refresh``) with the text that was
        read: after a write that could not lock every row, these are the ones the app held
        (retry them); the rest were changed, filled or deleted by the app."""
        ids = sql.SQL("%(ids)b::{}[]").format(sql.SQL(self.types.id_type))
        t_id = sql.Identifier("t", self.target.id_column)
        t_emb = sql.Identifier("t", self.target.embedding_column)
        return sql.SQL(
            "SELECT {t_id} FROM {table} AS t"
            " JOIN unnest({ids}, %(md5s)b::uuid[], %(tenants)b::text[])"
            " AS b(embedfill_id, embedfill_md5, embedfill_tenant) ON {t_id} = b.embedfill_id"
            " WHERE {t_id} = ANY({ids}){guard} AND {same}"
        ).format(
            table=self.table,
            ids=ids,
            t_id=t_id,
            guard=sql.SQL("") if refresh else sql.SQL(" AND {} IS NULL").format(t_emb),
            same=self._as_read(),
        )

    def count_embeddable(self) -> sql.Composed:
        """The table's rows, and those whose text is not blank (as Python sees it:
        %(blank)s is ``BLANK``): what a change of model embeds."""
        return sql.SQL(
            "SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER"
            " (WHERE btrim({text}, %(blank)s) <> '') FROM {table} AS t"
        ).format(text=self.rendered("t"), table=self.table)

    def coverage(self) -> sql.Composed:
        """Rows with text to embed (not blank: %(blank)s is ``BLANK``); of those, rows
        whose vector is NULL; and rows whose vector is not of their current text and the
        configured model (params ``column_id``, ``model_id``), or has no provenance."""
        emb = sql.Identifier("t", self.target.embedding_column)
        return sql.SQL(
            "SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE c.empty),"
            " pg_catalog.count(*) FILTER (WHERE NOT c.empty AND NOT c.fresh)"
            " FROM (SELECT {emb} IS NULL AS empty,"
            " EXISTS (SELECT 1 FROM {prov} AS p WHERE {of} AND p.model_id = %(model_id)s"
            " AND p.text_md5 = {md5}) AS fresh"
            " FROM {table} AS t WHERE btrim({text}, %(blank)s) <> '') AS c"
        ).format(
            emb=emb,
            prov=PROVENANCE,
            of=self._provenance_of("t"),
            md5=self.text_md5("t"),
            table=self.table,
            text=self.rendered("t"),
        )

    def text_sample(self) -> sql.Composed:
        """A random sample of at most %(limit)s rows, whatever their vector, as
        ``_checked`` reads them without the vector: ``TABLESAMPLE SYSTEM (%(percent)s)``
        reads that share of the table's pages (100: all of them)."""
        return sql.SQL(
            "SELECT {cols} FROM {table} AS t TABLESAMPLE SYSTEM (%(percent)s)"
            " ORDER BY random() LIMIT %(limit)s"
        ).format(cols=self._checked(False), table=self.table)

    def count_missing(self, *, tenants: bool) -> sql.Composed:
        """Rows whose embedding is NULL (of %(tenants)s); a side table's: with its live
        rows that have no side row yet, without those of deleted live rows (as
        ``status_by_tenant`` counts them)."""
        if self.live is None:
            return sql.SQL("SELECT count(*) FROM {table} WHERE {emb} IS NULL{tenants}").format(
                table=self.table, emb=self.emb, tenants=self._tenant_filter(tenants)
            )
        return sql.SQL(
            "SELECT (SELECT count(*) FROM {table} AS t WHERE {emb} IS NULL{tenants}"
            "{live_row}) + (SELECT count(*) FROM {live} AS t WHERE NOT {side_row}"
            "{live_tenants})"
        ).format(
            table=self.table,
            emb=self.emb,
            tenants=self._tenant_filter(tenants),
            live_row=self._of_live_rows(" AND "),
            live=self.live.table,
            side_row=self.has_side_row(),
            live_tenants=self.live._tenant_filter(tenants),
        )

    def count_missing_by_tenant(self, *, tenants: bool) -> sql.Composed:
        """Per tenant (NULL: no tenant column): rows whose embedding is NULL; a side
        table's as ``count_missing`` counts them."""
        counted = sql.SQL(
            "SELECT {tenant} AS tenant, pg_catalog.count(*) AS n FROM {table} AS t"
            " WHERE {emb} IS NULL{tenants}{live_row} GROUP BY 1"
        ).format(
            tenant=self._tenant_text(),
            table=self.table,
            emb=self.emb,
            tenants=self._tenant_filter(tenants),
            live_row=self._of_live_rows(" AND "),
        )
        if self.live is None:
            return counted
        return sql.SQL(
            "SELECT tenant, pg_catalog.sum(n)::bigint FROM ({counted} UNION ALL"
            " SELECT {live_tenant}, pg_catalog.count(*) FROM {live} AS t"
            " WHERE NOT {side_row}{live_tenants} GROUP BY 1) AS u GROUP BY 1"
        ).format(
            counted=counted,
            live_tenant=self.live.tenant_text("t"),
            live=self.live.table,
            side_row=self.has_side_row(),
            live_tenants=self.live._tenant_filter(tenants),
        )

    def _of_live_rows(self, joiner: str) -> sql.Composable:
        """A side target's condition that row ``t`` stands for a live row that exists
        (after ``joiner``); nothing for other targets."""
        if self.live is None:
            return sql.SQL("")
        return sql.SQL(joiner) + self.has_live_row()

    def watch_keys(self, *, outdated: bool, first: bool) -> sql.Composed:
        """A keyset page (after %(after)s unless ``first``, %(limit)s ids) of rows a watch
        should queue: NULL rows, or, with ``outdated``, rows whose vector is stale or from
        another model; either way only rows with text (not blank as Python sees it:
        %(blank)s is ``BLANK``) and not held back by a failure in watch job %(run_id)s:
        a row whose text the provider rejected waits for its text to change; one that
        failed for a passing cause (an outage, a key) waits until its ``retry_at``
        (db/queries.INSERT_FAILURE). Each row: the id, and the id as text."""
        emb = sql.Identifier("t", self.target.embedding_column)
        t_id = sql.Identifier("t", self.target.id_column)
        if outdated:
            need: sql.Composable = sql.SQL("{} IS NOT NULL AND {}").format(emb, self.outdated())
        else:
            need = sql.SQL("{} IS NULL").format(emb)
        need = sql.SQL(
            "{need} AND btrim({text}, %(blank)s) <> ''"
            " AND NOT EXISTS (SELECT 1 FROM embedfill.failures AS f"
            " WHERE f.run_id = %(run_id)s AND f.row_id = {id}::text"
            " AND CASE WHEN f.retry_at IS NULL THEN f.text_md5 IS NOT DISTINCT FROM {md5}"
            " ELSE f.retry_at > pg_catalog.now() END)"
        ).format(need=need, text=self.rendered("t"), id=t_id, md5=self.text_md5("t"))
        after = sql.SQL("") if first else sql.SQL(" AND {} > %(after)s").format(t_id)
        return sql.SQL(
            "SELECT {id}, {id}::text FROM {table} AS t WHERE {need}{after}"
            " ORDER BY {id} LIMIT %(limit)s"
        ).format(id=t_id, table=self.table, need=need, after=after)

    def poll_index(self) -> sql.Composed:
        """The partial index that makes a watch's poll for NULL rows cheap (for a hint)."""
        name = f"{self.target.table.name}_{self.target.embedding_column}_null"[:63]
        return sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} ({}) WHERE {} IS NULL").format(
            sql.Identifier(name), self.table, self.id, self.emb
        )

    def count_outdated(self, *, tenants: bool) -> sql.Composed:
        """Per tenant (NULL: no tenant column), (stale, outdated_model) of the rows with a
        vector (see ``status_by_tenant``)."""
        emb = sql.Identifier("t", self.target.embedding_column)
        return sql.SQL(
            "SELECT {tenant}, count(*) FILTER (WHERE p.model_id = %(model_id)s),"
            " count(*) FILTER (WHERE p.model_id <> %(model_id)s)"
            " FROM {table} AS t JOIN {prov} AS p ON {of}"
            " WHERE {emb} IS NOT NULL"
            " AND (p.model_id <> %(model_id)s OR p.text_md5 <> {md5}){tenants}{live_row}"
            " GROUP BY 1"
        ).format(
            live_row=self._of_live_rows(" AND "),
            tenant=self._tenant_text("t"),
            table=self.table,
            prov=PROVENANCE,
            of=self._provenance_of("t"),
            emb=emb,
            md5=self.text_md5("t"),
            tenants=self._tenant_filter(tenants),
        )

    def status_by_tenant(self, provenance: bool = True) -> sql.Composed:
        """Per tenant: rows, missing (NULL), unverified (a vector embedfill has no
        provenance for), outdated_model (written with another model than %(model_id)s)
        and stale (written with this model from other text than the row holds now).
        Without ``provenance`` (embedfill's schema not there yet) every vector is
        unverified. One pass over the table, a hash join with the provenance. A side
        table's rows are its live rows': those that have no side row yet are missing too
        (``_unmirrored``), and those of deleted live rows (until a sweep or a backfill
        deletes them) are not counted."""
        emb = sql.Identifier("t", self.target.embedding_column)
        live_rows = self._of_live_rows(" WHERE ")
        if not provenance:
            counted = sql.SQL(
                "SELECT {tenant} AS tenant, count(*) AS rows,"
                " count(*) FILTER (WHERE {emb} IS NULL) AS missing,"
                " count(*) FILTER (WHERE {emb} IS NOT NULL) AS unverified,"
                " 0::bigint AS outdated_model, 0::bigint AS stale"
                " FROM {table} AS t{live_rows} GROUP BY 1"
            ).format(tenant=self._tenant_text("t"), emb=emb, table=self.table, live_rows=live_rows)
        else:
            counted = sql.SQL(
                "SELECT {tenant} AS tenant, count(*) AS rows,"
                " count(*) FILTER (WHERE {emb} IS NULL) AS missing,"
                " count(*) FILTER (WHERE {emb} IS NOT NULL AND p.row_key IS NULL) AS unverified,"
                " count(*) FILTER (WHERE {emb} IS NOT NULL AND p.model_id <> %(model_id)s)"
                " AS outdated_model,"
                " count(*) FILTER (WHERE {emb} IS NOT NULL AND p.model_id = %(model_id)s"
                " AND p.text_md5 <> {md5}) AS stale"
                " FROM {table} AS t LEFT JOIN {prov} AS p ON {of}{live_rows}"
                " GROUP BY 1"
            ).format(
                live_rows=live_rows,
                tenant=self._tenant_text("t"),
                emb=emb,
                md5=self.text_md5("t"),
                table=self.table,
                prov=PROVENANCE,
                of=self._provenance_of("t"),
            )
        if self.live is None:
            return sql.SQL("{} ORDER BY 1").format(counted)
        return sql.SQL(
            "SELECT tenant, sum(rows)::bigint, sum(missing)::bigint, sum(unverified)::bigint,"
            " sum(outdated_model)::bigint, sum(stale)::bigint"
            " FROM ({counted} UNION ALL {unmirrored}) AS u GROUP BY 1 ORDER BY 1"
        ).format(counted=counted, unmirrored=self._unmirrored())

    def _unmirrored(self) -> sql.Composed:
        """A side table's live rows that have no side row yet, per tenant, as status
        counts: rows, all missing (a poll or a backfill gives them their side row)."""
        assert self.live is not None
        return sql.SQL(
            "SELECT {tenant} AS tenant, count(*) AS rows, count(*) AS missing,"
            " 0::bigint AS unverified, 0::bigint AS outdated_model, 0::bigint AS stale"
            " FROM {live} AS t WHERE NOT {side_row} GROUP BY 1"
        ).format(
            tenant=self.live.tenant_text("t"), live=self.live.table, side_row=self.has_side_row()
        )

    def has_live_row(self, alias: str = "t") -> sql.Composed:
        """A side target's row ``alias`` stands for a live row that exists."""
        assert self.live is not None
        return self.live.row_exists(sql.Identifier(alias, SIDE_ROW_ID))

    def has_side_row(self, alias: str = "t") -> sql.Composed:
        """A side target's live row ``alias`` has its side row."""
        assert self.live is not None
        return self.row_exists(sql.Identifier(alias, self.live.target.id_column))

    # ------------------------------------------------------------- verify and adopt

    def _unverified(self, alias: str) -> sql.Composable:
        """The row has no provenance record (params ``column_id``)."""
        return sql.SQL("NOT EXISTS (SELECT 1 FROM {prov} AS p WHERE {of})").format(
            prov=PROVENANCE, of=self._provenance_of(alias)
        )

    def _checked(self, vectors: bool) -> sql.Composable:
        """What verify reads of a row: id, tenant, the text's values, and the stored
        vector as ``real[]`` (NULL, when ``vectors`` is off: a dry run needs only text)."""
        emb = sql.Identifier("t", self.target.embedding_column)
        return sql.SQL("{id}, {tenant}, {values}, {vec}").format(
            id=sql.Identifier("t", self.target.id_column),
            tenant=self._tenant_text("t"),
            values=sql.SQL(", ").join(self._values("t")),
            vec=sql.SQL("{}::real[]").format(emb) if vectors else sql.SQL("NULL::real[]"),
        )

    def sample(
        self, *, unverified: bool = False, vectors: bool = True, fresh: bool = False
    ) -> sql.Composed:
        """A random sample of at most %(limit)s rows that hold a vector (``unverified``:
        and have no provenance; params ``column_id``), in id order, as ``_checked`` reads
        them. Cheap on a big table: ``TABLESAMPLE SYSTEM (%(percent)s)`` reads that share
        of the table's pages (100: all of them), ``ORDER BY random()`` sorts those rows'
        ids only (a NULL test reads no vector), and only the rows picked are then read
        in full, by id."""
        s_emb = sql.Identifier("s", self.target.embedding_column)
        where: sql.Composable = sql.SQL("{} IS NOT NULL").format(s_emb)
        if unverified:
            where = sql.SQL("{} AND {}").format(where, self._unverified("s"))
        outer: sql.Composable = sql.SQL("")
        if fresh:  # written by embedfill from the text the row holds now (params model_id),
            # tested on the outer row: aliased t, as a text_sql expects
            outer = sql.SQL(
                " AND EXISTS (SELECT 1 FROM {prov} AS p WHERE {of}"
                " AND p.model_id = %(model_id)s AND p.text_md5 = {md5})"
            ).format(prov=PROVENANCE, of=self._provenance_of("t"), md5=self.text_md5("t"))
        t_id = sql.Identifier("t", self.target.id_column)
        return sql.SQL(
            "SELECT {cols} FROM {table} AS t WHERE {t_id} = ANY(ARRAY("
            "SELECT {s_id} FROM {table} AS s TABLESAMPLE SYSTEM (%(percent)s)"
            " WHERE {where} ORDER BY random() LIMIT %(limit)s)){outer} ORDER BY {t_id}"
        ).format(
            cols=self._checked(vectors),
            table=self.table,
            t_id=t_id,
            s_id=sql.Identifier("s", self.target.id_column),
            where=where,
            outer=outer,
        )

    def with_vectors(self, *, first_page: bool, vectors: bool = True) -> sql.Composed:
        """A keyset page of %(limit)s rows that hold a vector, after %(after)s (unless
        ``first_page``), in id order, as ``_checked`` reads them (``verify --all``)."""
        t_id = sql.Identifier("t", self.target.id_column)
        after = sql.SQL("") if first_page else sql.SQL(" AND {} > %(after)s").format(t_id)
        return sql.SQL(
            "SELECT {cols} FROM {table} AS t WHERE {emb} IS NOT NULL{after}"
            " ORDER BY {t_id} LIMIT %(limit)s"
        ).format(
            cols=self._checked(vectors),
            table=self.table,
            emb=sql.Identifier("t", self.target.embedding_column),
            after=after,
            t_id=t_id,
        )

    def other_models(self) -> sql.Composed:
        """The models other than %(model_id)s that wrote the vectors the table's rows hold
        now (params ``column_id`` too): (provider, model, dimensions, rows), most rows
        first. A row deleted, or whose vector was cleared, counts for none."""
        return sql.SQL(
            "SELECT m.provider, m.model, m.dimensions, pg_catalog.count(*)"
            " FROM {table} AS t JOIN {prov} AS p ON {of}"
            " JOIN embedfill.models AS m ON m.id = p.model_id"
            " WHERE {emb} IS NOT NULL AND p.model_id <> %(model_id)s"
            " GROUP BY 1, 2, 3 ORDER BY 4 DESC"
        ).format(
            table=self.table,
            prov=PROVENANCE,
            of=self._provenance_of("t"),
            emb=sql.Identifier("t", self.target.embedding_column),
        )

    def mark_wrong(self) -> sql.Composed:
        """Record that the vectors of rows %(ids)s were found wrong (``verify``): their
        provenance says text md5 ``WRONG_MD5``, which no text has, so they count as
        stale (status, check, watch's sweep and ``--refresh`` re-embed them) and are
        never unverified (``adopt`` never blesses them). A record there keeps its model
        and time; a new one gets model %(model_id)s and time -infinity."""
        return sql.SQL(
            "INSERT INTO {prov} AS p (column_id, model_id, text_md5, embedded_at, row_key)"
            " SELECT %(column_id)s, %(model_id)s, %(wrong)s::uuid, '-infinity', k.id::text"
            " FROM unnest(%(ids)s::{id_type}[]) AS k(id)"
            " ON CONFLICT (column_id, row_key) DO UPDATE SET text_md5 = excluded.text_md5"
        ).format(prov=PROVENANCE, id_type=sql.SQL(self.types.id_type))

    def adopt(self, *, first_page: bool) -> sql.Composed:
        """Record provenance for the next %(limit)s rows (id order, after %(after)s unless
        ``first_page``) that hold a vector and have none: the md5 of the text as the row
        renders it now, and the model %(model_id)s (params ``column_id`` too). A record
        that appeared meanwhile (a backfill wrote the row) is kept: DO NOTHING. One
        statement, one transaction per page. The answer is one row: the page's last id,
        the rows it read and the records it wrote."""
        t_id = sql.Identifier("t", self.target.id_column)
        after = sql.SQL("") if first_page else sql.SQL(" AND {} > %(after)s").format(t_id)
        return sql.SQL(
            "WITH embedfill_page AS ("
            "SELECT {t_id} AS id, {md5} AS text_md5 FROM {table} AS t"
            " WHERE {emb} IS NOT NULL AND {unverified}{after} ORDER BY {t_id} LIMIT %(limit)s"
            "), embedfill_adopted AS ("
            "INSERT INTO {prov} (column_id, model_id, text_md5, embedded_at, row_key)"
            " SELECT %(column_id)s, %(model_id)s, a.text_md5, now(), a.id::text"
            " FROM embedfill_page AS a ON CONFLICT (column_id, row_key) DO NOTHING RETURNING 1"
            ") SELECT (SELECT a.id FROM embedfill_page AS a ORDER BY a.id DESC LIMIT 1),"
            " (SELECT count(*) FROM embedfill_page), (SELECT count(*) FROM embedfill_adopted)"
        ).format(
            t_id=t_id,
            md5=self.text_md5("t"),
            table=self.table,
            emb=sql.Identifier("t", self.target.embedding_column),
            unverified=self._unverified("t"),
            after=after,
            prov=PROVENANCE,
        )
