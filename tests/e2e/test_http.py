"""The admin service through a real uvicorn server on a loopback port, a real database and
a real local OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from embedfill import Database
from embedfill.http import create_app
from tests.support.cli import cli_env, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.http import ServerThread, free_port, serve_subprocess, wait_for
from tests.support.tables import snapshot, tickets_config

ADMIN = "admin-secret-for-tests-3f9a"
PLATFORM = "sk-platform-http-7777777777"
PATH = "/api/v1/admin/backfill-embeddings"


def app_for(db_url: str, fake: FakeOpenAI, **env: str) -> Any:
    env = {"TEST_PLATFORM_KEY": PLATFORM, **env}
    return create_app(tickets_config(fake.base_url), database=Database(db_url), env=env)


@pytest.fixture
def api(tickets: str, fake_openai: FakeOpenAI) -> Iterator[httpx.Client]:
    with (
        ServerThread(app_for(tickets, fake_openai, ADMIN_SECRET=ADMIN)) as base,
        httpx.Client(base_url=base, headers={"x-admin-secret": ADMIN}, timeout=60) as client,
    ):
        yield client


def missing(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        return int(
            conn.execute('SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL').fetchone()[
                0
            ]
        )


@pytest.mark.parametrize(
    ("env", "header", "expected"),
    [
        ({}, ADMIN, 503),
        ({"ADMIN_SECRET": ADMIN}, None, 401),
        ({"ADMIN_SECRET": ADMIN}, "wrong", 401),
        ({"ADMIN_SECRET": ADMIN}, ADMIN, 200),
        ({"AUTH_SECRET": ADMIN}, ADMIN, 200),
        ({"ADMIN_SECRET": ADMIN, "AUTH_SECRET": "other"}, "other", 401),
    ],
)
def test_auth_matrix(
    tickets: str, fake_openai: FakeOpenAI, env: dict[str, str], header: str | None, expected: int
) -> None:
    headers = {"x-admin-secret": header} if header else {}
    with ServerThread(app_for(tickets, fake_openai, **env)) as base:
        status = httpx.get(f"{base}/api/v1/admin/embeddings/status", headers=headers)
        post = httpx.post(f"{base}{PATH}?dryRun=true", headers=headers)
        health = httpx.get(f"{base}/healthz")
    assert status.status_code == expected and post.status_code == expected
    assert health.status_code == 200
    if expected == 503:
        assert "disabled until ADMIN_SECRET (or AUTH_SECRET) is set" in status.json()["error"]
    for r in (status, post):
        assert ADMIN not in r.text and "other" not in r.text.replace("another", "")


def test_a_service_without_an_admin_secret_says_so_at_start(
    tickets: str, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ADMIN_SECRET (or AUTH_SECRET) the admin API answers 503; the log says so
    when the service starts, where an operator looks first. Before (helper-33), nothing
    was logged, and the first sign was a 503 from curl."""
    import logging

    with caplog.at_level(logging.WARNING, logger="embedfill.http.app"):
        with ServerThread(app_for(tickets, fake_openai)) as base:
            assert httpx.get(f"{base}/healthz").status_code == 200
        with ServerThread(app_for(tickets, fake_openai, ADMIN_SECRET=ADMIN)) as base:
            assert httpx.get(f"{base}/healthz").status_code == 200
    said = [r.getMessage() for r in caplog.records if "admin API is disabled" in r.getMessage()]
    assert said == [
        "the admin API is disabled: set ADMIN_SECRET (or AUTH_SECRET, or either's _FILE) to "
        "use it; /healthz, /readyz and /metrics answer without it"
    ]


def test_dry_run_changes_nothing(api: httpx.Client, tickets: str, fake_openai: FakeOpenAI) -> None:
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    r = api.post(PATH, params={"dryRun": "true", "batchSize": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dry_run"] is True and body["missing_before"] == 45 and body["requests"] == 9
    assert {t["key_source"] for t in body["tenants"]} == {"platform"}
    assert fake_openai.requests == []
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before


def test_real_run_fills_every_null_row_and_reports_per_tenant(
    api: httpx.Client, tickets: str
) -> None:
    r = api.post(PATH)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["status_url"] == f"{PATH}/{job['job_id']}"
    final = wait_for(api, job["status_url"], {"succeeded", "partial", "failed"})
    assert final["status"] == "succeeded"
    assert final["progress"]["done"] == final["progress"]["total"] == 45
    report = final["report"]
    assert report["embedded"] == 45
    assert sorted((t["tenant"], t["embedded"]) for t in report["tenants"]) == [
        ("org-a", 15),
        ("org-b", 15),
        ("org-c", 15),
    ]
    assert missing(tickets) == 0
    status = api.get("/api/v1/admin/embeddings/status").json()
    assert status["targets"][0]["missing"] == 0


def test_wait_answers_with_the_final_report(api: httpx.Client, tickets: str) -> None:
    r = api.post(PATH, params={"wait": "true", "tenantId": ["org-a", "org-b"], "limit": 20})
    assert r.status_code == 200, r.text
    assert r.json()["embedded"] == 20
    assert {t["tenant"] for t in r.json()["tenants"]} <= {"org-a", "org-b"}


def test_recent_jobs_are_listed_newest_first(api: httpx.Client) -> None:
    assert api.get(PATH).json() == {"jobs": []}
    ids = []
    for limit in (5, 7, 9):
        r = api.post(PATH, params={"wait": "true", "limit": limit})
        assert r.status_code == 200, r.text
        ids.append(r.json()["job_id"])
    api.post(PATH, params={"dryRun": "true"})  # a dry run is not a job

    jobs = api.get(PATH).json()["jobs"]
    assert [j["job_id"] for j in jobs] == ids[::-1]
    assert [j["progress"]["done"] for j in jobs] == [9, 7, 5]
    assert {j["status"] for j in jobs} == {"succeeded"} and all(j["report"] is None for j in jobs)
    assert [j["job_id"] for j in api.get(PATH, params={"limit": 2}).json()["jobs"]] == ids[:0:-1]
    assert len(api.get(PATH, params={"target": "tickets"}).json()["jobs"]) == 3
    unknown = api.get(PATH, params={"target": "nope"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    assert api.get(PATH, params={"limit": 0}).status_code == 422


def test_a_second_post_while_one_runs_is_409(api: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.latency = 0.2
    first = api.post(PATH, params={"batchSize": 2})
    assert first.status_code == 202
    second = api.post(PATH)
    assert second.status_code == 409
    assert second.json()["job_id"] == first.json()["job_id"]
    assert f"job {first.json()['job_id']}" in second.json()["error"]
    fake_openai.latency = 0.0
    assert wait_for(api, first.json()["status_url"], {"succeeded"})["status"] == "succeeded"
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent)) == 45


def test_cancel_stops_after_the_batch_in_flight(
    api: httpx.Client, tickets: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.latency = 0.3
    job = api.post(PATH, params={"batchSize": 3}).json()
    wait_for(api, job["status_url"], {"running"})
    while not fake_openai.requests:
        pass
    r = api.post(f"{job['status_url']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    final = wait_for(api, job["status_url"], {"cancelled", "succeeded"})
    assert final["status"] == "cancelled"
    embedded = final["report"]["embedded"]
    assert 0 < embedded < 45 and embedded == 3 * len(fake_openai.ok_requests())
    assert missing(tickets) == 45 - embedded
    again = api.post(f"{job['status_url']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]
    fake_openai.latency = 0.0
    resumed = api.post(PATH, params={"wait": "true"})
    assert resumed.json()["embedded"] == 45 - embedded and missing(tickets) == 0


def test_bad_parameters_unknown_target_and_unknown_job(api: httpx.Client) -> None:
    for params, name in (
        ({"batchSize": 0}, "batchSize"),
        ({"batchSize": 4096}, "batchSize"),
        ({"limit": "ten"}, "limit"),
        ({"dryRun": "perhaps"}, "dryRun"),
    ):
        r = api.post(PATH, params=params)
        assert r.status_code == 422 and f"Parameter {name}" in r.json()["error"], r.text
    r = api.post(PATH, params={"dryRun": "true", "tenantId": "a\x00b"})
    assert r.status_code == 422 and "NUL character" in r.json()["error"]
    r = api.post(PATH, params={"target": "nope"})
    assert r.status_code == 404 and "No target named 'nope'" in r.json()["error"]
    assert api.get(f"{PATH}/999").status_code == 404
    assert api.post(f"{PATH}/999/cancel").status_code == 404


def test_metrics_move_after_a_run(api: httpx.Client, fake_openai: FakeOpenAI) -> None:
    def scrape() -> dict[str, float]:
        text = api.get("/metrics").text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(embedfill_\w+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    before = scrape()
    assert before['embedfill_missing_rows{target="tickets"}'] == 45
    from tests.support.fake_openai import Fault

    fake_openai.faults.append(Fault(500))
    assert api.post(PATH, params={"wait": "true"}).status_code == 200
    after = scrape()
    assert after['embedfill_rows_total{outcome="embedded",target="tickets"}'] == 45
    assert after['embedfill_provider_requests_total{status="500",target="tickets"}'] == 1
    assert after['embedfill_provider_retries_total{status="500",target="tickets"}'] == 1
    assert after['embedfill_provider_requests_total{status="200",target="tickets"}'] == 9
    assert after['embedfill_provider_latency_seconds_count{target="tickets"}'] == 10
    assert after['embedfill_tokens_total{target="tickets"}'] > 0
    assert after['embedfill_jobs_total{state="succeeded"}'] == 1
    assert after["embedfill_jobs_running"] == 0


def test_readyz(tickets: str, bare_db_url: str, fake_openai: FakeOpenAI) -> None:
    with ServerThread(app_for(tickets, fake_openai, ADMIN_SECRET=ADMIN)) as base:
        ok = httpx.get(f"{base}/readyz")
    assert ok.status_code == 200 and "pgvector present" in ok.json()["detail"]
    with ServerThread(app_for(bare_db_url, fake_openai, ADMIN_SECRET=ADMIN)) as base:
        bad = httpx.get(f"{base}/readyz")
    assert bad.status_code == 503
    assert bad.json() == {
        "error": "pgvector is missing in the database; the service log says how to fix it."
    }  # unauthenticated: generic reasons
    with ServerThread(
        create_app(
            tickets_config(fake_openai.base_url),
            database=Database("postgresql://nobody@127.0.0.1:1/x"),
            env={"ADMIN_SECRET": ADMIN},
        )
    ) as base:
        down = httpx.get(f"{base}/readyz")
        alive = httpx.get(f"{base}/healthz")
    assert down.status_code == 503 and down.json() == {
        "error": "The database is unavailable; the service log says why."
    }
    assert alive.status_code == 200


def test_a_job_survives_a_restart_of_the_service_and_finishes_by_itself(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Any
) -> None:
    fake_openai.latency = 0.25
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=2, concurrency=1)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM, ADMIN_SECRET=ADMIN)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    headers = {"x-admin-secret": ADMIN}
    proc = serve_subprocess(["--config", str(cfg)], env, port)
    try:
        job = httpx.post(f"{base}{PATH}", headers=headers).json()
        with psycopg.connect(tickets, autocommit=True) as conn:
            # kill once the job has recorded some progress (its heartbeat, every second)
            while not conn.execute(
                "SELECT (progress->>'done')::int > 0 FROM embedfill.runs WHERE id = %s",
                (job["job_id"],),
            ).fetchone()[0]:
                time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, first_logs = proc.communicate()
    fake_openai.latency = 0.0
    assert 0 < missing(tickets) < 45

    proc = serve_subprocess(["--config", str(cfg)], env, port)
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            # the job is still running: the new process's worker takes its chunks back
            # (their worker is dead) and finishes it; nobody has to post again
            record = wait_for(client, job["status_url"], {"succeeded"})
            assert record["job_id"] == job["job_id"]
            assert missing(tickets) == 0
            again = client.post(PATH, params={"wait": "true"})  # nothing left: a no-op job
            assert again.status_code == 200 and again.json()["embedded"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, second_logs = proc.communicate(timeout=60)
    lines = [
        json.loads(line) for line in (first_logs + second_logs).splitlines() if line.startswith("{")
    ]
    job_lines = [entry for entry in lines if entry["job_id"] is not None]
    assert {entry["job_id"] for entry in job_lines} >= {job["job_id"]}
    for secret in (ADMIN, PLATFORM):
        assert secret not in first_logs + second_logs
