"""No user function ever runs as embedfill: functions and operators named like built-ins,
in the app's schema and in public, on the search_path the URL sets, are never called by
what embedfill runs (issue 15, item 7). The CLI as real processes, as a superuser."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from tests.support.cli import cli_env, embedfill, popen, write_config
from tests.support.fake_openai import FakeOpenAI

PLATFORM = "sk-platform-path-7777777777"

# Each records its call and answers wrongly, so a call would also show in the results.
# concat(text, text, text) is the attack the issue measured: a better match for
# concat(a, 'literal', b) than pg_catalog's VARIADIC "any", so it wins wherever the path
# lets it be seen.
HIJACKS = """
CREATE TABLE IF NOT EXISTS public.hijacked (fn text, at timestamptz DEFAULT now());
CREATE FUNCTION {s}.concat(a text, b text, c text) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.concat3'); RETURN 'x'; END $$;
CREATE FUNCTION {s}.concat(a text, b text) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.concat2'); RETURN 'x'; END $$;
CREATE FUNCTION {s}.concat(a text) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.concat1'); RETURN 'x'; END $$;
CREATE FUNCTION {s}.md5(a varchar) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.md5'); RETURN 'x'; END $$;
CREATE FUNCTION {s}.btrim(a varchar, b varchar) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.btrim'); RETURN 'x'; END $$;
CREATE FUNCTION {s}.length(a varchar) RETURNS int LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.length'); RETURN 0; END $$;
CREATE FUNCTION {s}.hashtextextended(a varchar, b int) RETURNS bigint LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.hashtext'); RETURN 0; END $$;
CREATE FUNCTION {s}.hijack_eq(a varchar, b varchar) RETURNS boolean LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.='); RETURN true; END $$;
CREATE OPERATOR {s}.= (leftarg = varchar, rightarg = varchar, function = {s}.hijack_eq);
CREATE FUNCTION {s}.format_type(a oid, b text) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.format_type'); RETURN 'x'; END $$;
"""
# operators on oid: the catalog's `c.oid = $1` matched them better than pg_catalog's
OID_HIJACKS = """
CREATE FUNCTION {s}.oid_eq_{t}(a oid, b {t}) RETURNS boolean LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO public.hijacked (fn) VALUES ('{s}.=(oid,{t})'); RETURN a = b::oid; END $$;
CREATE OPERATOR {s}.= (leftarg = oid, rightarg = {t}, function = {s}.oid_eq_{t});
"""


def hijack(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for schema in ("public", "app"):
            conn.execute(HIJACKS.format(s=schema).encode())
            for t in ("regclass", "int2", "int4", "int8"):
                conn.execute(OID_HIJACKS.format(s=schema, t=t).encode())


def hijacked(db_url: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        return [r[0] for r in conn.execute("SELECT fn FROM public.hijacked").fetchall()]


def with_path(db_url: str) -> str:
    """The URL with the app's schema and public first on the search_path, as an app
    (or an ALTER ROLE ... SET search_path) puts them."""
    return conninfo.make_conninfo(db_url, options="-csearch_path=app,public")


def test_no_function_of_the_app_or_public_runs_as_embedfill(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    hijack(tickets)
    cfg = write_config(tmp_path, fake_openai.base_url)
    # the user's own names, found through the URL's path: an unqualified table and
    # a tenant_key_sql over an unqualified table
    cfg.write_text(
        cfg.read_text()
        .replace('table = "app.SupportTickets"', 'table = "SupportTickets"')
        .replace("from app.org_settings", "from org_settings")
    )
    url = with_path(tickets)
    env = cli_env(url, TEST_PLATFORM_KEY=PLATFORM)
    run = lambda *args: embedfill("--config", str(cfg), *args, env=env)  # noqa: E731

    steps = [
        ("migrate",),
        ("status", "--json"),
        ("backfill", "--dry-run", "--json"),
        ("backfill", "--json"),
        ("check",),
        ("triggers", "install"),
        # exit 3: the fixture's old vectors (every 4th row) are another text's
        ("verify", "--all", "--json"),
    ]
    for args in steps:
        done = run(*args)
        assert done.returncode == (3 if args[0] == "verify" else 0), (args, done.stderr)
        assert hijacked(tickets) == [], args
    status = json.loads(run("status", "--json").stdout)
    assert status["targets"][0]["missing"] == 0

    # the app writes with the triggers installed; watch embeds its rows
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("INSERT INTO app.\"SupportTickets\" VALUES (1001, 'acme', 'new', 'row', NULL)")
        conn.execute("UPDATE app.\"SupportTickets\" SET subject = 'changed' WHERE ticket_no = 2")
    watcher = popen("--config", str(cfg), "watch", "--interval", "0.2", env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with psycopg.connect(tickets) as conn:
                row = conn.execute(
                    'SELECT emb IS NOT NULL FROM app."SupportTickets" WHERE ticket_no = 1001'
                ).fetchone()
            if row and row[0]:
                break
            time.sleep(0.3)
        else:
            pytest.fail("watch did not embed the new row")
    finally:
        watcher.send_signal(signal.SIGTERM)
        _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert hijacked(tickets) == []
    # every text went as rendered by pg_catalog's concat: subject, a blank line, body
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert sent and all("\n\n" in t and t != "x" for t in sent)


def test_text_sql_names_its_own_functions_with_their_schema(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """text_sql runs with pg_catalog alone on the path: a function of the app's, unqualified,
    is a config error that says to qualify it; qualified, it works."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION app.summary(s text, b text) RETURNS text LANGUAGE sql"
            " AS $$ SELECT s || ': ' || b $$"
        )
    cfg = write_config(tmp_path, fake_openai.base_url)
    base = cfg.read_text().replace('text = "{subject}\\n\\n{body}"', "text_sql = '{}'")
    env = cli_env(with_path(tickets), TEST_PLATFORM_KEY=PLATFORM)

    cfg.write_text(base.replace("{}", "summary(subject, body)"))
    done = embedfill("--config", str(cfg), "check", env=env)
    assert done.returncode == 2, done.stderr
    assert "app.summary(body)" not in done.stdout
    assert "text_sql runs with search_path = pg_catalog" in done.stderr, done.stderr

    cfg.write_text(base.replace("{}", "app.summary(subject, body)"))
    done = embedfill("--config", str(cfg), "backfill", "--json", env=env)
    assert done.returncode == 0, done.stderr
    sent = [t for r in fake_openai.ok_requests() for t in r.inputs]
    assert sent and all(": " in t for t in sent)
