"""max_concurrency = "auto": requests in flight find their own level."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from embedfill import BackfillOptions, Database, Report, abackfill
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import make_tickets, tickets_config

ENV = {"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"}


def run(
    db_url: str, fake: FakeOpenAI, concurrency: object, rows: int = 400, **provider: object
) -> Report:
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn, rows=rows, filled_every=10**6)
    config = tickets_config(
        fake.base_url,
        provider_overrides={"max_concurrency": concurrency, "max_attempts": 8, **provider},
    )
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(), env=ENV))


def test_auto_rises_above_its_start_when_the_provider_keeps_up(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.latency = 0.1
    report = run(db_url, fake_openai, "auto")
    assert report.embedded == 400 and report.failed == 0
    assert fake_openai.peak_in_flight > 6  # started at 4


@pytest.mark.parametrize("cap", [6, 10, 16])
def test_auto_settles_under_a_provider_that_refuses_too_many_at_once(
    db_url: str, fake_openai: FakeOpenAI, cap: int
) -> None:
    """About 400 requests of 5 rows against a provider that refuses (429) more than
    ``cap`` at once: slow start overshoots once (its first 429 comes back a round trip
    late, as TCP's loss does), then it settles under the cap. Slow start as first built
    grew the limit past what was sent and halved from there, and each late refusal of
    one overshoot cut again."""
    fake_openai.latency, fake_openai.max_in_flight = 0.1, cap
    report = run(db_url, fake_openai, "auto", rows=2000, batch_size=5)
    assert report.embedded == 2000 and report.failed == 0
    refused = [r.status for r in fake_openai.requests].count(429)
    assert refused <= 0.1 * len(fake_openai.requests), (refused, len(fake_openai.requests))
    assert fake_openai.peak_in_flight > cap  # it did look for more


def test_a_fixed_concurrency_is_never_exceeded(db_url: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.latency = 0.05
    report = run(db_url, fake_openai, 3)
    assert report.embedded == 400
    assert fake_openai.peak_in_flight <= 3
