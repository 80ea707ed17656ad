"""Hostile operator: configurations and URLs a careless user writes, against a real
PostgreSQL and a real local provider."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill, astatus
from embedfill.config import Config, parse_config
from embedfill.db.schema import amigrate
from embedfill.errors import ConfigError
from tests.support.fake_openai import FakeOpenAI
from tests.support.roles import EMBEDFILL_GRANTS, Roles
from tests.support.tables import snapshot

PLATFORM = "sk-platform-attack-0123456789"

# a text_sql that closes the check's SELECT and smuggles in a second statement
SMUGGLED = (
    'subject) FROM app."SupportTickets" AS t LIMIT 0; DELETE FROM app.victim; SELECT (subject'
)


def config_with(base_url: str, **target: Any) -> Config:
    """The tickets target with some of its keys replaced (None removes one)."""
    doc: dict[str, Any] = {
        "providers": {
            "openai": {
                "kind": "openai",
                "model": "test-embed",
                "dimensions": 8,
                "base_url": base_url,
                "api_key_env": "TEST_PLATFORM_KEY",
                "batch_size": 5,
                "timeout_s": 2,
            }
        },
        "targets": [
            {
                "name": "tickets",
                "table": "app.SupportTickets",
                "id_column": "ticket_no",
                "text": "{subject}\n\n{body}",
                "embedding_column": "emb",
                "tenant_column": "org",
                "provider": "openai",
            }
        ],
    }
    for key, value in target.items():
        if value is None:
            doc["targets"][0].pop(key, None)
        else:
            doc["targets"][0][key] = value
    return parse_config(doc)


@pytest.fixture
def victim(tickets: str) -> str:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("CREATE TABLE app.victim (x int)")
        conn.execute("INSERT INTO app.victim VALUES (1)")
    return tickets


def victim_rows(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM app.victim").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("dry_run", [True, False])
def test_text_sql_never_runs_a_second_statement(
    victim: str, fake_openai: FakeOpenAI, dry_run: bool
) -> None:
    config = config_with(fake_openai.base_url, text=None, text_sql=SMUGGLED)
    with pytest.raises(ConfigError, match=r"text_sql of target 'tickets'"):
        asyncio.run(
            abackfill(
                config,
                Database(victim),
                BackfillOptions(dry_run=dry_run),
                env={"TEST_PLATFORM_KEY": PLATFORM},
            )
        )
    with pytest.raises(ConfigError, match=r"text_sql of target 'tickets'"):
        asyncio.run(astatus(config, Database(victim)))
    assert victim_rows(victim) == 1


def run_as(url: str, config: Config, **opts: Any) -> Any:
    env = {"TEST_PLATFORM_KEY": PLATFORM}
    return asyncio.run(abackfill(config, Database(url), BackfillOptions(**opts), env=env))


def test_a_role_that_may_not_read_the_table_is_told_the_grant(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create()
    roles.grant(app_rw, *EMBEDFILL_GRANTS, "GRANT USAGE ON SCHEMA app TO {role}")
    config = config_with(fake_openai.base_url)
    with pytest.raises(ConfigError) as info:
        asyncio.run(astatus(config, Database(roles.url(app_rw))))
    assert str(info.value) == (
        f"Role {app_rw} may not SELECT column 'ticket_no' of app.SupportTickets; grant it as "
        f'the table\'s owner: GRANT SELECT, UPDATE ON "app"."SupportTickets" TO "{app_rw}".'
    )


def test_a_role_that_may_not_write_the_column_stops_before_paying_the_provider(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create()
    roles.grant(
        app_rw,
        *EMBEDFILL_GRANTS,
        "GRANT USAGE ON SCHEMA app TO {role}",
        'GRANT SELECT ON app."SupportTickets" TO {role}',
        'GRANT UPDATE (subject) ON app."SupportTickets" TO {role}',
    )
    config = config_with(fake_openai.base_url)
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)

    plan = run_as(roles.url(app_rw), config, dry_run=True)  # reading is enough to plan
    assert plan.missing_before == 45
    with pytest.raises(ConfigError) as info:
        run_as(roles.url(app_rw), config)

    assert str(info.value) == (
        f"Role {app_rw} may not UPDATE column 'emb' of app.SupportTickets; grant it as "
        f'the table\'s owner: GRANT SELECT, UPDATE ON "app"."SupportTickets" TO "{app_rw}".'
    )
    assert info.value.exit_code == 2
    assert fake_openai.requests == []  # nothing paid for
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before
