"""A full backfill on a table whose names need quoting everywhere."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from embedfill import BackfillOptions, Database, abackfill, astatus
from embedfill.config import parse_config
from embedfill.providers.hashing import hash_vector


def test_odd_identifiers_end_to_end(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "we.ird"')
        conn.execute(
            'CREATE TABLE "we.ird"."Mixed Case" ("Row ID" text PRIMARY KEY, '
            '"Tenant""s" int, "Body Text" text, "Emb" vector(4))'
        )
        for i in range(12):
            conn.execute(
                'INSERT INTO "we.ird"."Mixed Case" VALUES (%s, %s, %s, NULL)',
                (f"r{i:02d}", i % 2, f"body {i}"),
            )
    config = parse_config(
        {
            "providers": {"h": {"kind": "hash", "dimensions": 4, "batch_size": 4}},
            "targets": [
                {
                    "name": "odd",
                    "table": '"we.ird"."Mixed Case"',
                    "id_column": "Row ID",
                    "text": "{Body Text}",
                    "embedding_column": "Emb",
                    "tenant_column": 'Tenant"s',
                    "provider": "h",
                }
            ],
        }
    )
    db = Database(db_url)
    report = asyncio.run(abackfill(config, db, BackfillOptions(tenants=("1",))))
    assert report.embedded == 6 and [t.tenant for t in report.tenants] == ["1"]
    report = asyncio.run(abackfill(config, db, BackfillOptions()))
    assert report.embedded == 6
    (status,) = asyncio.run(astatus(config, db))
    assert status.missing == 0 and status.rows == 12 and status.table == "we.ird.Mixed Case"
    with psycopg.connect(db_url) as conn:
        register_vector(conn)
        for row_id, body, emb in conn.execute(
            'SELECT "Row ID", "Body Text", "Emb" FROM "we.ird"."Mixed Case"'
        ):
            np.testing.assert_array_equal(emb.to_numpy(), hash_vector(body, 4), row_id)


def test_vector_index_is_reported(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, emb vector(3))")
        conn.execute("CREATE INDEX docs_emb ON docs USING hnsw (emb vector_cosine_ops)")
    config = parse_config(
        {
            "providers": {"h": {"kind": "hash", "dimensions": 3}},
            "targets": [
                {
                    "name": "docs",
                    "table": "docs",
                    "id_column": "id",
                    "text": "{body}",
                    "embedding_column": "emb",
                    "provider": "h",
                }
            ],
        }
    )
    (status,) = asyncio.run(astatus(config, Database(db_url)))
    assert status.vector_index == "docs_emb (hnsw)" and status.tenants == ()


def test_a_text_column_with_a_percent_sign_is_read_through_text_sql(db_url: str) -> None:
    """A name holding '%' is refused in the config (the statements' placeholders start
    with '%'); docs/configuration.md says to read such a column with text_sql, which
    keeps its '%' through every statement: backfill, the write guard, status, refresh
    and the change triggers."""
    from embedfill.application import atriggers

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute('CREATE TABLE notes (id bigint PRIMARY KEY, "Body%Text" text, emb vector(4))')
        conn.execute(
            "INSERT INTO notes SELECT g, 'note ' || g || ' at 5%', NULL"
            " FROM generate_series(1, 8) g"
        )
    config = parse_config(
        {
            "providers": {"h": {"kind": "hash", "dimensions": 4}},
            "targets": [
                {
                    "name": "notes",
                    "table": "notes",
                    "id_column": "id",
                    "text_sql": '"Body%Text"',
                    "embedding_column": "emb",
                    "provider": "h",
                }
            ],
        }
    )
    db = Database(db_url)
    assert asyncio.run(abackfill(config, db, BackfillOptions())).embedded == 8
    asyncio.run(atriggers(config, db, None, True, False))  # install
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("""UPDATE notes SET "Body%Text" = 'edited at 9%' WHERE id = 3""")
        conn.execute("""INSERT INTO notes VALUES (9, 'new at 1%', NULL)""")
        queued = conn.execute("SELECT count(*) FROM embedfill.changes").fetchone()
    assert queued == (2,)
    (status,) = asyncio.run(astatus(config, db))
    assert (status.rows, status.missing, status.stale) == (9, 1, 1)
    report = asyncio.run(abackfill(config, db, BackfillOptions(refresh=True)))
    assert report.embedded == 2
    with psycopg.connect(db_url) as conn:
        register_vector(conn)
        for row_id, body, emb in conn.execute('SELECT id, "Body%Text", emb FROM notes'):
            np.testing.assert_array_equal(emb.to_numpy(), hash_vector(body, 4), row_id)


def test_a_table_found_in_a_schema_with_a_percent_sign_is_one_sentence(
    db_url: str, tmp_path: Path
) -> None:
    """An unqualified table found by the URL's search_path in a schema holding '%': the
    config's names were fine, the statements' were not (a traceback from backfill, a
    'relation "a$1.docs" does not exist' from status). One sentence, exit 2, and
    nothing written."""
    from psycopg import conninfo

    from tests.support.cli import cli_env, embedfill

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "a%b"')
        conn.execute('CREATE TABLE "a%b".docs (id bigint PRIMARY KEY, body text, emb vector(4))')
        conn.execute("""INSERT INTO "a%b".docs VALUES (1, 'one', NULL)""")
    config = tmp_path / "embedfill.toml"
    config.write_text(
        '[providers.h]\nkind = "hash"\ndimensions = 4\n\n[[targets]]\nname = "docs"\n'
        'table = "docs"\nid_column = "id"\ntext = "{body}"\nembedding_column = "emb"\n'
        'provider = "h"\n'
    )
    url = conninfo.make_conninfo(db_url, options="-csearch_path=a%b")
    for command in ("backfill", "status", "check"):
        done = embedfill("--config", str(config), command, env=cli_env(url))
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.strip().endswith(
            "Table docs of target 'docs' is in schema 'a%b' (found by the search_path), and "
            "embedfill cannot use a name holding '%' in its statements; rename the schema, "
            "or put the table in another one and name it schema.table."
        ), (command, done.stderr)
    with psycopg.connect(db_url) as conn:
        assert conn.execute('SELECT count(*) FROM "a%b".docs WHERE emb IS NULL').fetchone() == (1,)
