"""Test tables shaped like the README's example: app."SupportTickets" with tenants."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from embedfill.config import Config, parse_config
from embedfill.providers.hashing import hash_vector

TENANTS = ("org-a", "org-b", "org-c")


def ticket_text(i: int) -> tuple[str, str]:
    return (
        f"Ticket {i}: cannot export report",
        f"Customer {i % 17} says the CSV export of "
        f"dashboard {i % 5} times out after {i % 60} seconds.",
    )


def make_tickets(
    conn: psycopg.Connection[Any],
    *,
    rows: int = 60,
    filled_every: int = 4,
    dims: int = 8,
) -> None:
    """Rows 1..rows over three tenants; every ``filled_every``-th row already has a vector
    (a stale, arbitrary one), the rest are NULL."""
    register_vector(conn)
    conn.execute("CREATE SCHEMA app")
    conn.execute(
        f'CREATE TABLE app."SupportTickets" (ticket_no bigint PRIMARY KEY, '
        f"org text NOT NULL, subject text, body text, emb vector({dims}))"
    )
    conn.execute("CREATE TABLE app.org_settings (org text PRIMARY KEY, api_key text)")
    with conn.cursor() as cur:
        for i in range(1, rows + 1):
            subject, body = ticket_text(i)
            emb = hash_vector(f"old {i}", dims) if i % filled_every == 0 else None
            cur.execute(
                'INSERT INTO app."SupportTickets" VALUES (%s, %s, %s, %s, %s)',
                (i, TENANTS[i % 3], subject, body, emb),
            )


def snapshot(conn: psycopg.Connection[Any]) -> dict[int, str | None]:
    rows = conn.execute('SELECT ticket_no, emb::text FROM app."SupportTickets"').fetchall()
    return {r[0]: r[1] for r in rows}


def stored_vectors(conn: psycopg.Connection[Any]) -> dict[int, np.ndarray | None]:
    register_vector(conn)
    rows = conn.execute('SELECT ticket_no, emb FROM app."SupportTickets"').fetchall()
    return {r[0]: None if r[1] is None else r[1].to_numpy() for r in rows}


def provider_settings(base_url: str, dims: int = 8, **overrides: Any) -> dict[str, Any]:
    """The provider settings every test config uses: the fake server, a platform key."""
    return {
        "kind": "openai",
        "model": "test-embed",
        "dimensions": dims,
        "base_url": base_url,
        "api_key_env": "TEST_PLATFORM_KEY",
        "batch_size": 5,
        "max_concurrency": 3,
        "timeout_s": 2,
        "max_attempts": 4,
    } | overrides


def tickets_config(
    base_url: str, dims: int = 8, providers: dict[str, Any] | None = None, **target: Any
) -> Config:
    """The tickets target on provider section "openai" (the test server), and any other
    ``providers`` sections (a change of model's, say)."""
    provider = provider_settings(base_url, dims)
    provider |= target.pop("provider_overrides", {})
    return parse_config(
        {
            "providers": {"openai": provider, **(providers or {})},
            "targets": [
                {
                    "name": "tickets",
                    "table": "app.SupportTickets",
                    "id_column": "ticket_no",
                    "text": "{subject}\n\n{body}",
                    "embedding_column": "emb",
                    "tenant_column": "org",
                    "provider": "openai",
                    **target,
                }
            ],
        }
    )
