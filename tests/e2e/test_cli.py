"""The CLI as a subprocess against a real database and a real local OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import snapshot

PLATFORM = "sk-platform-zyxwvutsrq987654"
TENANT_B = "sk-tenant-b-secret-kkkkkkkk"


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def test_backfill_json_contract_and_exit_codes(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)

    plan = embedfill("--config", str(cfg), "backfill", "--dry-run", "--json", env=env)
    assert plan.returncode == 0, plan.stderr
    data = json.loads(plan.stdout)
    for key in (
        "run_id",
        "target",
        "dry_run",
        "missing_before",
        "embedded",
        "skipped",
        "failed",
        "requests",
        "tokens",
        "estimated_cost_usd",
        "tenants",
        "failures",
    ):
        assert key in data
    assert data["dry_run"] is True and data["missing_before"] == 45
    for t in data["tenants"]:
        assert set(t) >= {"tenant", "missing", "embedded", "skipped", "failed", "key_source"}
        assert t["key_source"] == "platform"

    done = embedfill("--config", str(cfg), "backfill", "--json", "--batch-size", "7", env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["embedded"] == 45 and data["failed"] == 0
    assert max(len(r.inputs) for r in fake_openai.ok_requests()) == 7

    status = embedfill("--config", str(cfg), "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    (target,) = json.loads(status.stdout)["targets"]
    assert target["name"] == "tickets" and target["missing"] == 0 and target["rows"] == 60
    assert target["dimensions"] == 8 and target["vector_index"] is None
    assert {t["tenant"] for t in target["tenants"]} == {"org-a", "org-b", "org-c"}


def test_failed_rows_exit_3_and_secrets_never_leak(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    master = embedfill("keys", "new-master-key", env=cli_env(None)).stdout.strip()
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM, EMBEDFILL_MASTER_KEY=master)
    stored = embedfill(
        "--config", str(cfg), "keys", "set", "--tenant", "org-b", env=env, stdin=TENANT_B + "\n"
    )
    assert stored.returncode == 0, stored.stderr
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("INSERT INTO app.org_settings VALUES ('org-c', 'sk-tenant-c-revoked-cc')")
    fake_openai.bad_keys.add("sk-tenant-c-revoked-cc")

    result = embedfill("--debug", "--config", str(cfg), "backfill", "--json", env=env)
    assert result.returncode == 3, result.stderr
    data = json.loads(result.stdout)
    tenants = {t["tenant"]: t for t in data["tenants"]}
    assert tenants["org-b"]["key_source"] == "tenant" and tenants["org-b"]["embedded"] == 15
    assert tenants["org-c"]["failed"] == 15 and tenants["org-a"]["key_source"] == "platform"
    assert set(fake_openai.texts_by_key()) == {PLATFORM, TENANT_B}

    listed = embedfill("keys", "list", "--json", env=env)
    assert json.loads(listed.stdout)["keys"][0]["key"] == "…" + TENANT_B[-4:]

    secrets = (PLATFORM, TENANT_B, master, "sk-tenant-c-revoked-cc")
    outputs = result.stdout + result.stderr + listed.stdout + listed.stderr + stored.stdout
    with psycopg.connect(tickets) as conn:
        tables = conn.execute(
            "SELECT concat_ws(' ', r.*::text, (SELECT string_agg(f::text, ' ') "
            "FROM embedfill.failures f)) FROM embedfill.runs r"
        ).fetchall()
        keys = conn.execute(
            "SELECT t::text, encode(ciphertext, 'escape') FROM embedfill.tenant_keys t"
        ).fetchall()
    dump = outputs + json.dumps(tables) + json.dumps(keys)
    for secret in secrets:
        assert secret not in dump


def test_keys_need_a_master_key_and_stdin(tickets: str, tmp_path: Path) -> None:
    env = cli_env(tickets)
    no_master = embedfill("keys", "set", "--tenant", "t1", env=env, stdin="sk-abc\n")
    assert no_master.returncode == 2
    assert "EMBEDFILL_MASTER_KEY is not set" in no_master.stderr
    assert "sk-abc" not in no_master.stderr + no_master.stdout
    env["EMBEDFILL_MASTER_KEY"] = embedfill("keys", "new-master-key", env=env).stdout.strip()
    empty = embedfill("keys", "set", "--tenant", "t1", env=env, stdin="")
    assert empty.returncode == 2 and "No key was given on stdin" in empty.stderr
    assert (
        embedfill("keys", "set", "--tenant", "t1", env=env, stdin="sk-1234567890\n").returncode == 0
    )
    assert embedfill("keys", "delete", "--tenant", "t1", env=env).returncode == 0
    gone = embedfill("keys", "delete", "--tenant", "t1", env=env)
    assert gone.returncode == 2 and "No key is stored" in gone.stderr


def test_a_key_typed_on_the_command_line_is_not_echoed_back(tickets: str) -> None:
    """`keys set` reads the key from stdin; one typed after it on the command line is an
    unexpected argument, and the parse error does not print it back (the terminal's
    scrollback and a CI log would keep it). Before (helper-33), the error quoted it."""
    env = cli_env(tickets)
    secret = "sk-typed-on-argv-0123456789"
    done = embedfill("keys", "set", "--tenant", "t1", secret, env=env, stdin="")
    assert done.returncode == 2
    assert "unexpected extra arguments" in done.stderr
    assert secret not in done.stderr + done.stdout
    other = embedfill("status", secret, env=env)  # any command
    assert other.returncode == 2 and secret not in other.stderr + other.stdout
    # typed where a command goes: masked, while a command's typo is still named
    slot = embedfill("keys", secret, env=env)
    assert slot.returncode == 2 and secret not in slot.stderr + slot.stdout
    typo = embedfill("stauts", env=env)
    assert typo.returncode == 2 and "No such command 'stauts'" in typo.stderr


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ("", "The tenant id is empty"),
        ("   ", "The tenant id is empty"),
        ("x" * 513, "The tenant id is 513 characters long, over the 512"),
    ],
)
def test_an_empty_or_over_long_tenant_id_in_keys_set_is_one_sentence(
    tickets: str, tenant: str, message: str
) -> None:
    """Before: an empty tenant stored a key nobody would ever use, and an over-long one
    was stored as given (past about 2,700 bytes, PostgreSQL's index-size error)."""
    env = cli_env(tickets)
    env["EMBEDFILL_MASTER_KEY"] = embedfill("keys", "new-master-key", env=env).stdout.strip()
    result = embedfill("keys", "set", "--tenant", tenant, env=env, stdin="sk-abc-secret-999\n")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].endswith(".")
    assert "sk-abc-secret-999" not in result.stdout + result.stderr
    listed = embedfill("keys", "list", "--json", env=env)
    assert json.loads(listed.stdout) == {"keys": []}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("\n[engine]\nwrite_concurency = 2\n", "Unknown key 'write_concurency' in [engine]"),
        ("", None),
    ],
)
def test_config_errors_exit_2_before_any_request(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path, extra: str, message: str | None
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url, extra=extra)
    if message is None:  # an unknown column
        cfg.write_text(
            cfg.read_text().replace('embedding_column = "emb"', 'embedding_column = "embedding"')
        )
        message = "Column 'embedding' (embedding_column of target 'tickets') does not exist"
    with psycopg.connect(tickets) as conn:
        before = snapshot(conn)
    result = embedfill(
        "--config", str(cfg), "backfill", env=cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    )
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert fake_openai.requests == []
    with psycopg.connect(tickets) as conn:
        assert snapshot(conn) == before


def test_non_vector_column_and_missing_extension(
    tickets: str, bare_db_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    cfg.write_text(cfg.read_text().replace('embedding_column = "emb"', 'embedding_column = "body"'))
    result = embedfill("--config", str(cfg), "status", env=cli_env(tickets))
    assert result.returncode == 2 and "is text, not a pgvector vector" in result.stderr

    result = embedfill("--config", str(cfg), "status", env=cli_env(bare_db_url))
    assert result.returncode == 2
    assert "pgvector extension is not enabled in this database" in result.stderr
    assert "CREATE EXTENSION vector" in result.stderr


def test_kill_9_mid_run_then_resume(tickets: str, fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.latency = 0.15
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=2, concurrency=2)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    proc = popen("--config", str(cfg), "backfill", "--json", env=env)
    wait_until(lambda: len(fake_openai.ok_requests()) >= 6)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    with psycopg.connect(tickets, autocommit=True) as conn:  # a fresh view each query
        # a write the killed process had sent still commits on the server: count once
        # the server has ended every session of it
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()[0]
                == 0
            )
        )
        filled = conn.execute(
            'SELECT count(*) FROM app."SupportTickets" WHERE emb IS NOT NULL'
        ).fetchone()[0]
    assert 15 < filled < 60, "the kill must land mid-run"

    fake_openai.latency = 0.0
    resumed = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads(resumed.stdout)
    with psycopg.connect(tickets) as conn:
        assert (
            conn.execute('SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL').fetchone()[
                0
            ]
            == 0
        )
        statuses = conn.execute("SELECT status FROM embedfill.runs ORDER BY id").fetchall()
    # the killed backfill's job is not lost: the next backfill joins it and finishes it
    assert statuses == [("succeeded",)]
    assert data["joined"] is True and data["run_id"] == 1
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    # embedded twice at most: the batches in flight at the kill, at the provider
    # (concurrency x batch size) and answered but not yet committed (as many again)
    assert len(sent) - len(set(sent)) <= 2 * (2 * 2)
    assert len(set(sent)) == 45
    (resumer,) = [w for w in data["workers"] if w["pid"] != proc.pid]
    assert resumer["embedded"] == 45 - (filled - 15)


def test_a_second_exclusive_run_is_refused_with_exit_4(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.2
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=2, concurrency=1)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    first = popen("--config", str(cfg), "backfill", "--json", env=env)
    wait_until(lambda: bool(fake_openai.requests))
    second = embedfill("--config", str(cfg), "backfill", "--exclusive", env=env)
    assert second.returncode == 4
    assert "already being backfilled by run 1" in second.stderr
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert json.loads(out)["embedded"] == 45
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert len(sent) == len(set(sent)) == 45


def test_sigterm_finishes_the_batch_in_flight(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.latency = 0.3
    cfg = write_config(tmp_path, fake_openai.base_url, batch_size=3, concurrency=1)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    proc = popen("--config", str(cfg), "backfill", "--json", env=env)
    wait_until(lambda: bool(fake_openai.requests))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "cancelled" in err
    data = json.loads(out)
    assert data["status"] == "cancelled"
    with psycopg.connect(tickets) as conn:
        filled = conn.execute(
            'SELECT count(*) FROM app."SupportTickets" WHERE emb IS NOT NULL'
        ).fetchone()[0]
    # every answered batch was written whole; nothing else
    assert filled - 15 == data["embedded"] == 3 * len(fake_openai.ok_requests())
