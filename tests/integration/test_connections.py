"""The connection budget of one process, whatever the number of jobs and targets: a
worker holds its control connection and its lanes (db/lanes.py), a watch adds one for
all its watchers (watch.WatchHub). Counted in pg_stat_activity, sampled throughout."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg

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


def _missing(db_url: str, n: int) -> int:
    with psycopg.connect(db_url) as conn:
        return sum(
            conn.execute(f"SELECT count(*) FROM app.notes_{i} WHERE emb IS NULL").fetchone()[0]  # type: ignore[index]
            for i in range(n)
        )


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
            deadline = time.monotonic() + 60
            while _missing(db_url, n) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert len(worker.sessions) >= 2  # it served several jobs at once
        finally:
            stop.set()
            await task
            most = sampler.stop()
        assert most <= 3, f"one worker process held {most} connections"

    asyncio.run(go())
    assert _missing(db_url, n) == 0


def test_a_watch_over_twelve_targets_holds_four_connections(
    db_url: str, roles: Roles, fake_openai: FakeOpenAI
) -> None:
    """Its worker's three, and one for all twelve watchers (was one per target)."""
    n = 12
    _tables(db_url, n)
    name = _role(db_url, roles)
    sampler = Sampler(db_url, name)
    running = Running(roles.url(name), _config(fake_openai.base_url, n), interval_s=0.5)
    try:
        deadline = time.monotonic() + 60
        while _missing(db_url, n) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _missing(db_url, n) == 0
        with psycopg.connect(db_url) as conn:  # new rows are still noticed
            conn.execute("INSERT INTO app.notes_7 VALUES (1000, 'a late note', NULL)")
        deadline = time.monotonic() + 20
        while _missing(db_url, n) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _missing(db_url, n) == 0
        assert sum(1 for w in running.watches if w.job_id) == n  # each target led
    finally:
        running.stop()
        most = sampler.stop()
    assert most <= 4, f"one watch process over {n} targets held {most} connections"
