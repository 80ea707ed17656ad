"""Run the embedfill CLI as a subprocess, the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TICKETS_TOML = """
[providers.openai]
kind = "openai"
model = "test-embed"
dimensions = {dims}
base_url = "{base_url}"
api_key_env = "TEST_PLATFORM_KEY"
batch_size = {batch_size}
max_concurrency = {concurrency}
timeout_s = 5

[[targets]]
name = "tickets"
table = "app.SupportTickets"
id_column = "ticket_no"
text = "{{subject}}\\n\\n{{body}}"
embedding_column = "emb"
tenant_column = "org"
provider = "openai"
tenant_key_sql = "select api_key from app.org_settings where org = %(tenant)s"
"""


def write_config(
    tmp: Path,
    base_url: str,
    *,
    dims: int = 8,
    batch_size: int = 5,
    concurrency: int = 3,
    extra: str = "",
) -> Path:
    path = tmp / "embedfill.toml"
    path.write_text(
        TICKETS_TOML.format(
            dims=dims, base_url=base_url, batch_size=batch_size, concurrency=concurrency
        )
        + extra
    )
    return path


def cli_env(db_url: str | None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "EMBEDFILL_CONFIG", "EMBEDFILL_MASTER_KEY")
    }
    if db_url:
        env["DATABASE_URL"] = db_url
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def embedfill(
    *args: str,
    env: dict[str, str],
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedfill", *args],
        env=env,
        input=stdin,
        text=True,
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
    )


def popen(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "embedfill", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
