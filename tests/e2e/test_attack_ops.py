"""Hostile operator: what a careless user types, through the real CLI and `embedfill serve`
against a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import cli_env, embedfill

SECRETS = ("Kx9", "Qv7secret")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked: {text}"


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("postgresql://app:Kx9 Qv7secret@db.example.invalid:5432/app", "password"),
        ("postgresql://my app:Kx9Qv7secret@db.example.invalid/app", "user name"),
        ("postgresql://app:Kx9Qv7secret@db.example.invalid/my app", "database name"),
        (
            "postgresql://app:Kx9Qv7secret@db.example.invalid/app?application_name=my app",
            "value of parameter 'application_name'",
        ),
    ],
)
def test_a_space_in_the_url_says_where_and_how_to_write_it(url: str, part: str) -> None:
    result = embedfill("--debug", "status", env=cli_env(url))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"embedfill: DATABASE_URL is not a valid PostgreSQL URL (the {part} has a space in "
        "it: a space must be written %20); fix it."
    ]
    assert_no_secret(result.stdout, result.stderr)


def test_a_dotenv_that_is_not_utf8_is_one_sentence(tmp_path: Path) -> None:
    # saved as Latin-1 by an editor: the 'ä' of the password is one byte, not UTF-8
    url = "postgresql://app:Kx9Qv7s\u00e4cret@127.0.0.1:1/app"
    (tmp_path / ".env").write_bytes(f"DATABASE_URL={url}\n".encode("latin-1"))
    result = embedfill("--debug", "status", env=cli_env(None), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"embedfill: {tmp_path / '.env'} is not UTF-8 text; save it as UTF-8."
    ]
    assert_no_secret(result.stdout, result.stderr)
