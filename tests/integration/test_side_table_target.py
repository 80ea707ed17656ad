"""A target whose vectors are in a side table (``embedding_table``): where a table-strategy
change of model leaves them after the cutover's finalize. The config points at the side
table; backfill, status, check and watch keep it filled from the live table's rows."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import numpy as np
import psycopg
import pytest

from embedfill import Database
from embedfill.application import (
    abackfill,
    amodel_finalize,
    amodel_status,
    aplan_model,
    astatus,
    atriggers,
)
from embedfill.config import Config, parse_config
from embedfill.engine.state import BackfillOptions
from embedfill.errors import PlanRefused, RunAborted, SchemaMismatch
from embedfill.providers.hashing import hash_vector
from tests.integration.test_model_start import (
    T,
    _raw_providers,
    _raw_target,
    _watched_config,
    config,
    cut_over,
    new_vectors,
    run,
    texts,
)

RELATION = "SupportTickets_emb_next"


def side_config(base: Config | None = None) -> Config:
    """The tickets target pointed at its side table, with the new model's section, as
    the finalize's next step says."""
    target = {k: v for k, v in _raw_target().items() if k != "embedding_column"}
    target |= {"embedding_table": RELATION, "provider": "next"}
    cfg = parse_config({"providers": _raw_providers(), "targets": [target]})
    if base is None:
        return cfg
    return Config(providers=base.providers, targets=cfg.targets, engine=base.engine)


def finalized(url: str) -> Any:
    """A table-strategy change to ``next`` cut over and finalized: no --force needed."""
    cut_over(url, "table")
    return run(amodel_finalize, url, yes=True)


def fresh(url: str, row_ids: list[int]) -> bool:
    got, want = new_vectors(url), texts(url)
    return all(
        got.get(i) is not None and np.allclose(got[i], hash_vector(want[i], 16), atol=1e-6)
        for i in row_ids
    )


def test_a_finalized_side_table_becomes_the_targets_vectors_and_backfill_status_keep_it(
    indexed: str,
) -> None:
    st = finalized(indexed)
    assert st.phase == "finalized" and st.active == "new"
    assert st.next_step is not None
    assert f'embedding_table = "{RELATION}"' in st.next_step and 'provider = "next"' in st.next_step
    # the old config stops at the dropped column and says what to write instead
    with pytest.raises(SchemaMismatch, match=f'embedding_table = "{RELATION}"'):
        asyncio.run(abackfill(config(), Database(indexed), BackfillOptions(target="tickets")))

    cfg = side_config()
    [st] = asyncio.run(amodel_status(cfg, Database(indexed), "tickets"))
    assert (st.phase, st.active, st.next_step) == ("finalized", "new", None)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {T} (ticket_no, org, subject, body)"
            " VALUES (61, 'org-a', 'new', 'row'), (62, 'org-b', 'another', 'one')"
        )
        conn.execute(f"UPDATE {T} SET body = 'edited after the finalize' WHERE ticket_no = 1")
        conn.execute(f"DELETE FROM {T} WHERE ticket_no = 2")
    [before] = asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    # the new live rows have no side row yet: missing all the same, each in its tenant
    assert (before.missing, before.stale) == (2 + 2, 1)  # 5 and 6: blank, never filled
    by_tenant = {t.tenant: t.missing for t in before.tenants}
    assert by_tenant["org-a"] >= 1 and by_tenant["org-b"] >= 1

    report = asyncio.run(
        abackfill(cfg, Database(indexed), BackfillOptions(target="tickets"), env={})
    )
    assert (report.status, report.embedded) == ("succeeded", 2)
    assert report.provider == "hash:hash-v2"
    report = asyncio.run(
        abackfill(cfg, Database(indexed), BackfillOptions(target="tickets", refresh=True), env={})
    )
    assert (report.status, report.embedded) == ("succeeded", 1)
    assert fresh(indexed, [1, 61, 62])
    assert 2 not in new_vectors(indexed)  # the deleted live row's side row went too
    [after] = asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    assert (after.rows, after.missing, after.stale, after.outdated_model) == (61, 2, 0, 0)


def test_a_side_table_target_refuses_a_change_of_model_in_one_sentence(indexed: str) -> None:
    finalized(indexed)
    with pytest.raises(PlanRefused, match="a change of model from a side table"):
        asyncio.run(aplan_model(side_config(), Database(indexed), "tickets", "other"))


def test_a_side_table_targets_change_triggers_bring_live_edits_within_seconds(
    indexed: str, fake_openai: Any
) -> None:
    """``triggers install`` of a side-table target puts them on the live table, queueing
    the side table's vectors: an edit of a live row, and a new live row (its side row
    made as the watch takes its key), reach the side table with the poll and the sweep
    an hour away; ``uninstall`` removes them. Before, install was refused, and a deploy
    script that runs it failed from the finalize on; then (helper-30) a new row's key
    was taken and dropped, and the row waited for the poll, or for the sweep when its
    id was below the poll's window."""
    from tests.integration.test_watch import Running, wait_for

    finalized(indexed)  # a change made without triggers
    cfg = side_config(_watched_config(fake_openai))
    plan, script = asyncio.run(atriggers(cfg, Database(indexed), "tickets", True, False))
    with psycopg.connect(indexed, autocommit=True) as conn:
        side_id = conn.execute(
            "SELECT id FROM embedfill.vector_columns WHERE table_name = %s", (RELATION,)
        ).fetchone()
        on_live = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal"
            " ORDER BY 1",
            (T,),
        ).fetchall()
    assert side_id is not None and plan.column_id == side_id[0]
    assert on_live == [
        (f"embedfill_changed_{side_id[0]}_ins",),
        (f"embedfill_changed_{side_id[0]}_upd",),
    ]
    assert f'"app"."{RELATION}"."embedding"' in script  # the vectors it feeds
    assert 'the triggers are on "app"."SupportTickets"' in script
    w = Running(indexed, cfg, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        time.sleep(1.0)  # past the watcher's first sweep
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'edited under triggers' WHERE ticket_no = 3")
            conn.execute(
                f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (61, 'org-a', 'n', 'r')"
            )
        wait_for(lambda: fresh(indexed, [3, 61]), timeout=20)
    finally:
        w.stop()
    assert w.error is None
    plan, _ = asyncio.run(atriggers(cfg, Database(indexed), "tickets", False, False))
    with psycopg.connect(indexed, autocommit=True) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
            (T,),
        ).fetchone()
    assert plan.statements and left == (0,)


def test_a_row_moved_to_another_tenant_with_its_edit_is_paid_by_the_new_tenant(
    indexed: str, fake_openai: Any
) -> None:
    """The triggers queue an edit that also moves the row to another tenant: the side
    row's tenant (whose key pays) is brought up to date before it is embedded. Before
    (helper-30), the edit went out on the old tenant's key: the side row's tenant was
    the live row's only after the next sweep's mirror."""
    from embedfill.application import amodel_cutover, amodel_start, amodel_verify
    from embedfill.config import EngineConfig
    from tests.integration.test_watch import Running, wait_for
    from tests.support.tables import provider_settings

    env = {"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"}
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO app.org_settings VALUES ('org-a', 'sk-tenant-a-aaaaaaaa'),"
            " ('org-b', 'sk-tenant-b-bbbbbbbb')"
        )
        assert conn.execute(f"SELECT org FROM {T} WHERE ticket_no = 3").fetchone() == ("org-a",)
    providers = {
        "openai": provider_settings(fake_openai.base_url, 8),
        "next": provider_settings(fake_openai.base_url, 16, model="test-embed-2"),
    }
    raw = _raw_target() | {
        "provider": "openai",
        "tenant_key_sql": "select api_key from app.org_settings where org = %(tenant)s",
    }
    live = parse_config({"providers": providers, "targets": [raw]})
    side_raw = {k: v for k, v in raw.items() if k != "embedding_column"}
    side_raw |= {"embedding_table": RELATION, "provider": "next"}
    side = parse_config({"providers": providers, "targets": [side_raw]})
    side = Config(providers=side.providers, targets=side.targets, engine=EngineConfig())
    db = Database(indexed)
    asyncio.run(amodel_start(live, db, "tickets", "next", "table", env=env))
    asyncio.run(amodel_verify(live, db, "tickets", env=env))
    asyncio.run(amodel_cutover(live, db, "tickets"))
    asyncio.run(amodel_finalize(live, db, "tickets", yes=True, force=True))
    asyncio.run(atriggers(side, db, "tickets", True, False))
    w = Running(indexed, side, env=env, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        time.sleep(1.0)  # past the watcher's first sweep
        fake_openai.requests.clear()
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(
                f"UPDATE {T} SET org = 'org-b', body = 'for org b only' WHERE ticket_no = 3"
            )

        def sent() -> dict[str, int]:
            by_key = fake_openai.texts_by_key().items()
            return {k: sum("for org b only" in t for t in v) for k, v in by_key}

        wait_for(lambda: sum(sent().values()) > 0, timeout=20)
    finally:
        w.stop()
    assert w.error is None
    assert {k: n for k, n in sent().items() if n} == {"sk-tenant-b-bbbbbbbb": 1}
    with psycopg.connect(indexed) as conn:
        tenant = conn.execute(
            f"SELECT embedfill_tenant FROM {SIDE_TABLE} WHERE embedfill_row_id = 3"
        ).fetchone()
    assert tenant == ("org-b",)


def test_a_row_moved_to_another_tenant_without_an_edit_moves_its_side_row_within_seconds(
    indexed: str, fake_openai: Any
) -> None:
    """An UPDATE of the tenant column alone (the text as it was) is queued by a side-table
    target's triggers: the side row's tenant, by which status counts and a tenant's job
    finds its rows, is the live row's within seconds, and the vector (of the same text) is
    not paid for again. Before, the triggers watched the text's columns only, and the side
    row kept the old tenant until the next sweep's mirror (an hour here)."""
    from tests.integration.test_watch import Running, wait_for

    finalized(indexed)
    cfg = side_config(_watched_config(fake_openai))
    plan, _ = asyncio.run(atriggers(cfg, Database(indexed), "tickets", True, False))
    assert plan.watched[-1] == "org"  # the tenant column, after the text's

    def side_tenant() -> Any:
        with psycopg.connect(indexed) as conn:
            return conn.execute(
                f"SELECT embedfill_tenant, embedding FROM {SIDE_TABLE} WHERE embedfill_row_id = 3"
            ).fetchone()

    before = side_tenant()
    assert before is not None and before[0] == "org-a" and before[1] is not None
    [counted] = asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    w = Running(indexed, cfg, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        time.sleep(1.0)  # past the watcher's first sweep
        fake_openai.requests.clear()
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET org = 'org-b' WHERE ticket_no = 3")
        wait_for(lambda: side_tenant()[0] == "org-b", timeout=20)
        time.sleep(1.0)  # a re-embedding would have been sent by now
    finally:
        w.stop()
    assert w.error is None
    assert side_tenant()[1] == before[1]  # the same vector: the text did not change
    assert fake_openai.requests == []
    [now] = asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    assert (now.missing, now.stale) == (counted.missing, counted.stale)


def test_ids_the_app_swaps_reach_the_side_table_within_seconds(
    indexed: str, fake_openai: Any
) -> None:
    """The app swaps two rows' ids, their texts as they were: each side row is its live
    row's by id, so the two vectors must follow. The triggers queue an UPDATE of the id
    column too, and each row is embedded again. Before (helper-32), they queued nothing
    and the app's searches found each row under the other's vector until the sweep."""
    from tests.integration.test_watch import Running, wait_for

    finalized(indexed)
    cfg = side_config(_watched_config(fake_openai))
    plan, _ = asyncio.run(atriggers(cfg, Database(indexed), "tickets", True, False))
    assert "ticket_no" in plan.watched
    w = Running(indexed, cfg, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        time.sleep(1.0)  # past the watcher's first sweep
        assert fresh(indexed, [2, 3])
        with psycopg.connect(indexed, autocommit=True) as conn, conn.transaction():
            conn.execute(f"UPDATE {T} SET ticket_no = -2 WHERE ticket_no = 2")
            conn.execute(f"UPDATE {T} SET ticket_no = 2 WHERE ticket_no = 3")
            conn.execute(f"UPDATE {T} SET ticket_no = 3 WHERE ticket_no = -2")
        assert not fresh(indexed, [2, 3])
        wait_for(lambda: fresh(indexed, [2, 3]), timeout=20)
    finally:
        w.stop()
    assert w.error is None


def test_live_ids_widened_by_the_app_are_one_sentence_until_the_side_table_follows(
    indexed: str, fake_openai: Any
) -> None:
    """The app widens its ids (integer to bigint) after the finalize and inserts one
    beyond integer's range: the side table, made with the ids' type then, cannot hold
    it. A backfill says so in one sentence with the statement that fixes it, a running
    watch of the side table stops with it (nothing written); after that statement the
    backfill fills the new row. Before (helper-32), every run failed with the server's
    "integer out of range", and the watch retried it for ever."""
    from tests.integration.test_watch import Running, wait_for

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {T} ALTER COLUMN ticket_no TYPE integer")
    finalized(indexed)
    cfg = side_config(_watched_config(fake_openai))
    w = Running(indexed, cfg, interval_s=0.3, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {T} ALTER COLUMN ticket_no TYPE bigint")
            conn.execute(
                f"INSERT INTO {T} (ticket_no, org, subject, body)"
                " VALUES (3000000000, 'org-a', 'big', 'id')"
            )
        wait_for(lambda: w.watches[0].failed is not None, timeout=20)
    finally:
        with pytest.raises(RunAborted):  # its only target stopped: exit 3
            w.stop()
    fix = f'ALTER TABLE "app"."{RELATION}" ALTER COLUMN embedfill_row_id TYPE bigint'
    sentence = (
        f"The side table app.{RELATION} keeps its rows' ids as integer, but id column "
        "'ticket_no' of app.SupportTickets is bigint now (the app's migration changed "
        f"it); change the side table's to match, as its owner: {fix}."
    )
    assert sentence in str(w.watches[0].failed)
    with pytest.raises(SchemaMismatch) as refused:
        asyncio.run(abackfill(cfg, Database(indexed), BackfillOptions(), env={}))
    assert str(refused.value) == sentence
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(fix)
    report = asyncio.run(abackfill(cfg, Database(indexed), BackfillOptions(), env={}))
    assert report.status == "succeeded" and report.embedded >= 1
    with psycopg.connect(indexed) as conn:
        row = conn.execute(
            f"SELECT embedding IS NOT NULL FROM {SIDE_TABLE} WHERE embedfill_row_id = 3000000000"
        ).fetchone()
    assert row == (True,)


def test_a_watch_of_a_side_table_target_gives_it_new_rows_and_finds_edits(
    indexed: str, fake_openai: Any
) -> None:
    from tests.integration.test_watch import Running, wait_for

    finalized(indexed)
    cfg = side_config(_watched_config(fake_openai))
    w = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=2)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (61, 'org-a', 'n', 'r')"
            )
            conn.execute(f"UPDATE {T} SET body = 'edited while watched' WHERE ticket_no = 3")
        wait_for(lambda: fresh(indexed, [3, 61]), timeout=30)
    finally:
        w.stop()
    assert w.error is None and fake_openai.requests == []  # the new model's vectors only


def test_a_watch_running_through_a_table_strategy_finalize_keeps_the_side_table_fresh(
    indexed: str, fake_openai: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The live watcher ends with the live column; the side table's goes on (it is what
    the app searches) and says once what to write in the config. Before, it ended too and
    nothing kept the side table fresh."""
    from tests.integration.test_watch import Running, wait_for

    cfg = _watched_config(fake_openai)
    cut_over(indexed, "table")
    w = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        live, new = w.watches
        with caplog.at_level(logging.WARNING, logger="embedfill.watch"):
            run(amodel_finalize, indexed, yes=True)
            wait_for(lambda: live.job_id is None, timeout=20)
            with psycopg.connect(indexed, autocommit=True) as conn:
                conn.execute(
                    f"INSERT INTO {T} (ticket_no, org, subject, body)"
                    " VALUES (61, 'org-a', 'after', 'the finalize')"
                )
            wait_for(lambda: fresh(indexed, [61]), timeout=20)
        assert new.job_id is not None and not new.retired
        told = [r.getMessage() for r in caplog.records if "goes on keeping" in r.getMessage()]
        assert len(told) == 1 and f'embedding_table = "{RELATION}"' in told[0]
    finally:
        w.stop()
    assert w.error is None


@pytest.mark.parametrize(
    ("relation", "said"),
    [
        ("SupportTickets_emb_nxt", "does not exist in this database: a rollback's finalize"),
        ("SupportTickets", "is not a side table that a change of model made"),
    ],
)
def test_an_embedding_table_that_is_no_side_table_is_one_sentence(
    indexed: str, relation: str, said: str
) -> None:
    finalized(indexed)
    target = {k: v for k, v in _raw_target().items() if k != "embedding_column"}
    target |= {"embedding_table": relation, "provider": "next"}
    cfg = parse_config({"providers": _raw_providers(), "targets": [target]})
    with pytest.raises(SchemaMismatch, match=said) as caught:
        asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    assert "embedfill model status" in str(caught.value)


def side_rows(url: str) -> dict[int, bool]:
    """Each side row's id, and whether it holds a vector."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT embedfill_row_id, embedding IS NOT NULL FROM {SIDE_TABLE}"
        ).fetchall()
    return dict(rows)


SIDE_TABLE = f'app."{RELATION}"'


def test_a_side_table_of_other_rows_is_refused_before_its_vectors_are_touched(
    indexed: str,
) -> None:
    """A mirror deletes every side row whose live row it does not find: pointed at the
    side table of another table, or naming the live rows by another id, the first
    backfill deleted every vector the app searches (helper-26). Now refused in one
    sentence, the side table untouched."""
    finalized(indexed)
    before = side_rows(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE app.other (id bigint PRIMARY KEY, org text, subject text, body text)"
        )
        conn.execute(
            "INSERT INTO app.other SELECT g, 'org-a', 's', 'b' FROM generate_series(1000, 1004) g"
        )
        conn.execute(f"ALTER TABLE {T} ADD legacy_id bigint UNIQUE")
        conn.execute(f"UPDATE {T} SET legacy_id = ticket_no + 1000")
    other = {k: v for k, v in _raw_target().items() if k != "embedding_column"}
    other |= {"table": "app.other", "id_column": "id"}
    by_legacy = dict(other, table="app.SupportTickets", id_column="legacy_id")
    for target, said in (
        (other, "holds the vectors of another table's rows"),
        (by_legacy, "names app.SupportTickets's rows by 'ticket_no', not by 'legacy_id'"),
    ):
        target |= {"embedding_table": RELATION, "provider": "next"}
        cfg = parse_config({"providers": _raw_providers(), "targets": [target]})
        with pytest.raises(SchemaMismatch, match=re.escape(said)):
            asyncio.run(abackfill(cfg, Database(indexed), BackfillOptions(target="tickets")))
        with pytest.raises(SchemaMismatch, match=re.escape(said)):
            asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    assert side_rows(indexed) == before
    # a change started before its id was recorded: no side row is a live row by this id
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute("UPDATE embedfill.model_migrations SET home = home - 'id_column'")
    target = dict(by_legacy, embedding_table=RELATION, provider="next")
    cfg = parse_config({"providers": _raw_providers(), "targets": [target]})
    with pytest.raises(SchemaMismatch, match="No row of the side table"):
        asyncio.run(abackfill(cfg, Database(indexed), BackfillOptions(target="tickets")))
    assert side_rows(indexed) == before
    asyncio.run(abackfill(side_config(), Database(indexed), BackfillOptions(target="tickets")))


def test_a_side_table_target_before_the_finalize_is_told_to_wait_for_it(indexed: str) -> None:
    """Written into the config before the cutover's finalize, the side table is not the
    target's vectors yet (the live column is): every command says so, and what to keep."""
    from embedfill.application import amodel_rollback

    cut_over(indexed, "table")
    for call in (
        lambda: asyncio.run(astatus(side_config(), Database(indexed), "tickets")),
        lambda: run(amodel_rollback, indexed, cfg=side_config()),
    ):
        with pytest.raises(SchemaMismatch, match="is at phase cut_over") as caught:
            call()
        assert "until then keep embedding_column" in str(caught.value)


def test_a_poll_finds_a_live_row_committed_below_the_side_tables_highest_id(
    indexed: str, fake_openai: Any
) -> None:
    """Rows committed out of id order (or an id used again): a poll's mirror took only
    ids above the side table's highest, so such a row waited for the sweep (minutes)."""
    from tests.integration.test_watch import Running, wait_for

    finalized(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"DELETE FROM {T} WHERE ticket_no = 30")
    asyncio.run(abackfill(side_config(), Database(indexed), BackfillOptions(target="tickets")))
    assert 30 not in side_rows(indexed)  # pruned
    w = Running(
        indexed, side_config(_watched_config(fake_openai)), interval_s=0.3, sweep_interval_s=3600
    )
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {T} (ticket_no, org, subject, body)"
                " VALUES (30, 'org-a', 'back', 'again')"
            )
        wait_for(lambda: fresh(indexed, [30]), timeout=20)
    finally:
        w.stop()
    assert w.error is None


def test_a_mirror_writes_no_side_row_that_is_already_right(indexed: str) -> None:
    """Every mirror (each poll, with ids that are not integers) took a lock on every
    side row (INSERT ... ON CONFLICT DO UPDATE locks the row it meets): 0.65 s and 11 MB
    of WAL a poll at 200,000 rows (helper-26). A side row already right is not touched."""
    from embedfill.db import homes
    from embedfill.db.catalog import inspect_target

    finalized(indexed)
    cfg = side_config()
    asyncio.run(abackfill(cfg, Database(indexed), BackfillOptions(target="tickets")))

    async def mirrors() -> None:
        from embedfill.db.connect import connect

        conn = await connect(Database(indexed))
        try:
            target = cfg.target("tickets")
            info = await inspect_target(conn, target, 16)
            for newer in (False, True):
                await conn.execute(homes.mirror(info.sql(target), newer=newer))
        finally:
            await conn.close()

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute("VACUUM FREEZE " + SIDE_TABLE)
        asyncio.run(mirrors())
        locked = conn.execute(f"SELECT count(*) FROM {SIDE_TABLE} WHERE xmax <> '0'").fetchone()
    assert locked == (0,)


def test_a_dry_run_counts_the_live_rows_the_side_table_lacks(indexed: str) -> None:
    finalized(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {T} (ticket_no, org, subject, body)"
            " VALUES (61, 'org-a', 'new', 'row'), (62, 'org-b', 'another', 'one')"
        )
    plan = asyncio.run(
        abackfill(side_config(), Database(indexed), BackfillOptions(target="tickets", dry_run=True))
    )
    [st] = asyncio.run(astatus(side_config(), Database(indexed), "tickets"))
    assert plan.missing_before == st.missing == 4
    # the scan walks the side table: the plan says what its cost leaves out
    assert any(w.startswith('2 rows of "app"."SupportTickets" have no row') for w in plan.warnings)


def test_a_tenant_typo_on_a_side_table_target_names_the_apps_table_and_column(
    indexed: str,
) -> None:
    """The warning for a tenant that matches no row names the app's table and tenant
    column, not the side table's internal ones. Before (helper-33), it said
    "(column embedfill_tenant)", a name the user never wrote."""
    finalized(indexed)
    opts = BackfillOptions(target="tickets", dry_run=True, tenants=("org-typo",))
    plan = asyncio.run(abackfill(side_config(), Database(indexed), opts))
    assert (
        "Tenant 'org-typo' matches no row of app.SupportTickets (column org); check the "
        "tenant id." in plan.warnings
    )


def test_a_jobs_counts_of_a_side_table_are_the_rows_status_counts(indexed: str) -> None:
    """What a job counts to do per tenant (its report's ``missing`` and ``stale``) is
    what status counts: a live row without a side row is missing; a side row whose
    live row was deleted (until a mirror deletes it) is neither missing nor stale."""
    from embedfill import freshness
    from embedfill.db.catalog import (
        count_missing_by_tenant,
        count_outdated_by_tenant,
        inspect_target,
    )
    from embedfill.db.connect import connect

    finalized(indexed)
    cfg = side_config()
    [before] = asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {T} (ticket_no, org, subject, body)"
            " VALUES (61, 'org-a', 'new', 'row'), (62, 'org-b', 'another', 'one')"
        )
        conn.execute(f"UPDATE {SIDE_TABLE} SET embedding = NULL WHERE embedfill_row_id = 5")
        conn.execute(f"DELETE FROM {T} WHERE ticket_no IN (5, 7)")  # 7 keeps its vector

    async def counts() -> tuple[dict[Any, int], dict[Any, tuple[int, int]]]:
        conn = await connect(Database(indexed))
        try:
            target = cfg.target("tickets")
            info = await inspect_target(conn, target, 16)
            model = freshness.model_identity(cfg.provider_for(target), info)
            ids = await freshness.provenance_ids(
                conn, info, target.embedding_column, model, create=False
            )
            q = info.sql(target)
            return (
                await count_missing_by_tenant(conn, q, None),
                await count_outdated_by_tenant(conn, q, None, ids.params()),
            )
        finally:
            await conn.close()

    missing, outdated = asyncio.run(counts())
    [st] = asyncio.run(astatus(cfg, Database(indexed), "tickets"))
    assert {t.tenant: t.missing for t in st.tenants if t.missing} == missing
    base = {t.tenant: t.missing for t in before.tenants}
    assert missing == {"org-a": base.get("org-a", 0) + 1, "org-b": base.get("org-b", 0) + 1}
    assert {k: v for k, v in outdated.items() if any(v)} == {}
    assert st.stale == 0 and st.outdated_model == 0


def test_row_security_turned_on_after_the_finalize_reaches_the_side_table(
    indexed: str, roles: Any
) -> None:
    """The live table's policies were copied to the side table at the start and the
    cutover only: turned on later, the app's readers of the side table alone saw every
    tenant's rows, and a role without BYPASSRLS was told to fix its text template."""
    from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS

    finalized(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {T} ENABLE ROW LEVEL SECURITY")
        conn.execute(f"CREATE POLICY org_a ON {T} USING (org = 'org-a')")
    role = roles.create()
    roles.grant(role, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    roles.grant(role, f"GRANT SELECT, INSERT, UPDATE, DELETE ON {SIDE_TABLE} TO {{role}}")
    from embedfill.errors import RowSecurityHides

    with pytest.raises(RowSecurityHides, match=r"Row-level security on app\.SupportTickets hides"):
        asyncio.run(
            abackfill(side_config(), Database(roles.url(role)), BackfillOptions(target="tickets"))
        )
    asyncio.run(abackfill(side_config(), Database(indexed), BackfillOptions(target="tickets")))
    with psycopg.connect(indexed, autocommit=True) as conn:
        secured = conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass", (SIDE_TABLE,)
        ).fetchone()
        conn.execute(f'GRANT SELECT ON {SIDE_TABLE} TO "{role}"')
        conn.execute(f'SET ROLE "{role}"')
        tenants = conn.execute(f"SELECT DISTINCT embedfill_tenant FROM {SIDE_TABLE}").fetchall()
    assert secured == (True,) and tenants == [("org-a",)]


def test_a_role_that_may_not_insert_side_rows_is_told_the_whole_grant(
    indexed: str, roles: Any
) -> None:
    from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS

    finalized(indexed)
    role = roles.create()
    roles.grant(role, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    roles.grant(role, f"GRANT SELECT, UPDATE ON {SIDE_TABLE} TO {{role}}")
    with pytest.raises(SchemaMismatch) as caught:
        asyncio.run(
            abackfill(side_config(), Database(roles.url(role)), BackfillOptions(target="tickets"))
        )
    said = str(caught.value)
    assert f'GRANT SELECT, INSERT, UPDATE, DELETE ON "app"."{RELATION}" TO "{role}"' in said
    roles.grant(role, f"GRANT SELECT, INSERT, UPDATE, DELETE ON {SIDE_TABLE} TO {{role}}")
    roles.grant(role, f"REVOKE SELECT ON {T} FROM {{role}}")
    with pytest.raises(SchemaMismatch) as caught:  # the text is read from the live rows
        asyncio.run(astatus(side_config(), Database(roles.url(role)), "tickets"))
    assert f'GRANT SELECT ON "app"."SupportTickets" TO "{role}"' in str(caught.value)
    roles.grant(role, f"GRANT SELECT ON {T} TO {{role}}")
    report = asyncio.run(
        abackfill(side_config(), Database(roles.url(role)), BackfillOptions(target="tickets"))
    )
    assert report.status == "succeeded"


def test_a_watch_whose_role_may_not_keep_the_side_table_says_so_at_start(
    indexed: str, roles: Any
) -> None:
    """The watch gives the side table its rows itself: without INSERT it queued nothing,
    retrying for ever (helper-27); now its start is refused with the grant to run."""
    from tests.integration.test_watch import Running, wait_for
    from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS

    finalized(indexed)
    role = roles.create()
    roles.grant(role, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    roles.grant(role, f"GRANT SELECT, UPDATE ON {SIDE_TABLE} TO {{role}}")
    w = Running(roles.url(role), side_config(), interval_s=0.3, sweep_interval_s=3600)
    wait_for(lambda: w.error is not None, timeout=20)
    with pytest.raises(
        SchemaMismatch, match=r"may not INSERT rows of app\.SupportTickets_emb_next"
    ):
        w.stop()
    assert 'GRANT SELECT, INSERT, UPDATE, DELETE ON "app"."SupportTickets_emb_next"' in str(w.error)


def test_a_watch_of_the_side_table_target_takes_over_the_change_watch_a_kill_left_running(
    indexed: str, fake_openai: Any
) -> None:
    """The side table is watched as tickets@next until the finalize, as tickets after the
    config names it. A watch killed in between left its job running: the new watcher
    waited for it to end for ever (helper-28). It holds the column's watch lock, so the
    job's watch is gone: it ends that job and opens its own."""
    from tests.integration.test_watch import Running, wait_for

    cut_over(indexed, "table")
    w = Running(indexed, _watched_config(fake_openai), interval_s=0.3, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        left = w.watches[1].job_id
        run(amodel_finalize, indexed, yes=True)
    finally:
        w.stop()
    with psycopg.connect(indexed, autocommit=True) as conn:  # as a kill -9 leaves it
        conn.execute(
            "UPDATE embedfill.runs SET status = 'running', finished_at = NULL WHERE id = %s",
            (left,),
        )
    w = Running(indexed, side_config(_watched_config(fake_openai)), interval_s=0.3)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id), timeout=20)
        assert w.watches[0].job_id != left
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (61, 'org-a', 'n', 'r')"
            )
        wait_for(lambda: fresh(indexed, [61]), timeout=20)
    finally:
        w.stop()
    with psycopg.connect(indexed) as conn:
        status = conn.execute("SELECT status FROM embedfill.runs WHERE id = %s", (left,))
        assert status.fetchone()[0] != "running"
