"""`embedfill demo` and `embedfill seed` as a new user runs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.cli import cli_env, embedfill


@pytest.mark.slow
def test_demo_runs_offline_on_the_embedded_database(tmp_path: Path) -> None:
    env = cli_env(None, EMBEDFILL_DATA_DIR=str(tmp_path / "pgdata"), HF_HUB_OFFLINE="1")
    result = embedfill("demo", env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "the demo always uses the embedded PostgreSQL" in result.stderr.splitlines()[0]
    out = result.stdout
    assert "10,000 rows, 382 missing" in out
    assert "missing before: 382  embedded: 382" in out
    assert "10,000 rows, 0 missing" in out
    # the pre-filled vectors were adopted as a shown step: the end reads clean
    assert "recorded 9,618 pre-filled vectors as written by local:all-MiniLM-L6-v2" in out
    final = out.split("6. status")[1]
    assert "unverified" not in final or "0 unverified" in final
    assert "9,618" not in final


def test_seed_refuses_to_replace_a_table_it_did_not_create(db_url: str, tmp_path: Path) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE workflow_insights (id int)")
    result = embedfill("seed", "--rows", "10", "--missing", "2", env=cli_env(db_url))
    assert result.returncode == 2
    assert "was not created by `embedfill seed`; refusing" in result.stderr

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DROP TABLE workflow_insights")
    result = embedfill(
        "seed",
        "--rows",
        "50",
        "--missing",
        "7",
        "--tenants",
        "2",
        "--dims",
        "16",
        env=cli_env(db_url),
    )
    assert result.returncode == 0, result.stderr
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE embedding IS NULL),"
            " count(DISTINCT tenant_id), count(DISTINCT content)"
            " FROM workflow_insights"
        ).fetchone() == (50, 7, 2, 50)
    again = embedfill("seed", "--rows", "20", env=cli_env(db_url))
    assert again.returncode == 2 and "--missing must be between 0 and --rows" in again.stderr
    # the flag that is wrong is the one named (helper-33: --rows -5 blamed --missing)
    negative = embedfill("seed", "--rows", "-5", env=cli_env(db_url))
    assert negative.returncode == 2 and "--rows must be 1 or more, not -5." in negative.stderr


def test_embedded_database_is_announced_first(tmp_path: Path) -> None:
    env = cli_env(None, EMBEDFILL_DATA_DIR=str(tmp_path / "pgdata"))
    result = embedfill("seed", "--rows", "20", "--missing", "5", env=env)
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert "no DATABASE_URL is set; using the embedded PostgreSQL" in first
    assert str(tmp_path / "pgdata") in result.stderr


def test_dotenv_in_the_working_directory_is_read(db_url: str, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"DATABASE_URL='{db_url}'\n")
    result = embedfill("seed", "--rows", "20", "--missing", "5", env=cli_env(None), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "embedded" not in result.stderr
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM workflow_insights").fetchone() == (20,)


def test_a_second_seed_forgets_what_was_recorded_about_the_replaced_table(
    db_url: str, tmp_path: Path
) -> None:
    """Reseeding replaces the table's vectors: provenance of the old ones must not
    survive (adopt then recorded none of the new placeholders)."""
    env = cli_env(db_url)
    for _ in range(2):
        seeded = embedfill("seed", "--rows", "40", "--missing", "6", env=env)
        assert seeded.returncode == 0, seeded.stderr
        adopted = embedfill("adopt", env=env)
        assert adopted.returncode == 0, adopted.stderr
        assert "adopted 34 vectors" in adopted.stdout, adopted.stdout
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.provenance").fetchone() == (34,)


def test_seed_by_a_role_that_may_not_touch_embedfills_schema_still_seeds(
    db_url: str, roles: Any
) -> None:
    """Forgetting the replaced table's provenance is done only where the role may: a role
    without USAGE on schema embedfill (or DELETE on its provenance) seeds as before."""
    assert embedfill("migrate", env=cli_env(db_url)).returncode == 0
    role = roles.create()
    roles.grant(role, "GRANT CREATE ON SCHEMA public TO {role}")
    for _ in range(2):  # the second replaces the table the first made
        result = embedfill("seed", "--rows", "20", "--missing", "3", env=cli_env(roles.url(role)))
        assert result.returncode == 0, result.stderr
    roles.grant(role, "GRANT USAGE ON SCHEMA embedfill TO {role}")
    roles.grant(role, "GRANT SELECT ON ALL TABLES IN SCHEMA embedfill TO {role}")
    result = embedfill("seed", "--rows", "20", "--missing", "3", env=cli_env(roles.url(role)))
    assert result.returncode == 0, result.stderr
