"""A job knows what it is: workers configured otherwise refuse it, and a chunk runs on
one worker at a time (paid once), whatever kills and rings happen. Real PostgreSQL, the
real fake provider, real worker processes."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from pathlib import Path

import psycopg
import pytest

from embedfill.application import job_record, list_jobs
from embedfill.config import load_config
from embedfill.db.connect import Database
from tests.e2e.test_workers import (
    PLATFORM,
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
from tests.support.tables import make_tickets


def _other(tmp_path: Path, base: Path, old: str, new: str) -> Path:
    """The same config file but one setting."""
    text = base.read_text()
    assert old in text, old
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    path = other / "embedfill.toml"
    path.write_text(text.replace(old, new))
    return path


def _refused(url: str, job_id: int) -> dict[int, str | None]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT pid, refused FROM embedfill.workers WHERE run_id = %s", (job_id,)
        ).fetchall()
    return {int(pid): refused for pid, refused in rows}


def models_written(url: str) -> dict[str, int]:
    """Rows per model that wrote their vector, as provenance records it."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT m.model, count(*) FROM embedfill.provenance p"
            " JOIN embedfill.models m ON m.id = p.model_id GROUP BY 1"
        ).fetchall()
    return {str(m): int(n) for m, n in rows}


@pytest.mark.parametrize(
    ("setting", "old", "new"),
    [
        ("model", 'model = "test-embed"', 'model = "test-embed-large"'),
        ("text", 'text = "{subject}\\n\\n{body}"', 'text = "{subject}"'),
        ("tenant_key_sql", "where org = %(tenant)s", "where org = %(tenant)s and false"),
    ],
)
def test_a_worker_configured_otherwise_refuses_the_job_and_writes_nothing(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path, setting: str, old: str, new: str
) -> None:
    """The careless operator: one more worker started with another model (or template,
    or key source) than the job's creator. It must not write its own vectors: it hands
    the chunks back, says why once, and the job's route lists it as refused; a worker
    configured like the creator does the job."""
    fake_openai.latency = 0.05
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    other = _other(tmp_path, cfg, old, new)
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    stranger = popen("--config", str(other), "worker", env=env)
    try:
        wait_until(lambda: _refused(big, job_id).get(stranger.pid) is not None, timeout=60)
        time.sleep(1.0)  # it keeps being rung: it still takes nothing
        assert fake_openai.ok_requests() == [] and missing(big) == 300
        record = asyncio.run(job_record(Database(big), job_id))
        (mine,) = [w for w in record["workers"] if w["pid"] == stranger.pid]
        assert mine["refused"] == setting and mine["embedded"] == 0
        listed = asyncio.run(list_jobs(load_config(cfg), Database(big), None, 10))
        assert listed[0]["workers"] == record["workers"]  # the list shows what the job does
        helper = popen("--config", str(cfg), "worker", env=env)
        try:
            wait_until(lambda: job_status(big, job_id) != "running", timeout=90, every=0.2)
        finally:
            (_, (code, _, err)) = stop_all([stranger, helper])
    finally:
        if stranger.poll() is None:
            stranger.kill()
    assert code == 0, err
    assert job_status(big, job_id) == "succeeded"
    assert_all_true(big)
    assert models_written(big) == {"test-embed": 300}
    _, _, stranger_err = stranger.returncode, *stranger.communicate()
    said = [line for line in stranger_err.splitlines() if "refuse" in line or "leaving" in line]
    assert len(said) == 1, stranger_err  # one sentence, not one per ring
    assert f"job {job_id}" in said[0] and PLATFORM not in stranger_err
    final = asyncio.run(job_record(Database(big), job_id))["report"]
    assert final["provider"] == "openai:test-embed"


def test_a_backfill_configured_otherwise_does_not_join_the_running_job(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    other = _other(tmp_path, cfg, 'model = "test-embed"', 'model = "test-embed-large"')
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    done = embedfill("--config", str(other), "backfill", "--json", env=env, timeout=60)
    assert done.returncode == 4, done.stderr
    assert f"run {job_id}" in done.stderr and "'test-embed'" in done.stderr
    assert "test-embed-large" in done.stderr
    assert missing(big) == 300 and fake_openai.requests == []


def test_a_kill_9_re_sends_only_what_the_killed_worker_had_in_flight(
    db_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Three workers (each with its own platform key, so the provider's log says who
    sent what), a 150 ms provider; one is killed mid-job. What the survivors send again
    is what the victim had in flight or answered in its last moments, never more: a
    chunk runs on one worker at a time, and the victim's answered rows were committed."""
    big = db_url
    with psycopg.connect(big, autocommit=True) as conn:
        make_tickets(conn, rows=1600)  # 1200 NULL
    fake_openai.latency = 0.15
    cfg = write_config(
        tmp_path, fake_openai.base_url, batch_size=5, concurrency=2, extra=jobs_toml()
    )
    keys = [f"sk-worker-{i}" for i in range(3)]
    enqueue(cfg, cli_env(big, TEST_PLATFORM_KEY=keys[0]))
    workers = [
        popen("--config", str(cfg), "worker", env=cli_env(big, TEST_PLATFORM_KEY=k)) for k in keys
    ]
    victim = workers[1]
    try:
        wait_until(lambda: any(r.key == keys[1] for r in fake_openai.ok_requests()))
        wait_until(lambda: missing(big) < 900)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
        wait_until(lambda: missing(big) == 0, timeout=120)
    finally:
        stop_all(workers)
    assert_all_true(big, rows=1600)
    by_victim = {text: r.at for r in fake_openai.requests if r.key == keys[1] for text in r.inputs}
    survivors = collections.Counter(
        t for r in fake_openai.ok_requests() if r.key != keys[1] for t in r.inputs
    )
    assert max(survivors.values()) == 1  # no survivor sent a text twice
    again = {t: by_victim[t] for t in survivors if t in by_victim}
    # answered (or sent) by the victim in its last second and a half at most
    early = {t: round(killed_at - at, 2) for t, at in again.items() if at < killed_at - 1.5}
    assert early == {}, early
    assert len(again) <= 2 * 2 * 5 * 3, len(again)  # its requests in flight and just answered
    with psycopg.connect(big) as conn:
        attempts = conn.execute("SELECT max(attempts) FROM embedfill.chunks").fetchone()
    assert attempts is not None and attempts[0] <= 2


def test_a_job_route_lists_workers_and_chunks_in_the_job_list_too(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.05
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["run_id"]
    record = asyncio.run(job_record(Database(big), job_id))
    (listed,) = asyncio.run(list_jobs(load_config(cfg), Database(big), None, 10))
    assert listed["workers"] == record["workers"] and listed["chunks"] == record["chunks"]
    assert record["chunks"]["done"] == record["chunks"]["total"] > 1


def test_a_row_that_failed_on_one_try_and_was_written_on_the_next_is_embedded(
    big: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A chunk handed back after its failures were recorded is done again by another
    worker: a row that failed on the first try and is written on the next counts as
    embedded, not failed, and the job ends `succeeded`, not `partial`."""
    cfg = write_config(tmp_path, fake_openai.base_url, extra=jobs_toml())
    env = cli_env(big, TEST_PLATFORM_KEY=PLATFORM)
    job_id = enqueue(cfg, env)
    with psycopg.connect(big, autocommit=True) as conn:  # what the first try recorded
        conn.execute(
            "INSERT INTO embedfill.failures (run_id, row_id, tenant, error_class, message,"
            " attempts) SELECT %s, ticket_no::text, org, 'ProviderUnavailable',"
            " 'an earlier try', 1 FROM app.\"SupportTickets\" WHERE emb IS NULL"
            " ORDER BY ticket_no LIMIT 3",
            (job_id,),
        )
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["run_id"], report["joined"]) == (job_id, True)
    assert (report["embedded"], report["failed"], report["status"]) == (300, 0, "succeeded")
    assert missing(big) == 0
