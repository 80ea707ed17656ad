"""The dry run says what would fail: tenants without a usable key, tenants that match no
row, and an empty key treated as no key wherever it comes from."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from embedfill import BackfillOptions, Database, abackfill
from embedfill.keys import new_master_key
from tests.support.fake_openai import FakeOpenAI
from tests.support.keys import store_key
from tests.support.tables import tickets_config

PLATFORM = "sk-platform-dry-0123456789"
KEY_SQL = "select api_key from app.org_settings where org = %(tenant)s"


def run(db_url: str, config: Any, env: dict[str, str], **opts: Any) -> Any:
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(**opts), env=env))


def test_tenants_without_a_usable_key_would_fail(tickets: str, fake_openai: FakeOpenAI) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("""INSERT INTO app.org_settings VALUES
                        ('org-a', 'sk-tenant-a-aaaaaaaa'), ('org-b', '')""")
        conn.execute("""UPDATE app."SupportTickets" SET subject = NULL, body = ' '
                        WHERE ticket_no = 1""")  # org-b, blank: skipped, not failed
    config = tickets_config(
        fake_openai.base_url, tenant_key_sql=KEY_SQL, allow_platform_fallback=False
    )
    plan = run(tickets, config, env={"TEST_PLATFORM_KEY": PLATFORM}, dry_run=True)

    by_tenant = {t.tenant: t for t in plan.tenants}
    assert by_tenant["org-a"].would_fail == 0 and by_tenant["org-a"].key_source == "tenant"
    assert by_tenant["org-b"].would_fail == 14 and by_tenant["org-b"].skipped == 1
    assert by_tenant["org-c"].would_fail == 15
    assert plan.would_fail == 29
    assert "tenant_key_sql gave an empty key" in (by_tenant["org-b"].error or "")
    assert "tenant_key_sql gave no key" in (by_tenant["org-c"].error or "")
    data = plan.to_dict()
    assert data["would_fail"] == 29
    assert {t["tenant"]: t["would_fail"] for t in data["tenants"]} == {
        "org-a": 0,
        "org-b": 14,
        "org-c": 15,
    }
    assert fake_openai.requests == []

    # the real run fails exactly those rows
    done = run(tickets, config, env={"TEST_PLATFORM_KEY": PLATFORM})
    assert done.failed == 29 and done.embedded == 15


def test_a_usable_key_for_every_tenant_would_fail_nothing(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    plan = run(
        tickets, tickets_config(fake_openai.base_url), {"TEST_PLATFORM_KEY": PLATFORM}, dry_run=True
    )
    assert plan.would_fail == 0 and all(t.would_fail == 0 for t in plan.tenants)


def test_an_empty_stored_key_is_no_key(tickets: str, fake_openai: FakeOpenAI) -> None:
    env = {"TEST_PLATFORM_KEY": PLATFORM, "EMBEDFILL_MASTER_KEY": new_master_key()}
    store_key(tickets, "org-a", "  ", env)
    # with the platform key to fall back on, org-a uses it: no request with an empty key
    report = run(tickets, tickets_config(fake_openai.base_url), env)
    assert {t.tenant: t.key_source for t in report.tenants}["org-a"] == "platform"
    assert report.embedded == 45
    assert {r.key for r in fake_openai.requests} == {PLATFORM}

    # without the fallback, org-a has no key, and the reason says why
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('UPDATE app."SupportTickets" SET emb = NULL')
    config = tickets_config(fake_openai.base_url, allow_platform_fallback=False)
    plan = run(tickets, config, env, dry_run=True)
    org_a = {t.tenant: t for t in plan.tenants}["org-a"]
    assert org_a.would_fail == org_a.missing == 20
    assert "its stored key is empty" in (org_a.error or "")


def test_an_empty_platform_key_is_no_key(tickets: str, fake_openai: FakeOpenAI) -> None:
    plan = run(
        tickets, tickets_config(fake_openai.base_url), {"TEST_PLATFORM_KEY": " "}, dry_run=True
    )
    assert plan.would_fail == 45
    assert all("TEST_PLATFORM_KEY is empty" in (t.error or "") for t in plan.tenants)


def test_a_tenant_that_matches_no_row_is_a_warning(tickets: str, fake_openai: FakeOpenAI) -> None:
    env = {"TEST_PLATFORM_KEY": PLATFORM}
    config = tickets_config(fake_openai.base_url)
    plan = run(tickets, config, env, dry_run=True, tenants=("org-a", "org-x"))
    assert plan.warnings == [
        "Tenant 'org-x' matches no row of app.SupportTickets (column org); check the tenant id."
    ]
    assert plan.to_dict()["warnings"] == plan.warnings
    assert plan.missing_before == 15
    # a real run says the same; a tenant with rows but nothing missing is no warning
    done = run(tickets, config, env, tenants=("org-a", "org-x"))
    assert done.warnings == plan.warnings and done.embedded == 15
    again = run(tickets, config, env, tenants=("org-a",))
    assert again.warnings == [] and again.embedded == 0
