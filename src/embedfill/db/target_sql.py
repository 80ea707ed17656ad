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
    id_type: str  # e.g. "bigint", "uuid", "text"
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

    def _fingerprint(self, alias: str | None = None) -> sql.Composable:
        """md5 of the tenant and the text columns, computed by the server. It guards the
        write (the row still holds what was read, tenant included) and is the
        de-duplication key (same tenant, same source: same text)."""
        cols = [
            sql.Identifier(alias, c) if alias else sql.Identifier(c)
            for c in self.target.text_columns
        ]
        return sql.SQL("md5(ROW({}, {})::text)").format(
            self._tenant_text(alias), sql.SQL(", ").join(cols)
        )

    def _tenant_filter(self, tenants: bool) -> sql.Composable:
        if not tenants:
            return sql.SQL("")
        return sql.SQL(" AND {} = ANY(%(tenants)s::text[])").format(self._tenant_text())

    def scan(self, *, first_page: bool, tenants: bool) -> sql.Composed:
        """Keyset page of rows whose embedding is NULL, in id order (walks the PK index)."""
        after = sql.SQL("") if first_page else sql.SQL(" AND {} > %(after)s").format(self.id)
        return sql.SQL(
            "SELECT {id}, {tenant}, {fp}, {cols} FROM {table}"
            " WHERE {emb} IS NULL{after}{tenants} ORDER BY {id} LIMIT %(limit)s"
        ).format(
            id=self.id,
            tenant=self._tenant_text(),
            fp=self._fingerprint(),
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in self.target.text_columns),
            table=self.table,
            emb=self.emb,
            after=after,
            tenants=self._tenant_filter(tenants),
        )

    @property
    def integer_ids(self) -> bool:
        return self.types.id_type in INTEGER_TYPES

    def write(self) -> sql.Composed:
        """One bulk UPDATE per batch, written only where the embedding is still NULL and
        the source text is unchanged since it was read.

        Rows are locked first with ``SKIP LOCKED``: a row the application holds locked is
        never waited for (so the backfill never queues behind the app, holds its batch's
        rows meanwhile, or joins a deadlock); it comes back as ``(id, false)`` for a later
        try. Written rows come back as ``(id, true)``; a row in neither was changed, filled
        or deleted by the app since it was read.

        Ids are matched with ``= ANY(ids)`` (an index scan of the batch's keys); integer
        ids also get ``BETWEEN lo AND hi``. Other id types get no range: Python's order of
        strings is not the column collation's, and a wrong range silently skips rows.
        """
        ids = sql.SQL("%(ids)b::{}[]").format(sql.SQL(self.types.id_type))
        t_id = sql.Identifier("t", self.target.id_column)
        keys = sql.SQL("{t_id} = ANY({ids})").format(t_id=t_id, ids=ids)
        if self.integer_ids:
            keys = sql.SQL("{keys} AND {t_id} BETWEEN %(lo)b AND %(hi)b").format(
                keys=keys, t_id=t_id
            )
        return sql.SQL(
            "WITH locked AS ("
            "SELECT {t_id} AS id FROM {table} AS t WHERE {keys} FOR UPDATE OF t SKIP LOCKED"
            "), written AS ("
            "UPDATE {table} AS t SET {emb} = u.v"
            " FROM unnest({ids}, %(fps)b::text[], %(vecs)b::{vec_type}[]) AS u(id, fp, v)"
            " WHERE {t_id} = u.id AND {keys} AND {t_id} IN (SELECT id FROM locked)"
            " AND {t_emb} IS NULL AND {fp} = u.fp"
            " RETURNING {t_id} AS id"
            ") SELECT id, true FROM written"
            " UNION ALL SELECT {t_id}, false FROM {table} AS t"
            " WHERE {keys} AND {t_id} NOT IN (SELECT id FROM locked)"
        ).format(
            table=self.table,
            emb=self.emb,
            ids=ids,
            vec_type=sql.SQL(self.types.vector_type),
            t_id=t_id,
            keys=keys,
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
