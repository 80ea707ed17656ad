"""A hostile provider and a busy application against the engine: a real PostgreSQL and
the real local OpenAI-compatible server answering what real providers and proxies
sometimes answer."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import random
import threading
import uuid
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill import BackfillOptions, Database, abackfill
from embedfill.errors import SchemaMismatch
from embedfill.providers.hashing import hash_vector
from tests.integration.test_app_safety import docs_config, docs_vectors, run_docs, with_engine
from tests.integration.test_provider_faults import (
    assert_rows_hold_their_own_vectors,
    config,
    expected_text,
    failures,
    run,
)
from tests.support.fake_openai import FakeOpenAI, Fault
from tests.support.tables import make_tickets

# ------------------------------------------------------------------ hostile answers


def _answer(embeddings: list[Any]) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]
    return json.dumps({"object": "list", "data": data}).encode()


HOSTILE_BODIES = {
    "html": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    "empty": b"",
    "garbage": bytes(range(256)),
    "gzip_without_header": gzip.compress(_answer([[0.5] * 8] * 5)),
    "deeply_nested": b"[" * 100_000 + b"]" * 100_000,
    "index_beyond_any_int": json.dumps(
        {"data": [{"index": 10**400 + i, "embedding": [0.5] * 8} for i in range(5)]}
    ).encode(),
    "empty_embedding": _answer([[]] * 5),
    "null_data": b'{"data": null}',
    "a_list": b"[1, 2, 3]",
}


@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_a_hostile_200_is_a_malformed_answer_retried_never_a_crash(
    tickets: str, fake_openai: FakeOpenAI, body: bytes
) -> None:
    fake_openai.faults.append(Fault(status=200, raw=body))
    report = run(tickets, config(fake_openai.base_url, max_concurrency=1))

    assert report.status == "succeeded" and report.embedded == 45 and report.failed == 0
    assert report.retries == 1
    assert assert_rows_hold_their_own_vectors(tickets) == 0


def test_a_200_with_a_broken_gzip_body_is_retried(tickets: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.faults.append(
        Fault(status=200, raw=b"\x1f\x8b\x08\x00junk", headers={"content-encoding": "gzip"})
    )
    report = run(tickets, config(fake_openai.base_url, max_concurrency=1))

    assert report.status == "succeeded" and report.embedded == 45 and report.retries == 1
    assert assert_rows_hold_their_own_vectors(tickets) == 0


def test_a_gzipped_answer_is_decoded(tickets: str, fake_openai: FakeOpenAI) -> None:
    texts = [expected_text(i) for i in (2, 5, 11, 14, 17)]  # the first batch: org-c's
    vectors = [base64.b64encode(hash_vector(t, 8).tobytes()).decode() for t in texts]
    fake_openai.faults.append(
        Fault(status=200, raw=gzip.compress(_answer(vectors)), headers={"content-encoding": "gzip"})
    )
    report = run(tickets, config(fake_openai.base_url, max_concurrency=1))

    assert report.status == "succeeded" and report.embedded == 45 and report.retries == 0
    assert assert_rows_hold_their_own_vectors(tickets) == 0


def shuffled_with_extras(payload: dict[str, Any]) -> None:
    random.Random(7).shuffle(payload["data"])
    for item in payload["data"]:
        item["extra"] = {"nested": [1, 2]}
        item["object"] = "something else"
    payload["usage"] = "not an object"
    payload["data"].reverse()


def test_items_in_any_order_with_extra_fields_map_by_index(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mangle = shuffled_with_extras  # every answer
    report = run(tickets, config(fake_openai.base_url, batch_size=12))

    assert report.status == "succeeded" and report.embedded == 45 and report.retries == 0
    assert assert_rows_hold_their_own_vectors(tickets) == 0


def test_a_vector_with_one_integer_beyond_float32_fails_its_row_alone(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """10**39 and 10**400 are both infinite as float32, like 1e39: the row fails as
    NonFiniteVector, the rest of the batch is written."""

    def huge_in_first(payload: dict[str, Any]) -> None:
        raw = base64.b64decode(payload["data"][0]["embedding"])
        values = np.frombuffer(raw, dtype="<f4").tolist()
        payload["data"][0]["embedding"] = [*values[:-1], 10**400]

    fake_openai.faults.append(Fault(status=200, mangle=huge_in_first))
    report = run(tickets, config(fake_openai.base_url, max_concurrency=1))

    # the first batch is org-c's rows 2, 5, 11, 14, 17
    assert [(f.id, f.error_class) for f in report.failures] == [(2, "NonFiniteVector")]
    assert report.embedded == 44 and report.retries == 0
    assert assert_rows_hold_their_own_vectors(tickets, null={2}) == 1
    assert [r[:2] for r in failures(tickets)] == [("2", "NonFiniteVector")]


RETRY_AFTERS = {
    "negative": {"retry-after": "-30"},
    "nan": {"retry-after": "nan"},
    "inf": {"retry-after": "inf"},
    "minus_inf": {"retry-after": "-inf"},
    "date_in_the_past": {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
    "date_far_ahead": {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
    "date_beyond_any_year": {"retry-after": "Sun, 06 Nov 99999999999 08:49:37 GMT"},
    "garbage": {"retry-after": "soon\u00e9"},
    "ms_huge": {"retry-after-ms": "1e300"},
    "ms_nan": {"retry-after-ms": "NaN", "retry-after": "0"},
}


@pytest.mark.parametrize("headers", list(RETRY_AFTERS.values()), ids=list(RETRY_AFTERS))
@pytest.mark.parametrize("status", [429, 503])
def test_any_retry_after_is_a_bounded_wait_never_a_crash(
    tickets: str, fake_openai: FakeOpenAI, headers: dict[str, str], status: int
) -> None:
    fake_openai.faults.append(Fault(status, headers=headers))
    report = run(tickets, config(fake_openai.base_url, max_concurrency=1, max_retry_wait_s=0.5))

    assert report.status == "succeeded" and report.embedded == 45 and report.retries == 1
    assert report.duration_s < 30
    assert assert_rows_hold_their_own_vectors(tickets) == 0


# ------------------------------------------------------------------ odd ids and tenants


@pytest.mark.parametrize(
    ("id_type", "ids"),
    [
        ("char(6)", ["a", "a b", "b ", " c", "\u00e9", "\u65e5\u672c"]),
        ("varchar(10)", ["a", "a ", "a  ", " a", "A", "\u00c5", "A\u030a"]),
        ("text", ["", "'", '"', "\\", "%s", "%(x)s", "\u200b", "\U0001f600", "a\tb\nc"]),
        ("uuid", [str(uuid.UUID(int=i * 2**100 + i)) for i in range(12)]),
        ("int2", [-32768, 32767, 0, 1]),
        ("int8", [-(2**63), 2**63 - 1, 0]),
        ("numeric(12,2)", ["1.50", "1.5", "-0.01", "9999999999.99"]),
    ],
    ids=["char", "varchar_spaces", "text_odd", "uuid", "int2_edges", "int8_edges", "numeric"],
)
def test_odd_ids_are_all_written_with_their_own_vectors(
    db_url: str, fake_openai: FakeOpenAI, id_type: str, ids: list[Any]
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE docs (id {id_type} PRIMARY KEY, body text, emb vector(8))")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO docs (id, body) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                [(i, f"doc {n}") for n, i in enumerate(ids)],
            )
        expected = conn.execute("SELECT count(*) FROM docs").fetchone()[0]  # type: ignore[index]
    config = with_engine(docs_config(fake_openai.base_url), scan_page_size=2)
    report = run_docs(db_url, config, batch_size=2)

    assert report.embedded == expected and report.changed == 0 and report.status == "succeeded"
    for body, vector in docs_vectors(db_url).values():
        np.testing.assert_array_equal(vector, hash_vector(body, 8))


def test_null_ids_under_a_unique_index_are_refused_before_any_request(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """A unique index lets many rows hold a NULL id; those rows can be read and embedded
    but never written back, so each run would pay for them and call them changed."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (pk serial PRIMARY KEY, id text, body text, emb vector(8))")
        conn.execute("CREATE UNIQUE INDEX docs_id ON docs (id)")
        conn.execute(
            "INSERT INTO docs (id, body) SELECT CASE WHEN g % 3 = 0 THEN NULL ELSE 'k' || g END,"
            " 'doc ' || g FROM generate_series(1, 30) g"
        )
    with pytest.raises(SchemaMismatch, match="is NULL in some rows") as raised:
        run_docs(db_url, docs_config(fake_openai.base_url), batch_size=2)
    assert raised.value.exit_code == 2
    assert fake_openai.requests == []
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE docs SET id = 'n' || pk WHERE id IS NULL")
    report = run_docs(db_url, docs_config(fake_openai.base_url), batch_size=2)
    assert report.embedded == 30 and report.changed == 0


# ------------------------------------------------------------------ cancels


def test_a_cancel_before_the_fill_never_drops_the_vector_index(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """A SIGTERM that lands while the run starts (say, during the take-over of a dead
    run) must not then drop the table's vector index and rebuild it: on a large table
    that rebuild takes hours, searches scan the whole table meanwhile, and the user
    asked the run to stop."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn)
        conn.execute(
            'CREATE INDEX tickets_emb_hnsw ON app."SupportTickets"'
            " USING hnsw (emb vector_cosine_ops)"
        )
    index_oid = "SELECT 'app.tickets_emb_hnsw'::regclass::oid"
    with psycopg.connect(db_url) as conn:
        before = conn.execute(index_oid).fetchone()
    cancel = asyncio.Event()

    async def go() -> Any:
        return await abackfill(
            config(fake_openai.base_url),
            Database(db_url),
            BackfillOptions(defer_index=True),
            env={"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"},
            cancel=cancel,
            on_start=lambda run_id: cancel.set(),
        )

    report = asyncio.run(asyncio.wait_for(go(), 60))
    assert report.status == "cancelled" and report.embedded == 0
    assert fake_openai.requests == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute(index_oid).fetchone() == before  # never dropped and rebuilt
    assert report.deferred_indexes == []


def test_a_cancel_while_the_scan_waits_on_an_app_table_lock_stops_at_once(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A migration takes ACCESS EXCLUSIVE mid-run and holds it for minutes: the next scan
    page queues behind it. A SIGTERM then must not wait for the migration."""
    config_ = with_engine(config(fake_openai.base_url, max_concurrency=1), scan_page_size=5)
    release = threading.Event()
    locked = threading.Event()

    def migration() -> None:
        with psycopg.connect(tickets) as app:
            app.execute('LOCK TABLE app."SupportTickets" IN ACCESS EXCLUSIVE MODE')
            locked.set()
            release.wait(120)
            app.rollback()

    def scan_waits() -> bool:
        with psycopg.connect(tickets, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'SELECT %%IS NULL%%ORDER BY%%'"
            ).fetchone()
        return bool(row and row[0])

    fake_openai.on_inputs = lambda inputs: (
        None if locked.is_set() else threading.Thread(target=migration, daemon=True).start()
    )
    cancel = asyncio.Event()

    async def go() -> Any:
        task = asyncio.create_task(
            abackfill(
                config_,
                Database(tickets),
                BackfillOptions(),
                env={"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"},
                cancel=cancel,
            )
        )
        while not await asyncio.to_thread(scan_waits):
            assert not task.done(), task
            await asyncio.sleep(0.05)
        cancel.set()
        try:
            return await asyncio.wait_for(task, 20)  # not the migration's two minutes
        finally:
            release.set()

    try:
        report = asyncio.run(go())
    finally:
        release.set()
    assert report.status == "cancelled" and report.failed == 0
    assert failures(tickets) == []


@pytest.mark.parametrize(
    ("tenant_type", "tenants"),
    [
        ("text", [None, "", "None", "a'b", 'q"q', "new\nline", "\u00e9t\u00e9", "%(tenant)s"]),
        ("int", [None, 0, -1, 2**31 - 1]),
        ("uuid", [None, str(uuid.UUID(int=1)), str(uuid.UUID(int=2))]),
    ],
    ids=["text", "int", "uuid"],
)
def test_odd_tenants_each_get_their_own_rows_and_key(
    db_url: str, fake_openai: FakeOpenAI, tenant_type: str, tenants: list[Any]
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE docs (id int PRIMARY KEY, org {tenant_type}, body text, emb vector(8))"
        )
        conn.execute(f"CREATE TABLE keys (org {tenant_type}, api_key text)")
        with conn.cursor() as cur:
            for n in range(40):
                # the same text in every tenant: each must embed it with its own key
                cur.execute(
                    "INSERT INTO docs VALUES (%s, %s, %s)", (n, tenants[n % len(tenants)], "same")
                )
            for k, t in enumerate(tenants):
                if t is not None:
                    cur.execute("INSERT INTO keys VALUES (%s, %s)", (t, f"sk-tenant-{k}-xxxxxxxx"))
    cfg = docs_config(
        fake_openai.base_url,
        tenant_column="org",
        tenant_key_sql="select api_key from keys where org = %(tenant)s",
    )
    report = run_docs(db_url, cfg)

    assert report.failed == 0 and report.embedded == 40
    assert report.deduplicated == 40 - len(tenants)
    by_key = fake_openai.texts_by_key()
    named = [t for t in tenants if t is not None]
    assert len(by_key) == len(named) + 1  # each tenant its own key; NULL the platform's
    assert all(texts == ["same"] for texts in by_key.values())


# ------------------------------------------------------------------ first runs at once


def test_first_runs_started_together_on_a_fresh_database_all_find_the_schema(
    server_url: str, template_url: str
) -> None:
    """Two runs (or a run and the service) start on a database embedfill has never
    touched: each migrates, one waits for the other. The waiter must then find the
    schema made, not fail with 'relation "runs" already exists'."""
    from embedfill.db.connect import connect
    from embedfill.db.schema import EXPECTED_VERSION, ensure_schema
    from tests.conftest import TEMPLATE, _create_db, _drop_db

    async def together(url: str) -> list[int]:
        conns = [await connect(Database(url)) for _ in range(4)]
        try:
            return list(await asyncio.gather(*(ensure_schema(c) for c in conns)))
        finally:
            for c in conns:
                await c.close()

    for _ in range(5):
        name = _create_db(server_url, TEMPLATE)
        try:
            url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
            assert asyncio.run(together(url)) == [EXPECTED_VERSION] * 4
        finally:
            _drop_db(server_url, name)
