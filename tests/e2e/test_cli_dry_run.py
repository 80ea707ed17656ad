"""`backfill --dry-run` as a user runs it: samples, rows that would fail, warnings."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI

PLATFORM = "sk-platform-cli-dry-55555555"
TENANT_A = "sk-tenant-a-cli-dry-66666666"


def test_dry_run_json_has_samples_would_fail_and_warnings(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO app.org_settings VALUES ('org-a', %s), ('org-b', '')", (TENANT_A,)
        )
    cfg = write_config(tmp_path, fake_openai.base_url, extra="allow_platform_fallback = false\n")
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    args = ("--config", str(cfg), "backfill", "--dry-run")

    r = embedfill(
        *args, "--json", "--tenant", "org-a", "--tenant", "org-b", "--tenant", "nope", env=env
    )
    assert r.returncode == 3, r.stderr  # rows would fail
    data = json.loads(r.stdout)
    assert data["would_fail"] == 15 and data["run_id"] is not None
    assert {t["tenant"]: t["would_fail"] for t in data["tenants"]} == {"org-a": 0, "org-b": 15}
    assert data["warnings"] == [
        "Tenant 'nope' matches no row of app.SupportTickets (column org); check the tenant id."
    ]
    assert "warning: Tenant 'nope' matches no row" in r.stderr
    assert [s["id"] for s in data["samples"]] == [1, 3]
    assert data["samples"][0] == {
        "id": 1,
        "tenant": "org-b",
        "text": "Ticket 1: cannot export report\n\nCustomer 1 says the CSV export of "
        "dashboard 1 times out after 1 seconds.",
    }
    for secret in (PLATFORM, TENANT_A):
        assert secret not in r.stdout + r.stderr

    r = embedfill(*args, "--tenant", "org-a", env=env)
    assert r.returncode == 0, r.stderr  # nothing would fail
    assert "sample texts, as they would be sent" in r.stdout
    assert "row 3 (tenant org-a):" in r.stdout
    assert '"Ticket 3: cannot export report\\n\\nCustomer 3 says' in r.stdout

    r = embedfill(*args, env=env)
    assert r.returncode == 3
    assert "would fail: 30" in r.stdout
    assert "tenant org-b:" in r.stdout and "tenant_key_sql gave an empty key" in r.stdout
    assert fake_openai.requests == []
