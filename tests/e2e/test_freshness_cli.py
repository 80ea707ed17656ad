"""`status` and `backfill --refresh` as an operator sees them."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI

PLATFORM = "sk-platform-test-freshness-cli"


def test_status_shows_stale_outdated_and_unverified_and_refresh_fixes_them(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    assert embedfill("--config", str(cfg), "backfill", env=env).returncode == 0
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """UPDATE app."SupportTickets" SET body = body || '!' WHERE ticket_no <= 30
               AND ticket_no % 4 <> 0"""
        )
    shown = embedfill("--config", str(cfg), "status", env=env)
    assert shown.returncode == 0
    assert "23 stale" in shown.stdout and "15 unverified" in shown.stdout
    assert "0 outdated model" in shown.stdout
    # what to run about the unverified ones
    said = " ".join(shown.stdout.split())
    assert (
        "15 vectors have no record of embedfill's: `embedfill verify --target tickets` "
        "checks a sample against the provider, then `embedfill adopt --target tickets` "
        "records the ones you keep"
    ) in said, said
    as_json = json.loads(embedfill("--config", str(cfg), "status", "--json", env=env).stdout)
    (target,) = as_json["targets"]
    assert (target["stale"], target["outdated_model"], target["unverified"]) == (23, 0, 15)
    assert sum(t["stale"] for t in target["tenants"]) == 23

    refreshed = embedfill("--config", str(cfg), "backfill", "--refresh", "--json", env=env)
    assert refreshed.returncode == 0, refreshed.stderr
    report = json.loads(refreshed.stdout)
    assert (report["stale_before"], report["refreshed"]) == (23, 23)
    assert "mixes two vector spaces" not in refreshed.stderr  # same model: nothing mixed
    after = json.loads(embedfill("--config", str(cfg), "status", "--json", env=env).stdout)
    assert after["targets"][0]["stale"] == 0


def test_refresh_after_a_model_change_says_it_mixes_vector_spaces_before_it_starts(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    assert embedfill("--config", str(cfg), "backfill", env=env).returncode == 0
    cfg.write_text(cfg.read_text().replace('model = "test-embed"', 'model = "test-embed-v2"'))
    plan = embedfill("--config", str(cfg), "backfill", "--refresh", "--dry-run", "--json", env=env)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["stale_before"] == 45
    done = embedfill("--config", str(cfg), "backfill", "--refresh", env=env)
    assert done.returncode == 0, done.stderr
    assert "45 rows of target 'tickets' hold vectors of another model" in done.stderr
    assert done.stderr.count("mixes two vector spaces") == 1  # before it starts, once
    assert "stale or outdated-model before: 45  refreshed: 45" in done.stdout


def test_status_shows_the_rows_failing_by_error_class_per_target_and_tenant(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Rows whose text the provider rejects: `status` counts them failing, by error
    class, for the target and each tenant, in text and JSON."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            'UPDATE app."SupportTickets" SET body = body || %s WHERE ticket_no IN (1, 2, 5)',
            (fake_openai.bad_marker,),
        )
        orgs = dict(
            conn.execute(
                'SELECT ticket_no, org FROM app."SupportTickets" WHERE ticket_no IN (1, 2, 5)'
            ).fetchall()
        )
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert json.loads(done.stdout)["failed"] == 3, done.stdout + done.stderr
    (target,) = json.loads(embedfill("--config", str(cfg), "status", "--json", env=env).stdout)[
        "targets"
    ]
    assert target["failing"] == 3 and target["failing_errors"] == {"BadInput": 3}, target
    by_tenant = {t["tenant"]: t["failing"] for t in target["tenants"]}
    expected: dict[str, int] = {}
    for org in orgs.values():
        expected[org] = expected.get(org, 0) + 1
    assert {k: v for k, v in by_tenant.items() if v} == expected
    shown = embedfill("--config", str(cfg), "status", env=env)
    said = " ".join(shown.stdout.split())
    assert "3 failing (BadInput 3)" in said, said
