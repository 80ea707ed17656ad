"""Every builder query renders odd identifiers quoted, never spliced."""

from __future__ import annotations

import psycopg
import pytest

from embedfill.config import parse_config
from embedfill.db.target_sql import ColumnTypes, TargetSQL


def target(table: str, **cols: str):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "providers": {"p": {"kind": "hash", "dimensions": 3}},
            "targets": [
                {
                    "name": "t",
                    "table": table,
                    "id_column": cols.get("id", "id"),
                    "text": cols.get("text", "{Body Text}"),
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
    assert 'md5(ROW("Org""Id"::text, "Body Text")::text)' in scan
    write = q.write().as_string(conn)
    assert 'UPDATE "we.ird"."Mixed Case" AS t SET "Emb" = u.v' in write
    assert '"t"."id" BETWEEN %(lo)b AND %(hi)b' in write
    assert 'md5(ROW("t"."Org""Id"::text, "t"."Body Text")::text) = u.fp' in write
    assert "%(ids)b::bigint[], %(fps)b::text[], %(vecs)b::vector[]" in write
    assert '"Org""Id"::text AS tenant' in q.status_by_tenant().as_string(conn)


def test_injection_in_names_stays_inside_quotes(conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    evil = 'x"; DROP TABLE users; --'
    q = TargetSQL(target("public.t", emb=evil, text="{a}"))
    rendered = q.count_missing(tenants=False).as_string(conn)
    assert '"x""; DROP TABLE users; --" IS NULL' in rendered
