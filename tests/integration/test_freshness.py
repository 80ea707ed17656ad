"""Provenance, stale / outdated-model / unverified counts, and ``--refresh``, against a
real PostgreSQL and the real test server."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import psycopg

from embedfill import BackfillOptions, Database, abackfill, astatus
from embedfill.config import render_text
from embedfill.providers.hashing import hash_vector
from tests.support.fake_openai import FakeOpenAI
from tests.support.tables import stored_vectors, tickets_config

PLATFORM = "sk-platform-0123456789abcdef"
ENV = {"TEST_PLATFORM_KEY": PLATFORM}


def run(db_url: str, config: Any, **opts: Any) -> Any:
    return asyncio.run(abackfill(config, Database(db_url), BackfillOptions(**opts), env=ENV))


def status(db_url: str, config: Any) -> Any:
    return asyncio.run(astatus(config, Database(db_url)))[0]


def text_of(conn: psycopg.Connection[Any], i: int, template: str = "{subject}\n\n{body}") -> str:
    row = conn.execute(
        'SELECT subject, body FROM app."SupportTickets" WHERE ticket_no = %s', (i,)
    ).fetchone()
    assert row is not None
    return render_text(template, {"subject": row[0], "body": row[1]})


def edit(db_url: str, ids: range | list[int], suffix: str = " (edited)") -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            'UPDATE app."SupportTickets" SET body = body || %s WHERE ticket_no = ANY(%s)',
            (suffix, list(ids)),
        )


def test_edited_rows_show_as_stale_and_refresh_reembeds_exactly_them(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    # rows pre-filled by "other code" (every 4th, 15 of 60) have no provenance
    before = status(tickets, config)
    assert (before.missing, before.unverified, before.stale, before.outdated_model) == (
        45,
        15,
        0,
        0,
    )

    run(tickets, config)
    after = status(tickets, config)
    assert (after.missing, after.unverified, after.stale, after.outdated_model) == (0, 15, 0, 0)
    assert sum(t.unverified for t in after.tenants) == 15  # per tenant too

    edited = [i for i in range(1, 61) if i % 4][:25]
    edit(tickets, edited)
    stale = status(tickets, config)
    assert (stale.missing, stale.stale, stale.outdated_model) == (0, 25, 0)
    assert sum(t.stale for t in stale.tenants) == 25

    sent_before = len(fake_openai.ok_requests())
    plain = run(tickets, config)  # without --refresh: unchanged behaviour, nothing to do
    assert plain.embedded == 0 and plain.refreshed == 0
    assert len(fake_openai.ok_requests()) == sent_before

    report = run(tickets, config, refresh=True)
    assert report.status == "succeeded"
    assert report.stale_before == 25 and report.refreshed == 25 and report.embedded == 25
    assert report.to_dict()["stale_before"] == 25 and report.to_dict()["refreshed"] == 25
    assert report.progress()["total"] == 25 and report.progress()["done"] == 25
    sent = [t for r in fake_openai.ok_requests()[sent_before:] for t in r.inputs]
    assert len(sent) == 25  # exactly the edited rows, once each
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
        for i in edited:
            np.testing.assert_array_equal(vectors[i], hash_vector(text_of(conn, i), 8))
    final = status(tickets, config)
    assert (final.stale, final.outdated_model, final.unverified) == (0, 0, 15)


def test_a_model_change_shows_every_row_as_outdated_model_not_stale(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    edit(tickets, [1, 2, 3])  # stale under the old model: still counted outdated_model
    other = tickets_config(fake_openai.base_url, provider_overrides={"model": "test-embed-v2"})
    s = status(tickets, other)
    assert (s.outdated_model, s.stale, s.unverified) == (45, 0, 15)

    report = run(tickets, other, refresh=True)
    assert report.stale_before == 45 and report.refreshed == 45
    assert any("mixes two vector spaces" in w for w in report.warnings)
    s = status(tickets, other)
    assert (s.outdated_model, s.stale) == (0, 0)
    # and back under the first model every row is outdated again
    assert status(tickets, config).outdated_model == 45


def test_a_backfill_with_another_model_than_the_columns_says_it_mixes_two(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """The config's model changed, and a plain backfill (not --refresh) fills the NULL
    rows with it: the column then holds two models, searches across them meaningless.
    It goes on (asked for), and its report says so in one sentence naming both and the
    two ways out. Before (helper-33), it said nothing, while `watch` refuses it."""
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('UPDATE app."SupportTickets" SET emb = NULL WHERE ticket_no IN (1, 2, 3)')
    other = tickets_config(fake_openai.base_url, provider_overrides={"model": "test-embed-v2"})
    report = run(tickets, other)
    assert report.embedded == 3
    [warning] = [w for w in report.warnings if "were written with" in w]
    assert warning.startswith(
        "Target 'tickets' is configured with openai:test-embed-v2 (8 dimensions), but 42 of "
        "its vectors were written with openai:test-embed (8 dimensions): the rows this "
        "backfill fills get vectors of another model than theirs"
    )
    assert "`embedfill backfill --refresh --target tickets`" in warning
    assert "`embedfill model start`" in warning
    # the column of one model again: nothing to say
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('UPDATE app."SupportTickets" SET emb = NULL WHERE ticket_no IN (1, 2, 3)')
    report = run(tickets, config)
    assert report.embedded == 3
    assert not [w for w in report.warnings if "were written with" in w]


def test_a_template_change_shows_affected_rows_as_stale(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    changed = tickets_config(fake_openai.base_url, text="{subject}: {body}")
    s = status(tickets, changed)
    assert (s.stale, s.outdated_model) == (45, 0)
    report = run(tickets, changed, refresh=True)
    assert report.refreshed == 45
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
        np.testing.assert_array_equal(
            vectors[1], hash_vector(text_of(conn, 1, "{subject}: {body}"), 8)
        )


def test_one_off_writes_by_others_leave_no_provenance(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            'INSERT INTO app."SupportTickets" VALUES (1000, %s, %s, %s, %s::vector)',
            ("org-a", "s", "b", "[1,0,0,0,0,0,0,0]"),
        )
    assert status(tickets, config).unverified == 16


def test_provenance_rows_record_text_md5_model_and_time(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    with psycopg.connect(tickets) as conn:
        rows = conn.execute(
            "SELECT p.row_key, p.text_md5::text, m.provider, m.model, m.dimensions,"
            " p.embedded_at > now() - interval '1 minute'"
            " FROM embedfill.provenance p JOIN embedfill.models m ON m.id = p.model_id"
        ).fetchall()
        assert len(rows) == 45
        import hashlib
        import uuid

        for key, md5, provider, model, dims, recent in rows:
            text = text_of(conn, int(key))
            assert md5 == str(uuid.UUID(hashlib.md5(text.encode()).hexdigest()))
            assert (provider, model, dims, recent) == ("openai", "test-embed", 8, True)


def test_rows_deleted_or_edited_mid_refresh_are_never_written_with_old_text(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    edit(tickets, range(1, 61))  # all 45 rows embedfill wrote are stale now
    seen: list[int] = []

    def mid_run(inputs: list[str]) -> None:
        # while a batch is at the provider, the app edits one of its rows and deletes
        # another (the same batch: both are read, embedded, and must not be written)
        if seen or len(inputs) < 2:
            return
        ids = [int(t.split(":")[0].removeprefix("Ticket ")) for t in inputs]
        seen.extend(ids[:2])
        with psycopg.connect(tickets, autocommit=True) as conn:
            conn.execute(
                """UPDATE app."SupportTickets" SET body = 'newer' WHERE ticket_no = %s""",
                (ids[0],),
            )
            conn.execute('DELETE FROM app."SupportTickets" WHERE ticket_no = %s', (ids[1],))

    fake_openai.on_inputs = mid_run
    report = run(tickets, config, refresh=True)
    assert seen and report.status == "succeeded" and report.failed == 0
    assert report.changed == 2  # read, embedded, not written: edited and deleted
    edited, deleted = seen
    with psycopg.connect(tickets) as conn:
        vectors = stored_vectors(conn)
        assert deleted not in vectors
        # the edited row still holds a vector of its old text, and shows as stale: never
        # a vector of text it no longer holds written now
        assert status(tickets, config).stale == 1
        fake_openai.on_inputs = None
        again = run(tickets, config, refresh=True)
        assert again.refreshed == 1
        vectors = stored_vectors(conn)
        np.testing.assert_array_equal(vectors[edited], hash_vector(text_of(conn, edited), 8))
    assert status(tickets, config).stale == 0


def test_a_dimensions_change_shows_every_row_as_outdated_model(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:  # a column of any size
        conn.execute('ALTER TABLE app."SupportTickets" ALTER COLUMN emb TYPE vector')
    config = tickets_config(fake_openai.base_url)
    run(tickets, config)
    smaller = tickets_config(fake_openai.base_url, dims=4)
    s = status(tickets, smaller)
    assert (s.outdated_model, s.stale, s.unverified) == (45, 0, 15)
    assert status(tickets, config).outdated_model == 0


def test_status_before_embedfills_schema_exists_shows_every_vector_unverified(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    s = status(tickets, tickets_config(fake_openai.base_url))
    assert (s.missing, s.unverified, s.stale, s.outdated_model) == (45, 15, 0, 0)
    with psycopg.connect(tickets) as conn:
        schema = conn.execute("SELECT to_regnamespace('embedfill')").fetchone()
    assert schema == (None,)  # status wrote nothing


def test_status_on_a_schema_from_before_changes_of_model_reads_its_counts(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A database the previous release migrated (provenance, no model_migrations yet):
    status, which never migrates, reads it in one snapshot. The missing table of changes
    of model failed one statement, which aborted the snapshot's transaction and every
    read after it ("current transaction is aborted")."""
    config = tickets_config(fake_openai.base_url)
    run(tickets, config, limit=10)
    edit(tickets, [1])
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("DELETE FROM embedfill.schema_version WHERE version >= 9")
        conn.execute("DROP TABLE embedfill.model_migrations, embedfill.active_models")
    s = status(tickets, config)
    assert (s.missing, s.stale, s.outdated_model, s.cut_over_to) == (35, 1, 0, None)
