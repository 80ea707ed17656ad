"""Hostile operator: configurations and URLs a careless user writes, against a real
PostgreSQL and a real local provider."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill, astatus
from embedfill.config import Config, parse_config
from embedfill.errors import ConfigError
from tests.support.fake_openai import FakeOpenAI

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
