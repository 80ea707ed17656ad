"""The engine against a real PostgreSQL and a real local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill
from embedfill.config import render_text
from embedfill.errors import SchemaMismatch
from embedfill.providers.hashing import hash_vector
from tests.support.fake_openai import FakeOpenAI, Fault
from tests.support.tables import TENANTS, snapshot, stored_vectors, tickets_config

PLATFORM = "sk-platform-0123456789abcdef"


def run(db_url: str, config: Any, env: dict[str, str] | None = None, **opts: Any) -> Any:
    env = {"TEST_PLATFORM_KEY": PLATFORM} if env is None else env
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(**opts), env=env))


def expected_text(i: int) -> str:
    from tests.support.tables import ticket_text

    subject, body = ticket_text(i)
    return render_text("{subject}\n\n{body}", {"subject": subject, "body": body})


def test_every_null_row_gets_the_providers_vector_and_others_are_untouched(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    report = run(tickets, tickets_config(fake_openai.base_url))

    assert report.status == "succeeded"
    assert report.missing_before == 45 and report.embedded == 45 and report.failed == 0
    with psycopg.connect(tickets) as conn:
        after = snapshot(conn)
        vectors = stored_vectors(conn)
    for i, old in before.items():
        if old is not None:
            assert after[i] == old, f"row {i} was not NULL and must not change"
        else:
            np.testing.assert_array_equal(vectors[i], hash_vector(expected_text(i), 8))
    # batches never exceed batch_size and never mix tenants
    tenant_of = {expected_text(i): TENANTS[i % 3] for i in before}
    for req in fake_openai.ok_requests():
        assert 1 <= len(req.inputs) <= 5
        assert len({tenant_of[t] for t in req.inputs}) == 1
    assert sum(t.embedded for t in report.tenants) == 45


def test_each_tenant_pays_with_its_own_key_or_the_platform_key(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("INSERT INTO app.org_settings VALUES ('org-a', 'sk-tenant-a-aaaaaaaa')")
    config = tickets_config(
        fake_openai.base_url,
        tenant_key_sql="select api_key from app.org_settings where org = %(tenant)s",
    )
    report = run(tickets, config)

    by_key = fake_openai.texts_by_key()
    tenant_of = {expected_text(i): TENANTS[i % 3] for i in range(1, 61)}
    assert {tenant_of[t] for t in by_key["sk-tenant-a-aaaaaaaa"]} == {"org-a"}
    assert {tenant_of[t] for t in by_key[PLATFORM]} == {"org-b", "org-c"}
    sources = {t.tenant: t.key_source for t in report.tenants}
    assert sources == {"org-a": "tenant", "org-b": "platform", "org-c": "platform"}
    # the platform's owner pays for org-b and org-c: the report says so, once each
    billed = [w for w in report.warnings if "billed to the platform key" in w]
    assert len(billed) == 2 and all("TEST_PLATFORM_KEY" in w for w in billed)
    assert any("'org-b'" in w for w in billed) and any("'org-c'" in w for w in billed)
    assert not any("'org-a'" in w for w in billed)
    assert PLATFORM not in " ".join(report.warnings)


def test_a_tenant_key_sql_that_returns_several_rows_fails_that_tenant_and_says_why(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Which of two keys to bill is not embedfill's guess (it used to take the first)."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("CREATE TABLE app.org_keys (org text, api_key text)")
        conn.execute(
            "INSERT INTO app.org_keys VALUES ('org-a', 'sk-tenant-a-one-1111'),"
            " ('org-a', 'sk-tenant-a-two-2222'), ('org-b', 'sk-tenant-b-bbbbbbbb')"
        )
    config = tickets_config(
        fake_openai.base_url,
        tenant_key_sql="select api_key from app.org_keys where org = %(tenant)s",
        allow_platform_fallback=False,
    )
    report = run(tickets, config)

    by_tenant = {t.tenant: t for t in report.tenants}
    assert by_tenant["org-a"].embedded == 0 and by_tenant["org-a"].failed == 15
    assert "tenant_key_sql returned several rows for tenant 'org-a'" in (
        by_tenant["org-a"].error or ""
    )
    assert by_tenant["org-b"].embedded == 15
    keys = set(fake_openai.texts_by_key())
    assert not keys & {"sk-tenant-a-one-1111", "sk-tenant-a-two-2222"}


def test_dry_run_writes_nothing_and_estimates(tickets: str, fake_openai: FakeOpenAI) -> None:
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    report = run(tickets, tickets_config(fake_openai.base_url), dry_run=True)

    assert fake_openai.requests == []
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before
    assert report.dry_run and report.embedded == 0 and report.missing_before == 45
    # 45 rows over 3 tenants (15 each) in batches of 5: 3 + 3 + 3 = 9 requests
    assert report.requests == 9
    assert report.tokens > 40 * 10
    assert {t.key_source for t in report.tenants} == {"platform"}


def test_tenant_with_a_rejected_key_fails_alone(tickets: str, fake_openai: FakeOpenAI) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("INSERT INTO app.org_settings VALUES ('org-b', 'sk-revoked-bbbbbbbb')")
    fake_openai.bad_keys.add("sk-revoked-bbbbbbbb")
    config = tickets_config(
        fake_openai.base_url,
        tenant_key_sql="select api_key from app.org_settings where org = %(tenant)s",
    )
    report = run(tickets, config)

    by_tenant = {t.tenant: t for t in report.tenants}
    assert by_tenant["org-b"].failed == by_tenant["org-b"].missing > 0
    assert by_tenant["org-b"].embedded == 0 and "rejected the API key" in by_tenant["org-b"].error
    assert by_tenant["org-a"].embedded == by_tenant["org-a"].missing
    assert by_tenant["org-c"].embedded == by_tenant["org-c"].missing
    assert report.status == "partial"
    # the tenant is stopped after its first rejection, not retried batch after batch
    rejected = [r for r in fake_openai.requests if r.status == 401]
    assert len(rejected) <= 3  # at most one per concurrent worker
    with psycopg.connect(tickets) as conn:
        rows = conn.execute("SELECT count(*), min(error_class) FROM embedfill.failures").fetchone()
    assert rows == (by_tenant["org-b"].failed, "AuthFailed")


def test_tenant_without_any_key_fails_with_the_reason(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    report = run(tickets, tickets_config(fake_openai.base_url), env={})
    assert report.failed == 45 and report.embedded == 0
    assert all("TEST_PLATFORM_KEY is not set" in t.error for t in report.tenants)
    assert fake_openai.requests == []


def test_dimension_mismatch_is_refused_before_any_request(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    with pytest.raises(SchemaMismatch, match=r"holds 8-dimensional vectors.*makes 16"):
        run(tickets, tickets_config(fake_openai.base_url, dims=16))
    assert fake_openai.requests == []
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before
        assert conn.execute("SELECT to_regclass('embedfill.runs')").fetchone() == (None,)


def test_blank_texts_are_skipped_and_long_texts_truncated(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("""UPDATE app."SupportTickets" SET subject = NULL, body = '   '
                        WHERE ticket_no IN (1, 2)""")
        conn.execute("""UPDATE app."SupportTickets" SET body = repeat('word ', 500)
                        WHERE ticket_no = 5""")
    config = tickets_config(fake_openai.base_url, provider_overrides={"max_input_tokens": 100})
    report = run(tickets, config)

    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert all(t.strip() for t in sent)
    assert report.skipped == 2 and report.truncated == 1 and report.embedded == 43
    long_text = next(t for t in sent if "word word" in t)
    from embedfill.tokens import openai_counter

    assert openai_counter().count(long_text) <= 100
    with psycopg.connect(tickets) as conn:
        nulls = conn.execute(
            'SELECT ticket_no FROM app."SupportTickets" WHERE emb IS NULL ORDER BY 1'
        ).fetchall()
    assert nulls == [(1,), (2,)]


def test_one_bad_input_is_isolated_and_recorded(tickets: str, fake_openai: FakeOpenAI) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """UPDATE app."SupportTickets" SET body = %s WHERE ticket_no = 7""",
            (fake_openai.bad_marker,),
        )
    report = run(tickets, tickets_config(fake_openai.base_url))

    assert report.failed == 1 and report.embedded == 44
    assert [(f.id, f.error_class) for f in report.failures] == [(7, "BadInput")]
    with psycopg.connect(tickets) as conn:
        row = conn.execute(
            "SELECT row_id, tenant, error_class, attempts FROM embedfill.failures"
        ).fetchone()
        status = conn.execute("SELECT status, failed FROM embedfill.runs").fetchone()
    assert row == ("7", TENANTS[7 % 3], "BadInput", 1)
    assert status == ("partial", 1)


def test_transient_faults_are_retried(tickets: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.faults += [
        Fault(429, retry_after=0.2),
        Fault(500),
        Fault(502),
        Fault(200, delay=2.5),
        Fault(drop=True),
    ]
    report = run(tickets, tickets_config(fake_openai.base_url))

    assert report.status == "succeeded" and report.embedded == 45
    assert report.retries == 5
    assert report.requests == report.batches + 5


@pytest.mark.slow  # waits out the lone worker's two pauses (30 s, 60 s) before the rows fail
def test_transient_faults_give_up_after_max_attempts(tickets: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.faults += [Fault(503)] * 200
    config = tickets_config(
        fake_openai.base_url, provider_overrides={"max_attempts": 2, "max_concurrency": 1}
    )
    report = run(tickets, config, limit=5)
    assert report.failed == 5 and report.embedded == 0
    assert {f.attempts for f in report.failures} == {2}


def test_identical_texts_are_embedded_once(tickets: str, fake_openai: FakeOpenAI) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        # all of org-a's missing rows say the same thing
        conn.execute("""UPDATE app."SupportTickets" SET subject = 'same', body = 'same'
                        WHERE org = 'org-a'""")
    report = run(tickets, tickets_config(fake_openai.base_url))
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent))
    assert sent.count("same\n\nsame") == 1
    assert report.embedded == 45
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
        same = conn.execute("""SELECT ticket_no FROM app."SupportTickets" WHERE org = 'org-a'
                               AND ticket_no % 4 <> 0""").fetchall()
    for (i,) in same:
        np.testing.assert_array_equal(vectors[i], hash_vector("same\n\nsame", 8))


def test_an_app_update_during_the_run_is_never_overwritten_with_the_old_text(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    target_text = expected_text(10)

    def app_edits_row_10(inputs: list[str]) -> None:
        if target_text in inputs:
            with psycopg.connect(tickets, autocommit=True) as conn:
                conn.execute("""UPDATE app."SupportTickets" SET body = 'edited by the app'
                                WHERE ticket_no = 10""")

    fake_openai.on_inputs = app_edits_row_10
    report = run(tickets, tickets_config(fake_openai.base_url))
    assert report.embedded == 44 and report.changed == 1
    with psycopg.connect(tickets) as conn:
        assert conn.execute(
            'SELECT emb FROM app."SupportTickets" WHERE ticket_no = 10'
        ).fetchone() == (None,)
    # the next run embeds the new text
    fake_openai.on_inputs = None
    again = run(tickets, tickets_config(fake_openai.base_url))
    assert again.embedded == 1
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
    subject = "Ticket 10: cannot export report"
    np.testing.assert_array_equal(vectors[10], hash_vector(f"{subject}\n\nedited by the app", 8))


def test_a_row_moved_to_another_tenant_during_the_run_is_not_written(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Its text unchanged, a row the app moved to another tenant while its vector was
    asked for (on the first tenant's key) is left for the next run, which pays with the
    new tenant's: the write's guard compares the tenant as well as the text."""
    target_text = expected_text(10)

    def app_moves_row_10(inputs: list[str]) -> None:
        if target_text in inputs:
            with psycopg.connect(tickets, autocommit=True) as conn:
                conn.execute(
                    """UPDATE app."SupportTickets" SET org = 'org-moved' WHERE ticket_no = 10"""
                )

    fake_openai.on_inputs = app_moves_row_10
    report = run(tickets, tickets_config(fake_openai.base_url))
    assert report.embedded == 44 and report.changed == 1
    with psycopg.connect(tickets) as conn:
        assert conn.execute(
            'SELECT emb FROM app."SupportTickets" WHERE ticket_no = 10'
        ).fetchone() == (None,)
    fake_openai.on_inputs = None
    again = run(tickets, tickets_config(fake_openai.base_url))
    assert again.embedded == 1 and [t.tenant for t in again.tenants] == ["org-moved"]


def test_tenant_filter_and_limit(tickets: str, fake_openai: FakeOpenAI) -> None:
    report = run(tickets, tickets_config(fake_openai.base_url), tenants=("org-b",), limit=4)
    assert report.embedded == 4 and [t.tenant for t in report.tenants] == ["org-b"]
    tenant_of = {expected_text(i): TENANTS[i % 3] for i in range(1, 61)}
    assert {tenant_of[t] for r in fake_openai.ok_requests() for t in r.inputs} == {"org-b"}


def test_rerun_is_idempotent(tickets: str, fake_openai: FakeOpenAI) -> None:
    run(tickets, tickets_config(fake_openai.base_url))
    with psycopg.connect(tickets) as conn:
        first = snapshot(conn)
    sent = len(fake_openai.requests)
    again = run(tickets, tickets_config(fake_openai.base_url))
    assert again.missing_before == 0 and again.embedded == 0
    assert len(fake_openai.requests) == sent
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == first


def test_client_side_rate_limits_keep_the_provider_from_answering_429(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    # the provider allows 600 requests/min (10/s) with a 1 s burst; so does the config
    fake_openai.rpm, fake_openai.burst_s = 600, 1.0
    config = tickets_config(fake_openai.base_url, provider_overrides={"rpm": 600})
    report = run(tickets, config)
    assert report.embedded == 45
    assert [r.status for r in fake_openai.requests].count(429) == 0
    assert report.requests == report.batches == 9


def test_a_model_of_unknown_size_that_answers_the_wrong_size_stops_the_run(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.dims = 12  # the column holds 8; the config does not say the model's size
    config = tickets_config(fake_openai.base_url)
    config = replace(
        config, providers={"openai": replace(config.providers["openai"], dimensions=None)}
    )
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    with pytest.raises(SchemaMismatch, match="returned 12-dimensional vectors but column 'emb'"):
        run(tickets, config)
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before
        assert conn.execute("SELECT status FROM embedfill.runs").fetchone() == ("failed",)


def test_a_halfvec_column_is_filled_with_the_providers_vectors_at_half_precision(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """pgvector's halfvec (2 bytes a dimension): the binary write sends float16s, the
    stored vectors are the provider's to half precision, and status and a rerun see
    them as fresh."""
    from embedfill.application import astatus

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" ALTER COLUMN emb TYPE halfvec(8)')
    config = tickets_config(fake_openai.base_url)
    report = run(tickets, config)
    assert report.status == "succeeded" and report.embedded == 45
    with psycopg.connect(tickets) as conn:
        rows = conn.execute(
            'SELECT ticket_no, emb::text FROM app."SupportTickets" WHERE emb IS NOT NULL'
        ).fetchall()
    stored = {i: np.array([float(x) for x in v.strip("[]").split(",")]) for i, v in rows}
    assert len(stored) == 60
    for i, vector in stored.items():
        if i % 4 != 0:  # the 15 rows that held vectors before are left as they were
            want = hash_vector(expected_text(i), 8).astype(np.float16).astype(np.float64)
            np.testing.assert_allclose(vector, want, rtol=1e-3, atol=1e-3)
    (status,) = asyncio.run(astatus(config, Database(tickets)))
    assert (status.missing, status.stale, status.outdated_model) == (0, 0, 0)
    assert run(tickets, config).embedded == 0
