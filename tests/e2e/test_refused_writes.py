"""Writes that cannot succeed end, and say why (issue 15, item 9): a CHECK constraint on
the vector column, or an app trigger that raises for some rows, fails those rows with
the reason; the others are written, the job ends `partial` (exit 3) instead of handing
its chunk back for ever, and no log line carries row values."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI

PLATFORM = "sk-platform-refused-1234"
T = 'app."SupportTickets"'


@pytest.mark.parametrize("refusal", ["check", "trigger", "cardinality"])
def test_a_row_the_database_refuses_fails_alone_and_the_job_ends(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path, refusal: str
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        if refusal == "check":
            conn.execute(
                f"ALTER TABLE {T} ADD CONSTRAINT no_vector_for_7"
                " CHECK (emb IS NULL OR ticket_no <> 7) NOT VALID"
            )
        else:
            # "cardinality": what an app's trigger doing an INSERT ... ON CONFLICT that
            # meets one row twice raises (cannot affect row a second time)
            code = "cardinality_violation" if refusal == "cardinality" else "raise_exception"
            conn.execute(
                "CREATE FUNCTION app.refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF NEW.ticket_no IN (7, 9) THEN"
                " RAISE EXCEPTION 'ticket % is frozen', NEW.ticket_no"
                f" USING DETAIL = 'secret row text: ' || NEW.body, ERRCODE = '{code}'; END IF;"
                " RETURN NEW; END $$"
            )
            conn.execute(
                f"CREATE TRIGGER refuse BEFORE UPDATE ON {T} FOR EACH ROW"
                " EXECUTE FUNCTION app.refuse()"
            )
        body7 = conn.execute(f"SELECT body FROM {T} WHERE ticket_no = 7").fetchone()
    assert body7 is not None
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=120)
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    refused = 1 if refusal == "check" else 2
    assert report["status"] == "partial"
    assert report["failed"] == refused and report["embedded"] == 45 - refused
    assert {f["error_class"] for f in report["failures"]} == {"WriteRefused"}
    assert "Task exception was never retrieved" not in done.stderr
    assert "Traceback" not in done.stderr
    assert body7[0] not in done.stderr and "secret row text" not in done.stderr
    with psycopg.connect(tickets) as conn:
        nulls = conn.execute(f"SELECT ticket_no FROM {T} WHERE emb IS NULL ORDER BY 1").fetchall()
        runs = conn.execute("SELECT status FROM embedfill.runs WHERE NOT dry_run").fetchall()
    assert [n[0] for n in nulls] == ([7] if refusal == "check" else [7, 9])
    assert runs == [("partial",)]


def test_a_table_that_refuses_every_write_halts_the_run_with_the_reason(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A relation that cannot be updated (an app trigger answering feature_not_supported
    for every row): the first write's refusal halts the run, saying why, instead of
    paying the provider for every row it cannot write."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION app.refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'this table is read-only during the migration'"
            " USING DETAIL = 'secret row text: ' || NEW.body,"
            " ERRCODE = 'feature_not_supported'; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE UPDATE ON {T} FOR EACH ROW EXECUTE FUNCTION app.refuse()"
        )
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env, timeout=120)
    # it went back to the queue every few seconds, for ever, and the backfill never exited
    assert done.returncode == 3, done.stderr
    assert (
        "The database refused to write the vectors (this table is read-only during the "
        "migration); fix what it names (a constraint, a trigger, a privilege) and run again."
    ) in done.stderr
    assert "secret row text" not in done.stderr and "Traceback" not in done.stderr
    assert "Task exception was never retrieved" not in done.stderr
    sent = sum(len(r.inputs) for r in fake_openai.ok_requests())
    assert sent < 45  # it stopped paying once the table refused
    with psycopg.connect(tickets) as conn:
        runs = conn.execute("SELECT status, error FROM embedfill.runs WHERE NOT dry_run").fetchall()
        nulls = conn.execute(f"SELECT count(*) FROM {T} WHERE emb IS NULL").fetchone()
        classes = conn.execute("SELECT DISTINCT error_class FROM embedfill.failures").fetchall()
    assert [r[0] for r in runs] == ["failed"] and "read-only" in runs[0][1], runs
    assert nulls == (45,) and classes == [("WriteRefused",)]
