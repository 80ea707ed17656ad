"""Every builder query renders odd identifiers quoted, never spliced."""

from __future__ import annotations

import psycopg
import pytest

from embedfill.config import parse_config
from embedfill.db.target_sql import ColumnTypes, TargetSQL


def target(table: str, text_sql: str | None = None, **cols: str):  # type: ignore[no-untyped-def]
    text = {"text_sql": text_sql} if text_sql else {"text": cols.get("text", "{Body Text}")}
    return parse_config(
        {
            "providers": {"p": {"kind": "hash", "dimensions": 3}},
            "targets": [
                {
                    "name": "t",
                    "table": table,
                    "id_column": cols.get("id", "id"),
                    **text,
                    "embedding_column": cols.get("emb", "Emb"),
                    "tenant_column": cols.get("tenant", 'Org"Id'),
                    "provider": "p",
                }
            ],
        }
    ).targets[0]


@pytest.fixture(scope="module")
def conn(server_url: str):  # type: ignore[no-untyped-def]
    with psycopg.connect(server_url) as c:
        yield c


def test_odd_identifiers_are_quoted(conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    q = TargetSQL(target('"we.ird"."Mixed Case"'), ColumnTypes("bigint", "vector"))
    scan = q.scan(first_page=False, tenants=True).as_string(conn)
    assert 'FROM "we.ird"."Mixed Case"' in scan
    assert '"Emb" IS NULL' in scan and '"Org""Id"::text = ANY(%(tenants)s::text[])' in scan
    assert """decode(md5(concat(coalesce("t"."Body Text"::text, ''))), 'hex')""" in scan
    for write in (q.write().as_string(conn), q.write_fast().as_string(conn)):
        assert 'UPDATE "we.ird"."Mixed Case" AS t SET "Emb" = b.embedfill_vec' in write
        assert '"t"."id" BETWEEN %(lo)b AND %(hi)b' in write
        # still the text that was read, of the same tenant
        assert (
            """md5(concat(coalesce("t"."Body Text"::text, '')))::uuid = b.embedfill_md5"""
            ' AND "t"."Org""Id"::text IS NOT DISTINCT FROM b.embedfill_tenant'
        ) in write
        assert "%(ids)b::bigint[], %(vecs)b::vector[], %(md5s)b::uuid[]" in write
    assert 'FROM "we.ird"."Mixed Case" AS t JOIN embedfill_batch' in q.write().as_string(conn)
    assert "FOR NO KEY UPDATE OF t SKIP LOCKED" in q.write().as_string(conn)
    owed = q.still_owed().as_string(conn)
    assert '"t"."Emb" IS NULL' in owed and '"t"."id" = ANY(%(ids)b::bigint[])' in owed
    text_ids = TargetSQL(target('"Mixed Case"'), ColumnTypes("text", "vector"))
    for write in (text_ids.write().as_string(conn), text_ids.write_fast().as_string(conn)):
        # a range computed in Python would not follow the column's collation
        assert "BETWEEN" not in write and '"t"."id" = ANY(%(ids)b::text[])' in write
    assert '"Org""Id"::text AS tenant' in q.status_by_tenant().as_string(conn)
    assert 'FROM "we.ird"."Mixed Case" AS t WHERE' in scan
    assert '"Body Text"::text FROM' in scan  # the server renders each column as text
    absent = q.absent_tenants().as_string(conn)
    assert 'SELECT 1 FROM "we.ird"."Mixed Case" AS t WHERE "Org""Id"::text = w.tenant' in absent


def test_text_sql_is_composed_verbatim_with_percent_escaped(conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    q = TargetSQL(target('"Mixed Case"', text_sql="title || ' 100%' -- note"))
    expr = "(\ntitle || ' 100%%' -- note\n)"
    scan = q.scan(first_page=True, tenants=False).as_string(conn)
    write = q.write().as_string(conn)
    # the scan evaluates the expression once a row (a lateral subquery) and makes the
    # md5 of the text (a NULL value is empty text) from that value
    text = "embedfill_lateral.embedfill_scan_text"
    md5 = f"decode(md5(coalesce({text}, '')), 'hex')"
    assert f'"Emb" IS NOT NULL, {md5}, {text} FROM' in scan
    assert scan.count("100%%") == 1
    assert f"CROSS JOIN LATERAL (SELECT {expr}::text AS embedfill_scan_text)" in scan
    assert "b.embedfill_md5 AS text_md5" in write
    assert f"md5(coalesce({expr}::text, ''))::uuid = b.embedfill_md5" in write
    check = q.check_text_sql().as_string(conn)
    assert check == f'SELECT {expr} FROM "Mixed Case" AS t LIMIT %(zero)s'


def test_injection_in_names_stays_inside_quotes(conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    evil = 'x"; DROP TABLE users; --'
    q = TargetSQL(target("public.t", emb=evil, text="{a}"))
    rendered = q.count_missing(tenants=False).as_string(conn)
    assert '"x""; DROP TABLE users; --" IS NULL' in rendered
