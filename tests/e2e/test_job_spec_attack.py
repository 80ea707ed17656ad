"""Attacks on job specs, claims, rings and exact counts (review of the job-spec change):
real PostgreSQL, the real fake provider, real worker processes."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path

import psycopg

from embedfill import jobs
from embedfill.config import load_config
from embedfill.db.catalog import inspect_target
from embedfill.db.connect import Database, connect
from embedfill.db.schema import ensure_schema
from tests.e2e.test_job_spec import models_written
from tests.e2e.test_workers import (
    PLATFORM,
    enqueue,
    job_status,
    jobs_toml,
    missing,
    stop_all,
    wait_until,
)
from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.roles import Roles
from tests.support.schema import undo_0007


def _open_chunks(url: str, job_id: int) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM embedfill.chunks WHERE run_id = %s"
            " AND state IN ('todo', 'doing')",
            (job_id,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _as_before_the_upgrade(url: str, job_id: int) -> None:
    """What migration 7 leaves of a job created (and partly done) by the embedfill before
    it: no spec, no tenants_before, no tallies for the rows already written, its rings in
    the target's queue."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM embedfill.tallies WHERE run_id = %s", (job_id,))
        conn.execute(
            "UPDATE embedfill.runs SET spec = NULL, parameters = parameters - 'tenants_before'"
            " WHERE id = %s",
            (job_id,),
        )
        conn.execute(
            "UPDATE embedfill.procrastinate_jobs SET queue_name = 'embedfill:tickets'"
            " WHERE task_name = 'embedfill.chunk'"
        )


def test_a_worker_with_a_shorter_lease_never_steals_a_live_workers_chunk(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The careless operator: two workers of the same job (same fingerprint), one with
    the default-ish lease_s = 30, one started with lease_s = 1. The holder moves its
    chunks' heartbeat every 10 s; the other must judge it by the holder's lease, not its
    own 1 s, and never hand the live holder's chunks out again (texts paid twice)."""
    with psycopg.connect(big, autocommit=True) as conn:
        conn.execute('DELETE FROM app."SupportTickets" WHERE ticket_no > 120')
    fake_openai.latency = 2.0
    slow = write_config(
        tmp_path,
        fake_openai.base_url,
        batch_size=10,
        concurrency=2,
        extra=jobs_toml(lease_s=30, chunk_rows=15),
    )
    quick_dir = tmp_path / "quick"
    quick_dir.mkdir()
    quick = write_config(
        quick_dir,
        fake_openai.base_url,
        batch_size=10,
        concurrency=2,
        extra=jobs_toml(lease_s=1, chunk_rows=15),
    )
    job_id = enqueue(slow, cli_env(big, TEST_PLATFORM_KEY="sk-slow"))
    holder = popen("--config", str(slow), "worker", env=cli_env(big, TEST_PLATFORM_KEY="sk-slow"))
    workers = [holder]
    try:
        wait_until(lambda: any(r.key == "sk-slow" for r in fake_openai.requests), timeout=60)
        workers.append(
            popen("--config", str(quick), "worker", env=cli_env(big, TEST_PLATFORM_KEY="sk-quick"))
        )
        wait_until(lambda: job_status(big, job_id) != "running", timeout=180, every=0.3)
    finally:
        stop_all(workers)
    assert job_status(big, job_id) == "succeeded"
    sent = collections.Counter(t for r in fake_openai.ok_requests() for t in r.inputs)
    twice = sorted(t for t, n in sent.items() if n > 1)
    with psycopg.connect(big) as conn:
        attempts = conn.execute("SELECT max(attempts) FROM embedfill.chunks").fetchone()
    assert twice == [] and attempts == (1,), (len(twice), attempts)


def test_a_job_from_before_the_upgrade_keeps_the_rows_it_wrote_in_its_counts(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A job running across the upgrade: the rows its workers wrote before migration 7
    have no tally. Its final report must still count them (the workers' reports did)."""
    fake_openai.latency = 0.1
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=5, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    first = popen("--config", str(cfg), "worker", env=env)
    try:
        wait_until(lambda: missing(big) <= 220, timeout=60)
    finally:
        ((code, _, err),) = stop_all([first])
    assert code == 0, err
    written_before = 300 - missing(big)
    assert 0 < written_before < 300
    _as_before_the_upgrade(big, job_id)
    # a plain worker refuses a job that does not say what it writes; a backfill of the
    # target takes it over (and joins it)
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["joined"] is True
    assert missing(big) == 0
    with psycopg.connect(big) as conn:
        row = conn.execute("SELECT report FROM embedfill.runs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    report = row[0]
    assert report["embedded"] == 300, (report["embedded"], written_before)


def test_a_job_from_before_the_upgrade_is_not_done_by_a_worker_of_another_model(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A job left running by the embedfill before specs (spec NULL, rings in the target's
    queue): a worker configured with another model must not take its chunks and write
    its own vectors into the column (no worker guesses what such a job writes)."""
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = other_dir / "embedfill.toml"
    other.write_text(cfg.read_text().replace('model = "test-embed"', 'model = "test-embed-large"'))
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    _as_before_the_upgrade(big, job_id)
    stranger = popen("--config", str(other), "worker", env=env)
    try:
        time.sleep(8.0)
    finally:
        stop_all([stranger])
    assert models_written(big).get("test-embed-large", 0) == 0, models_written(big)


def test_a_job_whose_last_chunk_could_not_finish_it_is_finished_by_a_later_worker(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The worker that settles the last chunk could not finish the job (here: the
    column's lock was held at that moment; as well: it was kill -9'd, or its connection
    dropped, between the chunk's commit and the job's). A job with no open chunk gets no
    ring: any `embedfill worker` started later must still finish it."""
    fake_openai.latency = 0.05
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    with psycopg.connect(big, autocommit=True) as conn:
        row = conn.execute(
            "SELECT table_oid, column_name FROM embedfill.runs WHERE id = %s", (job_id,)
        ).fetchone()
        assert row is not None
        key = jobs.lock_key(int(row[0]), str(row[1]))
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
        first = popen("--config", str(cfg), "worker", env=env)
        try:
            wait_until(lambda: _open_chunks(big, job_id) == 0, timeout=120, every=0.2)
            time.sleep(2.0)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
    later = popen("--config", str(cfg), "worker", env=env)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and job_status(big, job_id) == "running":
            time.sleep(0.5)
    finally:
        stop_all([first, later])
    assert missing(big) == 0
    assert job_status(big, job_id) == "succeeded"


def test_a_watch_job_from_before_specs_is_replaced_not_resumed(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A watch job left running by the embedfill before specs has no spec: the elected
    watcher must end it and open one with its own spec, not resume it spec-less."""
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    config = load_config(cfg)
    target = config.target("tickets")
    pconf = config.provider_for(target)

    async def go() -> tuple[int, int | None, str | None]:
        conn = await connect(Database(big))
        try:
            await ensure_schema(conn)
            info = await inspect_target(conn, target, 8, pconf.label, write=True)
            spec = jobs.spec_of("watch", target, pconf, info, env={})
            old = await jobs.open_watch_job(conn, spec=spec, target=target, info=info, actor="test")
            assert old is not None
            await conn.execute("UPDATE embedfill.runs SET spec = NULL WHERE id = %s", (old,))
            again = await jobs.open_watch_job(
                conn, spec=spec, target=target, info=info, actor="test"
            )
            cur = await conn.execute("SELECT spec FROM embedfill.runs WHERE id = %s", (again,))
            row = await cur.fetchone()
            return old, again, json.dumps(row[0]) if row and row[0] is not None else None
        finally:
            await conn.close()

    old, again, spec = asyncio.run(go())
    assert spec is not None, (old, again)


def test_a_job_whose_table_no_longer_fits_any_worker_fails_instead_of_hanging(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The app renames a column the template reads while the job is queued. Every worker
    (configured exactly like the job's creator: same fingerprint) fails its checks with
    a config error: the job fails, with the reason, rather than every worker refusing
    it and the job staying `running` for ever."""
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    with psycopg.connect(big, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" RENAME COLUMN subject TO title')
    worker = popen("--config", str(cfg), "worker", env=env)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and job_status(big, job_id) == "running":
            time.sleep(0.5)
    finally:
        ((_, _, err),) = stop_all([worker])
    with psycopg.connect(big) as conn:
        refused = conn.execute(
            "SELECT refused FROM embedfill.workers WHERE run_id = %s", (job_id,)
        ).fetchall()
    assert job_status(big, job_id) == "failed", (refused, err[-600:])


def _back_to_version_6(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        undo_0007(conn)


def test_roles_granted_before_migration_7_still_work_after_it(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path, roles: Roles
) -> None:
    """The README's least-privilege role, granted at version 6, then `embedfill migrate`
    as the owner: the writer role must still run a backfill (every write now inserts into
    embedfill.tallies), and a read-only role (SELECT on embedfill's tables, for a
    dashboard) must still list jobs (the job views now read embedfill.tallies)."""
    from embedfill.application import list_jobs
    from tests.support.cli import embedfill
    from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS

    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    owner_env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    assert embedfill("--config", str(cfg), "migrate", env=owner_env).returncode == 0
    _back_to_version_6(big)
    writer = roles.create()
    roles.grant(
        writer, *EMBEDFILL_GRANTS, *TICKETS_GRANTS, "GRANT SELECT ON app.org_settings TO {role}"
    )
    reader = roles.create()
    roles.grant(
        reader,
        "GRANT USAGE ON SCHEMA embedfill TO {role}",
        "GRANT SELECT ON ALL TABLES IN SCHEMA embedfill TO {role}",
    )
    done = embedfill("--config", str(cfg), "migrate", env=owner_env)
    assert done.returncode == 0, done.stderr
    ran = embedfill(
        "--config",
        str(cfg),
        "backfill",
        "--json",
        env=cli_env(roles.url(writer), TEST_PLATFORM_KEY=PLATFORM),
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert missing(big) == 0
    listed = asyncio.run(list_jobs(load_config(cfg), Database(roles.url(reader)), None, 10))
    assert listed and listed[0]["workers"]
