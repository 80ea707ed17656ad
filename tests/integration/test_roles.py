"""Real roles with real privileges: a DML-only role runs backfills, migrating embedfill's
schema is explicit, and a server without free connections gets a clear message."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill
from embedfill.db.schema import EXPECTED_VERSION, amigrate
from embedfill.errors import ConfigError, DatabaseError
from tests.support.fake_openai import FakeOpenAI
from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS, Roles
from tests.support.schema import undo_0007
from tests.support.tables import snapshot, tickets_config

PLATFORM = "sk-platform-roles-0123456789"


def run(url: str, config: Any, **opts: Any) -> Any:
    return asyncio.run(
        abackfill(
            config, Database(url), BackfillOptions(**opts), env={"TEST_PLATFORM_KEY": PLATFORM}
        )
    )


def schema_state(db_url: str) -> tuple[bool, int | None]:
    with psycopg.connect(db_url) as conn:
        exists = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'embedfill')"
        ).fetchone()
        version = None
        if conn.execute("SELECT to_regclass('embedfill.schema_version')").fetchone()[0]:
            version = conn.execute("SELECT max(version) FROM embedfill.schema_version").fetchone()[
                0
            ]
    assert exists is not None
    return bool(exists[0]), version


def set_back_to_version_1(db_url: str) -> None:
    """As if this database had been migrated by the previous release."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM embedfill.schema_version WHERE version >= 2")
        conn.execute("DROP TABLE embedfill.model_migrations, embedfill.active_models")  # 9
        conn.execute("DROP TABLE IF EXISTS embedfill.rate_budgets")
        undo_0007(conn)  # job specs, leases, rings, tallies (version 7)
        conn.execute(  # provenance (version 6)
            "DROP TABLE embedfill.provenance, embedfill.models, embedfill.vector_columns,"
            " embedfill.changes"
        )
        conn.execute("DROP TABLE embedfill.chunks, embedfill.workers")
        conn.execute(  # procrastinate's queue (version 5)
            """DO $$ DECLARE o record; BEGIN
            FOR o IN SELECT p.oid::regprocedure AS f FROM pg_proc p
                JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'embedfill' AND p.proname LIKE 'procrastinate%' LOOP
                EXECUTE format('DROP FUNCTION %s CASCADE', o.f); END LOOP;
            DROP TABLE embedfill.procrastinate_events, embedfill.procrastinate_periodic_defers,
                embedfill.procrastinate_jobs, embedfill.procrastinate_workers;
            DROP TYPE embedfill.procrastinate_job_status, embedfill.procrastinate_job_event_type,
                embedfill.procrastinate_job_to_defer_v1;
            END $$"""
        )
        conn.execute("DROP INDEX embedfill.runs_physical_active")
        conn.execute(
            "ALTER TABLE embedfill.runs DROP COLUMN cancel_requested,"
            " DROP COLUMN table_oid, DROP COLUMN column_name"
        )


def test_a_dml_only_role_runs_a_backfill_once_the_schema_exists(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    assert asyncio.run(amigrate(Database(tickets))) == (None, EXPECTED_VERSION)
    app_rw = roles.create()
    roles.grant(app_rw, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)

    report = run(roles.url(app_rw), tickets_config(fake_openai.base_url))

    assert report.status == "succeeded" and report.embedded == 45 and report.failed == 0
    with psycopg.connect(tickets) as conn:
        assert all(v is not None for v in snapshot(conn).values())
        actor = conn.execute("SELECT status FROM embedfill.runs").fetchall()
    assert actor == [("succeeded",)]


def test_a_dml_only_role_without_the_schema_is_told_what_to_run(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    app_rw = roles.create()
    roles.grant(app_rw, *TICKETS_GRANTS)
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)

    with pytest.raises(ConfigError) as info:
        run(roles.url(app_rw), tickets_config(fake_openai.base_url))

    msg = str(info.value)
    assert "embedfill's schema is missing" in msg
    assert f"role {app_rw} may not create it" in msg
    assert "CREATE on database" in msg and "`embedfill migrate`" in msg
    assert info.value.exit_code == 2
    assert schema_state(tickets) == (False, None)
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before
    assert fake_openai.requests == []


def test_a_dml_only_role_on_an_old_schema_is_told_to_migrate(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    asyncio.run(amigrate(Database(tickets)))
    set_back_to_version_1(tickets)
    app_rw = roles.create()
    # the GRANTs of version 1's README: migrating copies them to the tables added since
    roles.grant(app_rw, *EMBEDFILL_GRANTS[:3], *TICKETS_GRANTS)

    with pytest.raises(ConfigError) as info:
        run(roles.url(app_rw), tickets_config(fake_openai.base_url))

    msg = str(info.value)
    assert f"at version 1, this build needs {EXPECTED_VERSION}" in msg
    assert f"role {app_rw} may not migrate it" in msg and "`embedfill migrate`" in msg
    assert schema_state(tickets) == (True, 1)

    # the owner migrates once; then the same role runs
    assert asyncio.run(amigrate(Database(tickets))) == (1, EXPECTED_VERSION)
    assert run(roles.url(app_rw), tickets_config(fake_openai.base_url)).embedded == 45
    # and reads the changes of model (workers and watch look for them; the app reads
    # which vectors are active): their grants were copied to the tables added since
    with psycopg.connect(roles.url(app_rw)) as conn:
        conn.execute("SELECT count(*) FROM embedfill.model_migrations").fetchone()
        conn.execute("SELECT count(*) FROM embedfill.active_models").fetchone()


def test_a_role_that_may_create_the_schema_still_gets_it_on_first_use(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    assert run(tickets, tickets_config(fake_openai.base_url)).embedded == 45
    assert schema_state(tickets) == (True, EXPECTED_VERSION)


def test_migrate_as_a_role_that_may_not_names_the_privilege(tickets: str, roles: Roles) -> None:
    app_rw = roles.create()
    with pytest.raises(ConfigError) as info:
        asyncio.run(amigrate(Database(roles.url(app_rw))))
    msg = str(info.value)
    assert f"role {app_rw} may not create it" in msg and "CREATE on database" in msg
    assert schema_state(tickets) == (False, None)


def test_more_writers_than_free_connections_is_a_clear_message(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create(connection_limit=3)  # fewer than a worker with 4 writers needs
    roles.grant(app_rw, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    config = tickets_config(fake_openai.base_url)
    config = replace(config, engine=replace(config.engine, write_concurrency=4))
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)

    with pytest.raises(DatabaseError) as info:
        run(roles.url(app_rw), config)

    msg = str(info.value)
    assert "no free connection" in msg and "max_connections" in msg
    assert "check DATABASE_URL" not in msg
    assert fake_openai.requests == []
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before


def test_connection_limit_in_the_url_keeps_a_run_within_it(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create(connection_limit=3)  # the server refuses a fourth
    roles.grant(app_rw, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    config = tickets_config(fake_openai.base_url)
    config = replace(config, engine=replace(config.engine, write_concurrency=4))

    # a backfill of three connections: its worker's control one (liveness lock, job
    # queue, claims, audit trail), its table lane (reads, and writes), one writer lane
    report = run(roles.url(app_rw, query="connection_limit=3"), config)

    assert report.status == "succeeded" and report.embedded == 45


def test_the_defaults_use_three_connections(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    """No connection_limit, default engine settings, a role the server holds to 3."""
    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create(connection_limit=3)
    roles.grant(app_rw, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    report = run(roles.url(app_rw), tickets_config(fake_openai.base_url))
    assert report.status == "succeeded" and report.embedded == 45


def test_connection_limit_2_works(tickets: str, roles: Roles, fake_openai: FakeOpenAI) -> None:
    """Two connections: the control one and the table lane, which reads and writes."""
    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create(connection_limit=2)
    roles.grant(app_rw, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    config = tickets_config(fake_openai.base_url)
    config = replace(config, engine=replace(config.engine, write_concurrency=4))
    report = run(roles.url(app_rw, query="connection_limit=2"), config)
    assert report.status == "succeeded" and report.embedded == 45
    with psycopg.connect(tickets) as conn:
        left = conn.execute('SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL')
        assert left.fetchone() == (0,)


def test_a_prisma_url_with_connection_limit_5_works(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    """A Prisma app's URL as it is (`connection_limit=5`), at the defaults, as a role
    the server holds to five connections."""
    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create(connection_limit=5)
    roles.grant(app_rw, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    report = run(
        roles.url(app_rw, query="connection_limit=5&schema=public"),
        tickets_config(fake_openai.base_url),
    )
    assert report.status == "succeeded" and report.embedded == 45


def test_a_connection_limit_too_low_for_a_worker_is_refused_before_anything_is_written(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    from embedfill import ConfigError

    asyncio.run(amigrate(Database(tickets)))
    app_rw = roles.create()
    roles.grant(app_rw, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    with pytest.raises(ConfigError) as info:
        run(roles.url(app_rw, query="connection_limit=1"), tickets_config(fake_openai.base_url))
    assert "connection_limit=1 in DATABASE_URL is too low" in str(info.value)
    assert "set connection_limit=2 or more." in str(info.value)
    assert fake_openai.requests == []
    with psycopg.connect(tickets) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.runs").fetchone() == (0,)
