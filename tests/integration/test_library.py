"""The library as a program uses it: a Config built in code, progress callbacks, and no
silent fall-back to the embedded database."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

import embedfill
from embedfill import Config, ConfigError, ProviderConfig, TargetConfig
from embedfill.config import parse_config, parse_table_name
from tests.support.fake_openai import FakeOpenAI

PLATFORM = "sk-platform-library-1234567890"
NO_DATABASE = (
    "No database: pass database_url=... or set DATABASE_URL "
    "(embedfill.database(embedded=True) uses the bundled server)."
)


def config_from_dict(base_url: str) -> Config:
    return parse_config(
        {
            "providers": {
                "openai": {
                    "kind": "openai",
                    "model": "test-embed",
                    "dimensions": 8,
                    "base_url": base_url,
                    "api_key_env": "TEST_PLATFORM_KEY",
                    "batch_size": 5,
                    "max_concurrency": 1,
                }
            },
            "targets": [
                {
                    "name": "tickets",
                    "table": "app.SupportTickets",
                    "id_column": "ticket_no",
                    "text": "{subject}\n\n{body}",
                    "embedding_column": "emb",
                    "tenant_column": "org",
                    "provider": "openai",
                }
            ],
        }
    )


def config_from_dataclasses(base_url: str) -> Config:
    return Config(
        providers={
            "openai": ProviderConfig(
                name="openai",
                kind="openai",
                model="test-embed",
                dimensions=8,
                base_url=base_url,
                api_key_env="TEST_PLATFORM_KEY",
                batch_size=5,
                max_concurrency=1,
            )
        },
        targets=(
            TargetConfig(
                name="tickets",
                table=parse_table_name("app.SupportTickets"),
                id_column="ticket_no",
                text="{subject}\n\n{body}",
                embedding_column="emb",
                tenant_column="org",
                provider="openai",
            ),
        ),
    )


@pytest.mark.parametrize("build", [config_from_dict, config_from_dataclasses])
def test_a_config_built_in_code_backfills_with_progress(
    tickets: str, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, build: object
) -> None:
    monkeypatch.setenv("TEST_PLATFORM_KEY", PLATFORM)
    fake_openai.latency = 0.05  # 9 requests one at a time: progress has time to show
    config = build(fake_openai.base_url)  # type: ignore[operator]
    seen: list[tuple[int, int]] = []

    def on_progress(report: embedfill.Report) -> None:
        # the live Report: copy what you need, it keeps changing
        seen.append((report.embedded + report.skipped + report.failed, report.missing_before))

    report = embedfill.backfill(config, database_url=tickets, on_progress=on_progress)

    assert report.embedded == 45 and report.status == "succeeded"
    done = [d for d, _ in seen]
    assert len(seen) >= 3 and done == sorted(done) and done[0] < done[-1] == 45
    assert {total for _, total in seen} == {45}
    with psycopg.connect(tickets) as conn:
        left = conn.execute('SELECT count(*) FROM app."SupportTickets" WHERE emb IS NULL')
        assert left.fetchone() == (0,)


def test_a_config_built_in_code_is_checked(fake_openai: FakeOpenAI) -> None:
    config = config_from_dataclasses(fake_openai.base_url)
    with pytest.raises(ConfigError, match="uses provider 'other', which is not defined"):
        replace(config, targets=(replace(config.targets[0], provider="other"),))


def test_library_calls_need_a_database(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("EMBEDFILL_DATA_DIR", str(tmp_path / "pgdata"))
    config = config_from_dict(fake_openai.base_url)
    with pytest.raises(ConfigError) as caught:
        embedfill.status(config)
    assert str(caught.value) == NO_DATABASE and caught.value.exit_code == 2
    with pytest.raises(ConfigError, match="No database"):
        embedfill.backfill(config, dry_run=True)
    with pytest.raises(ConfigError, match="No database"):
        embedfill.database()
    from embedfill.http import create_app

    with pytest.raises(ConfigError, match="No database"):
        create_app(config, env={"ADMIN_SECRET": "x"})
    assert not (tmp_path / "pgdata").exists()  # no embedded server was started
    assert fake_openai.requests == []


def test_database_url_from_the_environment(
    tickets: str, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", tickets)
    (target,) = embedfill.status(config_from_dict(fake_openai.base_url))
    assert target.missing == 45
    assert embedfill.database() == embedfill.Database(tickets)
    explicit = embedfill.database("postgresql://elsewhere/db")
    assert explicit.url == "postgresql://elsewhere/db"


def test_the_embedded_server_is_an_explicit_choice(tmp_path: Path) -> None:
    # in a child process, whose exit stops the server it started
    program = (
        "import embedfill, psycopg\n"
        "db = embedfill.database(embedded=True)\n"
        "with psycopg.connect(db.url) as conn:\n"
        "    conn.execute('SELECT 1')\n"
        "print(db.embedded)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["EMBEDFILL_DATA_DIR"] = str(tmp_path / "pgdata")
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "using the embedded PostgreSQL" in done.stderr
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()
