"""What a provider answers is checked, its waits are bounded, and a rejection of every
request stops the run once: the engine against a real PostgreSQL and a real local
OpenAI-compatible server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill, errors
from embedfill.config import Config, render_text
from embedfill.providers.hashing import hash_vector
from tests.support import fake_openai as fake
from tests.support.fake_openai import INF_MARKER, NAN_MARKER, FakeOpenAI, Fault
from tests.support.tables import make_tickets, snapshot, stored_vectors, ticket_text, tickets_config

PLATFORM = "sk-platform-0123456789abcdef"


def run(db_url: str, config: Config, *, cancel: asyncio.Event | None = None, **opts: Any) -> Any:
    """One backfill, bounded: a run that hangs fails the test instead of the suite."""

    async def go() -> Any:
        coro = abackfill(
            config,
            Database(db_url),
            BackfillOptions(**opts),
            env={"TEST_PLATFORM_KEY": PLATFORM},
            cancel=cancel,
        )
        return await asyncio.wait_for(coro, timeout=90)

    return asyncio.run(go())


def expected_text(i: int) -> str:
    subject, body = ticket_text(i)
    return render_text("{subject}\n\n{body}", {"subject": subject, "body": body})


def config(base_url: str, **provider: Any) -> Config:
    return tickets_config(base_url, provider_overrides=provider)


def assert_rows_hold_their_own_vectors(db_url: str, *, null: set[int] = frozenset()) -> int:
    """Every row written holds the vector of its own text; returns how many were NULL."""
    with psycopg.connect(db_url) as conn:
        vectors = stored_vectors(conn)
    for i, vector in vectors.items():
        if i % 4 == 0:  # filled before the run with an arbitrary vector
            continue
        if i in null:
            assert vector is None, f"row {i} must stay NULL"
        elif vector is not None:
            np.testing.assert_array_equal(vector, hash_vector(expected_text(i), 8), f"row {i}")
    return sum(1 for v in vectors.values() if v is None)


def failures(db_url: str) -> list[tuple[str, str, str, int]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT row_id, error_class, message, attempts FROM embedfill.failures ORDER BY 1"
        ).fetchall()


# ------------------------------------------------------------------ malformed answers

MALFORMED = [
    fake.string_indices,
    fake.duplicated_index,
    fake.missing_embedding,
    fake.null_embedding,
    fake.bad_base64,
    fake.odd_byte_count,
    fake.strings_in_vector,
    fake.short_vector,
    fake.data_not_a_list,
    fake.one_vector_missing,
]


@pytest.mark.parametrize("mangle", MALFORMED, ids=lambda m: m.__name__)
def test_a_malformed_answer_is_retried_and_never_written(
    tickets: str, fake_openai: FakeOpenAI, mangle: fake.Mangle
) -> None:
    fake_openai.faults.append(Fault(status=200, mangle=mangle))
    report = run(tickets, config(fake_openai.base_url, max_concurrency=1))

    assert report.status == "succeeded" and report.embedded == 45 and report.failed == 0
    assert report.retries == 1
    assert assert_rows_hold_their_own_vectors(tickets) == 0


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (fake.string_indices, "index 0 is a string, not an integer"),
        (fake.null_embedding, "embedding 0 is null, not a list of numbers or base64"),
        (fake.bad_base64, "embedding 0 is not valid base64"),
        (fake.data_not_a_list, "'data' is an object, not a list"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_a_provider_that_keeps_answering_malformed_fails_those_rows_with_the_reason(
    tickets: str, fake_openai: FakeOpenAI, mangle: fake.Mangle, reason: str
) -> None:
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    fake_openai.mangle = mangle  # every answer
    # 12 inputs per request: sorted as text, indices "10" and "11" would come before "2"
    report = run(tickets, config(fake_openai.base_url, batch_size=12, max_attempts=2))

    assert report.embedded == 0 and report.failed == 45 and report.status == "partial"
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before
    recorded = failures(tickets)
    assert len(recorded) == 45
    assert {(c, m, a) for _, c, m, a in recorded} == {
        ("BadAnswer", f"The provider's answer was malformed: {reason}.", 2)
    }


@pytest.mark.parametrize("marker", [NAN_MARKER, INF_MARKER], ids=["nan", "inf"])
def test_a_non_finite_vector_fails_its_row_alone(
    tickets: str, fake_openai: FakeOpenAI, marker: str
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('UPDATE app."SupportTickets" SET body = %s WHERE ticket_no = 7', (marker,))
    report = run(tickets, config(fake_openai.base_url))

    assert report.status == "partial"
    assert report.failed == 1 and report.embedded == 44
    assert [(f.id, f.error_class) for f in report.failures] == [(7, "NonFiniteVector")]
    ((row, cls, message, _),) = failures(tickets)
    assert (row, cls) == ("7", "NonFiniteVector")
    assert "NaN or infinite" in message
    # row 7 stays NULL, the rest of its batch holds the right vectors
    assert assert_rows_hold_their_own_vectors(tickets, null={7}) == 1


# ------------------------------------------------------------------ bounded waits


def test_retry_after_is_capped_by_max_retry_wait_s(tickets: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.faults.append(Fault(429, retry_after=3600))
    report = run(tickets, config(fake_openai.base_url, max_retry_wait_s=0.5))

    assert report.status == "succeeded" and report.embedded == 45
    assert report.retries == 1
    assert report.duration_s < 30  # not an hour
    assert assert_rows_hold_their_own_vectors(tickets) == 0


def test_timeout_s_is_a_deadline_for_the_whole_request_body_included(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    # headers at once, then the body 4 bytes every 0.25 s: about half a minute
    fake_openai.faults.append(Fault(status=200, trickle=0.25))
    report = run(tickets, config(fake_openai.base_url, timeout_s=2, max_concurrency=1))

    assert report.status == "succeeded" and report.embedded == 45
    assert report.retries == 1  # the trickled answer timed out and was retried
    assert report.duration_s < 20  # well under the trickle's half a minute
    assert assert_rows_hold_their_own_vectors(tickets) == 0


def test_a_cancel_during_a_retry_wait_stops_at_once_leaving_rows_null(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.faults += [Fault(429, retry_after=3600)] * 3  # one per worker
    cancel = asyncio.Event()

    async def go() -> Any:
        task = asyncio.create_task(
            abackfill(
                tickets_config(fake_openai.base_url),
                Database(tickets),
                BackfillOptions(),
                env={"TEST_PLATFORM_KEY": PLATFORM},
                cancel=cancel,
            )
        )
        while len(fake_openai.requests) < 3:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        cancel.set()
        return await asyncio.wait_for(task, timeout=10)

    report = asyncio.run(go())
    assert report.status == "cancelled"
    assert report.failed == 0 and report.embedded == 0
    assert [r.status for r in fake_openai.requests] == [429, 429, 429]
    assert failures(tickets) == []
    assert assert_rows_hold_their_own_vectors(tickets) == 45


# ------------------------------------------------------------------ request-wide rejections


@pytest.fixture
def many_tickets(db_url: str) -> str:
    """266 rows, 200 of them NULL."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn, rows=266)
    return db_url


@pytest.mark.parametrize("mistake", ["model", "dimensions"])
def test_a_400_for_every_request_stops_the_run_with_one_error(
    many_tickets: str, fake_openai: FakeOpenAI, mistake: str
) -> None:
    if mistake == "model":
        fake_openai.reject_models.add("test-embed")
        said = "The model `test-embed` does not exist"
    else:
        fake_openai.supported_dimensions = {256, 1024}
        said = "This model does not support dimensions=8"
    with psycopg.connect(many_tickets) as conn:
        before = snapshot(conn)

    with pytest.raises(errors.ProviderMisconfigured) as raised:
        run(many_tickets, config(fake_openai.base_url))

    message = str(raised.value)
    assert said in message and "'openai'" in message
    assert "model" in message and "dimensions" in message
    assert raised.value.exit_code == 2
    assert len(fake_openai.requests) <= 5  # not two requests per row
    with psycopg.connect(many_tickets) as conn:
        assert snapshot(conn) == before
        run_row = conn.execute("SELECT status, failed, error FROM embedfill.runs").fetchone()
    assert run_row[:2] == ("failed", 0) and said in run_row[2]
    assert failures(many_tickets) == []


def test_two_bad_inputs_in_the_first_request_are_not_mistaken_for_a_bad_model(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    # the first batch is org-c's rows 2, 5, 11, 14, 17; its halves are [2, 5] and
    # [11, 14, 17]: a bad input in each, so both halves are rejected too
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            'UPDATE app."SupportTickets" SET body = %s WHERE ticket_no IN (2, 17)',
            (fake_openai.bad_marker,),
        )
    report = run(tickets, config(fake_openai.base_url, max_concurrency=1))

    assert report.failed == 2 and report.embedded == 43
    assert sorted((f.id, f.error_class) for f in report.failures) == [
        (2, "BadInput"),
        (17, "BadInput"),
    ]
    assert assert_rows_hold_their_own_vectors(tickets, null={2, 17}) == 2


# ------------------------------------------------------------------ size changes


@pytest.fixture
def size_changes_after_3_answers(fake_openai: FakeOpenAI) -> Iterator[FakeOpenAI]:
    answered = 0

    def count(inputs: list[str]) -> None:
        nonlocal answered
        answered += 1
        if answered > 3:
            fake_openai.dims_override = 12

    fake_openai.on_inputs = count
    yield fake_openai


def test_a_size_change_after_rows_were_written_ends_with_exit_3_and_the_reason(
    tickets: str, size_changes_after_3_answers: FakeOpenAI
) -> None:
    fake_openai = size_changes_after_3_answers
    with pytest.raises(errors.EmbedfillError) as raised:
        run(tickets, config(fake_openai.base_url, max_concurrency=1))

    assert type(raised.value).__name__ == "RunAborted"
    assert raised.value.exit_code == 3
    message = str(raised.value)
    assert "15 rows" in message
    assert "returned 12-dimensional vectors but column 'emb'" in message
    # what was answered before the change is written, each row its own vector; the rest
    # stays NULL for the next run, not recorded as failures
    assert assert_rows_hold_their_own_vectors(tickets) == 45 - 15
    assert failures(tickets) == []
    with psycopg.connect(tickets) as conn:
        assert conn.execute("SELECT status, embedded FROM embedfill.runs").fetchone() == (
            "failed",
            15,
        )


def test_a_batch_size_above_what_the_provider_takes_is_learned_from_the_first_400(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Issue 15, item 12: 61 of 144 requests were 400s and the report said retries: 0.
    The first refused batch is halved until its halves go through; later batches are cut
    at that size, the refused requests count as retries, and a warning says what to set."""
    fake_openai.max_inputs = 6
    config = tickets_config(
        fake_openai.base_url, provider_overrides={"batch_size": 20, "max_concurrency": 1}
    )
    report = asyncio.run(
        abackfill(
            config,
            Database(tickets),
            BackfillOptions(),
            env={"TEST_PLATFORM_KEY": "sk-platform-batch-learn-1234"},
        )
    )
    assert report.embedded == 45 and report.failed == 0
    refused = [r for r in fake_openai.requests if r.status == 400]
    assert 1 <= len(refused) <= 4, [(len(r.inputs), r.status) for r in fake_openai.requests]
    assert report.retries >= len(refused)
    (warning,) = [w for w in report.warnings if "Set batch_size = " in w]
    learned = int(warning.split("Set batch_size = ")[1].split()[0])
    assert 1 <= learned <= 6  # at most what the provider takes
    assert all(len(r.inputs) <= max(learned, 6) for r in fake_openai.requests[-10:])
