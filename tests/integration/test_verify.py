"""``verify`` and ``adopt`` against a real PostgreSQL and the real test server: stored
vectors re-embedded and compared, tenants' keys paying for their rows, provenance for
vectors embedfill did not write."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from embedfill import (
    BackfillOptions,
    Database,
    TargetNotFound,
    UsageError,
    VerificationFailed,
    aadopt,
    abackfill,
    astatus,
    averify,
)
from embedfill import verify as verify_mod
from embedfill.providers.hashing import hash_vector
from embedfill.verify import AdoptResult, VerifyResult
from tests.support.fake_openai import FakeOpenAI, Fault, duplicated_index
from tests.support.tables import tickets_config

PLATFORM = "sk-platform-0123456789abcdef"
TENANT_B = "sk-tenant-b-verify-secret-bbbb"
ENV = {"TEST_PLATFORM_KEY": PLATFORM}
PREFILLED = list(range(4, 61, 4))  # rows "other code" filled with a wrong vector


def backfill(db_url: str, config: Any) -> None:
    report = asyncio.run(abackfill(config, Database(db_url), BackfillOptions(), env=ENV))
    assert report.failed == 0


def check(db_url: str, config: Any, **kw: Any) -> VerifyResult:
    return asyncio.run(averify(config, Database(db_url), env=kw.pop("env", ENV), **kw))


def adopt(db_url: str, config: Any, **kw: Any) -> AdoptResult:
    return asyncio.run(aadopt(config, Database(db_url), env=ENV, **kw))


def status(db_url: str, config: Any) -> Any:
    return asyncio.run(astatus(config, Database(db_url)))[0]


def rendered(conn: psycopg.Connection[Any], i: int) -> str:
    row = conn.execute(
        'SELECT subject, body FROM app."SupportTickets" WHERE ticket_no = %s', (i,)
    ).fetchone()
    assert row is not None
    return f"{row[0] or ''}\n\n{row[1] or ''}"


def set_vectors(db_url: str, vectors: dict[int, np.ndarray | None]) -> None:
    """Write vectors straight into the table, as other code would (no provenance)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        register_vector(conn)
        for i, v in vectors.items():
            conn.execute('UPDATE app."SupportTickets" SET emb = %s WHERE ticket_no = %s', (v, i))


def right_vectors(db_url: str, ids: list[int]) -> dict[int, np.ndarray | None]:
    with psycopg.connect(db_url) as conn:
        return {i: hash_vector(rendered(conn, i), 8) for i in ids}


def provenance(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT row_key, model_id, text_md5, embedded_at FROM embedfill.provenance"
            " ORDER BY row_key"
        ).fetchall()


def tenant_of(i: int) -> str:
    return ("org-a", "org-b", "org-c")[i % 3]


# ------------------------------------------------------------------------- verify


def test_verify_after_a_backfill_agrees_and_flags_the_vectors_others_wrote(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    backfill(tickets, config)
    sent_before = len(fake_openai.ok_requests())

    result = check(tickets, config, all_rows=True)
    # every row holds a vector: 45 from the backfill, 15 written by "other code" from
    # other text ("old i"), which are exactly the ones that disagree
    assert (result.rows, result.checked, result.failed, result.skipped) == (60, 60, 0, 0)
    assert [m.id for m in result.mismatched] == PREFILLED
    assert {m.tenant for m in result.mismatched} == {tenant_of(i) for i in PREFILLED}
    assert all(m.cosine is not None and m.cosine < 0.99 for m in result.mismatched)
    assert result.exit_code == 3 and not result.ok
    assert result.threshold == 0.99 and result.sample is None
    data = result.to_dict()
    assert data["checked"] == 60
    assert data["min_cosine"] == pytest.approx(result.min_cosine, abs=1e-6)  # 6 places
    assert data["mismatched"][0] == {
        "id": 4,
        "tenant": "org-b",
        "cosine": pytest.approx(result.mismatched[0].cosine, abs=1e-6),
    }
    # the same batching as a backfill (5 rows a request), only the texts a backfill sends
    sent = fake_openai.ok_requests()[sent_before:]
    assert max(len(r.inputs) for r in sent) == 5
    assert result.requests == len(sent) and result.tokens > 0
    with psycopg.connect(tickets) as conn:
        texts = {rendered(conn, i) for i in range(1, 61)}
    assert {t for r in sent for t in r.inputs} == texts

    # once the rows hold the right vectors, every cosine is ~1 and the check passes
    set_vectors(tickets, right_vectors(tickets, PREFILLED))
    fixed = check(tickets, config, all_rows=True)
    assert fixed.checked == 60 and fixed.mismatched == [] and fixed.exit_code == 0
    assert fixed.min_cosine == pytest.approx(1.0, abs=1e-6)


def test_a_sample_is_random_and_checks_only_rows_with_a_vector(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    # before any backfill only the 15 pre-filled rows hold a vector
    whole = check(tickets, config)  # default sample 100: all 15
    assert whole.sample == 100 and whole.checked == 15
    assert sorted(m.id for m in whole.mismatched) == PREFILLED

    backfill(tickets, config)
    with psycopg.connect(tickets) as conn:
        by_text = {rendered(conn, i): i for i in range(1, 61)}
    seen: set[int] = set()
    for _ in range(4):
        before = len(fake_openai.ok_requests())
        some = check(tickets, config, sample=10)
        assert some.sample == 10 and some.rows == 10 and some.checked == 10
        sent = [by_text[t] for r in fake_openai.ok_requests()[before:] for t in r.inputs]
        assert len(set(sent)) == 10  # ten different rows
        seen |= set(sent)
    assert len(seen) > 10  # four samples of 10 from 60 rows are not the same 10 rows


def test_close_but_not_bit_exact_vectors_agree_above_the_threshold(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    set_vectors(tickets, dict.fromkeys(PREFILLED))
    backfill(tickets, config)
    fake_openai.noise = 0.01  # a remote model: each answer a little different
    result = check(tickets, config)
    assert result.checked == 60 and result.exit_code == 0
    assert result.min_cosine is not None and 0.99 < result.min_cosine < 1.0
    strict = tickets_config(
        fake_openai.base_url, provider_overrides={"verify_min_cosine": 0.9999999}
    )
    picky = check(tickets, strict)
    assert picky.threshold == 0.9999999 and picky.exit_code == 3
    assert len(picky.mismatched) > 0


def test_wrong_zero_and_blank_rows(tickets: str, fake_openai: FakeOpenAI) -> None:
    config = tickets_config(fake_openai.base_url)
    set_vectors(tickets, dict.fromkeys(PREFILLED))
    backfill(tickets, config)
    right = right_vectors(tickets, [7, 8])
    wrong = right[7]
    assert wrong is not None
    set_vectors(tickets, {7: -wrong, 8: np.zeros(8, dtype=np.float32)})
    with psycopg.connect(tickets, autocommit=True) as conn:  # blank text: not checked
        conn.execute(
            "UPDATE app.\"SupportTickets\" SET subject = ' ', body = NULL WHERE ticket_no = 9"
        )
    result = check(tickets, config, all_rows=True)
    assert (result.rows, result.checked, result.skipped) == (60, 59, 1)
    by_id = {m.id: m for m in result.mismatched}
    assert set(by_id) == {7, 8}
    assert by_id[7].cosine == pytest.approx(-1.0, abs=1e-6) and by_id[7].tenant == "org-b"
    assert by_id[8].cosine is None  # a zero vector has no direction: it cannot agree
    assert result.min_cosine == pytest.approx(-1.0, abs=1e-6)
    assert result.to_dict()["mismatched"][1] == {"id": 8, "tenant": "org-c", "cosine": None}


def test_tenants_own_keys_pay_for_their_rows(tickets: str, fake_openai: FakeOpenAI) -> None:
    config = tickets_config(
        fake_openai.base_url,
        tenant_key_sql="select api_key from app.org_settings where org = %(tenant)s",
        allow_platform_fallback=False,
    )
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("INSERT INTO app.org_settings VALUES ('org-b', %s)", (TENANT_B,))
    # only org-b has a key and the target does not fall back to the platform key:
    # org-b's rows are checked with its key, the others' not at all
    result = check(tickets, config, all_rows=True)
    tenants = {t.tenant: t for t in result.tenants}
    assert tenants["org-b"].key_source == "tenant" and tenants["org-b"].checked == 5
    assert tenants["org-a"].key_source == "none" and tenants["org-a"].failed == 5
    assert "no API key of its own" in (tenants["org-a"].error or "")
    assert result.failed == 10 and result.exit_code == 3
    by_key = fake_openai.texts_by_key()
    assert set(by_key) == {TENANT_B}
    with psycopg.connect(tickets) as conn:
        assert sorted(by_key[TENANT_B]) == sorted(
            rendered(conn, i) for i in PREFILLED if tenant_of(i) == "org-b"
        )

    # with fallback, the platform pays for tenants without a key of their own only
    fallback = tickets_config(
        fake_openai.base_url,
        tenant_key_sql="select api_key from app.org_settings where org = %(tenant)s",
    )
    fake_openai.requests.clear()
    both = check(tickets, fallback, all_rows=True)
    assert both.failed == 0 and both.checked == 15
    by_key = fake_openai.texts_by_key()
    with psycopg.connect(tickets) as conn:
        texts = {i: rendered(conn, i) for i in PREFILLED}
    assert sorted(by_key[TENANT_B]) == sorted(
        t for i, t in texts.items() if tenant_of(i) == "org-b"
    )
    assert sorted(by_key[PLATFORM]) == sorted(
        t for i, t in texts.items() if tenant_of(i) != "org-b"
    )
    dump = repr(both.to_dict()) + repr(result.to_dict())
    assert TENANT_B not in dump and PLATFORM not in dump


def test_a_dry_run_sends_nothing_and_shows_what_it_costs(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(
        fake_openai.base_url, provider_overrides={"price_per_1m_tokens": 1000.0}
    )
    backfill(tickets, config)
    fake_openai.requests.clear()
    plan = check(tickets, config, dry_run=True, all_rows=True)
    assert fake_openai.requests == []
    assert plan.dry_run and plan.rows == 60 and plan.checked == 0 and plan.mismatched == []
    assert plan.requests == 12  # 20 rows a tenant, 5 a request
    assert plan.tokens > 0 and plan.estimated_cost_usd == pytest.approx(plan.tokens / 1000)
    assert {t.tenant: t.key_source for t in plan.tenants} == dict.fromkeys(
        ("org-a", "org-b", "org-c"), "platform"
    )
    assert sum(t.tokens for t in plan.tenants) == plan.tokens
    # a sample's plan is the sample's size
    small = check(tickets, config, dry_run=True, sample=7)
    assert small.rows == 7 and fake_openai.requests == []
    # what the real run then spends is what the plan said
    real = check(tickets, config, all_rows=True)
    assert (real.requests, real.tokens) == (plan.requests, plan.tokens)


def test_the_text_is_cut_to_the_model_limit_as_a_backfill_cuts_it(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url, provider_overrides={"max_input_tokens": 5})
    set_vectors(tickets, dict.fromkeys(PREFILLED))
    backfill(tickets, config)
    backfilled = {t for r in fake_openai.ok_requests() for t in r.inputs}
    fake_openai.requests.clear()
    result = check(tickets, config, all_rows=True)
    assert result.truncated == 60 and result.mismatched == []
    assert {t for r in fake_openai.ok_requests() for t in r.inputs} == backfilled


def test_provider_faults_are_retried_and_a_rejected_row_fails_alone(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    set_vectors(tickets, dict.fromkeys(PREFILLED))
    backfill(tickets, config)
    # one request at a time: the two faults meet the first batch (retried twice, then a
    # success) and row 10's 400 comes after it, so no probe is sent (with several in
    # flight the probe could meet a fault first, and the count would depend on timing)
    config = tickets_config(fake_openai.base_url, provider_overrides={"max_concurrency": 1})
    with psycopg.connect(tickets, autocommit=True) as conn:  # the provider rejects row 10
        conn.execute(
            'UPDATE app."SupportTickets" SET body = body || %s WHERE ticket_no = 10',
            (fake_openai.bad_marker,),
        )
    fake_openai.faults = [Fault(status=500), Fault(mangle=duplicated_index)]
    result = check(tickets, config, all_rows=True)
    assert result.retries == 2  # a 500 and a malformed answer, each retried
    assert result.checked == 59 and result.failed == 1
    (failure,) = result.failures
    assert failure.id == 10 and failure.tenant == "org-b" and "rejected" in failure.error
    # row 10 was not checked, so it is not called mismatched either (nor is any other)
    assert result.mismatched == []
    assert result.exit_code == 3  # a row that could not be checked is not a pass


def test_sampling_a_big_table_reads_a_share_of_its_pages(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO app.\"SupportTickets\" SELECT i, 'org-a', 's ' || i,"
            " repeat('body ', 40), NULL FROM generate_series(1000, 9000) AS i"
        )
        conn.execute('VACUUM ANALYZE app."SupportTickets"')
        pages = conn.execute(
            "SELECT relpages FROM pg_class WHERE oid = 'app.\"SupportTickets\"'::regclass"
        ).fetchone()
    assert pages is not None and pages[0] > 100
    assert verify_mod.sample_percents(2, pages[0])[0] < 100
    # a sparse column (15 vectors in 8,000 rows): the pages sampled hold too few, so
    # every page's ids are read
    sparse = check(tickets, config, sample=2)
    assert sparse.rows == 2 and {m.id for m in sparse.mismatched} <= set(PREFILLED)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """UPDATE app."SupportTickets" SET emb = '[1,0,0,0,0,0,0,0]' WHERE ticket_no >= 1000"""
        )
        conn.execute('VACUUM ANALYZE app."SupportTickets"')
    dense = check(tickets, config, sample=3)
    assert dense.rows == 3 and dense.checked == 3


def test_bad_choices_are_usage_errors(tickets: str, fake_openai: FakeOpenAI) -> None:
    config = tickets_config(fake_openai.base_url)
    with pytest.raises(UsageError, match="--sample N or --all, not both"):
        check(tickets, config, sample=5, all_rows=True)
    with pytest.raises(UsageError, match="at least 1"):
        check(tickets, config, sample=0)
    with pytest.raises(UsageError, match="--verify-sample must be at least 1"):
        adopt(tickets, config, verify_sample=0)
    with pytest.raises(TargetNotFound):
        check(tickets, config, target="nope")
    assert fake_openai.requests == []


# -------------------------------------------------------------------------- adopt


def test_adopt_records_unverified_vectors_without_calling_the_provider(
    tickets: str, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tickets_config(fake_openai.base_url)
    monkeypatch.setattr(verify_mod, "ADOPT_PAGE_ROWS", 4)  # several keyset pages
    assert status(tickets, config).unverified == 15
    done = adopt(tickets, config)
    assert done.adopted == 15 and done.verified is None
    assert done.to_dict() == {
        "target": "tickets",
        "model": "openai:test-embed (8 dimensions)",
        "adopted": 15,
        "verify": None,
    }
    assert fake_openai.requests == []
    s = status(tickets, config)
    assert (s.unverified, s.stale, s.outdated_model, s.missing) == (0, 0, 0, 45)
    assert [int(r[0]) for r in provenance(tickets)] == sorted(PREFILLED, key=str)
    assert adopt(tickets, config).adopted == 0  # nothing left to adopt

    # adopted rows are tracked from now on: an edit shows as stale
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("UPDATE app.\"SupportTickets\" SET body = 'new' WHERE ticket_no = 8")
    assert status(tickets, config).stale == 1


def test_adopt_never_overwrites_provenance_embedfill_wrote(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    backfill(tickets, config)
    written = {r[0]: r for r in provenance(tickets)}
    assert len(written) == 45
    other = tickets_config(fake_openai.base_url, provider_overrides={"model": "test-embed-v2"})
    assert adopt(tickets, other).adopted == 15
    after = {r[0]: r for r in provenance(tickets)}
    assert len(after) == 60
    assert {k: after[k] for k in written} == written  # untouched, to the microsecond
    s = status(tickets, other)
    assert (s.unverified, s.outdated_model) == (0, 45)


def test_adopt_verify_sample_refuses_when_stored_vectors_disagree(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    backfill(tickets, config)
    before = provenance(tickets)
    sent_before = len(fake_openai.ok_requests())
    with pytest.raises(VerificationFailed) as refused:
        adopt(tickets, config, verify_sample=15)
    message = str(refused.value)
    assert "15 of 15 sampled vectors" in message and "nothing was adopted" in message
    for i in PREFILLED[:10]:
        assert f" {i} (tenant {tenant_of(i)}, cosine " in message
    assert "and 5 more" in message
    assert refused.value.exit_code == 3
    details = refused.value.details
    assert details is not None and details["adopted"] == 0
    assert sorted(m["id"] for m in details["verify"]["mismatched"]) == PREFILLED
    # only unverified rows were sampled, and nothing was written
    sent = [t for r in fake_openai.ok_requests()[sent_before:] for t in r.inputs]
    with psycopg.connect(tickets) as conn:
        assert sorted(sent) == sorted(rendered(conn, i) for i in PREFILLED)
    assert provenance(tickets) == before
    assert status(tickets, config).unverified == 15


def test_adopt_verify_sample_adopts_when_the_sample_agrees(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    set_vectors(tickets, right_vectors(tickets, PREFILLED))
    fake_openai.noise = 0.005
    done = adopt(tickets, config, verify_sample=5)
    assert done.verified is not None and done.verified.checked == 5
    assert done.verified.min_cosine is not None and done.verified.min_cosine > 0.99
    assert done.adopted == 15
    # the check's 5 rows (batched per tenant) are all that was sent
    assert sum(len(r.inputs) for r in fake_openai.ok_requests()) == 5
    s = status(tickets, config)
    assert (s.unverified, s.stale) == (0, 0)
    # and a verify of everything agrees
    assert check(tickets, config, all_rows=True).exit_code == 0


# ------------------------------------------------- one embedding client with backfill


def test_verify_heeds_the_providers_rate_limit_headers_as_a_backfill_does(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Answers that say the key is nearly spent (x-ratelimit-*, no 429 yet) hold off
    every process that uses the key: verify records the pause in the shared budget, as
    a backfill's workers do (embedding/client.py; verify had no such thing before)."""
    config = tickets_config(fake_openai.base_url)
    backfill(tickets, config)
    fake_openai.requests.clear()
    fake_openai.rpm, fake_openai.burst_s = 150, 5.0  # a bucket of about 12 requests

    result = check(tickets, config, sample=None)

    assert result.failed == 0 and [r.status for r in fake_openai.requests].count(429) == 0
    with psycopg.connect(tickets) as conn:
        paused = conn.execute(
            "SELECT count(*) FROM embedfill.rate_budgets WHERE paused_until > clock_timestamp()"
        ).fetchone()
    assert paused == (1,)


def test_verify_with_a_model_the_provider_rejects_stops_with_one_sentence(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Every request rejected (a wrong model): one probe tells it from bad rows, as in a
    backfill; before, verify bisected every batch down to single rows and listed each
    row as failed."""
    from embedfill.errors import ProviderMisconfigured

    config = tickets_config(fake_openai.base_url)
    backfill(tickets, config)
    fake_openai.requests.clear()
    fake_openai.reject_models = {"test-embed"}

    with pytest.raises(ProviderMisconfigured) as info:
        check(tickets, config, sample=None)

    assert "the request itself is wrong" in str(info.value)
    assert "model = 'test-embed'" in str(info.value)
    # the batches in flight and one probe: no bisection down to rows
    assert len(fake_openai.requests) <= 4 + 1 + 4
