"""One rate budget per API key, shared through PostgreSQL by every run in every process."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest

from embedfill import BackfillOptions, Database, Report, abackfill
from embedfill.config import Config, parse_config
from embedfill.db.connect import connect
from embedfill.db.schema import ensure_schema
from embedfill.db.store import Store
from embedfill.ratelimit import Rates, SharedLimits
from embedfill.secrets import Secret
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import make_tickets, provider_settings

KEY = "sk-shared-0123456789abcdef"


async def limits_pair(db_url: str, rates: Rates) -> tuple[SharedLimits, SharedLimits, list[Any]]:
    conns = [await connect(Database(db_url)) for _ in range(2)]
    await ensure_schema(conns[0])
    a, b = (SharedLimits(Store(c), rates, "openai||m") for c in conns)
    return a, b, conns


def test_two_processes_draw_on_one_budget_and_share_a_pause(db_url: str) -> None:
    async def go() -> None:
        # 60 requests/min = 1/s with a 2 s burst: two at once, then one a second, in total
        a, b, conns = await limits_pair(db_url, Rates(rpm=60, tpm=0, burst_s=2.0))
        key = Secret(KEY)
        try:
            waits = [await a.reserve(key, 1), await b.reserve(key, 1)]
            waits += [await a.reserve(key, 1), await b.reserve(key, 1)]
            assert waits[0] == waits[1] == 0.0
            assert waits[2] == pytest.approx(1.0, abs=0.1)  # b's request counted for a
            assert waits[3] == pytest.approx(2.0, abs=0.1)
            other = await a.reserve(Secret("sk-another-key-0000000"), 1)
            assert other == 0.0  # another key has its own budget
            # a 429 seen by one pauses the other
            await a.pause(key, 30.0)
            assert await b.reserve(key, 1) == pytest.approx(30.0, abs=1.0)
        finally:
            for c in conns:
                await c.close()

    asyncio.run(go())
    with psycopg.connect(db_url) as conn:
        ids = [r[0] for r in conn.execute("SELECT key_id FROM embedfill.rate_budgets")]
    assert len(ids) == 2 and all(KEY not in i and "sk-" not in i for i in ids)


def two_targets(db_url: str, rows: int = 40) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn, rows=rows, filled_every=1000)
        conn.execute('CREATE TABLE app."Other" (LIKE app."SupportTickets" INCLUDING ALL)')
        conn.execute(
            "INSERT INTO app.\"Other\" SELECT ticket_no, org, subject || ' (other)', body, emb"
            ' FROM app."SupportTickets"'
        )


def shared_key_config(base_url: str, table: str, tpm: int) -> Config:
    return parse_config(
        {
            "providers": {"openai": provider_settings(base_url, tpm=tpm, max_concurrency=4)},
            "targets": [
                {
                    "name": table,
                    "table": f"app.{table}",
                    "id_column": "ticket_no",
                    "text": "{subject}\n\n{body}",
                    "embedding_column": "emb",
                    "tenant_column": "org",
                    "provider": "openai",
                }
            ],
        }
    )


def run_both(
    db_url: str, base_url: str, *, tpm: int
) -> tuple[list[Report], list[BaseException], float]:
    """Backfill both tables at once, one thread each, sharing KEY: their reports, their
    errors, and the seconds the two took together."""
    reports: list[Report] = []
    errors: list[BaseException] = []

    def run(table: str) -> None:
        config = shared_key_config(base_url, table, tpm=tpm)
        env = {"TEST_PLATFORM_KEY": KEY}
        try:
            reports.append(
                asyncio.run(abackfill(config, Database(db_url), BackfillOptions(), env=env))
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("SupportTickets", "Other")]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return reports, errors, time.monotonic() - started


def test_two_jobs_sharing_a_key_stay_under_its_tpm_together(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """Each job alone would be within the cap; together, only a shared budget keeps
    the provider from answering 429 (and from the cap being exceeded)."""
    two_targets(db_url)
    from embedfill.tokens import openai_counter

    counter = openai_counter()
    fake_openai.count_tokens = counter.count
    # 100 tokens/s; like a provider's per-minute window, the server forgives a few seconds
    # of burst, so the two jobs together must pace themselves at the rate
    fake_openai.tpm, fake_openai.burst_s = 6000, 3.0
    reports, errors, elapsed = run_both(db_url, fake_openai.base_url, tpm=6000)

    assert errors == []
    assert [r.embedded for r in reports] == [40, 40]
    statuses = [r.status for r in fake_openai.requests]
    assert statuses.count(429) <= 0.02 * len(statuses), statuses
    # never more than the cap: over the whole run, tokens sent <= rate x time + one burst
    sent = sum(r.tokens for r in fake_openai.requests if r.status == 200)
    assert sent <= 100 * elapsed + 100 + max(r.tokens for r in fake_openai.requests)
    # and they use it: from the first request to the last, at least 0.9 of the cap
    ok = [r for r in fake_openai.requests if r.status == 200]
    window = ok[-1].at - ok[0].at
    assert sum(r.tokens for r in ok[:-1]) >= 0.9 * 100 * window, (sent, window)


def test_the_providers_limit_headers_slow_every_worker_of_the_key(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """No client-side rpm/tpm: only the provider's x-ratelimit-* headers (sent on every
    answer, as OpenAI does) tell the two jobs to hold off before the key runs dry, so
    few requests meet a 429."""
    two_targets(db_url, rows=160)
    from embedfill.tokens import openai_counter

    fake_openai.count_tokens = openai_counter().count
    # 800 tokens/s and a bucket of 4,000 (~30 requests of ~130 tokens): far more than the
    # eight the two jobs may have in flight, half the ~8,500 they must send
    fake_openai.tpm, fake_openai.burst_s = 48_000, 5.0
    reports, errors, _ = run_both(db_url, fake_openai.base_url, tpm=0)

    assert errors == []
    # each drain of the bucket costs a few 429s: requests of the other job already on
    # their way when one job's answer said "short"; without the headers, over half
    statuses = [r.status for r in fake_openai.requests]
    assert statuses.count(429) <= 0.15 * len(statuses), (statuses.count(429), len(statuses))
    assert [r.embedded for r in reports] == [160, 160]
    assert [r.failed for r in reports] == [0, 0]
    with psycopg.connect(db_url) as conn:
        for table in ("SupportTickets", "Other"):
            missing = conn.execute(f'SELECT count(*) FROM app."{table}" WHERE emb IS NULL')
            assert missing.fetchone() == (0,)


def test_without_rpm_or_tpm_a_pause_still_reaches_every_process(db_url: str) -> None:
    from embedfill.ratelimit import PAUSE_CHECK_S

    async def go() -> None:
        a, b, conns = await limits_pair(db_url, Rates(rpm=0, tpm=0))
        key = Secret(KEY)
        try:
            assert await a.reserve(key, 10**6) == 0.0 and await b.reserve(key, 10**6) == 0.0
            await a.pause(key, 30.0)  # a saw a 429
            assert await a.reserve(key, 1) == pytest.approx(30.0, abs=1.0)
            await asyncio.sleep(PAUSE_CHECK_S)
            assert await b.reserve(key, 1) == pytest.approx(30.0, abs=1.0)
        finally:
            for c in conns:
                await c.close()

    asyncio.run(go())
