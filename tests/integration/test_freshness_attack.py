"""Hostile tests of issue 9's freshness features (provenance, status, watch): a real
PostgreSQL and the real test server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import conninfo, sql

from embedfill import BackfillOptions, Database, abackfill, astatus
from tests.integration import test_watch
from tests.integration.test_watch import Running, wait_for
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import tickets_config

ENV = {"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"}
watching = test_watch.watching  # the fixture


def run(db_url: str, config: Any, **opts: Any) -> Any:
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(**opts), env=ENV))


def status(db_url: str, config: Any) -> Any:
    return asyncio.run(astatus(config, Database(db_url)))[0]


def test_a_session_setting_change_does_not_make_every_row_stale(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A template over a timestamptz, a date, an interval and a float renders through
    the session's TimeZone, DateStyle, IntervalStyle and extra_float_digits. A DBA's
    ALTER DATABASE ... SET (or a role's, or PGTZ on one worker's machine) must not change
    the text embedfill embeds, or every row turns stale (and a watch re-embeds the whole
    table, again and again when two workers disagree)."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """ALTER TABLE app."SupportTickets"
               ADD COLUMN opened timestamptz DEFAULT '2024-05-01 12:00:00+00',
               ADD COLUMN due date DEFAULT '2024-05-03',
               ADD COLUMN took interval DEFAULT '1 day 02:03:04',
               ADD COLUMN score float8 DEFAULT 0.1"""
        )
    config = tickets_config(fake_openai.base_url, text="{subject} {opened} {due} {took} {score}")
    run(tickets, config)
    before = status(tickets, config)
    assert (before.missing, before.stale) == (0, 0)
    dbname = conninfo.conninfo_to_dict(tickets)["dbname"]
    with psycopg.connect(tickets, autocommit=True) as conn:
        for setting, value in (
            ("TimeZone", "Asia/Tokyo"),
            ("DateStyle", "SQL, DMY"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
        ):
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(str(dbname)), sql.Identifier(setting), sql.Literal(value)
                )
            )
    after = status(tickets, config)
    assert (after.missing, after.stale, after.outdated_model) == (0, 0, 0)
    # and a refresh finds nothing to send
    sent = len(fake_openai.ok_requests())
    report = run(tickets, config, refresh=True)
    assert report.refreshed == 0
    assert len(fake_openai.ok_requests()) == sent


def test_watch_does_not_requeue_a_row_whose_text_is_unicode_whitespace_forever(
    tickets: str, fake_openai: FakeOpenAI, watching: Callable[..., Running]
) -> None:
    """A NULL row whose text is blank to Python (an ideographic space, a no-break space:
    ``str.strip`` removes them) but not to ``btrim``'s ASCII whitespace is skipped by the
    worker, and the poll must not queue it again every interval forever."""
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO app."SupportTickets" (ticket_no, org, subject, body)
               VALUES (61, 'org-a', E'\\u3000', E'\\u00a0\\u2003'),
                      (62, 'org-b', NULL, E'\\u2028\\u0085')"""
        )
    w = watching()
    wait_for(lambda: status(tickets, tickets_config(fake_openai.base_url)).missing == 2)
    time.sleep(1.0)  # the blank rows' first chunk, if any, is done
    queued = w.watches[0].queued
    time.sleep(2.0)  # about 6 polls at 0.3 s
    assert w.watches[0].queued == queued, "the blank rows are queued again at every poll"


def test_the_watch_blank_set_is_exactly_what_python_strips() -> None:
    from embedfill.db.target_sql import BLANK

    assert set(BLANK) == {c for c in map(chr, range(0x110000)) if c.isspace()}


def test_watch_does_not_resend_a_stale_row_the_provider_rejects_at_every_sweep(
    tickets: str, fake_openai: FakeOpenAI, watching: Callable[..., Running]
) -> None:
    """A row with a vector whose new text the provider rejects for good (400) failed in
    this watch job: like a rejected NULL row, it waits for its text to change, instead of
    being sent again (and paid for, and recorded in embedfill.failures) at every sweep.
    A stale row whose new text is blank is not queued at every sweep either."""
    w = watching()
    config = tickets_config(fake_openai.base_url)
    wait_for(lambda: status(tickets, config).missing == 0)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """UPDATE app."SupportTickets" SET body = body || %s WHERE ticket_no = 5""",
            (fake_openai.bad_marker,),
        )
        conn.execute(
            """UPDATE app."SupportTickets" SET subject = ' ', body = '' WHERE ticket_no = 6"""
        )

    def poisoned() -> int:
        return sum(
            1 for r in fake_openai.requests if any(fake_openai.bad_marker in t for t in r.inputs)
        )

    wait_for(lambda: poisoned() > 0)
    time.sleep(1.5)  # the failing chunk is settled
    sent, queued = poisoned(), w.watches[0].queued
    time.sleep(3.5)  # about 3 sweeps at 1 s
    assert poisoned() == sent, "the rejected row is sent again at every sweep"
    assert w.watches[0].queued == queued, "a stale row is queued again at every sweep"
    with psycopg.connect(tickets) as conn:
        failures = conn.execute(
            "SELECT count(*) FROM embedfill.failures WHERE row_id = '5'"
        ).fetchone()
    assert failures == (1,)


def test_an_app_before_update_trigger_that_rewrites_the_text_does_not_hide_a_stale_vector(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            """CREATE FUNCTION app.normalize() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.subject := upper(NEW.subject); RETURN NEW; END $$"""
        )
        conn.execute(
            """CREATE TRIGGER normalize BEFORE UPDATE ON app."SupportTickets"
               FOR EACH ROW EXECUTE FUNCTION app.normalize()"""
        )
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    # the 45 vectors are of the lower-case subjects; the rows now hold upper-case ones:
    # provenance records the text embedded (read before the write), so they show stale
    assert status(tickets, config).stale == 45
