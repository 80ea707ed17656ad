"""Continuous mode (watch.py) in-process: a real PostgreSQL, the real test server, the
same workers as jobs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from prometheus_client import generate_latest

from embedfill import Database, astatus
from embedfill.config import EngineConfig, TableName, render_text
from embedfill.errors import RunAborted
from embedfill.http.metrics import Metrics
from embedfill.providers.hashing import hash_vector
from embedfill.runtime import awatch
from embedfill.watch import TargetWatch, WatchOptions
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import stored_vectors, tickets_config

T = 'app."SupportTickets"'
ENV = {"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"}


class Running:
    """``awatch`` on its own event loop in a thread, stopped by ``stop()``."""

    def __init__(
        self,
        db_url: str,
        config: Any,
        env: dict[str, str] | None = None,
        *,
        worker: bool = True,
        observer: Any = None,
        **opts: Any,
    ) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.watches: list[TargetWatch] = []
        self.error: BaseException | None = None
        # tasks still pending when the watch returned: nothing may outlive it
        self.left_behind: list[str] = []
        ready = threading.Event()

        def main() -> None:
            async def go() -> None:
                self.stop_event = asyncio.Event()
                ready.set()
                await awatch(
                    config,
                    Database(db_url),
                    None,
                    self.stop_event,
                    opts=WatchOptions(**opts),
                    env=ENV if env is None else env,
                    worker=worker,
                    on_watch=self.watches.extend,
                    observer=observer,
                )

            try:
                self.loop.run_until_complete(go())
            except BaseException as exc:
                self.error = exc
            finally:
                self.left_behind = [
                    t.get_coro().__qualname__  # type: ignore[union-attr]
                    for t in asyncio.all_tasks(self.loop)
                    if not t.done()
                ]
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self, timeout: float = 60) -> None:
        assert self.stop_event is not None
        # a watch whose every watcher ended has returned on its own, and its loop closed
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch did not stop"
        if self.error is not None:
            raise self.error
        assert self.left_behind == [], f"tasks outlived the watch: {self.left_behind}"


@pytest.fixture
def watching(tickets: str, fake_openai: FakeOpenAI) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(**opts: Any) -> Running:
        config = tickets_config(fake_openai.base_url)
        config = type(config)(
            providers=config.providers,
            targets=config.targets,
            engine=EngineConfig(chunk_rows=50, lease_s=5),
        )
        r = Running(tickets, config, **({"interval_s": 0.3, "sweep_interval_s": 1.0} | opts))
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def text_of(conn: psycopg.Connection[Any], i: int) -> str:
    row = conn.execute(
        'SELECT subject, body FROM app."SupportTickets" WHERE ticket_no = %s', (i,)
    ).fetchone()
    assert row is not None
    return render_text("{subject}\n\n{body}", {"subject": row[0], "body": row[1]})


def all_correct(db_url: str) -> bool:
    """Every row holds the vector of its current text (the pre-filled ones aside)."""
    with psycopg.connect(db_url) as conn:
        vectors = stored_vectors(conn)
        return all(
            v is not None and np.array_equal(v, hash_vector(text_of(conn, i), 8))
            for i, v in vectors.items()
            if i % 4 or i > 60
        )


def test_watch_fills_new_rows_refreshes_edited_ones_and_ends_its_job_on_stop(
    tickets: str, fake_openai: FakeOpenAI, watching: Callable[..., Running]
) -> None:
    w = watching()
    wait_for(lambda: all_correct(tickets))  # the backlog first
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO app."SupportTickets" (ticket_no, org, subject, body)
               SELECT i, 'org-a', 'new ' || i, 'body ' || i FROM generate_series(61, 80) i"""
        )
        conn.execute(
            """UPDATE app."SupportTickets" SET body = body || ' v2' WHERE ticket_no IN (1, 2, 3)"""
        )
    wait_for(lambda: all_correct(tickets))
    status = asyncio.run(astatus(tickets_config(fake_openai.base_url), Database(tickets)))[0]
    assert (status.missing, status.stale, status.outdated_model) == (0, 0, 0)
    job = w.watches[0].job_id
    assert job is not None
    w.stop()
    with psycopg.connect(tickets) as conn:
        row = conn.execute(
            "SELECT status, parameters->>'watch', embedded FROM embedfill.runs WHERE id = %s",
            (job,),
        ).fetchone()
    assert row is not None and row[0] == "succeeded" and row[1] == "true"
    assert row[2] == 45 + 20 + 3
    # each text sent once: nothing embedded twice
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent)) == 45 + 20 + 3


def test_changes_queued_by_a_trigger_are_picked_up_without_waiting_for_a_poll(
    tickets: str, fake_openai: FakeOpenAI, watching: Callable[..., Running]
) -> None:
    from embedfill.application import atriggers

    config = tickets_config(fake_openai.base_url)
    asyncio.run(atriggers(config, Database(tickets), "tickets", True, False))
    # polls and sweeps far apart: only the trigger's queue can be this quick
    w = watching(interval_s=3600, sweep_interval_s=3600)
    wait_for(lambda: all_correct(tickets))  # the backlog (the first poll and sweep)
    wait_for(lambda: bool(w.watches and w.watches[0].job_id))
    for n in range(3):  # an edit, a burst of edits in separate transactions, an insert
        with psycopg.connect(tickets, autocommit=True) as conn:
            if n == 0:
                conn.execute(
                    """UPDATE app."SupportTickets" SET body = 'edited' WHERE ticket_no = 7"""
                )
            elif n == 1:
                burst = """UPDATE app."SupportTickets" SET subject = 'burst' WHERE ticket_no = %s"""
                for i in (9, 10, 11, 13):
                    conn.execute(burst, (i,))
            else:
                conn.execute(
                    """INSERT INTO app."SupportTickets" (ticket_no, org, subject, body)
                       VALUES (61, 'org-b', 'new', 'row')"""
                )
        committed = time.monotonic()
        wait_for(lambda: all_correct(tickets), timeout=10)
        assert time.monotonic() - committed < 5  # generous: "did not wait for a poll"
    with psycopg.connect(tickets) as conn:
        left = conn.execute("SELECT count(*) FROM embedfill.changes").fetchone()
    assert left == (0,)


def test_a_second_watch_stands_by_and_takes_over_when_the_first_stops(
    tickets: str, fake_openai: FakeOpenAI, watching: Callable[..., Running]
) -> None:
    first = watching()
    wait_for(lambda: all_correct(tickets))
    second = watching()
    wait_for(lambda: bool(second.watches))
    time.sleep(1.0)
    assert first.watches[0].job_id is not None and second.watches[0].job_id is None
    first.stop()
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """UPDATE app."SupportTickets" SET body = 'after the first' WHERE ticket_no = 9"""
        )
    wait_for(lambda: all_correct(tickets))
    wait_for(lambda: bool(second.watches and second.watches[0].job_id))
    second.stop()


def test_a_standby_of_another_model_refuses_to_take_over_the_column(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Two watches start on a column without a vector of embedfill's yet (a first deploy,
    one replica on the new config): A with test-embed, B with other-embed; both pass
    the start-up check. A leads and fills the column. When A stops, B takes the column's
    lock and is refused as at start-up (ModelChanged) before anything is sent: the
    target stops, with its reason. Before (helper-31), it re-embedded every row in place
    with its model."""
    from embedfill.errors import ModelChanged

    base = tickets_config(fake_openai.base_url)
    config_a = dataclasses.replace(base, engine=EngineConfig(chunk_rows=50, lease_s=5))
    other = dataclasses.replace(base.providers["openai"], model="other-embed")
    config_b = dataclasses.replace(config_a, providers={"openai": other})
    a = Running(tickets, config_a, interval_s=0.3, sweep_interval_s=1.0)
    wait_for(lambda: bool(a.watches and a.watches[0].job_id))
    b = Running(tickets, config_b, interval_s=0.3, sweep_interval_s=1.0)
    try:
        wait_for(lambda: all_correct(tickets))
        wait_for(lambda: bool(b.watches))
        time.sleep(1.0)
        assert b.error is None and b.watches[0].job_id is None  # it stands by
    finally:
        a.stop()
    sent = len(fake_openai.requests)
    wait_for(lambda: b.watches[0].failed is not None, timeout=30)
    refused = b.watches[0].failed
    assert isinstance(refused, ModelChanged), refused
    assert "configured with openai:other-embed" in str(refused)
    assert "--allow-model-change" in str(refused)
    with pytest.raises(RunAborted):  # its one target stopped: exit 3, as any target's
        b.stop()
    assert len(fake_openai.requests) == sent and all_correct(tickets)
    [st] = asyncio.run(astatus(config_a, Database(tickets)))
    assert st.outdated_model == 0


def test_a_watch_job_whose_end_was_asked_for_is_ended_not_resumed(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A backfill that found no watch holding the column asks its watch job to end; a
    standby that took the lock meanwhile opens a new job instead of resuming that one
    (its watcher would have stopped at the cancel at once, the target unwatched while
    the process ran: helper-34)."""
    from embedfill import jobs
    from embedfill.db.catalog import inspect_target
    from embedfill.db.connect import connect
    from embedfill.db.schema import ensure_schema

    config = tickets_config(fake_openai.base_url)
    target = config.targets[0]
    pconf = config.provider_for(target)

    async def go() -> tuple[Any, Any, Any, Any]:
        conn = await connect(Database(tickets))
        try:
            await ensure_schema(conn)
            info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
            spec = jobs.spec_of("watch", target, pconf, info, env=ENV)

            async def open_job() -> Any:
                return await jobs.open_watch_job(
                    conn, spec=spec, target=target, info=info, actor="test"
                )

            first = await open_job()
            again = await open_job()  # resumed: a watch that died left it
            await conn.execute(
                "UPDATE embedfill.runs SET cancel_requested = true WHERE id = %s", (first,)
            )
            third = await open_job()
            cur = await conn.execute("SELECT status FROM embedfill.runs WHERE id = %s", (first,))
            return first, again, third, await cur.fetchone()
        finally:
            await conn.close()

    first, again, third, ended = asyncio.run(go())
    assert again == first
    assert third is not None and third != first
    assert ended == ("cancelled",)


def test_a_backfill_while_a_watch_runs_is_refused_with_a_clear_sentence(
    tickets: str, fake_openai: FakeOpenAI, watching: Callable[..., Running]
) -> None:
    from embedfill import BackfillOptions, abackfill
    from embedfill.errors import TargetBusy

    w = watching()
    wait_for(lambda: bool(w.watches and w.watches[0].job_id))
    with pytest.raises(TargetBusy, match="embedfill watch"):
        asyncio.run(
            abackfill(
                tickets_config(fake_openai.base_url),
                Database(tickets),
                BackfillOptions(),
                env=ENV,
            )
        )


def test_a_big_table_without_a_partial_null_index_gets_the_create_index_to_run(
    db_url: str,
) -> None:
    from embedfill.config import parse_config
    from embedfill.db.catalog import inspect_target, poll_index_hint
    from embedfill.db.connect import connect

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE big (id bigint PRIMARY KEY, body text, emb vector(3))")
        conn.execute("INSERT INTO big SELECT i, 'b' FROM generate_series(1, 120000) i")
        conn.execute("ANALYZE big")
    config = parse_config(
        {
            "providers": {"h": {"kind": "hash", "dimensions": 3}},
            "targets": [
                {
                    "name": "big",
                    "table": "big",
                    "text": "{body}",
                    "provider": "h",
                    "embedding_column": "emb",
                    "id_column": "id",
                }
            ],
        }
    )

    async def hint() -> str | None:
        conn = await connect(Database(db_url))
        try:
            target = config.targets[0]
            info = await inspect_target(conn, target, 3, "hash")
            return await poll_index_hint(conn, target, info)
        finally:
            await conn.close()

    sentence = asyncio.run(hint())
    assert sentence is not None
    assert (
        'CREATE INDEX CONCURRENTLY "big_emb_null" ON "public"."big" ("id") WHERE "emb" IS NULL'
        in sentence
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute('CREATE INDEX "big_emb_null" ON "big" ("id") WHERE "emb" IS NULL')
    assert asyncio.run(hint()) is None


# ------------------------------------ issue 15, items 3 and 11: a table that changes shape


def two_targets(base_url: str) -> Any:
    """tickets, and the same rows copied to app.notes: two targets of one watch."""
    config = tickets_config(base_url)
    notes = dataclasses.replace(
        config.targets[0], name="notes", table=TableName(schema="app", name="notes")
    )
    return type(config)(
        providers=config.providers,
        targets=(*config.targets, notes),
        engine=EngineConfig(chunk_rows=50, lease_s=5),
    )


def nulls(db_url: str, table: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE emb IS NULL").fetchone()
    assert row is not None
    return int(row[0])


def test_a_target_whose_table_no_longer_fits_stops_alone_and_the_watch_exits_3(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """ALTER COLUMN emb TYPE vector(16) under a watch of two targets: that target says
    why and stops (its job failed with the reason), the other goes on filling rows, and
    the watch ends with exit 3 naming it (it ended in a traceback and exit 0)."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('CREATE TABLE app.notes (LIKE app."SupportTickets" INCLUDING ALL)')
        conn.execute('INSERT INTO app.notes SELECT * FROM app."SupportTickets"')
    metrics = Metrics(service=False)  # what `watch --metrics-port` exports
    running = Running(tickets, two_targets(fake_openai.base_url), interval_s=0.3, observer=metrics)
    wait_for(lambda: nulls(tickets, "app.notes") == 0 and nulls(tickets, T) == 0)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {T} ALTER COLUMN emb TYPE vector(16) USING NULL")
    wait_for(lambda: any(w.failed is not None for w in running.watches))
    failed = next(w for w in running.watches if w.failed is not None)
    assert failed.target.name == "tickets"
    assert "16-dimensional" in str(failed.failed)
    # a watch on its own says so in its metrics too (only serve's status pass did)
    exported = metrics.registry.get_sample_value(
        "embedfill_target_error", {"target": "tickets", "error_class": "SchemaMismatch"}
    )
    assert exported == 1, generate_latest(metrics.registry).decode()
    # the other target goes on
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("UPDATE app.notes SET emb = NULL WHERE ticket_no <= 10")
    wait_for(lambda: nulls(tickets, "app.notes") == 0)
    with psycopg.connect(tickets) as conn:
        status = conn.execute(
            "SELECT status, error FROM embedfill.runs WHERE target = 'tickets'"
            " AND kind = 'watch' ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert status is not None and status[0] == "failed" and "16-dimensional" in status[1]
    with pytest.raises(RunAborted, match=r"1 of 2 watched targets stopped being watched") as e:
        running.stop()
    assert e.value.exit_code == 3 and "tickets" in str(e.value)


def test_a_watch_of_one_target_that_no_longer_fits_exits_3_by_itself(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    running = Running(tickets, config, interval_s=0.3)
    wait_for(lambda: nulls(tickets, T) == 0)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {T} DROP COLUMN subject")
    running.thread.join(30)
    assert not running.thread.is_alive(), "the watch went on with nothing to watch"
    assert isinstance(running.error, RunAborted)
    assert "subject" in str(running.error)


def test_a_watch_job_failed_by_a_worker_ends_its_target_and_says_so_in_the_metrics(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A worker fails the watch job (a table that refuses every write, say): that target
    stops being watched, and the watch's own metrics say so, as when its table no longer
    fits; the other target goes on."""
    from embedfill import jobs
    from embedfill.errors import WriteRefused

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('CREATE TABLE app.notes (LIKE app."SupportTickets" INCLUDING ALL)')
        conn.execute('INSERT INTO app.notes SELECT * FROM app."SupportTickets"')
    metrics = Metrics(service=False)
    running = Running(tickets, two_targets(fake_openai.base_url), interval_s=0.3, observer=metrics)
    wait_for(lambda: len(running.watches) == 2 and all(w.job_id for w in running.watches))
    (watcher,) = [w for w in running.watches if w.target.name == "tickets"]
    job = watcher.job_id
    assert job is not None

    async def fail() -> None:
        conn = await psycopg.AsyncConnection.connect(tickets, autocommit=True)
        try:
            await jobs.fail(conn, job, WriteRefused("The database refused to write the vectors."))
        finally:
            await conn.close()

    asyncio.run(fail())
    wait_for(lambda: watcher.failed is not None)
    exported = metrics.registry.get_sample_value(
        "embedfill_target_error", {"target": "tickets", "error_class": "RunAborted"}
    )
    assert exported == 1, generate_latest(metrics.registry).decode()
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("UPDATE app.notes SET emb = NULL WHERE ticket_no <= 10")
    wait_for(lambda: nulls(tickets, "app.notes") == 0)  # the other target goes on
    with pytest.raises(RunAborted, match=r"1 of 2 watched targets stopped being watched"):
        running.stop()


def test_a_table_that_changed_shape_but_still_fits_is_read_again(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    running = Running(tickets, config, interval_s=0.3)
    wait_for(lambda: nulls(tickets, T) == 0)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {T} ALTER COLUMN ticket_no TYPE numeric")
        conn.execute(f"ALTER TABLE {T} ADD COLUMN extra int")
        conn.execute(f"UPDATE {T} SET emb = NULL WHERE ticket_no <= 5")
    wait_for(lambda: nulls(tickets, T) == 0)
    assert all(w.failed is None for w in running.watches)
    running.stop()


def test_a_watch_jobs_progress_is_what_is_queued_in_flight_and_done_lately(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """Issue 15, item 8: a watch job has no total to reach; its route and the job list say
    what is queued, in a worker's hands and done in the last hour (rows)."""
    from embedfill.application import job_record, list_jobs

    config = tickets_config(fake_openai.base_url)
    running = Running(tickets, config, interval_s=0.3)
    wait_for(lambda: nulls(tickets, T) == 0)
    wait_for(lambda: bool(running.watches and running.watches[0].job_id))
    job = running.watches[0].job_id
    assert job is not None

    def progress() -> dict[str, Any]:
        return dict(asyncio.run(job_record(Database(tickets), job))["progress"])

    wait_for(lambda: progress()["done_last_hour"] == 45)
    shown = progress()
    assert shown["queued"] == 0 and shown["in_flight"] == 0
    (listed,) = asyncio.run(list_jobs(config, Database(tickets), "tickets", 10))
    assert listed["progress"]["done_last_hour"] == 45
    running.stop()


def test_a_watch_jobs_totals_are_the_rows_it_wrote_across_worker_sessions(
    tickets: str, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's session of the watch job closes when idle and a new one opens when rows
    come: the job's totals were what the worker's last session reported (598 rows
    written, "2 embedded"); they are the rows committed."""
    from embedfill.jobs import spec as job_spec

    quick = dataclasses.replace(job_spec.KINDS["watch"], idle_close_s=0.3)
    monkeypatch.setitem(job_spec.KINDS, "watch", quick)
    running = Running(tickets, tickets_config(fake_openai.base_url), interval_s=0.3)
    wait_for(lambda: nulls(tickets, T) == 0)
    first = 60 - 15  # the NULL rows; the 15 others hold vectors of other code (unverified)
    time.sleep(1.5)  # idle: the worker's session of the job closes
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET emb = NULL WHERE ticket_no <= 10")
    wait_for(lambda: nulls(tickets, T) == 0)
    job = running.watches[0].job_id
    running.stop()
    with psycopg.connect(tickets) as conn:
        row = conn.execute("SELECT embedded FROM embedfill.runs WHERE id = %s", (job,)).fetchone()
        tallied = conn.execute(
            "SELECT sum(embedded) FROM embedfill.tallies WHERE run_id = %s", (job,)
        ).fetchone()
    assert row is not None and tallied is not None
    assert row[0] == tallied[0] >= first + 10
