"""Failed rows come back (issue 15, item 1): a watch sends a row that failed for a
passing cause again after a backoff, and at once when its tenant's key changes; only a
row whose text the provider rejected waits for its text to change. In-process watch, a
real PostgreSQL and the real test server."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import psycopg

from embedfill import Database, astatus
from embedfill.config import EngineConfig
from embedfill.http.metrics import Metrics
from embedfill.keys import new_master_key
from tests.integration.test_watch import ENV, Running, nulls, wait_for
from tests.support.fake_openai import FakeOpenAI, Fault
from tests.support.keys import store_key
from tests.support.tables import tickets_config

T = 'app."SupportTickets"'


def config_for(base_url: str, *, retry_s: int, retry_max_s: int = 3600, **provider: Any) -> Any:
    config = tickets_config(
        base_url, provider_overrides={"max_attempts": 1, "batch_size": 5, **provider}
    )
    return dataclasses.replace(
        config,
        engine=EngineConfig(
            chunk_rows=50, lease_s=5, retry_failed_s=retry_s, retry_failed_max_s=retry_max_s
        ),
    )


def failures(db_url: str) -> list[tuple[str, str | None, bool]]:
    """(error class, tenant, waits for its text) of every failure recorded."""
    with psycopg.connect(db_url) as conn:
        if conn.execute("SELECT to_regclass('embedfill.failures')").fetchone() == (None,):
            return []  # the watch has not made embedfill's schema yet
        rows = conn.execute(
            "SELECT error_class, tenant, retry_at IS NULL FROM embedfill.failures ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def running_config(running: Running) -> Any:
    return running.watches[0].config


def test_rows_that_failed_in_a_provider_outage_are_filled_once_it_is_over(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """The provider answers 503 for a while: the rows that failed meanwhile stayed NULL
    for as long as the watch ran; they are sent again after their backoff."""
    fake_openai.faults = [Fault(503) for _ in range(10_000)]
    running = Running(
        tickets, config_for(fake_openai.base_url, retry_s=1), interval_s=0.3, sweep_interval_s=1
    )
    wait_for(lambda: len(failures(tickets)) >= 10, timeout=60)
    assert {f[0] for f in failures(tickets)} <= {"ProviderUnavailable"}
    assert not any(waits for *_, waits in failures(tickets))
    fake_openai.faults.clear()  # the outage is over
    wait_for(lambda: nulls(tickets, T) == 0, timeout=60)
    running.stop()


def test_a_failed_rows_wait_doubles_with_each_try_up_to_the_most(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A provider that never comes back: each row waits retry_failed_s after its first
    failure, then twice as long after each next one, never more than retry_failed_max_s
    (here 1 s doubling to at most 4 s, as 60 s doubles to an hour by default)."""
    # 429s: failed at once (a 5xx first hands the chunk to another worker, for a lease)
    fake_openai.faults = [Fault(429) for _ in range(100_000)]
    running = Running(
        tickets,
        config_for(fake_openai.base_url, retry_s=1, retry_max_s=4),
        interval_s=0.3,
        sweep_interval_s=1,
    )

    def waits() -> list[tuple[int, float]]:
        with psycopg.connect(tickets) as conn:
            if conn.execute("SELECT to_regclass('embedfill.failures')").fetchone() == (None,):
                return []
            rows = conn.execute(
                "SELECT tries, extract(epoch FROM retry_at - created_at)::float8"
                " FROM embedfill.failures"
            ).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]

    seen: set[tuple[int, float]] = set()  # (tries, wait) as they went by

    def tried_five_times() -> bool:
        now = waits()
        seen.update((tries, round(wait, 2)) for tries, wait in now)
        return any(tries >= 5 for tries, _ in now)

    try:
        wait_for(tried_five_times, timeout=90)
    finally:
        running.stop()
    for tries, wait in seen:
        assert abs(wait - min(4.0, 2.0 ** (tries - 1))) < 0.02, (tries, wait)
    assert {1, 2, 3, 4, 5} <= {tries for tries, _ in seen}, seen


def test_a_tenants_key_fixed_with_keys_set_fills_its_rows_at_once(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A revoked key, then the fix users make most (`keys set`): the tenant's rows are
    sent again at once, not after their backoff (an hour here), and not only once the
    watch restarts."""
    env = ENV | {"EMBEDFILL_MASTER_KEY": new_master_key()}
    fake_openai.bad_keys = {"sk-acme-revoked-000000"}
    store_key(tickets, "org-a", "sk-acme-revoked-000000", env)
    running = Running(
        tickets, config_for(fake_openai.base_url, retry_s=3600), env=env, interval_s=0.3
    )
    with psycopg.connect(tickets) as conn:
        acme = conn.execute(f"SELECT count(*) FROM {T} WHERE org = 'org-a' AND emb IS NULL")
        acme_nulls = acme.fetchone()
    assert acme_nulls is not None and acme_nulls[0] > 0
    wait_for(lambda: nulls(tickets, T) == acme_nulls[0], timeout=60)  # the others filled
    wait_for(lambda: any(f[0] == "AuthFailed" for f in failures(tickets)))
    # status and /metrics say which rows fail, per tenant, and why
    status = asyncio.run(astatus(running_config(running), Database(tickets)))[0]
    assert status.failing == acme_nulls[0] and status.failing_errors == {
        "AuthFailed": acme_nulls[0]
    }
    assert {t.tenant: t.failing for t in status.tenants}["org-a"] == acme_nulls[0]
    metrics = Metrics()
    metrics.set_status(status, 0.0)
    assert (
        f'embedfill_failing_rows{{error_class="AuthFailed",target="tickets"}} '
        f"{float(acme_nulls[0])}" in metrics.render().decode()
    )
    store_key(tickets, "org-a", "sk-acme-fixed-11111111", env)
    wait_for(lambda: nulls(tickets, T) == 0, timeout=30)
    status = asyncio.run(astatus(running_config(running), Database(tickets)))[0]
    assert status.failing == 0 and status.failing_errors == {}
    metrics.set_status(status, 1.0)
    assert 'embedfill_failing_rows{error_class="AuthFailed",target="tickets"} 0.0' in (
        metrics.render().decode()
    )
    assert "sk-acme-fixed-11111111" in fake_openai.texts_by_key()
    running.stop()


def test_a_tenant_key_sql_answer_fixed_in_the_apps_table_fills_its_rows_at_once(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("INSERT INTO app.org_settings VALUES ('org-a', 'sk-acme-revoked-000000')")
    fake_openai.bad_keys = {"sk-acme-revoked-000000"}
    config = config_for(fake_openai.base_url, retry_s=3600)
    target = dataclasses.replace(
        config.targets[0],
        tenant_key_sql="select api_key from app.org_settings where org = %(tenant)s",
    )
    config = dataclasses.replace(config, targets=(target,))
    running = Running(tickets, config, interval_s=0.3)
    wait_for(lambda: any(f[0] == "AuthFailed" for f in failures(tickets)), timeout=60)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("UPDATE app.org_settings SET api_key = 'sk-acme-fixed-2222222'")
    wait_for(lambda: nulls(tickets, T) == 0, timeout=30)
    running.stop()


def test_a_row_whose_text_the_provider_rejects_waits_for_its_text_to_change(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {T} SET body = body || %s WHERE ticket_no = 1", (fake_openai.bad_marker,)
        )
    running = Running(
        tickets, config_for(fake_openai.base_url, retry_s=1), interval_s=0.3, sweep_interval_s=1
    )
    wait_for(lambda: nulls(tickets, T) == 1, timeout=60)
    wait_for(lambda: [f[0] for f in failures(tickets)] == ["BadInput"])
    assert failures(tickets)[0][2]  # it waits for its text
    sent = sum(fake_openai.bad_marker in t for r in fake_openai.requests for t in r.inputs)
    time.sleep(3)  # three backoffs of a passing cause: it is not sent again
    again = sum(fake_openai.bad_marker in t for r in fake_openai.requests for t in r.inputs)
    assert again == sent
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = 'fixed' WHERE ticket_no = 1")
    wait_for(lambda: nulls(tickets, T) == 0, timeout=30)
    running.stop()


def _insert(db_url: str, lo: int, hi: int) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {T} (ticket_no, org, subject, body) SELECT i, 'org-b', 'new ' || i,"
            " 'body ' || i FROM generate_series(%s::int, %s::int) i",
            (lo, hi),
        )


def test_rows_sent_while_the_provider_rejects_every_request_are_filled_after_it(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """The provider answered, then for a while answers 400 to every request (a gateway
    mid-deploy: "the model does not exist or you do not have access"), then answers
    again. The rows sent meanwhile were not rejected for their texts: they fail as
    ProviderRejectsAll (a passing cause) and are filled after their backoff, without a
    restart. Before (helper-31), the session's first success made every later 400 a
    bad input: bisected down to single rows, each waited for its text to change."""
    running = Running(
        tickets, config_for(fake_openai.base_url, retry_s=1), interval_s=0.3, sweep_interval_s=1
    )
    try:
        wait_for(lambda: nulls(tickets, T) == 0, timeout=60)
        fake_openai.reject_models = {"test-embed"}  # the incident starts
        _insert(tickets, 1001, 1010)
        wait_for(lambda: len(failures(tickets)) >= 1, timeout=30)
        assert {f[0] for f in failures(tickets)} == {"ProviderRejectsAll"}
        assert not any(f[2] for f in failures(tickets))  # none waits for its text
        [st] = asyncio.run(astatus(running_config(running), Database(tickets)))
        assert st.failing_errors.keys() == {"ProviderRejectsAll"}
        fake_openai.reject_models = set()  # it is over
        wait_for(lambda: nulls(tickets, T) == 0, timeout=30)
    finally:
        running.stop()
    assert running.watches[0].failed is None
    # no row of a batch in flight when it ended was taken for a bad input (helper-34)
    assert {f[0] for f in failures(tickets)} == {"ProviderRejectsAll"}


def test_a_backfill_meeting_an_incident_fails_its_rows_once_and_keeps_its_batch_size(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A backfill whose provider starts refusing every request after its first answer:
    its rows fail as ProviderRejectsAll (exit 3, sent again by the next run), the first
    batch is bisected once and the others fail at their first 400 with one probe each,
    and no batch size is learnt from it. Before the review (helper-34), both halves of
    each pair failing as an incident taught it a batch size of 1."""
    from embedfill import BackfillOptions, abackfill

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET emb = NULL")

    def incident(_: Any) -> None:
        fake_openai.reject_models.add("test-embed")

    fake_openai.on_inputs = incident  # after the first answer, every request is refused
    config = config_for(fake_openai.base_url, retry_s=1)
    report = asyncio.run(abackfill(config, Database(tickets), BackfillOptions(), env=ENV))
    assert report.embedded >= 5 and report.failed == nulls(tickets, T) > 0
    assert {f.error_class for f in report.failures} == {"ProviderRejectsAll"}
    assert not [w for w in report.warnings if "batch_size" in w]
    # the batches in flight when it began are bisected (a batch of 5: at most 9
    # requests and a probe each, 4 at once); each later one costs a request and a probe:
    # nowhere near a bisection of every batch
    batches = -(-report.failed // 5)
    assert report.requests <= 4 * 10 + 2 * batches + 2, (report.requests, batches)


def test_a_watch_outlives_a_provider_that_rejects_every_request_from_its_first(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Everything is filled before the watch starts, so its worker's session has had no
    success yet when the provider starts rejecting every request (400, the probe's one
    word too). In a backfill that is a config error (exit 2); a watch, left running,
    fails the rows for a later try and goes on watching. Before (helper-31), its job
    failed and the target was never watched again."""
    from embedfill import BackfillOptions, abackfill

    config = config_for(fake_openai.base_url, retry_s=1)
    asyncio.run(abackfill(config, Database(tickets), BackfillOptions(), env=ENV))
    running = Running(tickets, config, interval_s=0.3, sweep_interval_s=1)
    try:
        wait_for(lambda: bool(running.watches) and running.watches[0].job_id is not None)
        time.sleep(1)
        fake_openai.reject_models = {"test-embed"}
        _insert(tickets, 2001, 2001)
        wait_for(lambda: [f[0] for f in failures(tickets)] == ["ProviderRejectsAll"], 30)
        fake_openai.reject_models = set()
        wait_for(lambda: nulls(tickets, T) == 0, timeout=30)
        assert running.watches[0].failed is None
    finally:
        running.stop()


def test_a_provider_answering_another_size_for_a_while_fails_rows_not_the_watch(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A misrouted proxy answers 16-dimensional vectors to an 8-d column for a while:
    nothing of those batches is written, their rows fail as VectorsMisfit, and once the
    right size comes back they are filled, without a restart. Before (helper-31), the
    session halted, the watch job failed and the target stopped being watched."""
    running = Running(
        tickets, config_for(fake_openai.base_url, retry_s=1), interval_s=0.3, sweep_interval_s=1
    )
    try:
        wait_for(lambda: nulls(tickets, T) == 0, timeout=60)
        fake_openai.dims_override = 16
        _insert(tickets, 4001, 4005)
        wait_for(lambda: "VectorsMisfit" in [f[0] for f in failures(tickets)], timeout=30)
        assert nulls(tickets, T) == 5  # nothing of the wrong size was written
        fake_openai.dims_override = None
        wait_for(lambda: nulls(tickets, T) == 0, timeout=30)
        assert running.watches[0].failed is None
    finally:
        running.stop()


def test_a_failed_row_the_app_deleted_fails_no_more(tickets: str, fake_openai: FakeOpenAI) -> None:
    """``status``'s ``failing`` (and ``embedfill_failing_rows``) counts rows that are
    there: a row that failed and that the app then deleted is not one. Before
    (helper-31), it counted for as long as the watch job ran."""
    from embedfill import BackfillOptions, abackfill

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {T} SET body = body || %s WHERE ticket_no = 1", (fake_openai.bad_marker,)
        )
    config = config_for(fake_openai.base_url, retry_s=1)
    asyncio.run(abackfill(config, Database(tickets), BackfillOptions(), env=ENV))
    [before] = asyncio.run(astatus(config, Database(tickets)))
    assert (before.failing, before.failing_errors) == (1, {"BadInput": 1})
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"DELETE FROM {T} WHERE ticket_no = 1")
    [after] = asyncio.run(astatus(config, Database(tickets)))
    assert (after.failing, after.failing_errors, after.missing) == (0, {}, 0)
    assert {t.tenant: t.failing for t in after.tenants if t.failing} == {}


def test_a_later_run_of_another_tenant_leaves_a_tenants_failed_rows_failing(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Rows failing are those of any job of the column not written since: a later run of
    one tenant (or with --limit) does not make another tenant's failed rows good. Before
    (helper-33), status counted the latest job's failures only, and a run of another
    tenant at 3 a.m. hid the first tenant's broken rows."""
    from embedfill import BackfillOptions, abackfill

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {T} SET body = body || %s WHERE ticket_no = 1", (fake_openai.bad_marker,)
        )
        (tenant,) = conn.execute(f"SELECT org FROM {T} WHERE ticket_no = 1").fetchone()
        conn.execute(f"UPDATE {T} SET emb = NULL WHERE org <> %s", (tenant,))
    config = config_for(fake_openai.base_url, retry_s=1)
    asyncio.run(abackfill(config, Database(tickets), BackfillOptions(tenants=[tenant]), env=ENV))
    [before] = asyncio.run(astatus(config, Database(tickets)))
    assert before.failing == 1
    other = "org-b" if tenant != "org-b" else "org-c"
    asyncio.run(abackfill(config, Database(tickets), BackfillOptions(tenants=[other]), env=ENV))
    [after] = asyncio.run(astatus(config, Database(tickets)))
    assert (after.failing, after.failing_errors) == (1, {"BadInput": 1})
    assert {t.tenant: t.failing for t in after.tenants if t.failing} == {tenant: 1}


def test_failures_record_no_key(tickets: str, fake_openai: FakeOpenAI) -> None:
    """What is recorded to tell keys apart is a digest: no key, nor a part of one."""
    env = ENV | {"EMBEDFILL_MASTER_KEY": new_master_key()}
    fake_openai.bad_keys = {"sk-acme-revoked-SECRETPART"}
    store_key(tickets, "org-a", "sk-acme-revoked-SECRETPART", env)
    running = Running(tickets, config_for(fake_openai.base_url, retry_s=3600), env=env)
    wait_for(lambda: any(f[0] == "AuthFailed" for f in failures(tickets)), timeout=60)
    running.stop()
    with psycopg.connect(tickets) as conn:
        dumped = conn.execute("SELECT f::text FROM embedfill.failures f").fetchall()
    assert dumped and not any("SECRETPART" in r[0] or "revoked" in r[0] for r in dumped)


def test_a_fixed_key_sends_the_tenants_edited_rows_at_once_too(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """An edited row (stale, not NULL) of a tenant whose key was revoked fails; the key
    fixed, it went again only at the next sweep (minutes: an hour here), while the
    NULL ones went at once. Both go at once now."""
    from embedfill import BackfillOptions, abackfill

    env = ENV | {"EMBEDFILL_MASTER_KEY": new_master_key()}
    store_key(tickets, "org-a", "sk-acme-good-00000000", env)
    config = config_for(fake_openai.base_url, retry_s=3600)
    asyncio.run(abackfill(config, Database(tickets), BackfillOptions(), env=env))
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {T} SET subject = subject || ' (edited)' WHERE ticket_no ="
            f" (SELECT min(ticket_no) FROM {T} WHERE org = 'org-a')"
        )
    stale = lambda: asyncio.run(astatus(config, Database(tickets)))[0].stale  # noqa: E731
    assert stale() == 1
    fake_openai.bad_keys = {"sk-acme-good-00000000"}  # revoked
    running = Running(tickets, config, env=env, interval_s=0.3, sweep_interval_s=3600)
    wait_for(lambda: any(f[0] == "AuthFailed" for f in failures(tickets)), timeout=60)
    assert stale() == 1
    store_key(tickets, "org-a", "sk-acme-fixed-22222222", env)
    wait_for(lambda: stale() == 0, timeout=30)
    assert "sk-acme-fixed-22222222" in fake_openai.texts_by_key()
    running.stop()
