"""The application keeps working while a backfill runs: its row locks are never waited
for, its table locks only briefly, and one target is one physical column whatever the
config calls it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill import BackfillOptions, Database, Report, TargetBusy, abackfill
from embedfill.config import Config, EngineConfig, parse_config
from embedfill.providers.hashing import hash_vector
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import provider_settings, stored_vectors, tickets_config

from .test_backfill import expected_text

ENV = {"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"}


def with_engine(config: Config, **engine: Any) -> Config:
    return dataclasses.replace(config, engine=EngineConfig(**engine))


class Background:
    """A backfill in a thread, so the test can play the application meanwhile."""

    def __init__(self, db_url: str, config: Config, **opts: Any) -> None:
        self.report: Report | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.report = asyncio.run(
                    abackfill(config, Database(db_url), BackfillOptions(**opts), env=ENV)
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 60) -> Report:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the backfill hung"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def filled(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute('SELECT count(*) FROM app."SupportTickets" WHERE emb IS NOT NULL')
        return int(row.fetchone()[0])  # type: ignore[index]


def assert_right_vectors(db_url: str, ids: set[int]) -> None:
    with psycopg.connect(db_url) as conn:
        vectors = stored_vectors(conn)
    for i in ids:
        np.testing.assert_array_equal(vectors[i], hash_vector(expected_text(i), 8))


# ---------------------------------------------------------------------------- row locks


def test_a_row_the_app_keeps_locked_is_skipped_not_waited_for(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = with_engine(tickets_config(fake_openai.base_url), locked_rows_wait_s=1)
    with psycopg.connect(tickets) as app:
        app.execute('SELECT * FROM app."SupportTickets" WHERE ticket_no = 2 FOR UPDATE')
        report = Background(tickets, config).join(timeout=30)  # the app still holds row 2
        app.rollback()

    assert report.locked == 1 and report.embedded == 44 and report.failed == 0
    assert report.status == "succeeded"
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
    assert vectors[2] is None  # left for the next run
    assert_right_vectors(tickets, {i for i in range(1, 61) if i % 4 and i != 2})
    again = Background(tickets, config).join()
    assert again.embedded == 1
    assert_right_vectors(tickets, {2})


def test_a_row_locked_for_a_while_is_written_later_in_the_same_run(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = with_engine(tickets_config(fake_openai.base_url), locked_rows_wait_s=30)
    with psycopg.connect(tickets) as app:
        app.execute('SELECT * FROM app."SupportTickets" WHERE ticket_no = 2 FOR UPDATE')
        run = Background(tickets, config)
        wait_until(lambda: filled(tickets) >= 15 + 40)  # all but row 2
        time.sleep(0.3)
        app.rollback()  # the app lets go while the run is still retrying
        report = run.join()

    assert report.locked == 0 and report.embedded == 45 and report.changed == 0
    assert_right_vectors(tickets, {i for i in range(1, 61) if i % 4})


def test_the_app_never_waits_on_the_backfill_nor_deadlocks(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """The origin of this test: the app held one row FOR UPDATE, the backfill's bulk
    UPDATE queued behind it holding the rest of its batch, the app then touched one of
    those and one of the two transactions died of a deadlock."""
    fake_openai.latency = 0.05
    config = with_engine(tickets_config(fake_openai.base_url), locked_rows_wait_s=5)
    waits: list[float] = []
    with psycopg.connect(tickets) as app:
        app.execute("SET lock_timeout = '10s'")
        app.execute('SELECT * FROM app."SupportTickets" WHERE ticket_no = 2 FOR UPDATE')
        run = Background(tickets, config)
        wait_until(lambda: filled(tickets) > 15)
        for i in (3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23):
            started = time.monotonic()
            app.execute(
                'UPDATE app."SupportTickets" SET body = body || %s WHERE ticket_no = %s',
                (" (edited)", i),
            )
            waits.append(time.monotonic() - started)
        app.commit()  # no deadlock, no lock timeout
        report = run.join()

    assert max(waits) < 5, waits
    assert report.failed == 0
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
        texts = dict(
            conn.execute(
                "SELECT ticket_no, subject || E'\\n\\n' || body FROM app.\"SupportTickets\""
            ).fetchall()
        )
    # every stored vector is the vector of the text the row held when it was written:
    # rows edited after being written are stale (a later refresh's job), never mixed up
    for i, vector in vectors.items():
        if vector is None or i % 4 == 0:
            continue
        candidates = [hash_vector(texts[i], 8), hash_vector(expected_text(i), 8)]
        assert any(np.array_equal(vector, c) for c in candidates), i


def test_a_table_lock_held_by_the_app_times_out_the_write_which_is_retried(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = with_engine(
        tickets_config(fake_openai.base_url), lock_timeout_ms=100, write_batch_rows=1000
    )
    held = threading.Event()
    released = threading.Event()

    def lock_the_table() -> None:
        with psycopg.connect(tickets) as app:
            app.execute('LOCK TABLE app."SupportTickets" IN ACCESS EXCLUSIVE MODE')
            held.set()
            time.sleep(1.5)
            app.rollback()
            released.set()

    def on_inputs(inputs: list[str]) -> None:
        if not held.is_set() and not released.is_set():
            threading.Thread(target=lock_the_table, daemon=True).start()
            held.wait(5)

    fake_openai.on_inputs = on_inputs
    report = Background(tickets, config).join()

    assert released.is_set()
    assert report.embedded == 45 and report.failed == 0
    assert_right_vectors(tickets, {i for i in range(1, 61) if i % 4})


# ---------------------------------------------------------------------------- ids


def make_docs(db_url: str, id_type: str, ids: list[Any], *, key: str = "PRIMARY KEY") -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE docs (id {id_type} {key}, body text, emb vector(8))")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO docs (id, body) VALUES (%s, %s)", [(i, f"doc {i}") for i in ids]
            )


def docs_config(base_url: str, *, engine: dict[str, Any] | None = None, **target: Any) -> Config:
    return parse_config(
        {
            "engine": engine or {},
            "providers": {"openai": provider_settings(base_url, batch_size=7, timeout_s=5)},
            "targets": [
                {
                    "name": "docs",
                    "table": "docs",
                    "id_column": "id",
                    "text": "{body}",
                    "embedding_column": "emb",
                    "provider": "openai",
                }
                | target
            ],
        }
    )


def run_docs(db_url: str, config: Config, **opts: Any) -> Report:
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(**opts), env=ENV))


def docs_vectors(db_url: str) -> dict[Any, np.ndarray | None]:
    from pgvector.psycopg import register_vector

    with psycopg.connect(db_url) as conn:
        register_vector(conn)
        rows = conn.execute("SELECT id, body, emb FROM docs").fetchall()
    return {r[0]: (r[1], None if r[2] is None else r[2].to_numpy()) for r in rows}


@pytest.fixture
def en_us_collation(db_url: str) -> str:
    """A libc collation ``en_us`` in the test's database that orders text unlike Python
    (case and punctuation folded); the locale is made before the server starts
    (tests/conftest.py). Skips where the server's machine lacks it."""
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE COLLATION en_us (provider = libc, locale = 'en_US.utf8')")
    except psycopg.errors.InvalidParameterValue as exc:
        pytest.skip(f"the server has no en_US.UTF-8 locale: {exc}")
    return "en_us"


@pytest.mark.parametrize("chunk_rows", [2000, 7], ids=["one-chunk", "chunks-of-7"])
def test_text_ids_under_a_collation_unlike_pythons_are_all_written(
    db_url: str, fake_openai: FakeOpenAI, en_us_collation: str, chunk_rows: int
) -> None:
    # chunk bounds are ids too: compared by the server in the column's collation
    words = ["apple", "Banana", "cherry", "Date", "_under", "a-b", "ab", "Zed", "zoo", "Émile"]
    ids = [f"{w}{n}" for w in words for n in range(12)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        server_order = [
            r[0]
            for r in conn.execute(
                "SELECT x FROM unnest(%s::text[]) x ORDER BY x COLLATE en_us", (ids,)
            ).fetchall()
        ]
    assert server_order != sorted(ids)  # the premise: Python sorts these differently
    make_docs(db_url, "text COLLATE en_us", ids)

    report = run_docs(db_url, docs_config(fake_openai.base_url, engine={"chunk_rows": chunk_rows}))

    assert report.embedded == len(ids) and report.changed == 0 and report.status == "succeeded"
    for body, vector in docs_vectors(db_url).values():
        np.testing.assert_array_equal(vector, hash_vector(body, 8))


@pytest.mark.parametrize(
    ("id_type", "ids"),
    [
        ("uuid", ["00000000-0000-0000-0000-00000000000a", "ffffffff-0000-0000-0000-000000000001"]),
        ("numeric", ["1.5", "-2", "10000000000000000000000"]),
        ("varchar(20)", ["b", "A", "a"]),
        ("char(3)", ["b", "A", "a c"]),
        ("int4", [3, -1, 7]),
    ],
)
def test_id_types_that_are_supported(
    db_url: str, fake_openai: FakeOpenAI, id_type: str, ids: list[Any]
) -> None:
    make_docs(db_url, id_type, ids)
    # chunks of one row: every bound is an id of this type, sent back as JSON
    report = run_docs(db_url, docs_config(fake_openai.base_url, engine={"chunk_rows": 1}))
    assert report.embedded == len(ids)
    for body, vector in docs_vectors(db_url).values():
        np.testing.assert_array_equal(vector, hash_vector(body, 8))


def test_citext_ids_with_a_row_deleted_mid_batch_are_counted_exactly(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """citext ids: the write answered the ids it wrote as a citext[] the client cannot
    read, which came back as one string; its characters were taken for the ids, and
    the report counted 23 embedded and 7 changed of 30 rows with one deleted."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS citext")
    make_docs(db_url, "citext", [f"K{n:03}" for n in range(30)])

    def app_deletes_one(inputs: list[str]) -> None:
        if "doc K005" in inputs:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("DELETE FROM docs WHERE id = 'k005'")  # case-insensitive

    fake_openai.on_inputs = app_deletes_one
    report = run_docs(db_url, docs_config(fake_openai.base_url))
    assert (report.embedded, report.changed, report.skipped) == (29, 1, 1), report
    vectors = docs_vectors(db_url)
    assert len(vectors) == 29 and all(v is not None for _, v in vectors.values())


def test_a_row_the_app_only_key_share_locks_is_written_beside_one_it_holds(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """The app inserts a row that references ticket 3 (a KEY SHARE lock on it, for as
    long as its transaction lasts) and holds ticket 6 FOR UPDATE: the write that skips
    locked rows locked with FOR UPDATE, which conflicts with KEY SHARE, so ticket 3 was
    left NULL as "locked" with 6, though the UPDATE itself does not wait for it."""
    config = with_engine(tickets_config(fake_openai.base_url), locked_rows_wait_s=1)
    with psycopg.connect(tickets) as app:
        app.execute('SELECT 1 FROM app."SupportTickets" WHERE ticket_no = 3 FOR KEY SHARE')
        app.execute('SELECT 1 FROM app."SupportTickets" WHERE ticket_no = 6 FOR UPDATE')
        report = Background(tickets, config).join(timeout=30)  # the app holds both
        app.rollback()
    assert (report.locked, report.embedded) == (1, 44), report
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
    assert vectors[6] is None and vectors[3] is not None
    assert_right_vectors(tickets, {3})


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("CREATE TABLE docs (id int, body text, emb vector(8))", "neither the primary key"),
        (
            "CREATE TABLE docs (id int, body text, emb vector(8));"
            " CREATE UNIQUE INDEX ON docs (id) WHERE id > 0",
            "neither the primary key",
        ),
        (
            "CREATE TYPE mood AS ENUM ('sad', 'ok');"
            " CREATE TABLE docs (id mood PRIMARY KEY DEFAULT 'ok', body text, emb vector(8))",
            "of type mood",
        ),
        (
            "CREATE TABLE docs (id float8 PRIMARY KEY DEFAULT 1, body text, emb vector(8))",
            "of type double precision",
        ),
        (
            "CREATE TABLE docs (id numeric PRIMARY KEY DEFAULT 'NaN', body text, emb vector(8));"
            " INSERT INTO docs VALUES (1, 'one')",
            "holds NaN",
        ),
    ],
)
def test_an_id_column_that_cannot_identify_rows_is_refused_before_any_request(
    db_url: str, fake_openai: FakeOpenAI, setup: str, message: str
) -> None:
    from embedfill import SchemaMismatch

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(setup.encode())
        conn.execute("INSERT INTO docs (body) VALUES ('a text to embed')")
    with pytest.raises(SchemaMismatch, match=message) as raised:
        run_docs(db_url, docs_config(fake_openai.base_url))
    assert raised.value.exit_code == 2
    assert fake_openai.requests == []
    assert str(raised.value).count(".") >= 1 and "\n" not in str(raised.value)


def test_a_unique_index_that_is_not_the_primary_key_is_enough(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE docs (pk serial PRIMARY KEY, id text NOT NULL, body text, emb vector(8))"
        )
        conn.execute("CREATE UNIQUE INDEX docs_id ON docs (id)")
        conn.execute("INSERT INTO docs (id, body) VALUES ('x', 'doc x'), ('y', 'doc y')")
    report = run_docs(db_url, docs_config(fake_openai.base_url))
    assert report.embedded == 2


# ---------------------------------------------------------------------------- exclusivity


def test_two_spellings_of_one_table_are_one_target(db_url: str, fake_openai: FakeOpenAI) -> None:
    make_docs(db_url, "int", list(range(1, 41)))
    fake_openai.latency = 0.2
    first = Background(db_url, docs_config(fake_openai.base_url, table="docs"))
    wait_until(lambda: bool(fake_openai.requests))
    second = docs_config(fake_openai.base_url, table="public.docs", name="docs-again")
    with pytest.raises(TargetBusy, match="target 'docs'") as busy:
        run_docs(db_url, second)
    assert busy.value.exit_code == 4 and busy.value.run_id is not None
    assert first.join().embedded == 40


def test_a_run_of_another_table_never_marks_a_live_run_abandoned(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    make_docs(tickets, "int", list(range(1, 11)))
    docs_done, held = threading.Event(), threading.Event()

    def hold_tickets(inputs: list[str]) -> None:
        if any(i.startswith("Ticket") for i in inputs):  # the slow run waits for the other
            held.set()
            docs_done.wait(60)

    fake_openai.on_inputs = hold_tickets
    slow = Background(tickets, tickets_config(fake_openai.base_url))
    wait_until(held.is_set)
    # same target name, another table: its run completes on its own (and the worker of
    # the first, serving a target of that name too, leaves the other table's job alone)
    other = run_docs(tickets, docs_config(fake_openai.base_url, name="tickets"))
    assert other.embedded == 10
    with psycopg.connect(tickets) as conn:
        statuses = dict(conn.execute("SELECT id, status FROM embedfill.runs").fetchall())
    docs_done.set()
    report = slow.join()
    assert statuses[report.run_id] == "running"
    assert report.status == "succeeded" and report.embedded == 45


# ---------------------------------------------------------------------------- audit truth


def committed(db_url: str) -> int:
    """Rows the run filled: NULL before (every 4th row was filled beforehand)."""
    return filled(db_url) - 15


def audit(db_url: str, run_id: int) -> tuple[str, int, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT status, embedded, failed FROM embedfill.runs WHERE id = %s", (run_id,)
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_a_size_change_mid_run_after_writes_is_exit_3_and_the_audit_counts_what_was_written(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    from embedfill import RunAborted

    config = tickets_config(fake_openai.base_url)
    provider = dataclasses.replace(config.providers["openai"], dimensions=None)
    config = dataclasses.replace(config, providers={"openai": provider})
    fake_openai.dims = 8
    seen = []

    def on_inputs(inputs: list[str]) -> None:
        seen.append(inputs)
        if len(seen) == 4:  # the model behind the endpoint changed
            fake_openai.dims = 16

    fake_openai.on_inputs = on_inputs
    with pytest.raises(RunAborted) as raised:
        run_docs(tickets, config)
    assert raised.value.exit_code == 3
    assert "16-dimensional" in str(raised.value) and "after writing" in str(raised.value)
    with psycopg.connect(tickets) as conn:
        (run_id,) = conn.execute("SELECT max(id) FROM embedfill.runs").fetchone()  # type: ignore[misc]
    status, embedded, failed = audit(tickets, run_id)
    assert status == "failed" and failed == 0
    assert embedded == committed(tickets) > 0


def test_a_cancelled_run_records_exactly_what_it_committed_and_no_failures(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.latency = 0.2
    config = tickets_config(fake_openai.base_url)

    async def go() -> Report:
        cancel = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_inputs(inputs: list[str]) -> None:  # the provider's threads
            # >= (not ==): requests answered at once by two threads may both count 5
            if len(fake_openai.requests) >= 4:
                loop.call_soon_threadsafe(cancel.set)

        fake_openai.on_inputs = on_inputs
        return await abackfill(config, Database(tickets), BackfillOptions(), env=ENV, cancel=cancel)

    report = asyncio.run(go())
    assert report.status == "cancelled" and report.failed == 0
    assert 0 < report.embedded < 45
    assert report.run_id is not None
    assert audit(tickets, report.run_id) == ("cancelled", committed(tickets), 0)
