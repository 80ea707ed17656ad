"""``NAME_FILE``: a secret mounted as a file stands for the variable ``NAME``."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedfill.config import env_secret
from embedfill.db.connect import url_from_env
from embedfill.errors import ConfigError
from embedfill.http.app import admin_secret


def test_the_variable_or_the_file_it_names(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-from-a-file\n")
    assert env_secret({"OPENAI_API_KEY": " sk-direct "}, "OPENAI_API_KEY") == "sk-direct"
    assert env_secret({"OPENAI_API_KEY_FILE": str(secret)}, "OPENAI_API_KEY") == "sk-from-a-file"
    assert env_secret({}, "OPENAI_API_KEY") == ""
    url = tmp_path / "url"
    url.write_text("postgresql://app@db/app")
    assert url_from_env({"DATABASE_URL_FILE": str(url)}) == "postgresql://app@db/app"
    admin = tmp_path / "admin"
    admin.write_text("s3cret-s3cret")
    found = admin_secret({"ADMIN_SECRET_FILE": str(admin)})
    assert found is not None and found.reveal() == "s3cret-s3cret"


def test_both_or_an_unreadable_file_is_one_sentence_without_the_secret(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-from-a-file")
    with pytest.raises(ConfigError, match="Both OPENAI_API_KEY and OPENAI_API_KEY_FILE") as both:
        env_secret(
            {"OPENAI_API_KEY": "sk-direct", "OPENAI_API_KEY_FILE": str(secret)}, "OPENAI_API_KEY"
        )
    assert "sk-" not in str(both.value)
    with pytest.raises(ConfigError, match=r"EMBEDFILL_MASTER_KEY_FILE names .* cannot be read"):
        env_secret({"EMBEDFILL_MASTER_KEY_FILE": str(tmp_path / "absent")}, "EMBEDFILL_MASTER_KEY")


def test_a_byte_order_mark_is_not_part_of_the_secret_and_an_empty_file_is_an_error(
    tmp_path: Path,
) -> None:
    bom = tmp_path / "admin"
    bom.write_bytes(b"\xef\xbb\xbfmy-admin-secret\r\n")  # as Notepad saves it
    assert env_secret({"ADMIN_SECRET_FILE": str(bom)}, "ADMIN_SECRET") == "my-admin-secret"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"DATABASE_URL_FILE names .* which is empty"):
        url_from_env({"DATABASE_URL_FILE": str(empty)})  # never a silent fallback
