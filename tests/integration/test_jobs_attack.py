"""Attacks on jobs (jobs.py, worker.py) through the library: odd ids cut into one-row
chunks, two jobs on one worker, a provider that misbehaves for one worker."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill import worker as worker_mod
from embedfill.application import abackfill
from embedfill.db.connect import Database
from embedfill.engine import BackfillOptions
from embedfill.providers.hashing import hash_vector
from tests.integration.test_app_safety import (
    ENV,
    docs_config,
    docs_vectors,
    make_docs,
    run_docs,
)
from tests.support.fake_openai import FakeOpenAI, Fault


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


def _tenant_docs(db_url: str, rows: int, tenants: int) -> None:
    """``rows`` docs, their tenants interleaved in id order (as an app's inserts are)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE docs (id int PRIMARY KEY, tenant text, body text, emb vector(8))"
        )
        conn.execute(
            "INSERT INTO docs SELECT i, 'org-' || (i %% %s), 'doc ' || i"
            " FROM generate_series(1, %s) AS i",
            (tenants, rows),
        )


def _tenant_config(base_url: str, lease_s: int = 30, **provider: Any) -> Any:
    engine = {"chunk_rows": 200, "lease_s": lease_s}
    config = docs_config(base_url, engine=engine, tenant_column="tenant")
    settings = dataclasses.replace(config.providers["openai"], batch_size=50, **provider)
    return dataclasses.replace(config, providers={"openai": settings})


@pytest.mark.parametrize("latency", [0.0, 0.05])
def test_chunk_boundaries_do_not_cut_a_tenants_batches(
    db_url: str, fake_openai: FakeOpenAI, latency: float
) -> None:
    """2,000 rows of 5 tenants in chunks of 200: each chunk held 40 rows of each tenant,
    and each chunk's end sent them as a part batch (50 requests where 40 suffice). The
    part batches wait for the next chunk's rows now: 40 requests, each text once."""
    _tenant_docs(db_url, 2000, 5)
    fake_openai.latency = latency
    report = run_docs(db_url, _tenant_config(fake_openai.base_url))
    assert (report.status, report.embedded, report.failed) == ("succeeded", 2000, 0)
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(fake_openai.ok_requests()) == 40 == report.requests
    assert len(sent) == len(set(sent)) == 2000
    assert all(len(r.inputs) == 50 for r in fake_openai.ok_requests())


def test_a_chunk_handed_back_from_a_batch_it_shares_loses_and_repeats_nothing(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """A batch holding rows of two chunks fails for this worker (503s, no retry left):
    both chunks go back to the queue and come round again; every row ends embedded,
    counted once, its text answered once."""
    _tenant_docs(db_url, 2000, 5)
    fake_openai.latency = 0.01
    fake_openai.faults = [Fault(status=503) for _ in range(6)]
    report = run_docs(db_url, _tenant_config(fake_openai.base_url, lease_s=2, max_attempts=1))
    assert (report.status, report.embedded, report.failed) == ("succeeded", 2000, 0)
    assert any(r.status == 503 for r in fake_openai.requests)
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent)) == 2000
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM docs WHERE emb IS NULL").fetchone() == (0,)


def test_a_row_waiting_for_a_handed_back_chunks_text_is_still_embedded(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """Rows 201-400 repeat the texts of rows 1-200: each waits for the vector of its
    text's first row, in another chunk. That chunk goes back to the queue (a 503, no
    retry left): the waiting rows were dropped with it, their own chunk ended with 50
    rows NULL, and the job said `succeeded`. They send their texts themselves now."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, emb vector(8))")
        conn.execute(
            "INSERT INTO docs SELECT i, 'doc ' || (((i - 1) % 200) + 1)"
            " FROM generate_series(1, 400) AS i"
        )
    fake_openai.latency = 0.3
    fake_openai.faults = [Fault(status=503, delay=0.5)]
    config = docs_config(fake_openai.base_url, engine={"chunk_rows": 200, "lease_s": 2})
    settings = dataclasses.replace(config.providers["openai"], batch_size=50, max_attempts=1)
    report = run_docs(db_url, dataclasses.replace(config, providers={"openai": settings}))
    assert (report.status, report.embedded, report.failed) == ("succeeded", 400, 0)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM docs WHERE emb IS NULL").fetchone() == (0,)


@pytest.mark.parametrize("worker_chunks", [2, 4])
def test_a_ring_waiting_for_a_slot_claims_nothing_while_the_worker_is_cut_off(
    db_url: str, fake_openai: FakeOpenAI, worker_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk went back (the provider unreachable from here): the worker takes no chunk
    for a while, so that no chunk's attempt is spent by a worker that keeps failing. A
    ring that waited for a slot got it as that chunk ended and claimed it anyway."""
    make_docs(db_url, "int", list(range(1, 121)))
    fake_openai.latency = 0.05
    fake_openai.faults = [Fault(status=503, delay=0.3) for _ in range(4)]
    engine = {"chunk_rows": 10, "worker_chunks": worker_chunks, "lease_s": 2}
    config = docs_config(fake_openai.base_url, engine=engine)
    settings = dataclasses.replace(config.providers["openai"], max_attempts=1)
    config = dataclasses.replace(config, providers={"openai": settings})
    cut_off_claims: list[int] = []
    claim = worker_mod.Worker._work_on

    async def watched(self: worker_mod.Worker, session: Any, run_id: int, seq: int) -> None:
        if time.monotonic() < self.cut_off_until:
            cut_off_claims.append(seq)
        await claim(self, session, run_id, seq)

    monkeypatch.setattr(worker_mod.Worker, "_work_on", watched)
    report = run_docs(db_url, config)
    assert (report.status, report.embedded) == ("succeeded", 120)
    assert cut_off_claims == []


def test_after_stop_a_ring_waiting_for_a_slot_claims_nothing(
    db_url: str, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop (SIGTERM's first step) finishes the chunks in hand and claims no more: rings
    that waited for a slot claimed and worked four more chunks after it."""
    make_docs(db_url, "int", list(range(1, 401)))
    fake_openai.latency = 0.25
    engine = {"chunk_rows": 20, "worker_chunks": 6, "lease_s": 10}
    config = docs_config(fake_openai.base_url, engine=engine)
    stop = asyncio.Event()
    late: list[int] = []
    claim = worker_mod.Worker._work_on

    async def watched(self: worker_mod.Worker, session: Any, run_id: int, seq: int) -> None:
        if stop.is_set():
            late.append(seq)
        await claim(self, session, run_id, seq)

    monkeypatch.setattr(worker_mod.Worker, "_work_on", watched)

    async def main() -> None:
        db = Database(db_url)
        await abackfill(config, db, BackfillOptions(target="docs"), env=ENV, enqueue=True)
        worker = worker_mod.Worker(config, db, env=ENV)
        task = asyncio.create_task(worker.run(stop))
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.wait_for(task, 60)

    asyncio.run(main())
    assert late == []


def test_a_late_timeout_while_the_provider_answers_does_not_pause_the_worker(
    db_url: str, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """One request sent during an outage times out after the provider came back, while it
    answers this worker's other requests: its chunk goes back to the queue and comes
    round again, and the worker goes on (it took no chunk for a lease: a lone watch's
    edits waited 14 s)."""
    make_docs(db_url, "int", list(range(1, 121)))
    fake_openai.latency = 0.05
    fake_openai.faults = [Fault(status=200, delay=3.0)]  # the first request hangs
    config = docs_config(fake_openai.base_url, engine={"chunk_rows": 30})
    settings = dataclasses.replace(config.providers["openai"], timeout_s=1, max_attempts=1)
    config = dataclasses.replace(config, providers={"openai": settings})
    with caplog.at_level(logging.INFO):
        report = run_docs(db_url, config)
    assert (report.status, report.embedded, report.failed) == ("succeeded", 120, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("goes back to the queue" in m for m in messages)
    assert not any("taking no chunk for" in m for m in messages)
