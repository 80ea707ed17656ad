"""Worker processes export their provider and row counters (issue 15, item 4): with
`serve --no-worker`, the provider alerts could never fire; `worker` and `watch` serve
their own /metrics with --metrics-port."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.http import free_port

PLATFORM = "sk-platform-worker-metrics-42"


def scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return ""


def test_a_worker_serves_its_provider_and_row_counters(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill("--config", str(cfg), "backfill", "--enqueue", "--json", env=env)
    assert done.returncode == 0, done.stderr
    port = free_port()
    worker = popen("--config", str(cfg), "worker", "--metrics-port", str(port), env=env)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = scrape(port)
            if 'embedfill_rows_total{outcome="embedded",target="tickets"} 45.0' in text:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"no row counters on the worker's /metrics:\n{text}")
        assert 'embedfill_provider_requests_total{status="200",target="tickets"}' in text
        assert PLATFORM not in text
        # the database's gauges are the service's: here they were exported and never set
        # (`embedfill_workers_alive 0` beside this live worker)
        for gauge in (
            "embedfill_workers_alive",
            "embedfill_missing_rows",
            "embedfill_jobs_running",
        ):
            assert gauge not in text
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err


def test_a_metrics_port_in_use_is_one_sentence(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    import socket

    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = embedfill("--config", str(cfg), "watch", "--metrics-port", str(port), env=env)
    assert done.returncode == 2, done.stderr
    assert "--metrics-port" in done.stderr.strip().splitlines()[-1]
