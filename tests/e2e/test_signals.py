"""Signals are obeyed: `backfill`, `worker` and `watch` as subprocesses, against a provider
that never answers (a request would otherwise hold them for `timeout_s`, a minute here).

The first SIGTERM or SIGINT stops the command; the provider requests still in flight
are abandoned after a grace (cli.GRACE_S, 4 s), so the provider sees them end within
5 s and the process exits with its usual code: `backfill` 1 (its job cancelled),
`worker` and `watch` 0. The rows of an abandoned request stay NULL, never failed, and
a job that goes on gets its chunks back. A second signal exits at once, 128 + its
number: 143 for SIGTERM, 130 for SIGINT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.procs import alive, worker_children

PLATFORM = "sk-platform-test-signals"
NULL_ROWS = 45  # of the 60 tickets (tests/support/tables.py)
ENGINE = "\n[engine]\nchunk_rows = 20\nlease_s = 10\n"
EXIT_SOON_S = 8.0  # first signal to exit: the grace (4 s), the shutdown, the slack of CI
PROVIDER_SEES_END_S = 5.0  # first signal to the provider seeing its requests end


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def config(tmp_path: Path, fake: FakeOpenAI) -> Path:
    """Two requests in flight per worker session, each allowed a whole minute."""
    cfg = write_config(tmp_path, fake.base_url, batch_size=5, concurrency=2, extra=ENGINE)
    cfg.write_text(cfg.read_text().replace("timeout_s = 5", "timeout_s = 60"))
    return cfg


def one(url: str, query: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def missing(url: str) -> object:
    return one(url, 'SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL')


def failures(url: str) -> object:
    return one(url, "SELECT count(*) FROM embedfill.failures")


def chunks_in_flight(url: str) -> object:
    return one(url, "SELECT count(*) FROM embedfill.chunks WHERE state = 'doing'")


def job_status(url: str, job_id: int) -> object:
    return one(url, f"SELECT status FROM embedfill.runs WHERE id = {int(job_id)}")


def command(name: str, cfg: Path) -> list[str]:
    args = {"backfill": ["backfill", "--json"], "worker": ["worker"]}
    return ["--config", str(cfg), *args.get(name, ["watch", "--interval", "0.5"])]


def stop_with_one_signal(
    proc: subprocess.Popen[str], fake: FakeOpenAI, sig: signal.Signals = signal.SIGTERM
) -> tuple[str, str, float, float]:
    """Send one signal once requests hang at the provider: (stdout, stderr, seconds until
    the provider saw them end, seconds until the process exited)."""
    try:
        wait_until(lambda: fake.hanging >= 1)
        time.sleep(0.3)  # the others the process sends meanwhile hang too
        sent = time.monotonic()
        proc.send_signal(sig)
        wait_until(lambda: fake.hanging == 0, timeout=30)
        ended = time.monotonic() - sent
        out, err = proc.communicate(timeout=30)
        exited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out, err, ended, exited


def test_sigterm_to_a_backfill_ends_its_hung_requests_and_cancels_its_job(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.hang = True
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    proc = popen(*command("backfill", config(tmp_path, fake_openai)), env=env)
    out, err, ended, exited = stop_with_one_signal(proc, fake_openai)
    assert proc.returncode == 1, err
    assert ended < PROVIDER_SEES_END_S and exited < EXIT_SOON_S, (ended, exited)
    assert "Traceback" not in err
    assert "SIGTERM again exits at once" in err
    report = json.loads(out)
    assert report["status"] == "cancelled"
    assert report["embedded"] == 0 and report["failed"] == 0
    assert report["requests"] >= 2  # sent (and abandoned), not failed
    assert missing(tickets) == NULL_ROWS  # left NULL for the next run
    assert failures(tickets) == 0
    assert job_status(tickets, report["run_id"]) == "cancelled"
    assert chunks_in_flight(tickets) == 0


def test_sigterm_to_a_worker_ends_its_hung_requests_and_hands_its_chunks_back(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.hang = True
    cfg = config(tmp_path, fake_openai)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    queued = embedfill("--config", str(cfg), "backfill", "--enqueue", "--json", env=env)
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)["job_id"]
    worker = popen(*command("worker", cfg), env=env)
    _, err, ended, exited = stop_with_one_signal(worker, fake_openai)
    assert worker.returncode == 0, err
    assert ended < PROVIDER_SEES_END_S and exited < EXIT_SOON_S, (ended, exited)
    assert "Traceback" not in err
    assert "go back to the queue" in err
    # the job goes on without this worker: its chunks back in the queue, no row failed
    assert job_status(tickets, job_id) == "running"
    assert chunks_in_flight(tickets) == 0
    assert failures(tickets) == 0
    assert missing(tickets) == NULL_ROWS
    # and the next worker (a backfill joining the job) finishes it, every row once
    fake_openai.hang = False
    finish = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=60)
    assert finish.returncode == 0, finish.stderr
    report = json.loads(finish.stdout)
    assert report["joined"] is True and report["run_id"] == job_id
    assert report["embedded"] == NULL_ROWS and report["failed"] == 0
    assert missing(tickets) == 0
    answered = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(answered) == len(set(answered)) == NULL_ROWS


def test_sigint_to_a_watch_ends_its_hung_requests(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.hang = True
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    proc = popen(*command("watch", config(tmp_path, fake_openai)), env=env)
    _, err, ended, exited = stop_with_one_signal(proc, fake_openai, signal.SIGINT)
    assert proc.returncode == 0, err
    assert ended < PROVIDER_SEES_END_S and exited < EXIT_SOON_S, (ended, exited)
    assert "Traceback" not in err
    assert chunks_in_flight(tickets) == 0
    assert failures(tickets) == 0
    assert missing(tickets) == NULL_ROWS


@pytest.mark.parametrize(
    ("name", "sig"),
    [
        ("backfill", signal.SIGTERM),
        ("worker", signal.SIGINT),
        ("watch", signal.SIGTERM),
    ],
)
def test_a_second_signal_exits_at_once(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path, name: str, sig: signal.Signals
) -> None:
    fake_openai.hang = True
    cfg = config(tmp_path, fake_openai)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    if name == "worker":
        queued = embedfill("--config", str(cfg), "backfill", "--enqueue", env=env)
        assert queued.returncode == 0, queued.stderr
    proc = popen(*command(name, cfg), env=env)
    try:
        wait_until(lambda: fake_openai.hanging >= 1)
        proc.send_signal(sig)
        time.sleep(1.0)
        assert proc.poll() is None  # the first signal: stopping, within its grace
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, err
    assert took < 1.5  # at once: not after the grace, nor after timeout_s
    assert f"{sig.name} again: exiting now" in err
    assert failures(tickets) == 0  # nothing failed: the rows stay NULL
    assert missing(tickets) == NULL_ROWS


def test_sigterm_to_a_backfill_with_processes_ends_its_children_s_requests_too(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The children are in their own process group (a Ctrl-C reaches the parent alone):
    the parent passes the signal on, and every process abandons its requests."""
    fake_openai.hang = True
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    cfg = config(tmp_path, fake_openai)
    parent = popen("--config", str(cfg), "backfill", "--processes", "2", "--json", env=env)
    try:
        # the parent holds two chunks; the child's requests for the third hang too
        wait_until(lambda: fake_openai.hanging >= 3 and bool(worker_children(parent.pid)))
        (child,) = worker_children(parent.pid)
        sent = time.monotonic()
        parent.send_signal(signal.SIGTERM)
        wait_until(lambda: fake_openai.hanging == 0, timeout=30)
        ended = time.monotonic() - sent
        out, err = parent.communicate(timeout=30)
        exited = time.monotonic() - sent
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate()
    assert parent.returncode == 1, err
    assert ended < PROVIDER_SEES_END_S and exited < EXIT_SOON_S, (ended, exited)
    assert not alive(child)
    report = json.loads(out)
    assert report["status"] == "cancelled" and report["failed"] == 0
    assert failures(tickets) == 0
    assert missing(tickets) == NULL_ROWS
    assert chunks_in_flight(tickets) == 0


def test_sigterm_to_serve_ends_its_worker_s_hung_requests(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The service's in-process worker obeys the same grace: uvicorn's shutdown on
    SIGTERM abandons the requests still hanging after it, and the job goes on."""
    from tests.support.http import free_port

    fake_openai.hang = True
    cfg = config(tmp_path, fake_openai)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM, ADMIN_SECRET="s3cret-signals")
    queued = embedfill("--config", str(cfg), "backfill", "--enqueue", "--json", env=env)
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)["job_id"]
    port = free_port()
    serve = popen("--config", str(cfg), "serve", "--port", str(port), env=env)
    _, err, ended, exited = stop_with_one_signal(serve, fake_openai)
    assert ended < PROVIDER_SEES_END_S and exited < EXIT_SOON_S, (ended, exited, err[-800:])
    assert job_status(tickets, job_id) == "running"  # it goes on, elsewhere or later
    assert chunks_in_flight(tickets) == 0 and failures(tickets) == 0
