"""What text is sent for each row: column types rendered by the server, text_sql, and
types that have no text, against a real PostgreSQL and a real local provider."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from embedfill import BackfillOptions, Database, abackfill
from embedfill.config import Config, parse_config
from embedfill.errors import ConfigError, SchemaMismatch
from embedfill.providers.hashing import hash_vector
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import provider_settings

PLATFORM = "sk-platform-text-0123456789"
UUID = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
# the example: title, a blank line, the content and the tags from the metadata;
# the id (a name the write's own columns once shadowed) and a % (psycopg's placeholder
# character) prove the expression reaches the server as written
TEXT_SQL = (
    "'#' || id || ' ' || replace(title, 'pct', '%') || E'\\n\\n' || content"
    " || coalesce(' ' || (metadata->>'tags'), '')"
)


def make_docs(conn: psycopg.Connection[Any]) -> None:
    conn.execute("""
        CREATE TABLE public.docs (
            id bigint PRIMARY KEY, org text NOT NULL, title text, content text,
            metadata jsonb, raw json, n numeric, d date, u uuid, flag boolean,
            tags text[], code char(5), blob bytea, emb vector(8))""")
    conn.execute(
        """INSERT INTO public.docs VALUES
        (1, 'org-a', 'Refund 10pct', 'Card charged twice',
         '{"tags": "billing", "prio": 2, "nested": {"a": [1, 2]}}', '{"b":1,  "a":2}',
         12.50, '2024-03-01', %(u)s, true, '{x,"y z"}', 'ab', '\\x00ff', NULL),
        (2, 'org-b', 'Login', 'Password reset loops', NULL, NULL,
         NULL, NULL, NULL, false, '{}', NULL, NULL, NULL),
        (3, 'org-a', 'Refund 10pct', 'Card charged twice',
         '{"tags": "billing", "prio": 2, "nested": {"a": [1, 2]}}', '{"b":1,  "a":2}',
         12.50, '2024-03-01', %(u)s, true, '{x,"y z"}', 'ab', NULL, NULL),
        (4, 'org-b', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""",
        {"u": UUID},
    )


@pytest.fixture
def docs(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_docs(conn)
    return db_url


def docs_config(base_url: str, **text: str) -> Config:
    return parse_config(
        {
            "providers": {"openai": provider_settings(base_url)},
            "targets": [
                {
                    "name": "docs",
                    "table": "public.docs",
                    "id_column": "id",
                    "embedding_column": "emb",
                    "tenant_column": "org",
                    "provider": "openai",
                    **text,
                }
            ],
        }
    )


def run(db_url: str, config: Config, **opts: Any) -> Any:
    env = {"TEST_PLATFORM_KEY": PLATFORM}
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(**opts), env=env))


def sent(fake: FakeOpenAI) -> list[str]:
    return [t for r in fake.ok_requests() for t in r.inputs]


def vectors(db_url: str) -> dict[int, np.ndarray | None]:
    with psycopg.connect(db_url) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT id, emb FROM public.docs ORDER BY id").fetchall()
    return {r[0]: None if r[1] is None else r[1].to_numpy() for r in rows}


ROW_1 = (
    'Refund 10pct|{"prio": 2, "tags": "billing", "nested": {"a": [1, 2]}}|{"b":1,  "a":2}'
    f'|12.50|2024-03-01|{UUID}|true|{{x,"y z"}}|ab'
)
ROW_2 = "Login||||||false|{}|"
ROW_4 = "||||||||"  # every column NULL: the template's own text remains


def test_each_type_is_rendered_in_its_postgresql_text_form(
    docs: str, fake_openai: FakeOpenAI
) -> None:
    config = docs_config(
        fake_openai.base_url, text="{title}|{metadata}|{raw}|{n}|{d}|{u}|{flag}|{tags}|{code}"
    )
    report = run(docs, config)

    # jsonb as JSON (not a Python dict's repr), json as stored, numbers, dates, uuids and
    # booleans as PostgreSQL writes them, arrays as array literals, char(n) unpadded
    assert sorted(sent(fake_openai)) == sorted([ROW_1, ROW_2, ROW_4])
    assert report.embedded == 4 and report.deduplicated == 1
    stored = vectors(docs)
    for i, text in ((1, ROW_1), (2, ROW_2), (3, ROW_1), (4, ROW_4)):
        np.testing.assert_array_equal(stored[i], hash_vector(text, 8))


def test_a_single_jsonb_column_is_sent_as_json(docs: str, fake_openai: FakeOpenAI) -> None:
    report = run(docs, docs_config(fake_openai.base_url, text="{metadata}"))
    assert sent(fake_openai) == ['{"prio": 2, "tags": "billing", "nested": {"a": [1, 2]}}']
    assert report.embedded == 2 and report.skipped == 2


def test_text_sql_is_evaluated_by_the_server(docs: str, fake_openai: FakeOpenAI) -> None:
    report = run(docs, docs_config(fake_openai.base_url, text_sql=TEXT_SQL))

    assert sorted(sent(fake_openai)) == [
        "#1 Refund 10%\n\nCard charged twice billing",
        "#2 Login\n\nPassword reset loops",
        "#3 Refund 10%\n\nCard charged twice billing",
    ]
    assert report.embedded == 3 and report.skipped == 1  # row 4's expression is NULL
    stored = vectors(docs)
    np.testing.assert_array_equal(stored[2], hash_vector("#2 Login\n\nPassword reset loops", 8))


def test_text_sql_write_guard_covers_what_the_expression_reads(
    docs: str, fake_openai: FakeOpenAI
) -> None:
    def app_edits_the_tags_of_row_2(inputs: list[str]) -> None:
        if any(t.startswith("#2 ") for t in inputs):
            with psycopg.connect(docs, autocommit=True) as conn:
                conn.execute("""UPDATE public.docs SET metadata = '{"tags": "auth"}'
                                WHERE id = 2""")

    fake_openai.on_inputs = app_edits_the_tags_of_row_2
    config = docs_config(fake_openai.base_url, text_sql=TEXT_SQL)
    report = run(docs, config)
    assert report.changed == 1 and report.embedded == 2
    assert vectors(docs)[2] is None  # never the vector of the text before the edit

    fake_openai.on_inputs = None
    again = run(docs, config)
    assert again.embedded == 1
    np.testing.assert_array_equal(
        vectors(docs)[2], hash_vector("#2 Login\n\nPassword reset loops auth", 8)
    )


def test_text_sql_with_a_typo_is_a_config_error_naming_the_option(
    docs: str, fake_openai: FakeOpenAI
) -> None:
    config = docs_config(fake_openai.base_url, text_sql="titel || content")
    with pytest.raises(ConfigError) as caught:
        run(docs, config)
    message = str(caught.value)
    assert "text_sql of target 'docs'" in message and 'column "titel" does not exist' in message
    assert caught.value.exit_code == 2 and "\n" not in message
    assert fake_openai.requests == []
    with psycopg.connect(docs) as conn:
        assert conn.execute("SELECT to_regclass('embedfill.runs')").fetchone() == (None,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "{title} {blob}",
            "Column 'blob' of public.docs is bytea, which has no text to embed; use text_sql "
            "to say how to turn it into text (e.g. encode(blob, 'escape')).",
        ),
        (
            "{title} {emb}",
            "Column 'emb' of public.docs is vector(8), which has no text to embed; use "
            "text_sql to say how to turn it into text (e.g. emb::text).",
        ),
    ],
)
def test_columns_without_text_are_refused_with_a_hint(
    docs: str, fake_openai: FakeOpenAI, text: str, message: str
) -> None:
    with pytest.raises(SchemaMismatch) as caught:
        run(docs, docs_config(fake_openai.base_url, text=text))
    assert str(caught.value) == message and caught.value.exit_code == 2
    assert fake_openai.requests == []


def test_text_sql_that_gives_bytes_is_refused(docs: str, fake_openai: FakeOpenAI) -> None:
    with pytest.raises(ConfigError, match=r"text_sql of target 'docs' gives bytea"):
        run(docs, docs_config(fake_openai.base_url, text_sql="blob"))
    # the hint in the message works
    report = run(docs, docs_config(fake_openai.base_url, text_sql="encode(blob, 'escape')"))
    assert sent(fake_openai) == ["\\000\\377"] and report.embedded == 1


def test_dry_run_shows_the_first_two_texts_as_they_would_be_sent(
    docs: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(docs, autocommit=True) as conn:
        conn.execute("UPDATE public.docs SET content = repeat('long ', 100) WHERE id = 2")
    report = run(docs, docs_config(fake_openai.base_url, text_sql=TEXT_SQL), dry_run=True)
    assert fake_openai.requests == []
    first, second = report.samples
    assert (first.id, first.tenant) == (1, "org-a")
    assert first.text == "#1 Refund 10%\n\nCard charged twice billing"
    assert (second.id, second.tenant) == (2, "org-b")
    assert len(second.text) == 301 and second.text.endswith("…")
    assert second.text.startswith("#2 Login\n\nlong long")
    data = report.to_dict()
    assert data["samples"][0] == {
        "id": 1,
        "tenant": "org-a",
        "text": "#1 Refund 10%\n\nCard charged twice billing",
    }
