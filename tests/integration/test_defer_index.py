"""Index-aware mode: vector indexes set aside during the backfill and rebuilt after."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from embedfill import BackfillOptions, Database, DatabaseError, abackfill
from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import make_tickets, tickets_config

INDEX = "tickets_emb_hnsw"


def with_index(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn)
        conn.execute(
            f'CREATE INDEX {INDEX} ON app."SupportTickets" '
            "USING hnsw (emb vector_cosine_ops) WITH (m = 8)"
        )


def index_def(db_url: str) -> str | None:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = %s", (INDEX,)
        ).fetchone()
    return row[0] if row else None


def test_indexes_are_dropped_during_the_fill_and_rebuilt(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    with_index(db_url)
    before = index_def(db_url)
    seen_during: list[str | None] = []
    fake_openai.on_inputs = lambda inputs: seen_during.append(index_def(db_url))
    report = asyncio.run(
        abackfill(
            tickets_config(fake_openai.base_url),
            Database(db_url),
            BackfillOptions(defer_index=True),
            env={"TEST_PLATFORM_KEY": "sk-x-123456789"},
        )
    )
    assert report.status == "succeeded" and report.embedded == 45
    assert seen_during and set(seen_during) == {None}
    assert index_def(db_url) == before  # same definition, WITH (m = 8) included
    (entry,) = report.deferred_indexes
    assert entry["name"] == INDEX and entry["rebuilt"] is True and entry["method"] == "hnsw"
    with psycopg.connect(db_url) as conn:
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (f"app.{INDEX}",)
        ).fetchone()
    assert valid == (True,)


def leave_invalid_index(db_url: str, definition: str) -> None:
    """What a crash during a CREATE INDEX CONCURRENTLY leaves: the index in the catalog,
    ``indisvalid = false``. A writer's open transaction holds the build in its first
    wait; the building backend is then killed."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"DROP INDEX IF EXISTS app.{INDEX}")
    writer = psycopg.connect(db_url)
    writer.execute('UPDATE app."SupportTickets" SET subject = subject WHERE ticket_no = 1')
    builder = psycopg.connect(db_url, autocommit=True)
    pid = builder.info.backend_pid
    concurrent = definition.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1)
    thread = threading.Thread(target=_quietly, args=(builder, concurrent))
    thread.start()
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(200):
            row = conn.execute(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                (f"app.{INDEX}",),
            ).fetchone()
            if row is not None:
                break
            time.sleep(0.05)
        assert row == (False,)
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    thread.join(10)
    writer.rollback()
    writer.close()


def _quietly(conn: psycopg.Connection[Any], statement: str) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute(statement.encode())


@pytest.mark.parametrize("left", ["dropped", "invalid"])
def test_a_run_killed_mid_index_work_is_repaired_by_the_next(
    db_url: str, fake_openai: FakeOpenAI, left: str
) -> None:
    with_index(db_url)
    config = tickets_config(fake_openai.base_url)
    env = {"TEST_PLATFORM_KEY": "sk-x-123456789"}
    asyncio.run(abackfill(config, Database(db_url), BackfillOptions(dry_run=True), env=env))
    definition = index_def(db_url)
    assert definition is not None
    # what a kill -9 in the middle of an index-aware run leaves behind
    if left == "dropped":
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"DROP INDEX app.{INDEX}")
    else:
        leave_invalid_index(db_url, definition)
    deferred = [{"schema": "app", "name": INDEX, "method": "hnsw", "definition": definition}]
    with psycopg.connect(db_url, autocommit=True) as conn:
        dead = conn.execute(
            "INSERT INTO embedfill.runs (target, actor, parameters, dry_run, status,"
            " table_oid, column_name) VALUES ('tickets', 'test', %s, false, 'running',"
            " 'app.\"SupportTickets\"'::regclass, 'emb') RETURNING id",
            (Jsonb({"deferred_indexes": deferred}),),
        ).fetchone()
    report = asyncio.run(abackfill(config, Database(db_url), BackfillOptions(), env=env))
    assert report.embedded == 45
    assert index_def(db_url) == definition
    with psycopg.connect(db_url) as conn:
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (f"app.{INDEX}",)
        ).fetchone()
        status = conn.execute("SELECT status FROM embedfill.runs WHERE id = %s", dead).fetchone()
    assert valid == (True,)
    assert status == ("abandoned",)


def test_a_dead_run_whose_repair_fails_is_not_marked_abandoned(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    with_index(db_url)
    config = tickets_config(fake_openai.base_url)
    env = {"TEST_PLATFORM_KEY": "sk-x-123456789"}
    asyncio.run(abackfill(config, Database(db_url), BackfillOptions(dry_run=True), env=env))
    broken = {
        "schema": "app",
        "name": "gone_idx",
        "method": "hnsw",
        "definition": 'CREATE INDEX gone_idx ON app."SupportTickets" USING hnsw (no_such_column)',
    }
    with psycopg.connect(db_url, autocommit=True) as conn:
        dead = conn.execute(
            "INSERT INTO embedfill.runs (target, actor, parameters, dry_run, status,"
            " table_oid, column_name) VALUES ('tickets', 'test', %s, false, 'running',"
            " 'app.\"SupportTickets\"'::regclass, 'emb') RETURNING id",
            (Jsonb({"deferred_indexes": [broken]}),),
        ).fetchone()
    with pytest.raises(DatabaseError):
        asyncio.run(abackfill(config, Database(db_url), BackfillOptions(), env=env))
    with psycopg.connect(db_url) as conn:
        status = conn.execute("SELECT status FROM embedfill.runs WHERE id = %s", dead).fetchone()
        filled = conn.execute(
            'SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL'
        ).fetchone()
    assert status == ("running",)  # still owed its repair; the next run tries again
    assert filled == (45,)


def test_cli_asks_before_dropping_and_refuses_without_confirmation(
    db_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    with_index(db_url)
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(db_url, TEST_PLATFORM_KEY="sk-x-123456789")
    refused = embedfill("--config", str(cfg), "backfill", "--defer-index", env=env)
    assert refused.returncode == 2
    assert f"will DROP the vector index {INDEX} (hnsw)" in refused.stderr
    assert "fill 45 rows" in refused.stderr and "confirm with --yes" in refused.stderr
    assert index_def(db_url) is not None and fake_openai.requests == []
    done = embedfill("--config", str(cfg), "backfill", "--defer-index", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert f"vector index {INDEX} rebuilt" in done.stdout
    assert index_def(db_url) is not None


def test_a_job_whose_finisher_died_mid_rebuild_is_repaired_by_the_next_backfill(
    db_url: str, fake_openai: FakeOpenAI
) -> None:
    with_index(db_url)
    config = tickets_config(fake_openai.base_url)
    env = {"TEST_PLATFORM_KEY": "sk-x-123456789"}
    definition = index_def(db_url)
    assert definition is not None
    queued = asyncio.run(
        abackfill(
            config, Database(db_url), BackfillOptions(defer_index=True), env=env, enqueue=True
        )
    )
    assert index_def(db_url) is None  # set aside when the job was created
    # what a finisher killed during its CREATE INDEX CONCURRENTLY leaves: every chunk
    # done (here: filled by hand), the job still running, the index INVALID
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE embedfill.chunks SET state = 'done'")
        conn.execute("DELETE FROM embedfill.procrastinate_jobs")
        conn.execute(
            "UPDATE app.\"SupportTickets\" SET emb = '[1,0,0,0,0,0,0,0]' WHERE emb IS NULL"
        )
    leave_invalid_index(db_url, definition)

    report = asyncio.run(abackfill(config, Database(db_url), BackfillOptions(), env=env))

    assert report.joined and report.run_id == queued.run_id and report.status == "succeeded"
    assert index_def(db_url) == definition
    with psycopg.connect(db_url) as conn:
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (f"app.{INDEX}",)
        ).fetchone()
    assert valid == (True,)
    assert [i["rebuilt"] for i in report.deferred_indexes] == [True]
