"""The one builder for SQL on users' tables.

Schema, table and column names come from configuration and are composed with
``sql.Identifier``; type names come from the live catalog (``format_type``, which quotes
what needs quoting); every value is a bound parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from ..config import TargetConfig

INTEGER_TYPES = ("smallint", "integer", "bigint")


@dataclass(frozen=True)
class ColumnTypes:
    id_type: str  # e.g. "bigint", "uuid", "text", "character(6)": with its modifier
    vector_type: str  # e.g. "vector" or "extensions.vector"


class TargetSQL:
    def __init__(self, target: TargetConfig, types: ColumnTypes | None = None) -> None:
        self.target = target
        self.types = types or ColumnTypes("bigint", "vector")
        t = target.table
        self.table = sql.Identifier(t.schema, t.name) if t.schema else sql.Identifier(t.name)
        self.id = sql.Identifier(target.id_column)
        self.emb = sql.Identifier(target.embedding_column)
        self.tenant = sql.Identifier(target.tenant_column) if target.tenant_column else None

    def _tenant_text(self, alias: str | None = None) -> sql.Composable:
        if self.tenant is None:
            return sql.SQL("NULL::text")
        assert self.target.tenant_column is not None
        col = sql.Identifier(alias, self.target.tenant_column) if alias else self.tenant
        return sql.SQL("{}::text").format(col)

    def _text_sql(self) -> sql.Composable:
        """The target's text_sql, verbatim (trusted configuration, like tenant_key_sql),
        parenthesised and on lines of its own so a trailing comment cannot swallow what
        follows. ``%`` is doubled: every builder query runs with parameters."""
        assert self.target.text_sql is not None
        return sql.SQL("(\n{}\n)").format(sql.SQL(self.target.text_sql.replace("%", "%%")))

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

    def _fingerprint(self, alias: str | None = None) -> sql.Composable:
        """md5 of the tenant and the text's sources, computed by the server: the template's
        columns, or the text_sql expression's value (so the guard covers whatever the
        expression reads). It guards the write (the row still holds what was read, tenant
        included) and is the de-duplication key (same tenant, same source: same text)."""
        if self.target.text_sql is not None:
            sources: list[sql.Composable] = self._values()
        else:
            sources = [
                sql.Identifier(alias, c) if alias else sql.Identifier(c)
                for c in self.target.text_columns
            ]
        return sql.SQL("md5(ROW({}, {})::text)").format(
            self._tenant_text(alias), sql.SQL(", ").join(sources)
        )

    def _tenant_filter(self, tenants: bool) -> sql.Composable:
        if not tenants:
            return sql.SQL("")
        return sql.SQL(" AND {} = ANY(%(tenants)s::text[])").format(self._tenant_text())

    def scan(self, *, first_page: bool, tenants: bool, upto: bool = False) -> sql.Composed:
        """Keyset page of rows whose embedding is NULL, in id order (walks the PK index),
        after %(after)s (unless ``first_page``) and up to %(hi)s (with ``upto``: a job's
        chunk). Bounds are compared by the server, in the column's type and collation.
        The table is aliased ``t`` here, in the write and in ``check_text_sql``, so a
        text_sql expression sees the same names in all three."""
        after = sql.SQL("") if first_page else sql.SQL(" AND {} > %(after)s").format(self.id)
        if upto:
            after += sql.SQL(" AND {} <= %(hi)s").format(self.id)
        return sql.SQL(
            "SELECT {id}, {tenant}, {fp}, {values} FROM {table} AS t"
            " WHERE {emb} IS NULL{after}{tenants} ORDER BY {id} LIMIT %(limit)s"
        ).format(
            id=self.id,
            tenant=self._tenant_text(),
            fp=self._fingerprint(),
            values=sql.SQL(", ").join(self._values()),
            table=self.table,
            emb=self.emb,
            after=after,
            tenants=self._tenant_filter(tenants),
        )

    def chunk_end(self, *, first: bool, tenants: bool) -> sql.Composed:
        """The id that ends a chunk of %(step)s + 1 rows needing an embedding after
        %(after)s (unless ``first``): no row when fewer are left. Ids only, from the key
        index: planning a job reads no text."""
        after = sql.SQL("") if first else sql.SQL(" AND {} > %(after)s").format(self.id)
        return sql.SQL(
            "SELECT {id} FROM {table} AS t WHERE {emb} IS NULL{after}{tenants}"
            " ORDER BY {id} OFFSET %(step)s LIMIT 1"
        ).format(
            id=self.id,
            table=self.table,
            emb=self.emb,
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

    def write(self) -> sql.Composed:
        """One bulk UPDATE per batch, written only where the embedding is still NULL and
        the source text is unchanged since it was read.

        Rows are locked first with ``SKIP LOCKED``: a row the application holds locked is
        never waited for (so the backfill never queues behind the app, holds its batch's
        rows meanwhile, or joins a deadlock); it is tried again later. The answer is one
        row: how many rows were locked, and the ids written; when fewer were locked than
        sent, ``still_owed`` tells the app's rows from rows it changed, filled or deleted.

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
            "SELECT * FROM unnest({ids}, %(fps)b::text[], %(vecs)b::{vec_type}[])"
            " AS u(embedfill_id, embedfill_fp, embedfill_vec)"
            "), embedfill_locked AS ("
            "SELECT {t_id} AS id FROM {table} AS t"
            " JOIN embedfill_batch AS b ON {t_id} = b.embedfill_id"
            " WHERE {keys} FOR UPDATE OF t SKIP LOCKED"
            "), embedfill_written AS ("
            "UPDATE {table} AS t SET {emb} = b.embedfill_vec FROM embedfill_batch AS b"
            " WHERE {t_id} = b.embedfill_id AND {keys}"
            " AND {t_id} IN (SELECT id FROM embedfill_locked)"
            " AND {t_emb} IS NULL AND {fp} = b.embedfill_fp"
            " RETURNING {t_id} AS id"
            ") SELECT (SELECT count(*) FROM embedfill_locked),"
            " (SELECT array_agg(id) FROM embedfill_written)"
        ).format(**self._write_names())

    def write_fast(self) -> sql.Composed:
        """The common case of ``write``, one plain bulk UPDATE that waits for row locks:
        run under a very short ``lock_timeout``, so that when the app holds one of the
        rows it gives up (releasing what it took) before anyone waits long, and ``write``
        takes over. Same answer shape: the batch size as "locked", and the ids written."""
        return sql.SQL(
            "WITH embedfill_written AS ("
            "UPDATE {table} AS t SET {emb} = b.embedfill_vec"
            " FROM unnest({ids}, %(fps)b::text[], %(vecs)b::{vec_type}[])"
            " AS b(embedfill_id, embedfill_fp, embedfill_vec)"
            " WHERE {t_id} = b.embedfill_id AND {keys}"
            " AND {t_emb} IS NULL AND {fp} = b.embedfill_fp"
            " RETURNING {t_id} AS id"
            ") SELECT cardinality({ids}), (SELECT array_agg(id) FROM embedfill_written)"
        ).format(**self._write_names())

    def _write_names(self) -> dict[str, sql.Composable]:
        """The pieces both writes are made of. ``keys`` bounds a batch's rows for an index
        scan (see ``write``)."""
        ids = sql.SQL("%(ids)b::{}[]").format(sql.SQL(self.types.id_type))
        t_id = sql.Identifier("t", self.target.id_column)
        if self.integer_ids:
            keys = sql.SQL("{} BETWEEN %(lo)b AND %(hi)b").format(t_id)
        else:
            keys = sql.SQL("{} = ANY({})").format(t_id, ids)
        return {
            "table": self.table,
            "emb": self.emb,
            "ids": ids,
            "vec_type": sql.SQL(self.types.vector_type),
            "t_id": t_id,
            "keys": keys,
            "t_emb": sql.Identifier("t", self.target.embedding_column),
            "fp": self._fingerprint("t"),
        }

    def still_owed(self) -> sql.Composed:
        """Of a batch's rows, those still NULL with the text that was read: after a write
        that could not lock every row, these are the ones the app held (retry them); the
        rest were changed, filled or deleted by the app."""
        ids = sql.SQL("%(ids)b::{}[]").format(sql.SQL(self.types.id_type))
        t_id = sql.Identifier("t", self.target.id_column)
        return sql.SQL(
            "SELECT {t_id} FROM {table} AS t"
            " JOIN unnest({ids}, %(fps)b::text[]) AS b(embedfill_id, embedfill_fp)"
            " ON {t_id} = b.embedfill_id"
            " WHERE {t_id} = ANY({ids}) AND {t_emb} IS NULL AND {fp} = b.embedfill_fp"
        ).format(
            table=self.table,
            ids=ids,
            t_id=t_id,
            t_emb=sql.Identifier("t", self.target.embedding_column),
            fp=self._fingerprint("t"),
        )

    def count_missing(self, *, tenants: bool) -> sql.Composed:
        return sql.SQL("SELECT count(*) FROM {table} WHERE {emb} IS NULL{tenants}").format(
            table=self.table, emb=self.emb, tenants=self._tenant_filter(tenants)
        )

    def status_by_tenant(self) -> sql.Composed:
        return sql.SQL(
            "SELECT {tenant} AS tenant, count(*) AS rows,"
            " count(*) FILTER (WHERE {emb} IS NULL) AS missing"
            " FROM {table} GROUP BY 1 ORDER BY 1"
        ).format(tenant=self._tenant_text(), emb=self.emb, table=self.table)
