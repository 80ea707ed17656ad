"""`embedfill watch` and `serve --watch` as an operator runs them: separate processes,
SIGTERM, kill -9 and a restart, the app editing rows while they are embedded."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill.config import render_text
from embedfill.providers.hashing import hash_vector
from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import make_tickets, stored_vectors

PLATFORM = "sk-platform-test-watch"
ROWS = 200


def wait_until(check: Any, timeout: float = 60, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(every)


def wrong_rows(url: str, upto: int | None = None) -> list[int]:
    """Rows (all, or those up to ``upto``) whose vector is not the one of their current
    text (NULL included); pre-filled rows (every 4th of the first ROWS) aside."""
    with psycopg.connect(url) as conn:
        vectors = stored_vectors(conn)
        rows = conn.execute('SELECT ticket_no, subject, body FROM app."SupportTickets"')
        texts = {
            r[0]: render_text("{subject}\n\n{body}", {"subject": r[1], "body": r[2]})
            for r in rows.fetchall()
        }
    bad = []
    for i, v in vectors.items():
        if (i <= ROWS and i % 4 == 0) or (upto is not None and i > upto):
            continue
        if v is None or not np.array_equal(v, hash_vector(texts[i], 8)):
            bad.append(i)
    return bad


@pytest.fixture
def table(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn, rows=ROWS)
    return db_url


def watch_config(tmp_path: Path, base_url: str) -> Path:
    return write_config(
        tmp_path,
        base_url,
        batch_size=5,
        concurrency=2,
        extra="\n[engine]\nlease_s = 2\nchunk_rows = 10\n",
    )


WATCH = (sys.executable, "-m", "embedfill")
FAST = ("--interval", "0.3", "--sweep-interval", "1")


class Watch:
    """An `embedfill watch` process; its log goes to a file (a pipe nobody reads would
    fill up and stall it)."""

    def __init__(self, cfg: Path, env: dict[str, str], *args: str) -> None:
        self.log = cfg.parent / f"watch-{time.monotonic_ns()}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*WATCH, "--config", str(cfg), "watch", *FAST, *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stderr(self) -> str:
        return self.log.read_text()[-3000:]


def start(cfg: Path, env: dict[str, str], *args: str) -> Watch:
    return Watch(cfg, env, *args)


def test_watch_killed_and_started_again_misses_nothing_and_repeats_only_what_was_in_flight(
    table: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.05
    cfg = watch_config(tmp_path, fake_openai.base_url)
    env = cli_env(table, TEST_PLATFORM_KEY=PLATFORM)
    assert embedfill("--config", str(cfg), "migrate", env=env).returncode == 0
    first = start(cfg, env)
    try:
        wait_until(lambda: len(wrong_rows(table)) < 100)
        with psycopg.connect(table) as conn:
            in_flight = conn.execute(
                "SELECT coalesce(sum(jsonb_array_length(keys)), 0) FROM embedfill.chunks"
                " WHERE state = 'doing'"
            ).fetchone()
        first.kill()  # kill -9, chunks in flight
        # while no watch runs, the app adds rows and edits embedded ones
        with psycopg.connect(table, autocommit=True) as conn:
            conn.execute(
                """INSERT INTO app."SupportTickets" (ticket_no, org, subject, body)
                   SELECT i, 'org-b', 'while down ' || i, 'b' FROM generate_series(1001, 1010) i"""
            )
            conn.execute(
                """UPDATE app."SupportTickets" SET body = body || ' (edited while down)'
                   WHERE ticket_no IN (1, 2, 3)"""
            )
        second = start(cfg, env)
        try:
            wait_until(lambda: wrong_rows(table) == [], timeout=120)
        finally:
            rc = second.stop()
        assert rc == 0, second.stderr()
    finally:
        if first.proc.poll() is None:
            first.kill()
    sent = collections.Counter(t for r in fake_openai.ok_requests() for t in r.inputs)
    twice = sum(n - 1 for n in sent.values() if n > 1)
    assert in_flight is not None
    # rows 1-3 were embedded (if at all) and then edited: their new text is new, not twice
    # what was in flight when killed (its chunks' rows), plus the batches sent but not
    # yet written, is all that may go out twice
    assert twice <= int(in_flight[0]) + 2 * 5 * 2, (twice, in_flight)


def test_a_backfill_after_the_watch_was_killed_ends_the_watch_job_it_left(
    table: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The watch is killed (-9, OOM) and not started again; the operator runs `backfill`.
    No watcher holds the column's watch lock, so the backfill ends the watch job the
    kill left and runs. Before (helper-31), every backfill was refused (exit 4), told to
    "stop the watch" that no longer ran; a watch started while one runs still is."""
    fake_openai.latency = 0.05
    cfg = watch_config(tmp_path, fake_openai.base_url)
    env = cli_env(table, TEST_PLATFORM_KEY=PLATFORM)
    assert embedfill("--config", str(cfg), "migrate", env=env).returncode == 0
    first = start(cfg, env)
    try:
        wait_until(lambda: len(wrong_rows(table)) < 100)
        refused = embedfill("--config", str(cfg), "backfill", env=env)
        first.kill()
    finally:
        if first.proc.poll() is None:
            first.kill()
    assert refused.returncode == 4 and "stop the watch" in refused.stderr  # it ran then
    done = embedfill("--config", str(cfg), "backfill", env=env)
    assert done.returncode == 0, done.stderr[-600:]
    assert wrong_rows(table) == []
    with psycopg.connect(table) as conn:
        jobs = conn.execute("SELECT kind, status FROM embedfill.runs ORDER BY id").fetchall()
    assert jobs[0][0] == "watch" and jobs[0][1] != "running"
    assert jobs[-1] == ("backfill", "succeeded")
    # a watch started again opens a job of its own and keeps the column filled
    second = start(cfg, env)
    try:
        with psycopg.connect(table, autocommit=True) as conn:
            conn.execute("""UPDATE app."SupportTickets" SET body = 'again' WHERE ticket_no = 5""")
        assert wrong_rows(table) == [5]
        wait_until(lambda: wrong_rows(table) == [], timeout=60)
    finally:
        rc = second.stop()
    assert rc == 0, second.stderr()


def test_an_edit_while_its_row_is_being_embedded_ends_with_the_new_texts_vector(
    table: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = watch_config(tmp_path, fake_openai.base_url)
    env = cli_env(table, TEST_PLATFORM_KEY=PLATFORM)
    edited: list[str] = []

    def edit_mid_flight(inputs: list[str]) -> None:
        if not edited and any(t.startswith("Ticket 10:") for t in inputs):
            edited.append("yes")
            with psycopg.connect(table, autocommit=True) as conn:
                conn.execute(
                    """UPDATE app."SupportTickets" SET body = 'rewritten mid-flight'
                       WHERE ticket_no = 10"""
                )

    fake_openai.on_inputs = edit_mid_flight
    proc = start(cfg, env)
    try:
        wait_until(lambda: bool(edited) and wrong_rows(table) == [], timeout=60)
    finally:
        assert proc.stop() == 0, proc.stderr()
    with psycopg.connect(table) as conn:
        (status,) = conn.execute(
            "SELECT status FROM embedfill.runs WHERE parameters->>'watch' = 'true'"
        ).fetchone() or ("none",)
    assert status == "succeeded"


def test_serve_watch_keeps_the_target_filled(
    table: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    from tests.support.http import free_port, serve_subprocess

    cfg = watch_config(tmp_path, fake_openai.base_url)
    env = cli_env(table, TEST_PLATFORM_KEY=PLATFORM, ADMIN_SECRET="admin-secret-watch-test")
    port = free_port()
    api = serve_subprocess(
        ["--config", str(cfg)], env, port, ("--watch", "--interval", "0.3", "--sweep-interval", "1")
    )
    try:
        wait_until(lambda: wrong_rows(table) == [], timeout=60)
        with psycopg.connect(table, autocommit=True) as conn:
            conn.execute(
                """INSERT INTO app."SupportTickets" (ticket_no, org, subject, body)
                   VALUES (5000, 'org-c', 'late', 'arrival')"""
            )
        wait_until(lambda: wrong_rows(table) == [], timeout=30)
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(60)
        api.communicate()


def test_watch_refuses_bad_intervals_and_unknown_targets_before_starting(
    table: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = watch_config(tmp_path, fake_openai.base_url)
    env = cli_env(table, TEST_PLATFORM_KEY=PLATFORM)
    bad = embedfill("--config", str(cfg), "watch", "--interval", "0", env=env)
    assert bad.returncode == 2 and "--interval must be between" in bad.stderr
    unknown = embedfill("--config", str(cfg), "watch", "--target", "nope", env=env)
    assert unknown.returncode != 0 and "nope" in unknown.stderr
    assert fake_openai.requests == []
    assert os.environ.get("DATABASE_URL") != table
