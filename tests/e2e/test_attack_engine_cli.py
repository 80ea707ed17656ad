"""The CLI killed at random points while an application edits, fills, deletes and locks
rows: every vector stored is the one of the row's text, and nothing the application
wrote is ever overwritten."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from embedfill.config import render_text
from embedfill.providers.hashing import hash_vector
from tests.e2e.test_http import ADMIN, PATH, app_for
from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI, Fault
from tests.support.http import ServerThread
from tests.support.tables import make_tickets

PLATFORM = "sk-platform-zyxwvutsrq987654"
MARKER = np.full(8, 7.0, dtype=np.float32)  # what the app writes itself


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


class App(threading.Thread):
    """Plays the application: edits texts (clearing the embedding, or only where it is
    still NULL), fills embeddings itself, deletes rows and holds row locks."""

    def __init__(self, db_url: str, rows: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.db_url, self.rows, self.rng = db_url, rows, random.Random(seed)
        self.expect: dict[int, str] = {}  # id -> "text" | "marker" | "deleted"
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.slowest = 0.0

    def run(self) -> None:
        try:
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                register_vector(conn)
                n = 0
                while not self.stop.is_set():
                    n += 1
                    self.step(conn, n)
        except BaseException as exc:
            self.error = exc

    def step(self, conn: psycopg.Connection[object], n: int) -> None:
        i = self.rng.randint(1, self.rows)
        if self.expect.get(i) == "deleted":
            return
        action = self.rng.random()
        table = 'app."SupportTickets"'
        started = time.monotonic()
        if action < 0.35:  # edit the text and clear the embedding, as an app would
            conn.execute(
                f"UPDATE {table} SET body = %s, emb = NULL WHERE ticket_no = %s",
                (f"edited {n} of {i}", i),
            )
            self.expect[i] = "text"
        elif action < 0.55:  # edit the text of a row still waiting for its embedding
            cur = conn.execute(
                f"UPDATE {table} SET subject = %s WHERE ticket_no = %s AND emb IS NULL",
                (f"subject {n}", i),
            )
            if cur.rowcount:
                self.expect[i] = "text"
        elif action < 0.7:  # the app embeds the row itself
            conn.execute(f"UPDATE {table} SET emb = %s WHERE ticket_no = %s", (MARKER, i))
            self.expect[i] = "marker"
        elif action < 0.8:
            conn.execute(f"DELETE FROM {table} WHERE ticket_no = %s", (i,))
            self.expect[i] = "deleted"
        else:  # hold a row lock for a moment
            with conn.transaction():
                conn.execute(f"SELECT 1 FROM {table} WHERE ticket_no = %s FOR UPDATE", (i,))
                time.sleep(0.05)
        self.slowest = max(self.slowest, time.monotonic() - started)
        time.sleep(0.002)


def test_kill_9_at_random_points_while_the_app_edits_never_stores_a_wrong_vector(
    db_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    rows = 2000
    with psycopg.connect(db_url, autocommit=True) as conn:
        make_tickets(conn, rows=rows)
        register_vector(conn)
        old = {
            r[0]: r[1].to_numpy()
            for r in conn.execute(
                'SELECT ticket_no, emb FROM app."SupportTickets" WHERE emb IS NOT NULL'
            )
        }
    fake_openai.latency = 0.03
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=7, concurrency=4)
    env = cli_env(db_url, TEST_PLATFORM_KEY=PLATFORM)
    app = App(db_url, rows, seed=11)
    app.start()
    rng = random.Random(5)
    try:
        for _ in range(4):
            until = len(fake_openai.ok_requests()) + rng.randint(2, 25)
            proc = popen("--config", str(cfg), "backfill", "--json", env=env)
            wait_until(
                lambda until=until, proc=proc: (
                    len(fake_openai.ok_requests()) >= until or proc.poll() is not None
                )
            )
            time.sleep(rng.random() * 0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
        during = embedfill("--config", str(cfg), "backfill", "--json", env=env)
        assert during.returncode == 0, during.stderr
    finally:
        app.stop.set()
        app.join(10)
    assert app.error is None, app.error
    assert app.slowest < 10  # the app never queued long behind the backfill

    last = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert last.returncode == 0, last.stderr
    assert json.loads(last.stdout)["failed"] == 0

    with psycopg.connect(db_url) as conn:
        register_vector(conn)
        stored = conn.execute(
            'SELECT ticket_no, subject, body, emb FROM app."SupportTickets"'
        ).fetchall()
        statuses = [r[0] for r in conn.execute("SELECT status FROM embedfill.runs ORDER BY id")]
    # one job, killed four times and resumed each time by the next backfill; then one more
    assert statuses == ["succeeded"] * 2
    assert {r[0] for r in stored} == {
        i for i in range(1, rows + 1) if app.expect.get(i) != "deleted"
    }
    for i, subject, body, emb in stored:
        assert emb is not None, f"row {i} left NULL"
        vector = emb.to_numpy()
        expect = app.expect.get(i)
        if expect == "marker":
            np.testing.assert_array_equal(vector, MARKER, f"row {i}: the app's vector overwritten")
        elif expect is None and i in old:
            np.testing.assert_array_equal(vector, old[i], f"row {i}: a filled row overwritten")
        else:
            text = render_text("{subject}\n\n{body}", {"subject": subject, "body": body})
            np.testing.assert_array_equal(vector, hash_vector(text, 8), f"row {i}: wrong vector")


def test_sigterm_while_the_provider_never_answers_exits_within_timeout_s(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.faults += [Fault(status=200, delay=120)] * 3  # one per worker, never answered
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=3, concurrency=3)  # 5 s
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    proc = popen("--config", str(cfg), "backfill", "--json", env=env)
    wait_until(lambda: not fake_openai.faults)  # all three requests are at the provider
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 1 and "cancelled" in err
    data = json.loads(out)
    assert data["status"] == "cancelled" and data["failed"] == 0 and data["embedded"] == 0
    assert took < 5 + 10  # the requests in flight, bounded by timeout_s, and no retry
    with psycopg.connect(tickets) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.failures").fetchone() == (0,)


def test_the_service_refuses_a_job_while_the_cli_runs_and_can_cancel_that_run(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.2
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=2, concurrency=1)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    proc = popen("--config", str(cfg), "backfill", "--json", env=env)
    wait_until(lambda: bool(fake_openai.ok_requests()))
    with (
        ServerThread(app_for(tickets, fake_openai, ADMIN_SECRET=ADMIN)) as base,
        httpx.Client(base_url=base, headers={"x-admin-secret": ADMIN}, timeout=60) as api,
    ):
        refused = api.post(PATH)
        assert refused.status_code == 409, refused.text
        assert refused.json()["job_id"] == 1
        assert "already being backfilled by run 1" in refused.json()["error"]
        status = api.get(f"{PATH}/1")
        assert status.status_code == 200 and status.json()["status"] == "running"
        cancelled = api.post(f"{PATH}/1/cancel")
        assert cancelled.status_code == 202, cancelled.text
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "cancelled" in err
        embedded = json.loads(out)["embedded"]
        assert 0 < embedded < 45
        fake_openai.latency = 0.0
        resumed = api.post(PATH, params={"wait": "true"})
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["embedded"] == 45 - embedded


def test_two_target_names_for_one_column_started_together_exactly_one_runs(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.05
    twin = """
[[targets]]
name = "tickets-too"
table = '"app"."SupportTickets"'
id_column = "ticket_no"
text = "{subject}\\n\\n{body}"
embedding_column = "emb"
tenant_column = "org"
provider = "openai"
"""
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=3, concurrency=2, extra=twin)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    procs: list[subprocess.Popen[str]] = []

    def hold_the_first_request(inputs: list[str]) -> None:
        # the winner's first request waits until the other process has given up, so the
        # two runs overlap however slowly a loaded machine starts the second
        if len(fake_openai.requests) == 0:
            wait_until(lambda: any(p.poll() is not None for p in procs), timeout=60)

    fake_openai.on_inputs = hold_the_first_request
    for _ in range(3):
        with psycopg.connect(tickets, autocommit=True) as conn:
            conn.execute('UPDATE app."SupportTickets" SET emb = NULL WHERE ticket_no % 4 <> 0')
        fake_openai.requests.clear()
        procs[:] = [
            popen("--config", str(cfg), "backfill", "--target", name, "--json", env=env)
            for name in ("tickets", "tickets-too")
        ]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 4], results
        (winner,) = [json.loads(out) for code, out, _ in results if code == 0]
        (loser,) = [err for code, _, err in results if code == 4]
        assert winner["embedded"] == 45
        assert "already being backfilled" in loser
        sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
        assert len(sent) == len(set(sent)) == 45
