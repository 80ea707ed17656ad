"""``embedfill verify`` and ``embedfill adopt`` as a user runs them: a subprocess against a
real database and the real local OpenAI-compatible server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from embedfill.providers.hashing import hash_vector
from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI

PLATFORM = "sk-platform-verify-0987654321"
TENANT_B = "sk-tenant-b-verify-cli-qqqqqq"
TENANT_C = "sk-tenant-c-from-sql-rrrrrrr"
PREFILLED = list(range(4, 61, 4))  # rows "other code" filled (with vectors of other text)


def run(cfg: Path, env: dict[str, str], *args: str) -> Any:
    return embedfill("--config", str(cfg), *args, env=env)


def texts(db_url: str) -> dict[int, str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute('SELECT ticket_no, subject, body FROM app."SupportTickets"').fetchall()
    return {r[0]: f"{r[1]}\n\n{r[2]}" for r in rows}


def fix_prefilled(db_url: str) -> None:
    """Give the pre-filled rows the vector of their text, as careful other code would."""
    by_id = texts(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        register_vector(conn)
        for i in PREFILLED:
            conn.execute(
                'UPDATE app."SupportTickets" SET emb = %s WHERE ticket_no = %s',
                (hash_vector(by_id[i], 8), i),
            )


def status(cfg: Path, env: dict[str, str]) -> dict[str, Any]:
    result = run(cfg, env, "status", "--json")
    assert result.returncode == 0, result.stderr
    target: dict[str, Any] = json.loads(result.stdout)["targets"][0]
    return target


def test_verify_json_contract_mismatches_and_exit_codes(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    assert run(cfg, env, "backfill", "--json").returncode == 0

    bad = run(cfg, env, "verify", "--json")
    assert bad.returncode == 3, bad.stderr
    data = json.loads(bad.stdout)
    for key in ("checked", "mismatched", "min_cosine", "target", "threshold", "requests"):
        assert key in data
    assert data["checked"] == 60 and data["threshold"] == 0.99 and data["sample"] == 100
    assert [m["id"] for m in data["mismatched"]] == PREFILLED
    assert {m["tenant"] for m in data["mismatched"]} == {"org-a", "org-b", "org-c"}
    assert all(set(m) == {"id", "tenant", "cosine"} for m in data["mismatched"])

    fix_prefilled(tickets)
    good = run(cfg, env, "verify", "--json", "--sample", "20")
    assert good.returncode == 0, good.stderr
    data = json.loads(good.stdout)
    assert data["checked"] == 20 and data["mismatched"] == [] and data["min_cosine"] > 0.999999

    everything = run(cfg, env, "verify", "--all", "--json")
    assert everything.returncode == 0 and json.loads(everything.stdout)["checked"] == 60

    # a vector written wrong by hand is named, with its tenant
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """UPDATE app."SupportTickets" SET emb = '[0,0,0,0,0,0,0,1]' WHERE ticket_no = 31"""
        )
    wrong = run(cfg, env, "verify", "--all", "--json")
    assert wrong.returncode == 3
    (m,) = json.loads(wrong.stdout)["mismatched"]
    assert m["id"] == 31 and m["tenant"] == "org-b" and m["cosine"] < 0.99
    human = run(cfg, env, "verify", "--all")
    assert human.returncode == 3
    assert "mismatched row 31 (tenant org-b): cosine" in human.stdout
    assert "checked: 60  mismatched: 1" in human.stdout


def test_usage_errors_exit_2(tickets: str, fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    both = run(cfg, env, "verify", "--sample", "5", "--all")
    assert both.returncode == 2 and "Use --sample N or --all, not both." in both.stderr
    zero = run(cfg, env, "verify", "--sample", "0")
    assert zero.returncode == 2 and "--sample must be at least 1, not 0." in zero.stderr
    unknown = run(cfg, env, "verify", "--target", "nope")
    assert unknown.returncode == 2 and "No target named 'nope'" in unknown.stderr
    for args in (("adopt", "--verify-sample", "0"), ("adopt", "--target", "nope")):
        refused = run(cfg, env, *args)
        assert refused.returncode == 2, refused.stderr
    bad_setting = write_config(tmp_path, fake_openai.base_url, extra="")
    bad_setting.write_text(
        bad_setting.read_text().replace("timeout_s = 5", "timeout_s = 5\nverify_min_cosine = 2")
    )
    config_error = run(bad_setting, env, "verify")
    assert config_error.returncode == 2
    assert "'verify_min_cosine' in [providers.openai] must be more than 0" in config_error.stderr
    assert fake_openai.requests == []


def test_dry_run_sends_nothing_and_tenant_keys_pay_without_leaking(
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
        conn.execute("INSERT INTO app.org_settings VALUES ('org-c', %s)", (TENANT_C,))

    plan = run(cfg, env, "--debug", "verify", "--all", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert fake_openai.requests == []
    data = json.loads(plan.stdout)
    assert data["dry_run"] is True and data["rows"] == 15 and data["checked"] == 0
    assert data["requests"] == 3 and data["tokens"] > 0 and "estimated_cost_usd" in data
    sources = {t["tenant"]: t["key_source"] for t in data["tenants"]}
    assert sources == {"org-a": "platform", "org-b": "tenant", "org-c": "tenant"}
    human = run(cfg, env, "verify", "--dry-run")
    assert human.returncode == 0 and "estimated cost: $" in human.stdout
    assert fake_openai.requests == []

    checked = run(cfg, env, "--debug", "verify", "--all", "--json")
    assert checked.returncode == 3  # the pre-filled vectors are of other text
    by_key = fake_openai.texts_by_key()
    by_id = texts(tickets)
    orgs = {i: ("org-a", "org-b", "org-c")[i % 3] for i in PREFILLED}
    assert sorted(by_key[TENANT_B]) == sorted(by_id[i] for i in PREFILLED if orgs[i] == "org-b")
    assert sorted(by_key[TENANT_C]) == sorted(by_id[i] for i in PREFILLED if orgs[i] == "org-c")
    assert sorted(by_key[PLATFORM]) == sorted(by_id[i] for i in PREFILLED if orgs[i] == "org-a")

    # verify recorded the 15 wrong vectors (stale now): adopt has none of them to bless
    assert checked.returncode == 3 and json.loads(checked.stdout)["marked_wrong"] == 15
    adopted = run(cfg, env, "--debug", "adopt", "--verify-sample", "3", "--json")
    assert adopted.returncode == 0 and json.loads(adopted.stdout)["adopted"] == 0
    outputs = [plan, human, checked, adopted, stored]
    dump = "".join(r.stdout + r.stderr for r in outputs)
    for secret in (PLATFORM, TENANT_B, TENANT_C, master):
        assert secret not in dump


def test_adopt_then_status_shows_no_unverified_rows(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    assert status(cfg, env)["unverified"] == 15

    # the pre-filled vectors are of other text: a verify sample refuses, naming rows
    refused = run(cfg, env, "adopt", "--verify-sample", "15", "--json")
    assert refused.returncode == 3
    assert "15 of 15 sampled vectors of target 'tickets' disagree" in refused.stderr
    assert "rows 4 (tenant org-b, cosine" in refused.stderr
    assert "nothing was adopted" in refused.stderr
    details = json.loads(refused.stdout)
    assert details["adopted"] == 0 and len(details["verify"]["mismatched"]) == 15
    assert status(cfg, env)["unverified"] == 15
    with psycopg.connect(tickets) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.provenance").fetchone() == (0,)

    fix_prefilled(tickets)
    fake_openai.requests.clear()
    checked = run(cfg, env, "adopt", "--verify-sample", "4")
    assert checked.returncode == 0, checked.stderr
    assert "verified 4 sampled unverified rows" in checked.stdout
    assert "adopted 15 vectors of tickets as openai:test-embed (8 dimensions)" in checked.stdout
    assert sum(len(r.inputs) for r in fake_openai.requests) == 4
    after = status(cfg, env)
    assert (after["unverified"], after["stale"], after["outdated_model"]) == (0, 0, 0)

    fake_openai.requests.clear()
    again = run(cfg, env, "adopt", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {
        "target": "tickets",
        "model": "openai:test-embed (8 dimensions)",
        "adopted": 0,
        "verify": None,
    }
    assert fake_openai.requests == []  # adopt alone never calls the provider


def test_verify_findings_are_acted_on_and_fix_repairs_them(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Issue 15, item 5: `adopt --verify-sample` blessed vectors right after `verify --all`
    had found them wrong, and `status` and `check` were green. Now the wrong ones are
    recorded as stale: status counts them, check fails, adopt leaves them, and `verify
    --fix` re-embeds them (a --refresh job, with provenance)."""
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    assert run(cfg, env, "backfill").returncode == 0  # the 45 NULL rows; 15 pre-filled
    with psycopg.connect(tickets, autocommit=True) as conn:  # other code breaks 3 of ours
        conn.execute(
            'UPDATE app."SupportTickets" SET emb = %s WHERE ticket_no IN (1, 2, 3)',
            ("[1,0,0,0,0,0,0,0]",),
        )
    found = run(cfg, env, "verify", "--all", "--json")
    assert found.returncode == 3
    data = json.loads(found.stdout)
    assert len(data["mismatched"]) == 18 and data["marked_wrong"] == 18
    after = status(cfg, env)
    assert after["stale"] == 18 and after["unverified"] == 0
    assert run(cfg, env, "check").returncode == 3
    adopted = run(cfg, env, "adopt", "--json")
    assert adopted.returncode == 0 and json.loads(adopted.stdout)["adopted"] == 0
    assert status(cfg, env)["stale"] == 18

    fixed = run(cfg, env, "verify", "--all", "--fix", "--json")
    assert fixed.returncode == 0, fixed.stderr
    report = json.loads(fixed.stdout)["fixed"]
    assert report["status"] == "succeeded" and report["embedded"] == 18
    final = status(cfg, env)
    assert final["stale"] == 0 and final["unverified"] == 0 and final["missing"] == 0
    assert run(cfg, env, "check").returncode == 0
    again = run(cfg, env, "verify", "--all", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["mismatched"] == []
    assert run(cfg, env, "verify", "--fix", "--dry-run").returncode == 2
