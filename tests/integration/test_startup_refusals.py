"""Start-up refuses what can never work, in one sentence, exit 2, before any request
(issue 15, item 10): a view or materialized view as the target, an inheritance parent
(its unique index does not cover its children), two targets on one vector column with
different id columns."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill, astatus
from embedfill.config import TableName
from embedfill.errors import ConfigError, SchemaMismatch
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import tickets_config

ENV = {"TEST_PLATFORM_KEY": "sk-platform-refusals-123456"}


def on_table(base_url: str, name: str) -> Any:
    config = tickets_config(base_url)
    target = dataclasses.replace(config.targets[0], table=TableName("app", name))
    return dataclasses.replace(config, targets=(target,))


def backfill(db_url: str, config: Any, **opts: Any) -> Any:
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(**opts), env=ENV))


@pytest.mark.parametrize(
    ("ddl", "kind"),
    [
        ('CREATE MATERIALIZED VIEW app.tv AS SELECT * FROM app."SupportTickets"', "materialized"),
        ('CREATE VIEW app.tv AS SELECT * FROM app."SupportTickets"', "a view"),
    ],
)
def test_a_view_or_materialized_view_is_refused_at_start_up(
    tickets: str, fake_openai: FakeOpenAI, ddl: str, kind: str
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(ddl)
        if "MATERIALIZED" in ddl:
            conn.execute("CREATE UNIQUE INDEX ON app.tv (ticket_no)")
    config = on_table(fake_openai.base_url, "tv")
    for attempt in (
        lambda: backfill(tickets, config),
        lambda: backfill(tickets, config, dry_run=True),
    ):
        with pytest.raises(SchemaMismatch, match=kind) as caught:
            attempt()
        assert caught.value.exit_code == 2
        assert "point `table` at the table that holds the rows" in str(caught.value)
    assert fake_openai.requests == []


def test_an_inheritance_parent_is_refused_at_start_up(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('CREATE TABLE app.child () INHERITS (app."SupportTickets")')
        conn.execute(
            "INSERT INTO app.child (ticket_no, org, subject, body)"
            " VALUES (1, 'org-a', 'same id as the parent''s row 1', 'x')"
        )
    config = tickets_config(fake_openai.base_url)
    with pytest.raises(SchemaMismatch, match="inheritance parent") as caught:
        backfill(tickets, config)
    assert caught.value.exit_code == 2
    with pytest.raises(SchemaMismatch, match="inheritance parent"):
        asyncio.run(astatus(config, Database(tickets)))
    assert fake_openai.requests == []
    # each child, as its own target, works
    child = on_table(fake_openai.base_url, "child")
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("ALTER TABLE app.child ADD PRIMARY KEY (ticket_no)")
    assert backfill(tickets, child).embedded == 1


def test_two_targets_on_one_column_with_different_ids_are_refused() -> None:
    config = tickets_config("http://127.0.0.1:9")
    other = dataclasses.replace(config.targets[0], name="again", id_column="org")
    with pytest.raises(ConfigError, match="different id columns") as caught:
        dataclasses.replace(config, targets=(config.targets[0], other))
    assert caught.value.exit_code == 2
    same = dataclasses.replace(config.targets[0], name="same-ids", tenant_column=None)
    dataclasses.replace(config, targets=(config.targets[0], same))  # the same ids: fine


def test_two_targets_naming_one_table_differently_with_different_ids_are_refused(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Found by review: `docs` and `public.docs` are one table; the config check compares
    names, so the resolved table decides at start-up."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" ADD COLUMN alt bigint')
        conn.execute('UPDATE app."SupportTickets" SET alt = ticket_no + 1000')
        conn.execute('CREATE UNIQUE INDEX ON app."SupportTickets" (alt)')
        conn.execute('ALTER TABLE app."SupportTickets" ALTER COLUMN alt SET NOT NULL')
    config = tickets_config(fake_openai.base_url)
    first = config.targets[0]
    second = dataclasses.replace(
        first, name="by-alt", table=TableName(None, "SupportTickets"), id_column="alt"
    )
    config = dataclasses.replace(config, targets=(first, second))
    url = f"{tickets} options=-csearch_path=app"
    with pytest.raises(ConfigError, match="different id columns") as caught:
        backfill(url, config)
    assert caught.value.exit_code == 2
    with pytest.raises(ConfigError, match="different id columns"):
        asyncio.run(astatus(config, Database(url)))
    assert fake_openai.requests == []
