"""The CLI as a subprocess (and the admin service on a real port) when the provider
misbehaves: exit codes, one clear line, no traceback, and signals honoured even while a
provider makes it wait."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from embedfill import Database
from embedfill.http import create_app
from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI, Fault, missing_embedding, string_indices
from tests.support.http import ServerThread
from tests.support.tables import snapshot, tickets_config

PLATFORM = "sk-platform-zyxwvutsrq987654"
ADMIN = "admin-secret-for-tests-5c1e"


def wait_until_requests(fake: FakeOpenAI, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(fake.requests) < count:
        assert time.monotonic() < deadline, "timed out waiting for the requests"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_run_waiting_out_an_hour_long_retry_after(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path, sig: signal.Signals
) -> None:
    fake_openai.faults += [Fault(429, retry_after=3600)] * 3  # one per worker
    cfg = write_config(tmp_path, fake_openai.base_url, concurrency=3)
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    proc = popen(
        "--config", str(cfg), "backfill", "--json", env=cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    )
    try:
        wait_until_requests(fake_openai, 3)
        time.sleep(0.5)  # every worker is now waiting
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)  # generous: "did not hang"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert "cancelled" in err and "Traceback" not in err
    data = json.loads(out)
    assert data["status"] == "cancelled" and data["failed"] == 0 and data["embedded"] == 0
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before  # the rows not sent stay NULL for the next run
        assert conn.execute("SELECT count(*) FROM embedfill.failures").fetchone() == (0,)


def test_malformed_answers_fail_rows_with_exit_3_not_a_traceback(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.mangle = string_indices
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=12, extra="")
    cfg.write_text(cfg.read_text().replace("timeout_s = 5", "timeout_s = 5\nmax_attempts = 2"))
    result = embedfill(
        "--config", str(cfg), "backfill", "--json", env=cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    assert data["failed"] == 45 and data["embedded"] == 0
    assert {f["error"] for f in data["failures"]} == {
        "The provider's answer was malformed: index 0 is a string, not an integer."
    }


def test_a_model_the_provider_rejects_exits_2_with_one_line(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.reject_models.add("test-embed")
    cfg = write_config(tmp_path, fake_openai.base_url)
    result = embedfill(
        "--config", str(cfg), "backfill", env=cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "The model `test-embed` does not exist" in line
    assert "provider 'openai'" in line and "model" in line and "dimensions" in line
    assert len(fake_openai.requests) <= 5


def test_a_size_change_mid_run_exits_3_with_the_reason(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    answered = 0

    def count(inputs: list[str]) -> None:
        nonlocal answered
        answered += 1
        if answered > 3:
            fake_openai.dims_override = 12

    fake_openai.on_inputs = count
    cfg = write_config(tmp_path, fake_openai.base_url, concurrency=1)
    result = embedfill(
        "--config", str(cfg), "backfill", env=cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    )
    assert result.returncode == 3, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "15 rows" in line and "12-dimensional" in line


def test_the_admin_service_answers_malformed_answers_with_a_report(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.mangle = missing_embedding
    app = create_app(
        tickets_config(fake_openai.base_url, provider_overrides={"max_attempts": 1}),
        database=Database(tickets),
        env={"TEST_PLATFORM_KEY": PLATFORM, "ADMIN_SECRET": ADMIN},
    )
    with ServerThread(app) as base:
        answer = httpx.post(
            f"{base}/api/v1/admin/backfill-embeddings?wait=true",
            headers={"x-admin-secret": ADMIN},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["status"] == "partial" and report["failed"] == 45
    assert {f["error"] for f in report["failures"]} == {
        "The provider's answer was malformed: embedding 0 is missing."
    }
