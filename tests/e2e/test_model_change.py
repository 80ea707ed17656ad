"""No silent model change (issue 15, item 2): `watch`, `worker` and `serve --watch`
configured with another model than the one that wrote the column's vectors refuse to
start (exit 2, one sentence naming both models and the rows, and the ways on); with
--allow-model-change they start. The CLI as real processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg

from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI

PLATFORM = "sk-platform-model-change-1234"


def filled_with_test_embed(tickets: str, cfg: Path, env: dict[str, str]) -> None:
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert done.returncode == 0, done.stderr


def now_another_model(cfg: Path) -> None:
    cfg.write_text(cfg.read_text().replace('model = "test-embed"', 'model = "test-embed-v2"'))


def watch_starts(cfg: Path, env: dict[str, str]) -> None:
    """`watch` starts (is still running 3 s on), and stops cleanly at SIGTERM."""
    watcher = popen("--config", str(cfg), "watch", "--interval", "0.3", env=env)
    time.sleep(3)
    assert watcher.poll() is None, watcher.communicate()[1]
    watcher.send_signal(signal.SIGTERM)
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err


def assert_refused(done_rc: int, stderr: str) -> None:
    assert done_rc == 2, stderr
    line = stderr.strip().splitlines()[-1]
    assert "openai:test-embed-v2 (8 dimensions)" in line
    assert "45 of its vectors were written with openai:test-embed (8 dimensions)" in line
    assert "backfill --refresh --target tickets" in line and "--allow-model-change" in line
    assert line.endswith(".")


def vectors(tickets: str) -> list[str]:
    with psycopg.connect(tickets) as conn:
        rows = conn.execute('SELECT emb::text FROM app."SupportTickets" ORDER BY 1').fetchall()
    return [r[0] for r in rows]


def written_by(tickets: str, model: str) -> int:
    """Rows whose provenance names this model (the vectors' values do not tell: the test
    server's vectors depend on the text alone)."""
    with psycopg.connect(tickets) as conn:
        row = conn.execute(
            "SELECT count(*) FROM embedfill.provenance p JOIN embedfill.models m"
            " ON m.id = p.model_id WHERE m.model = %s",
            (model,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_watch_worker_and_serve_watch_refuse_another_model(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    filled_with_test_embed(tickets, cfg, env)
    now_another_model(cfg)
    before = vectors(tickets)
    sent = len(fake_openai.requests)

    for args in (("watch",), ("worker",), ("serve", "--watch", "--port", "1")):
        done = embedfill("--config", str(cfg), *args, env=env, timeout=60)
        assert_refused(done.returncode, done.stderr)
    assert vectors(tickets) == before and len(fake_openai.requests) == sent
    # nor does `verify --fix` (its refresh would re-embed them too)
    fix = embedfill("--config", str(cfg), "verify", "--all", "--fix", env=env)
    assert fix.returncode == 2 and "so `verify --fix` would re-embed them" in fix.stderr
    assert vectors(tickets) == before

    # deliberate: the flag starts it, and the sweep re-embeds with the new model
    watcher = popen(
        "--config",
        str(cfg),
        "watch",
        "--interval",
        "0.3",
        "--sweep-interval",
        "1",
        "--allow-model-change",
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and written_by(tickets, "test-embed-v2") < 45:
            time.sleep(0.3)
    finally:
        watcher.send_signal(signal.SIGTERM)
        _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert written_by(tickets, "test-embed-v2") == 45
    assert written_by(tickets, "test-embed") == 0


def test_the_same_model_starts_as_before(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    filled_with_test_embed(tickets, cfg, env)
    watch_starts(cfg, env)


def test_after_a_deliberate_refresh_a_deleted_rows_record_blocks_nothing(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Found by review: a deleted row's provenance still counted as a vector of the old
    model, so after `backfill --refresh` (nothing left to do) watch still refused."""
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    filled_with_test_embed(tickets, cfg, env)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('DELETE FROM app."SupportTickets" WHERE ticket_no = 1')
    now_another_model(cfg)
    refreshed = embedfill("--config", str(cfg), "backfill", "--refresh", env=env)
    assert refreshed.returncode == 0, refreshed.stderr
    watch_starts(cfg, env)
