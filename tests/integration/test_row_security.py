"""Row-level security on a target (issue 15, item 6): a role the policies hide rows from
is refused at start-up in one sentence, exit 2, never "0 missing" over hidden rows; a
role that bypasses them works; a policy that appears while a job runs fails the job's
reads instead of filtering them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill, astatus
from embedfill.db.schema import amigrate
from embedfill.errors import RowSecurityHides
from tests.support.fake_openai import FakeOpenAI
from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS, Roles
from tests.support.tables import tickets_config

PLATFORM = "sk-platform-rls-0123456789"


def run(url: str, config: Any, **opts: Any) -> Any:
    return asyncio.run(
        abackfill(
            config, Database(url), BackfillOptions(**opts), env={"TEST_PLATFORM_KEY": PLATFORM}
        )
    )


def nulls(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute('SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL').fetchone()
    assert row is not None
    return int(row[0])


def at_first_request(db_url: str, statement: str) -> Callable[[list[str]], None]:
    """A hook for the test provider: run ``statement`` when the first request arrives,
    before it is answered (a change made under a running job)."""
    done = False

    def on_inputs(_: list[str]) -> None:
        nonlocal done
        if not done:
            done = True
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(statement.encode())

    return on_inputs


def only_acme(db_url: str, *, force: bool = False) -> None:
    """The app's tenant isolation: each session sees the tenant it set, none by default."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" ENABLE ROW LEVEL SECURITY')
        if force:
            conn.execute('ALTER TABLE app."SupportTickets" FORCE ROW LEVEL SECURITY')
        conn.execute(
            'CREATE POLICY tenant ON app."SupportTickets"'
            " USING (org = current_setting('app.tenant', true))"
        )


@pytest.fixture
def app_rw(tickets: str, roles: Roles) -> str:
    asyncio.run(amigrate(Database(tickets)))
    role = roles.create()
    roles.grant(role, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    return role


def test_a_role_the_policies_hide_rows_from_is_refused(
    tickets: str, roles: Roles, app_rw: str, fake_openai: FakeOpenAI
) -> None:
    only_acme(tickets)
    before = nulls(tickets)
    url = roles.url(app_rw)
    config = tickets_config(fake_openai.base_url)
    for attempt in (
        lambda: run(url, config),
        lambda: run(url, config, dry_run=True),
        lambda: asyncio.run(astatus(config, Database(url))),
    ):
        with pytest.raises(RowSecurityHides) as caught:
            attempt()
        message = str(caught.value)
        assert message.count(". ") == 0 and message.endswith(".")
        assert "Row-level security on app.SupportTickets" in message
        assert f'ALTER ROLE "{app_rw}" BYPASSRLS' in message or app_rw in message
        assert caught.value.exit_code == 2
    assert nulls(tickets) == before
    assert fake_openai.ok_requests() == []

    # the fix the sentence names
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{app_rw}" BYPASSRLS')
    report = run(url, config)
    assert report.embedded == before and nulls(tickets) == 0


def test_force_row_level_security_binds_the_owner_too(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    owner = roles.create()
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE app."SupportTickets" OWNER TO "{owner}"')
        conn.execute(f'GRANT USAGE ON SCHEMA app TO "{owner}"')
    asyncio.run(amigrate(Database(tickets)))
    roles.grant(owner, *EMBEDFILL_GRANTS)
    config = tickets_config(fake_openai.base_url)
    only_acme(tickets)  # the owner bypasses it: works
    assert run(roles.url(owner), config).embedded > 0

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('UPDATE app."SupportTickets" SET emb = NULL WHERE ticket_no < 10')
        conn.execute('ALTER TABLE app."SupportTickets" FORCE ROW LEVEL SECURITY')
    with pytest.raises(RowSecurityHides, match="FORCE ROW LEVEL SECURITY"):
        run(roles.url(owner), config)


def test_a_policy_added_under_a_running_job_fails_its_reads_not_filters_them(
    tickets: str, roles: Roles, app_rw: str, fake_openai: FakeOpenAI
) -> None:
    """Row-level security enabled once the job runs: the job fails, saying so (a worker
    session's own start-up check, or a statement refused under embedfill's
    ``row_security = off``), rather than skipping the rows it no longer sees."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            'CREATE POLICY tenant ON app."SupportTickets"'
            " USING (org = current_setting('app.tenant', true))"
        )
    fake_openai.latency = 0.2
    fake_openai.on_inputs = at_first_request(
        tickets, 'ALTER TABLE app."SupportTickets" ENABLE ROW LEVEL SECURITY'
    )
    report = None
    config = tickets_config(fake_openai.base_url, provider_overrides={"batch_size": 5})
    with pytest.raises(Exception) as caught:  # the job's failure, whatever its class
        report = run(roles.url(app_rw), config)
    assert report is None
    assert "row-level security" in str(caught.value).lower()


def test_a_privilege_revoked_mid_run_halts_it_instead_of_paying_for_every_row(
    tickets: str, roles: Roles, app_rw: str, fake_openai: FakeOpenAI
) -> None:
    """Issue 15, item 9, found by review: a refusal that every row meets (UPDATE revoked
    under the run) fails the batch and halts the run, rather than bisecting each batch
    and sending the rest to the provider for nothing."""
    fake_openai.on_inputs = at_first_request(
        tickets, f'REVOKE UPDATE ON app."SupportTickets" FROM "{app_rw}"'
    )
    config = tickets_config(
        fake_openai.base_url, provider_overrides={"batch_size": 5, "max_concurrency": 1}
    )
    with pytest.raises(Exception, match=r"refused to write the vectors|may not UPDATE") as caught:
        run(roles.url(app_rw), config)
    assert getattr(caught.value, "exit_code", None) in (2, 3)
    assert len(fake_openai.ok_requests()) <= 3  # 9 batches of 5 rows: the rest never sent


def test_a_policy_added_under_a_watch_ends_its_job_failed_with_the_reason(
    tickets: str, roles: Roles, app_rw: str, fake_openai: FakeOpenAI
) -> None:
    """The watch stops, naming row-level security, and its job ends `failed` with that
    reason: it stayed `running` for ever, and a backfill was then refused because "a
    watch keeps the column" while no watch ran."""
    from tests.integration.test_watch import Running, wait_for

    url = roles.url(app_rw)
    running = Running(
        url,
        tickets_config(fake_openai.base_url),
        env={"TEST_PLATFORM_KEY": PLATFORM},
        interval_s=0.3,
    )
    wait_for(lambda: nulls(tickets) == 0)
    only_acme(tickets)
    running.thread.join(30)
    assert not running.thread.is_alive(), "the watch went on over hidden rows"
    assert running.error is not None and "Row-level security" in str(running.error)
    with psycopg.connect(tickets) as conn:
        job = conn.execute(
            "SELECT status, error FROM embedfill.runs WHERE kind = 'watch' ORDER BY id DESC"
        ).fetchone()
    assert job is not None and job[0] == "failed", job
    assert "Row-level security" in job[1]
