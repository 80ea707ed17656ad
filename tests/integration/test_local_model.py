"""The bundled all-MiniLM-L6-v2, offline, through the provider and the engine."""

from __future__ import annotations

import asyncio

import numpy as np
import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill
from embedfill.config import default_config
from embedfill.providers import make_provider
from embedfill.seed import seed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local():  # type: ignore[no-untyped-def]
    config = default_config()
    return make_provider(config.providers["local"])


def test_related_texts_are_closer_than_unrelated(local) -> None:  # type: ignore[no-untyped-def]
    texts = [
        "Invoice approval stalls at the finance review step",
        "Finance sign-off on invoices is delayed for days",
        "The warehouse forklift battery needs replacing",
    ]
    a, b, c = asyncio.run(local.embed(texts, api_key=None))
    assert a.shape == (384,)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-4)
    assert float(a @ b) > float(a @ c) + 0.2


def test_token_counting_and_truncation_use_the_models_tokenizer(local) -> None:  # type: ignore[no-untyped-def]
    counter = local.counter()
    long_text = "backfill " * 1000
    assert counter.count(long_text) > local.max_input_tokens
    cut = counter.truncate(long_text, local.max_input_tokens)
    assert counter.count(cut) <= local.max_input_tokens and long_text.startswith(cut)


def test_demo_target_backfills_with_the_local_model(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        result = seed(conn, rows=300, missing=40, tenants=3)
    assert result.missing == 40
    report = asyncio.run(abackfill(default_config(), Database(db_url), BackfillOptions()))
    assert report.embedded == 40 and report.failed == 0
    assert {t.key_source for t in report.tenants} == {"none"}
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM workflow_insights WHERE embedding IS NULL"
        ).fetchone() == (0,)
