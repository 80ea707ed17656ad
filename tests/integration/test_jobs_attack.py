"""Attacks on jobs (jobs.py, worker.py) through the library: odd ids cut into one-row
chunks, two jobs on one worker, a provider that misbehaves for one worker."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill.providers.hashing import hash_vector
from tests.integration.test_app_safety import docs_config, docs_vectors, make_docs, run_docs
from tests.support.fake_openai import FakeOpenAI


@pytest.mark.parametrize(
    ("id_type", "ids"),
    [
        ("char(6)", ["a", "a b", "b ", " c", "\u00e9", "\u65e5\u672c"]),
        ("varchar(10)", ["a", "a ", "a  ", " a", "A", "\u00c5", "A\u030a"]),
        ("text", ["", "'", '"', "\\", "%s", "%(x)s", "\u200b", "\U0001f600", "a\tb\nc"]),
        ("uuid", [str(uuid.UUID(int=i * 2**100 + i)) for i in range(12)]),
        ("int8", [-(2**63), 2**63 - 1, 0]),
        ("numeric(12,2)", ["1.50", "-0.01", "9999999999.99", "0.1"]),
    ],
    ids=["char", "varchar_spaces", "text_odd", "uuid", "int8_edges", "numeric"],
)
def test_odd_ids_in_one_row_chunks_are_each_written_once(
    db_url: str, fake_openai: FakeOpenAI, id_type: str, ids: list[Any]
) -> None:
    make_docs(db_url, id_type, ids)
    with psycopg.connect(db_url) as conn:
        expected = conn.execute("SELECT count(*) FROM docs").fetchone()
    report = run_docs(db_url, docs_config(fake_openai.base_url, engine={"chunk_rows": 1}))
    assert (report.embedded,) == expected and report.status == "succeeded"
    assert report.changed == 0
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent))  # each row once: no chunk overlaps another
    for body, vector in docs_vectors(db_url).values():
        np.testing.assert_array_equal(vector, hash_vector(body, 8))


def test_more_chunks_at_once_than_a_session_holds_are_not_handed_back(
    db_url: str, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """`worker_chunks = 4` on one job: a session works on two chunks at once, so the
    rings for a third and fourth wait in the worker for a slot instead of going back to
    the queue for seconds. Handed back, every ring was out of reach when the two chunks
    ended, and the worker idled: the job ran at a quarter of the speed of the default."""
    make_docs(db_url, "int", list(range(1, 121)))
    fake_openai.latency = 0.05
    config = docs_config(fake_openai.base_url, engine={"chunk_rows": 10, "worker_chunks": 4})
    with caplog.at_level(logging.DEBUG):
        report = run_docs(db_url, config)
    assert (report.status, report.embedded) == ("succeeded", 120)
    # procrastinate's word for a ring handed back
    handed_back = [r.getMessage() for r in caplog.records if "to retry" in r.getMessage()]
    assert handed_back == []
