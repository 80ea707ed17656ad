"""Attacks on jobs and workers, the way a careless operator, a hostile provider and a new
user meet them: real PostgreSQL, the real fake provider, real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import conninfo

from embedfill import jobs
from embedfill.db.connect import Database, connect
from embedfill.providers.hashing import hash_vector
from tests.e2e.test_workers import (
    PLATFORM,
    ROWS,
    assert_all_true,
    enqueue,
    job_status,
    jobs_toml,
    missing,
    stop_all,
    wait_until,
)
from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.procs import alive, worker_children
from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS, Roles

SECOND_TARGET = """
[[targets]]
name = "tickets_b"
table = "app.SupportTickets"
id_column = "ticket_no"
text = "{subject}"
embedding_column = "emb_b"
tenant_column = "org"
provider = "openai"
"""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cancel(url: str, job_id: int) -> None:
    """What POST .../{id}/cancel does: cancel, then finish at once if nothing is in flight."""

    async def go() -> None:
        conn = await connect(Database(url))
        try:
            assert await jobs.cancel(conn, job_id)
            await jobs.finish(conn, job_id)
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_job_cancelled_while_its_only_worker_is_dead_ends_once_a_worker_starts(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """kill -9 of the only worker leaves chunks `doing`; the operator cancels the job;
    later a worker starts. The job must end `cancelled` (not stay running forever and
    block every later backfill of the column)."""
    fake_openai.latency = 0.3
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    victim = popen("--config", str(cfg), "worker", env=env)
    try:
        wait_until(lambda: missing(big) < 295)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        _cancel(big, job_id)
        assert job_status(big, job_id) == "running"  # a chunk is still shown in flight
        rescuer = popen("--config", str(cfg), "worker", env=env)
        try:
            wait_until(lambda: job_status(big, job_id) != "running", timeout=30, every=0.3)
        finally:
            stop_all([rescuer])
    finally:
        if victim.poll() is None:
            victim.kill()
    assert job_status(big, job_id) == "cancelled"
    # the column is free again: a new backfill starts a new job and completes it
    again = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["joined"] is False


def test_processes_children_work_only_on_their_own_job(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """`backfill --target tickets --processes 2` must not have its child take chunks of
    another target's job queued on the same database (nobody asked it to)."""
    with psycopg.connect(big, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" ADD COLUMN emb_b vector(8)')
    fake_openai.latency = 0.05
    cfg = write_config(
        tmp_path,
        fake_openai.base_url,
        batch_size=5,
        concurrency=2,
        extra=SECOND_TARGET + jobs_toml(),
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    other = embedfill(
        "--config", str(cfg), "backfill", "--target", "tickets_b", "--enqueue", "--json", env=env
    )
    assert other.returncode == 0, other.stderr
    other_id = int(json.loads(other.stdout)["job_id"])
    done = embedfill(
        "--config",
        str(cfg),
        "backfill",
        "--target",
        "tickets",
        "--processes",
        "2",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embedded"] == 300
    with psycopg.connect(big) as conn:
        taken = conn.execute(
            "SELECT count(*) FROM embedfill.chunks WHERE run_id = %s AND attempts > 0",
            (other_id,),
        ).fetchone()
        filled = conn.execute(
            'SELECT count(*) FROM app."SupportTickets" WHERE emb_b IS NOT NULL'
        ).fetchone()
    assert (taken, filled) == ((0,), (0,))
    assert job_status(big, other_id) == "running"


def test_sigterm_to_backfill_processes_cancels_the_job_and_leaves_no_child(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """SIGTERM to the parent only (what `kill PID` or systemd's main-PID stop does): the
    job ends cancelled, exit 1, every child gone. The children's argv holds no secret."""
    fake_openai.latency = 0.3
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    password = "pw-attack-" + "s3cr3t"
    url = conninfo.make_conninfo(big, password=password)
    env = cli_env(url, TEST_PLATFORM_KEY=PLATFORM)
    parent = popen("--config", str(cfg), "backfill", "--processes", "3", "--json", env=env)
    try:
        wait_until(lambda: len(_children(parent.pid)) == 2, timeout=60)
        kids = _children(parent.pid)
        for kid in kids:
            argv = Path(f"/proc/{kid}/cmdline").read_bytes().decode()
            assert PLATFORM not in argv and password not in argv, argv
        wait_until(lambda: missing(big) < 290)
        parent.send_signal(signal.SIGTERM)
        out, err = parent.communicate(timeout=90)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 1, err
    assert json.loads(out)["status"] == "cancelled"
    wait_until(lambda: not any(alive(k) for k in kids), timeout=30, every=0.2)
    assert password not in err and PLATFORM not in err
    with psycopg.connect(big) as conn:
        row = conn.execute("SELECT status FROM embedfill.runs ORDER BY id DESC").fetchone()
    assert row == ("cancelled",)


def test_kill_9_of_the_backfill_parent_children_finish_the_job_and_leave(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.1
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    parent = popen("--config", str(cfg), "backfill", "--processes", "3", "--json", env=env)
    kids: list[int] = []
    try:
        wait_until(lambda: len(_children(parent.pid)) == 2, timeout=60)
        kids = _children(parent.pid)
        wait_until(lambda: missing(big) < 280)
        parent.kill()
        parent.communicate(timeout=30)
        wait_until(lambda: job_status(big, 1) != "running", timeout=120, every=0.3)
        wait_until(lambda: not any(alive(k) for k in kids), timeout=30, every=0.2)
    finally:
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)
    assert job_status(big, 1) == "succeeded"
    assert missing(big) == 0


def test_worker_target_unknown_is_a_config_error(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    start = time.monotonic()
    done = embedfill("--config", str(cfg), "worker", "--target", "nope", env=env, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "nope" in done.stderr and time.monotonic() - start < 60
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_job_whose_chunks_used_up_their_queue_retries_still_ends(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A worker whose config was changed after the enqueue (target `tickets` now names
    another column) gives every chunk back, using one of procrastinate's 100 attempts each
    time (about 3 per 10 s here, so all are used in about 5 minutes); procrastinate then
    marks the queue job failed. That end state is set here directly; then the operator
    fixes the config and runs backfill, which joins the job."""
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    enqueue(cfg, env)
    with psycopg.connect(big, autocommit=True) as conn:
        conn.execute(
            "UPDATE embedfill.procrastinate_jobs SET status = 'failed', attempts = 100"
            " WHERE task_name = 'embedfill.chunk'"
        )
    try:
        done = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=45)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("backfill joined the job and waited for ever") from exc
    assert done.returncode == 0, done.stderr
    assert missing(big) == 0


def test_worker_logs_hold_no_database_password(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    password = "pw-attack-" + "w0rker"
    env = cli_env(conninfo.make_conninfo(big, password=password), TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    log = tmp_path / "worker.log"
    with log.open("w") as sink:  # --debug says a lot: a pipe nobody reads would fill up
        worker = subprocess.Popen(
            [sys.executable, "-m", "embedfill", "--config", str(cfg), "--debug", "worker"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: job_status(big, job_id) != "running", timeout=60, every=0.3)
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(60)
    out, err = "", log.read_text()
    assert code == 0, err[-2000:]
    assert "DEBUG" in err  # it did log at debug level
    assert password not in out + err and PLATFORM not in out + err
    assert job_status(big, job_id) == "succeeded"


def test_one_worker_works_on_two_jobs_of_two_targets_at_once(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    with psycopg.connect(big, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" ADD COLUMN emb_b vector(8)')
    fake_openai.latency = 0.05
    cfg = write_config(
        tmp_path,
        fake_openai.base_url,
        batch_size=5,
        concurrency=2,
        extra=SECOND_TARGET + jobs_toml(worker_chunks=4),
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    a = enqueue(cfg, env)
    queued = embedfill(
        "--config", str(cfg), "backfill", "--target", "tickets_b", "--enqueue", "--json", env=env
    )
    assert queued.returncode == 0, queued.stderr
    b = int(json.loads(queued.stdout)["job_id"])
    worker = popen("--config", str(cfg), "worker", env=env)
    try:
        wait_until(
            lambda: job_status(big, a) != "running" and job_status(big, b) != "running",
            timeout=120,
            every=0.3,
        )
    finally:
        ((code, _, err),) = stop_all([worker])
    assert code == 0, err
    assert (job_status(big, a), job_status(big, b)) == ("succeeded", "succeeded")
    assert_all_true(big)
    with psycopg.connect(big) as conn:
        register_vector(conn)
        rows = conn.execute('SELECT subject, emb_b FROM app."SupportTickets"').fetchall()
        totals = conn.execute("SELECT id, embedded FROM embedfill.runs ORDER BY id").fetchall()
    for subject, vector in rows:
        np.testing.assert_array_equal(vector.to_numpy(), hash_vector(subject, 8))
    assert totals == [(a, 300), (b, ROWS)]


def test_worker_job_unknown_says_so_in_one_line(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill("--config", str(cfg), "worker", "--job", "999", env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "embedfill: No backfill job has id 999."


def test_a_dry_run_with_processes_starts_no_worker_process(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A dry run is no job (no chunks): `worker --job` children of it would only take
    turns finishing the dry run's row as a job while it plans."""
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    parent = popen(
        "--config", str(cfg), "backfill", "--dry-run", "--processes", "3", "--json", env=env
    )
    seen: set[int] = set()
    while parent.poll() is None:
        seen.update(worker_children(parent.pid))
        time.sleep(0.02)
    out, err = parent.communicate(timeout=60)
    assert parent.returncode == 0, err
    assert json.loads(out)["dry_run"] is True
    assert seen == set()


def test_a_job_failed_by_a_worker_leaves_no_chunk_shown_in_flight(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A provider (or proxy) that answers another size to a worker fails the job (every
    chunk would meet it); the chunks that worker held must not stay `doing` for ever in
    the job's view (GET .../{id} `chunks`)."""
    fake_openai.dims_override = 16
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    worker = popen("--config", str(cfg), "worker", env=env)
    try:
        wait_until(lambda: job_status(big, job_id) != "running", timeout=60, every=0.2)
    finally:
        ((code, _, err),) = stop_all([worker])
    assert code == 0, err
    assert job_status(big, job_id) == "failed"
    with psycopg.connect(big) as conn:
        states = dict(
            conn.execute(
                "SELECT state, count(*) FROM embedfill.chunks WHERE run_id = %s GROUP BY 1",
                (job_id,),
            ).fetchall()
        )
    assert "doing" not in states and "todo" not in states, states


def test_rows_the_app_holds_locked_past_the_wait_do_not_hold_up_the_job(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path,
        fake_openai.base_url,
        batch_size=5,
        concurrency=2,
        extra=jobs_toml(locked_rows_wait_s=2),
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    with psycopg.connect(big) as app:  # the app holds rows of two chunks for the whole job
        app.execute('SELECT 1 FROM app."SupportTickets" WHERE ticket_no IN (3, 5, 390) FOR UPDATE')
        done = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=90)
        app.rollback()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["locked"] == 3 and report["embedded"] == 297, report
    assert report["chunks"]["done"] == report["chunks"]["total"]
    assert missing(big) == 3
    again = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=90)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["embedded"] == 3 and missing(big) == 0


def test_a_worker_started_without_the_api_key_does_not_fail_the_job(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The careless operator: one more `embedfill worker` on a machine where the provider
    key is not exported. The job was created with a key, another worker has it."""
    fake_openai.latency = 0.1
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    keyless = popen("--config", str(cfg), "worker", env=cli_env(big))
    healthy = popen("--config", str(cfg), "worker", env=env)
    try:
        wait_until(lambda: job_status(big, job_id) != "running", timeout=60, every=0.2)
    finally:
        stop_all([keyless, healthy])
    with psycopg.connect(big) as conn:
        failed = conn.execute("SELECT count(*) FROM embedfill.failures").fetchone()
    assert (job_status(big, job_id), failed) == ("succeeded", (0,))
    assert missing(big) == 0


def test_lease_of_one_second_never_steals_a_chunk_from_a_live_slow_worker(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """lease_s = 1 (the least allowed) and a provider slower than the lease: live workers
    keep their chunks (the lease is about the worker's heartbeat, not a request)."""
    with psycopg.connect(big, autocommit=True) as conn:
        conn.execute('DELETE FROM app."SupportTickets" WHERE ticket_no > 120')
    fake_openai.latency = 1.5
    cfg = write_config(
        tmp_path,
        fake_openai.base_url,
        batch_size=10,
        concurrency=2,
        extra=jobs_toml(lease_s=1, chunk_rows=15),
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    workers = [popen("--config", str(cfg), "worker", env=env) for _ in range(2)]
    try:
        wait_until(lambda: job_status(big, job_id) != "running", timeout=120, every=0.3)
    finally:
        results = stop_all(workers)
    assert [code for code, _, _ in results] == [0, 0], results
    assert job_status(big, job_id) == "succeeded"
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent)) == 90
    with psycopg.connect(big) as conn:
        attempts = conn.execute("SELECT max(attempts) FROM embedfill.chunks").fetchone()
    assert attempts == (1,)


def test_processes_beyond_the_connections_the_role_has_do_not_fail_the_job(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path, roles: Roles
) -> None:
    """The careless operator: `backfill --processes 5` as a role allowed 16 connections
    (each process needs at least 6). Either refuse before anything is written (exit 2,
    no job), or let the processes that connect finish the job."""
    fake_openai.latency = 0.1
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    migrated = embedfill("--config", str(cfg), "migrate", env=cli_env(big))
    assert migrated.returncode == 0, migrated.stderr
    role = roles.create(connection_limit=16)
    roles.grant(
        role, *EMBEDFILL_GRANTS, *TICKETS_GRANTS, "GRANT SELECT ON app.org_settings TO {role}"
    )
    env = cli_env(roles.url(role), TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill(
        "--config", str(cfg), "backfill", "--processes", "5", "--json", env=env, timeout=150
    )
    with psycopg.connect(big) as conn:
        runs = conn.execute("SELECT status FROM embedfill.runs").fetchall()
    if done.returncode == 2:
        assert runs == [] and missing(big) == 300, done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert runs == [("succeeded",)] and missing(big) == 0


def test_a_worker_with_high_concurrency_does_not_hoard_a_job(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """`--concurrency 16` takes at most two chunks of one job at a time: a second worker
    started a little later (its start-up takes a second or two on a loaded machine; the
    job at least four) gets some of them."""
    fake_openai.latency = 0.5
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)  # 16 chunks of 20 rows
    first = popen("--config", str(cfg), "worker", "--concurrency", "16", env=env)
    wait_until(lambda: missing(big) < 299)
    second = popen("--config", str(cfg), "worker", env=env)
    try:
        wait_until(lambda: job_status(big, job_id) != "running", timeout=90, every=0.3)
    finally:
        stop_all([first, second])
    with psycopg.connect(big) as conn:
        done = dict(conn.execute("SELECT pid, chunks FROM embedfill.workers").fetchall())
    assert done.get(second.pid, 0) > 0, done
