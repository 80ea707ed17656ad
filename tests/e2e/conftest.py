"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import psycopg
import pytest

from tests.support.tables import make_tickets

BIG_ROWS = 400  # 300 NULL (every 4th row is filled already)


@pytest.fixture
def big(db_url: str) -> str:
    """A database with app."SupportTickets" of 400 rows, 300 of them NULL."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn, rows=BIG_ROWS)
    return db_url
