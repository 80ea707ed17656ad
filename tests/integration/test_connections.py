"""The connection budget of one process, whatever the number of jobs and targets: a
worker holds its control connection and its lanes (db/lanes.py); a watch's watchers
share its worker's table lane (watch.WatchHub). Counted in pg_stat_activity, sampled
throughout."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from dataclasses import replace

import psycopg
import pytest

from embedfill import Database
from embedfill.application import abackfill
from embedfill.config import Config, parse_config
from embedfill.db.schema import amigrate
from embedfill.engine import BackfillOptions
from embedfill.worker import Worker
from tests.integration.test_watch import Running
from tests.support.fake_openai import FakeOpenAI
from tests.support.roles import EMBEDFILL_GRANTS, Roles
from tests.support.tables import provider_settings

ENV = {"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"}
ROWS = 40


def _tables(db_url: str, n: int) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS app")
        for i in range(n):
            conn.execute(
                f"CREATE TABLE app.notes_{i} (id bigint PRIMARY KEY, body text, emb vector(8))"
            )
            conn.execute(
                f"INSERT INTO app.notes_{i} SELECT g, 'note ' || g || ' of {i}', NULL"
                f" FROM generate_series(1, {ROWS}) g"
            )


def _config(base_url: str, n: int) -> Config:
    return parse_config(
        {
            "providers": {"openai": provider_settings(base_url)},
            "targets": [
                {
                    "name": f"notes_{i}",
                    "table": f"app.notes_{i}",
                    "id_column": "id",
                    "text": "{body}",
                    "embedding_column": "emb",
                    "provider": "openai",
                }
                for i in range(n)
            ],
        }
    )


def _missing(db_url: str, tables: Iterable[int]) -> int:
    """NULL rows left in these ``app.notes_<i>`` tables."""
    with psycopg.connect(db_url) as conn:
        return sum(
            conn.execute(f"SELECT count(*) FROM app.notes_{i} WHERE emb IS NULL").fetchone()[0]  # type: ignore[index]
            for i in tables
        )


def _filled(db_url: str, tables: Iterable[int], within_s: float) -> bool:
    """Whether these tables have no NULL row left within ``within_s`` (polled; from a
    test's event loop, through asyncio.to_thread)."""
    tables = list(tables)
    deadline = time.monotonic() + within_s
    while _missing(db_url, tables) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _missing(db_url, tables) == 0


class Sampler:
    """The most connections ``role`` held at once, sampled every 20 ms."""

    def __init__(self, db_url: str, role: str) -> None:
        self.most = 0
        self._stop = threading.Event()

        def sample() -> None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                while not self._stop.is_set():
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)
                    ).fetchone()
                    self.most = max(self.most, row[0] if row else 0)
                    time.sleep(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.most


def _role(db_url: str, roles: Roles) -> str:
    """A role of its own (no limit: what it holds is what it needs), granted what the
    README says."""
    asyncio.run(amigrate(Database(db_url)))
    name = roles.create()
    roles.grant(
        name,
        *EMBEDFILL_GRANTS,
        "GRANT USAGE ON SCHEMA app TO {role}",
        "GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA app TO {role}",
    )
    return name


def test_a_worker_on_four_jobs_at_once_holds_three_connections(
    db_url: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    n = 4
    _tables(db_url, n)
    name = _role(db_url, roles)
    url = roles.url(name)
    config = _config(fake_openai.base_url, n)
    fake_openai.latency = 0.05  # slow enough that the four jobs' sessions overlap

    async def go() -> None:
        for i in range(n):  # four jobs queued, nobody working yet
            await abackfill(
                config, Database(url), BackfillOptions(target=f"notes_{i}"), env=ENV, enqueue=True
            )
        sampler = Sampler(db_url, name)
        stop = asyncio.Event()
        worker = Worker(config, Database(url), env=ENV, concurrency=n)
        task = asyncio.create_task(worker.run(stop))
        try:
            await asyncio.to_thread(_filled, db_url, range(n), 60)
            assert len(worker.sessions) >= 2  # it served several jobs at once
        finally:
            stop.set()
            await task
            most = sampler.stop()
        assert most <= 3, f"one worker process held {most} connections"

    asyncio.run(go())
    assert _missing(db_url, range(n)) == 0


@pytest.mark.parametrize("limit", [None, 2])
def test_a_watch_over_twelve_targets_holds_three_connections_or_the_limits_two(
    db_url: str, roles: Roles, fake_openai: FakeOpenAI, limit: int | None
) -> None:
    """Three at the defaults (was four; one per target before that): the worker's
    control connection and table lane, and the twelve watchers' one in place of a writer
    lane. Two with ``connection_limit=2``: the watchers share the table lane. The role's
    CONNECTION LIMIT is the same, so one connection more would be refused by the server,
    not only counted."""
    n = 12
    _tables(db_url, n)
    name = _role(db_url, roles)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{name}" CONNECTION LIMIT {limit or 3}')
    url = roles.url(name, query=f"connection_limit={limit}" if limit else "")
    sampler = Sampler(db_url, name)
    running = Running(url, _config(fake_openai.base_url, n), interval_s=0.5)
    try:
        assert _filled(db_url, range(n), 60), running.error
        with psycopg.connect(db_url) as conn:  # new rows are still noticed
            conn.execute("INSERT INTO app.notes_7 VALUES (1000, 'a late note', NULL)")
        assert _filled(db_url, range(n), 20)
        assert sum(1 for w in running.watches if w.job_id) == n  # each target led
    finally:
        running.stop()
        most = sampler.stop()
    assert running.error is None, running.error
    assert most <= (limit or 3), f"one watch process over {n} targets held {most} connections"
    with psycopg.connect(db_url) as conn:  # each watch job ended when the watch did
        left = conn.execute(
            "SELECT count(*) FROM embedfill.runs WHERE status = 'running'"
        ).fetchone()
        assert left == (0,)


# ---------------------------------------------- one target locked, the others go on


@pytest.mark.parametrize("how", ["returns", "raises", "is cancelled"])
def test_a_writer_waiting_for_a_lane_wakes_when_a_read_frees_it(how: str) -> None:
    """A read on the table lane that failed (a lock timeout) or was cancelled must tell
    the writers waiting for a lane, as one that returned does (it did not: a target's
    writes then waited for the next unrelated release)."""
    from embedfill.db.lanes import Lane, Lanes

    async def go() -> None:
        lanes = Lanes(
            Database("postgresql://u@localhost/x"),
            write_concurrency=1,
            lock_timeout_ms=100,
            statement_timeout_s=1,
        )
        table = Lane(None, lanes)  # type: ignore[arg-type]  # no statement is run
        holding = asyncio.Event()

        async def read() -> None:
            async with table.hold():
                holding.set()
                await asyncio.sleep(0.2)
                if how == "raises":
                    raise psycopg.errors.LockNotAvailable("canceling statement: lock timeout")

        reader = asyncio.create_task(read())
        await holding.wait()

        async def write() -> bool:
            async with lanes.writer(table) as lane:
                return lane is table

        writer = asyncio.create_task(write())
        if how == "is cancelled":
            await asyncio.sleep(0.1)
            reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        done, _ = await asyncio.wait({writer}, timeout=2)
        assert done, f"the writer still waits 2 s after the read that {how} freed the lane"

    asyncio.run(go())


@pytest.mark.parametrize("limit", [2, None])
def test_a_table_the_app_holds_locked_does_not_hold_up_another_targets_job(
    db_url: str, roles: Roles, fake_openai: FakeOpenAI, limit: int | None
) -> None:
    """One worker, two jobs, and an app's migration holding ACCESS EXCLUSIVE on the
    first table: the second target is filled meanwhile, the first once it is released."""
    _tables(db_url, 2)
    name = _role(db_url, roles)
    url = roles.url(name, query=f"connection_limit={limit}" if limit else "")
    config = _config(fake_openai.base_url, 2)
    config = replace(config, engine=replace(config.engine, lock_timeout_ms=300))
    fake_openai.latency = 0.02

    async def go() -> None:
        for i in range(2):
            await abackfill(
                config, Database(url), BackfillOptions(target=f"notes_{i}"), env=ENV, enqueue=True
            )
        with psycopg.connect(db_url) as app:
            app.execute("LOCK TABLE app.notes_0 IN ACCESS EXCLUSIVE MODE")
            stop = asyncio.Event()
            worker = Worker(config, Database(url), env=ENV, concurrency=2)
            task = asyncio.create_task(worker.run(stop))
            try:
                filled = await asyncio.to_thread(_filled, db_url, [1], 30)
                assert filled, "the second target waited for the first one's lock"
                app.rollback()  # the migration ends
                await asyncio.to_thread(_filled, db_url, [0], 30)
            finally:
                stop.set()
                await task
        assert _missing(db_url, [0]) == 0

    asyncio.run(go())


def test_a_watch_goes_on_for_the_other_targets_while_one_table_is_locked(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    """The watchers share one connection: a watcher's read queued behind the app's lock
    gives way (lock_timeout) instead of holding it for every other target."""
    _tables(db_url, 2)
    running = Running(db_url, _config(fake_openai.base_url, 2), interval_s=0.5)
    try:
        assert _filled(db_url, range(2), 30)
        with psycopg.connect(db_url) as app:
            app.execute("LOCK TABLE app.notes_0 IN ACCESS EXCLUSIVE MODE")
            time.sleep(1.5)  # a poll of notes_0 is queued behind the lock by now
            with psycopg.connect(db_url, autocommit=True) as other:
                other.execute("INSERT INTO app.notes_1 VALUES (1000, 'a late note', NULL)")
            assert _filled(db_url, [1], 15), "notes_1's new row waited for notes_0's lock"
            app.rollback()
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("INSERT INTO app.notes_0 VALUES (1000, 'after the migration', NULL)")
        assert _filled(db_url, range(2), 15)
    finally:
        running.stop()


@pytest.mark.parametrize("limit", [None, 2])
def test_a_watchers_sweep_longer_than_the_statement_timeout_goes_through(
    db_url: str, roles: Roles, fake_openai: FakeOpenAI, limit: int | None
) -> None:
    """A stale sweep reads the whole table (here 200 rows at 10 ms each: 2 s) and is not
    cut off by the lanes' `statement_timeout_s` (1 s here), which bounds the worker's
    reads and writes: at the defaults the watchers have a connection of their own; with
    connection_limit=2, where they share the table lane, they lift it for their turn.
    While they shared the lane with its timeout, the sweep failed every time and each
    failure threw the step away: a row inserted since stayed NULL."""
    _tables(db_url, 0)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE app.notes (id bigint PRIMARY KEY, body text, emb vector(8))")
        conn.execute(
            "INSERT INTO app.notes SELECT g, 'note ' || g, NULL FROM generate_series(1, 200) g"
        )
        conn.execute(
            "CREATE FUNCTION app.slow(t text) RETURNS text LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(0.01); RETURN t; END $$"
        )
    name = _role(db_url, roles)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f'GRANT EXECUTE ON FUNCTION app.slow(text) TO "{name}"')
        conn.execute(f'ALTER ROLE "{name}" CONNECTION LIMIT {limit or 3}')
    config = parse_config(
        {
            "providers": {"openai": provider_settings(fake_openai.base_url)},
            "targets": [
                {
                    "name": "notes",
                    "table": "app.notes",
                    "id_column": "id",
                    # only the sweep, which reads rows with a vector, is slow
                    "text_sql": "CASE WHEN emb IS NULL THEN body ELSE app.slow(body) END",
                    "embedding_column": "emb",
                    "provider": "openai",
                }
            ],
            "engine": {"statement_timeout_s": 1, "chunk_rows": 100},
        }
    )
    url = roles.url(name, query=f"connection_limit={limit}" if limit else "")
    # a sweep every 6 s leaves the shared lane to the worker half the time
    running = Running(url, config, interval_s=0.5, sweep_interval_s=6)
    try:
        assert _missing_notes(db_url) == 0 or _wait_notes(db_url, 60), running.error
        time.sleep(7)  # a slow sweep has run by now
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("INSERT INTO app.notes VALUES (1000, 'a late note', NULL)")
        assert _wait_notes(db_url, 40), "the row inserted after the sweeps stayed NULL"
    finally:
        running.stop()


def _missing_notes(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM app.notes WHERE emb IS NULL").fetchone()
    return int(row[0]) if row else 0


def _wait_notes(db_url: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while _missing_notes(db_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _missing_notes(db_url) == 0


def test_serve_started_while_the_database_refuses_it_starts_its_worker_once_it_answers(
    db_url: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    """`serve --watch` started while its role may not log in: the watchers retry, and
    the in-process worker starts once the database answers. Before, it never started:
    the watchers queued chunks that no worker took, and the rows stayed NULL."""
    from embedfill.http import create_app
    from embedfill.watch import WatchOptions
    from tests.support.http import ServerThread

    _tables(db_url, 2)
    name = _role(db_url, roles)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{name}" NOLOGIN')
    app = create_app(
        _config(fake_openai.base_url, 2),
        database=Database(roles.url(name)),
        env=ENV | {"ADMIN_SECRET": "admin-secret-0123456789"},
        watch=WatchOptions(interval_s=0.5),
    )
    with ServerThread(app):
        time.sleep(2)  # a try or two refused
        assert _missing(db_url, range(2)) == 2 * ROWS
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'ALTER ROLE "{name}" LOGIN')
        assert _filled(db_url, range(2), 60), "the in-process worker never started"
