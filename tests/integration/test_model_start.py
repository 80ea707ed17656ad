"""`embedfill model start` and `model status`: the new vectors filled beside the live ones,
indexed like them, and how far it is; the live column is never touched."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from embedfill import Database
from embedfill.application import amodel_start, amodel_status
from embedfill.config import Config, parse_config
from embedfill.errors import SchemaMismatch, TargetBusy, UsageError
from embedfill.providers.hashing import hash_vector
from tests.support.tables import provider_settings, snapshot

NOWHERE = "http://127.0.0.1:9"  # the live provider is never called
T = 'app."SupportTickets"'
SIDE = 'app."SupportTickets_emb_next"'


def _raw_providers() -> dict[str, Any]:
    return {
        "openai": provider_settings(NOWHERE, 8),
        "next": {"kind": "hash", "model": "hash-v2", "dimensions": 16, "batch_size": 7},
        "other": {"kind": "hash", "model": "hash-v3", "dimensions": 16},
    }


def _raw_target() -> dict[str, Any]:
    return {
        "name": "tickets",
        "table": "app.SupportTickets",
        "id_column": "ticket_no",
        "text": "{subject}\n\n{body}",
        "embedding_column": "emb",
        "tenant_column": "org",
        "provider": "openai",
    }


def config() -> Config:
    return parse_config({"providers": _raw_providers(), "targets": [_raw_target()]})


def start(url: str, to: str = "next", strategy: str = "table") -> Any:
    return asyncio.run(amodel_start(config(), Database(url), "tickets", to, strategy, env={}))


def status(url: str) -> Any:
    [st] = asyncio.run(amodel_status(config(), Database(url), "tickets"))
    return st


def live(url: str) -> dict[int, str | None]:
    with psycopg.connect(url) as conn:
        return snapshot(conn)


def texts(url: str) -> dict[int, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT ticket_no, subject, body FROM {T}").fetchall()
    return {i: f"{s or ''}\n\n{b or ''}" for i, s, b in rows}


def new_vectors(
    url: str, where: str = SIDE, id_col: str = "embedfill_row_id", col: str = "embedding"
) -> dict[int, Any]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT {id_col}, {col}::real[] FROM {where}").fetchall()
    return {i: None if v is None else np.array(v, dtype=np.float32) for i, v in rows}


def twin_definition(url: str) -> str:
    """The one vector index of the side table (its twin), as the server defines it."""
    with psycopg.connect(url) as conn:
        [(definition,)] = conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
            f" WHERE indrelid = '{SIDE}'::regclass AND NOT indisprimary"
        ).fetchall()
    return str(definition)


def test_a_side_table_is_filled_with_the_new_models_vectors_and_indexed_like_the_live_column(
    indexed: str,
) -> None:
    assert status(indexed).phase == "none"
    live_before = live(indexed)
    st = start(indexed)
    assert (st.phase, st.strategy, st.active, st.index) == ("ready", "table", "old", "valid")
    assert (st.rows, st.missing, st.stale, st.coverage) == (58, 0, 0, 1.0)
    assert st.to_model == {"provider": "next", "kind": "hash", "model": "hash-v2", "dimensions": 16}
    assert live(indexed) == live_before  # the live column untouched
    got, want = new_vectors(indexed), texts(indexed)
    assert set(got) == set(want)  # a side row per live row
    for row_id, vector in got.items():
        if row_id in (5, 6):  # blank text: nothing to embed
            assert vector is None
        else:
            assert np.allclose(vector, hash_vector(want[row_id], 16), atol=1e-6)
    definition = twin_definition(indexed)
    assert "USING hnsw (embedding vector_cosine_ops)" in definition
    assert "m='8'" in definition and "ef_construction='32'" in definition


def test_edits_after_the_fill_show_in_status_and_a_second_start_catches_up(indexed: str) -> None:
    start(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = 'edited' WHERE ticket_no IN (1, 2)")
        conn.execute(
            f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (61, 'org-a', 'new', 'row')"
        )
    st = status(indexed)
    # 61 has no side row yet: missing all the same
    assert (st.rows, st.missing, st.stale, st.coverage) == (59, 1, 2, round(56 / 59, 6))
    st = start(indexed)
    assert (st.phase, st.rows, st.missing, st.stale, st.coverage) == ("ready", 59, 0, 0, 1.0)
    got, want = new_vectors(indexed), texts(indexed)
    for row_id in (1, 2, 61):
        assert np.allclose(got[row_id], hash_vector(want[row_id], 16), atol=1e-6)


def test_a_second_change_while_one_is_under_way_is_refused(indexed: str) -> None:
    start(indexed)
    with pytest.raises(TargetBusy, match="change of tickets's model to next"):
        start(indexed, to="other")
    with pytest.raises(TargetBusy):
        start(indexed, strategy="column")


def test_who_may_read_the_live_table_may_read_the_side_table(indexed: str, roles: Any) -> None:
    """Readers of the live table read the side table; a role that may also UPDATE it
    (embedfill's least-privileged role writes the live vectors) keeps the side table:
    a watch inserts the live table's new rows there, deletes those of deleted ones."""
    reader, writer, other = roles.create(), roles.create(), roles.create()
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA app TO "{reader}", "{writer}", "{other}"')
        conn.execute(f'GRANT SELECT ON {T} TO "{reader}"')
        conn.execute(f'GRANT SELECT, UPDATE ON {T} TO "{writer}"')
    start(indexed)
    with psycopg.connect(indexed) as conn:
        may = [
            tuple(
                conn.execute("SELECT has_table_privilege(%s, %s, %s)", (r, SIDE, p)).fetchone()[0]
                for p in ("SELECT", "INSERT", "UPDATE", "DELETE")
            )
            for r in (reader, writer, other)
        ]
    assert may == [
        (True, False, False, False),
        (True, True, True, True),
        (False, False, False, False),
    ]


def test_a_reader_granted_after_the_start_may_read_the_side_table_at_the_cutover(
    indexed: str, roles: Any
) -> None:
    """The side table is granted like the live table when it is made; an app role
    granted SELECT on the live table after that could not read it once the cutover sent
    its searches there (permission denied). The cutover grants it again, and so does a
    `model start` run again (which also mends a side table an older embedfill made
    without the writers' grants)."""
    from embedfill.application import amodel_cutover, amodel_verify

    late, writer = roles.create(), roles.create()
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA app TO "{late}", "{writer}"')
        conn.execute(f'GRANT SELECT, UPDATE ON {T} TO "{writer}"')
    start(indexed)

    def may(role: str, privilege: str) -> bool:
        with psycopg.connect(indexed) as conn:
            got = conn.execute("SELECT has_table_privilege(%s, %s, %s)", (role, SIDE, privilege))
            return bool(got.fetchone()[0])

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'REVOKE INSERT, UPDATE, DELETE ON {SIDE} FROM "{writer}"')  # an old build's
        conn.execute(f'GRANT SELECT ON {T} TO "{late}"')
    assert not may(late, "SELECT") and not may(writer, "INSERT")
    start(indexed)  # run again: resumes, and grants what the live table's grants say
    assert may(writer, "INSERT") and may(writer, "DELETE")
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'REVOKE SELECT ON {SIDE} FROM "{late}"')
    run(amodel_verify, indexed, env={})
    run(amodel_cutover, indexed)
    assert may(late, "SELECT")
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'SET ROLE "{late}"')
        assert conn.execute(f"SELECT count(*) FROM {SIDE}").fetchone()[0] > 0


def test_a_cutover_that_cannot_grant_a_reader_the_side_table_is_refused(
    indexed: str, roles: Any
) -> None:
    """A cutover run by a role that does not own the side table grants nothing
    (PostgreSQL only warns): a role granted SELECT on the live table after the start
    would then fail every search once the cutover sent its searches there. It is refused
    instead, naming the role and the GRANT; run by the side table's owner, it goes on."""
    from embedfill.application import amodel_cutover, amodel_verify
    from embedfill.errors import PrivilegeMissing
    from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS

    ops, late = roles.create(), roles.create()
    start(indexed)  # the side table is the superuser's
    roles.grant(ops, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    start(indexed)  # run again: ops, who may update the live table, is granted the side one
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA app TO "{late}"')
        conn.execute(f'GRANT SELECT ON {T} TO "{late}"')
    run(amodel_verify, indexed, env={})
    with pytest.raises(
        PrivilegeMissing,
        match=rf"{late} may read .* GRANT SELECT ON "
        + re.escape(f'"app"."SupportTickets_emb_next" TO "{late}".'),
    ):
        run(amodel_cutover, roles.url(ops))
    assert status(indexed).active == "old"
    assert run(amodel_cutover, indexed).active == "new"


def test_the_column_strategy_fills_a_shadow_column(indexed: str) -> None:
    live_before = live(indexed)
    st = start(indexed, strategy="column")
    assert (st.phase, st.strategy, st.index, st.coverage) == ("ready", "column", "valid", 1.0)
    assert st.home["column"] == "emb_next"
    assert live(indexed) == live_before  # emb itself untouched
    got, want = new_vectors(indexed, T, "ticket_no", "emb_next"), texts(indexed)
    for row_id, vector in got.items():
        if row_id in (5, 6):
            assert vector is None
        else:
            assert np.allclose(vector, hash_vector(want[row_id], 16), atol=1e-6)


def test_a_start_that_could_not_make_the_home_is_planned_and_goes_on_when_run_again(
    indexed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change is recorded before its home is made: a start stopped there (here the
    app holds the table through every try of the ALTER TABLE) leaves phase `planned`,
    not a `filling` with nowhere to fill, and the next start makes the home and goes on."""
    from embedfill import application

    monkeypatch.setattr(application, "DDL_TRIES", 1)
    with psycopg.connect(indexed) as app:
        app.execute(f"LOCK TABLE {T} IN ACCESS SHARE MODE")  # as a long read does
        with pytest.raises(TargetBusy, match="stayed locked"):
            start(indexed, strategy="column")
        st = status(indexed)
        assert (st.phase, st.strategy, st.index) == ("planned", "column", "none")
        assert "emb_next" not in columns(indexed)
    st = start(indexed, strategy="column")
    assert (st.phase, st.index, st.coverage) == ("ready", "valid", 1.0)
    assert "emb_next" in columns(indexed)


def test_a_role_that_may_not_make_the_home_is_told_before_anything_is_written(
    indexed: str, roles: Any
) -> None:
    from embedfill.db.schema import amigrate
    from embedfill.errors import PrivilegeMissing
    from tests.support.roles import EMBEDFILL_GRANTS, TICKETS_GRANTS

    asyncio.run(amigrate(Database(indexed)))  # the schema exists: DML is enough to run
    worker = roles.create()
    roles.grant(worker, *EMBEDFILL_GRANTS, *TICKETS_GRANTS)
    url = roles.url(worker)
    with pytest.raises(PrivilegeMissing, match=r"may not create the side table in schema app"):
        start(url)
    with pytest.raises(PrivilegeMissing, match=r"only its owner \(postgres\)"):
        start(url, strategy="column")
    with psycopg.connect(indexed) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.model_migrations").fetchone() == (0,)
    roles.grant(worker, "GRANT CREATE ON SCHEMA app TO {role}")
    assert start(url).phase == "ready"  # the side table is its own; the live one only read


def run(coro_fn: Any, url: str, *args: Any, cfg: Config | None = None, **kw: Any) -> Any:
    return asyncio.run(coro_fn(cfg or config(), Database(url), "tickets", *args, **kw))


def cut_over(url: str, strategy: str = "table", triggers: Config | None = None) -> None:
    """A change to ``next`` started, verified and cut over; with ``triggers``, the change
    triggers installed by that config after the start."""
    from embedfill.application import amodel_cutover, amodel_verify, atriggers

    start(url, strategy=strategy)
    if triggers is not None:
        asyncio.run(atriggers(triggers, Database(url), "tickets", True, False))
    run(amodel_verify, url, env={})
    run(amodel_cutover, url)


def job_status(url: str, job: int | None) -> tuple[str, str | None]:
    """A job's status and error, as embedfill.runs holds them."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT status, error FROM embedfill.runs WHERE id = %s", (job,))
        return row.fetchone()


def columns(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'app.\"SupportTickets\"'::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ).fetchall()
    return [r[0] for r in rows]


def test_verify_then_cutover_rollback_cutover_again_and_finalize(indexed: str) -> None:
    import embedfill
    from embedfill.application import (
        amodel_cutover,
        amodel_finalize,
        amodel_rollback,
        amodel_verify,
    )
    from embedfill.errors import UsageError, VerificationFailed

    def active() -> Any:
        return embedfill.active("tickets", config(), database_url=indexed)

    start(indexed)
    before = active()
    assert (before.relation, before.column, before.model, before.since) == (
        "SupportTickets",
        "emb",
        "test-embed",
        None,
    )
    with pytest.raises(VerificationFailed, match="run `embedfill model verify"):
        run(amodel_cutover, indexed)
    st = run(amodel_verify, indexed, env={})
    assert set(st.gates) == {"coverage", "shape", "sample", "recall_at_10"}
    assert all(g["pass"] for g in st.gates.values()), st.gates
    assert st.gates["shape"]["value"] == 16 and st.gates["sample"]["checked"] > 0
    assert st.gates["recall_at_10"]["value"] >= 0.95
    st = run(amodel_cutover, indexed)
    assert (st.phase, st.active) == ("cut_over", "new")
    now = active()
    assert (now.relation, now.column, now.provider, now.model, now.dimensions) == (
        "SupportTickets_emb_next",
        "embedding",
        "next",
        "hash-v2",
        16,
    )
    st = run(amodel_rollback, indexed)
    assert (st.phase, st.active) == ("rolled_back", "old")
    assert (active().relation, active().model) == ("SupportTickets", "test-embed")
    assert run(amodel_cutover, indexed).active == "new"  # the gates still hold
    with pytest.raises(UsageError, match="pass --yes"):
        run(amodel_finalize, indexed)
    windowed = parse_config(
        {
            "providers": {p: dict(v) for p, v in _raw_providers().items()},
            "targets": [_raw_target()],
            "engine": {"rollback_window_days": 7},
        }
    )
    with pytest.raises(UsageError, match="rollback window of 7 days"):
        run(amodel_finalize, indexed, cfg=windowed, yes=True)
    st = run(amodel_finalize, indexed, cfg=windowed, yes=True, force=True)
    assert st.phase == "finalized" and st.active == "new"
    assert "emb" not in columns(indexed)  # the old vectors and their index are gone
    assert active().relation == "SupportTickets_emb_next"


@pytest.mark.parametrize("strategy", ["column", "table"])
def test_a_cutovers_finalize_moves_the_change_triggers_off_the_dropped_column(
    indexed: str, strategy: str
) -> None:
    """The live column is dropped: its triggers would queue edits nobody drains. They
    move to the new vectors (the target, pointed at them, finds them installed), and so
    do the edits still queued: the shadow column's, or the side table's vectors, whose
    triggers stay on the live table. Before, a table-strategy finalize removed them,
    and forgot the queued edits."""
    from embedfill.application import amodel_finalize

    cut_over(indexed, strategy, triggers=config())
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = 'queued before' WHERE ticket_no = 3")
    st = run(amodel_finalize, indexed, yes=True, force=True)
    assert st.phase == "finalized"
    if strategy == "column":  # what the config needs now, said where the operator looks
        assert st.next_step == (
            "Point target 'tickets' at its new vectors in the config: "
            'embedding_column = "emb_next" and provider = "next".'
        )
    else:
        assert st.next_step == (
            "Point target 'tickets' at its side table in the config: embedding_table = "
            '"SupportTickets_emb_next" and provider = "next", without embedding_column.'
        )
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = 'edited after' WHERE ticket_no = 4")
        # moved to another tenant: a side row keeps its tenant, a column has none
        conn.execute(f"UPDATE {T} SET org = 'org-moved' WHERE ticket_no = 7")
        triggers = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
            (T,),
        ).fetchall()
        queued = conn.execute(
            "SELECT c.column_name, q.row_key FROM embedfill.changes AS q"
            " JOIN embedfill.vector_columns AS c ON c.id = q.column_id ORDER BY 1, 2"
        ).fetchall()
        column = "emb_next" if strategy == "column" else "embedding"
        new_id = conn.execute(
            "SELECT id FROM embedfill.vector_columns WHERE column_name = %s", (column,)
        ).fetchone()
    assert new_id is not None
    assert sorted(t for (t,) in triggers) == [
        f"embedfill_changed_{new_id[0]}_ins",
        f"embedfill_changed_{new_id[0]}_upd",
    ]
    # row 3's edit, queued for the dropped column, is the kept vectors' now
    moved = [(column, "7")] if strategy == "table" else []
    assert queued == [(column, "3"), (column, "4"), *moved]


def test_an_edit_after_verify_keeps_the_cutover_back(indexed: str) -> None:
    from embedfill.application import amodel_cutover, amodel_verify
    from embedfill.errors import VerificationFailed

    start(indexed)
    run(amodel_verify, indexed, env={})
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET body = 'edited' WHERE ticket_no = 3")
    with pytest.raises(VerificationFailed, match="Gate coverage fails"):
        run(amodel_cutover, indexed)
    assert status(indexed).active == "old"


def test_a_wrong_new_vector_fails_the_sample_gate_and_keeps_the_cutover_back(
    indexed: str,
) -> None:
    """Three new vectors that are not their texts' (a bug in a fill, a hand edit): the
    sample gate re-embeds them, fails, and records them stale; the cutover is refused
    naming the gate; a `start` again re-embeds exactly them and the next verify passes."""
    from embedfill.application import amodel_cutover, amodel_verify
    from embedfill.errors import VerificationFailed

    start(indexed)
    wrong = hash_vector("not this row's text", 16).tolist()
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {SIDE} SET embedding = %s::vector WHERE embedfill_row_id IN ('1', '2', '3')",
            (str(wrong),),
        )
    verified = run(amodel_verify, indexed, env={})
    sample = verified.gates["sample"]
    assert not sample["pass"] and sample["value"] < sample["threshold"], sample
    # recorded stale, as `embedfill verify` does: the coverage falls with it
    assert status(indexed).stale == 3
    assert {name for name, g in verified.gates.items() if not g["pass"]} == {"sample", "coverage"}
    with pytest.raises(VerificationFailed, match="Gate sample fails"):
        run(amodel_cutover, indexed)
    assert status(indexed).active == "old"
    again = start(indexed)
    assert (again.stale, again.missing, again.coverage) == (0, 0, 1.0)
    got, want = new_vectors(indexed), texts(indexed)
    for row_id in (1, 2, 3):
        assert np.allclose(got[row_id], hash_vector(want[row_id], 16), atol=1e-6)
    assert all(g["pass"] for g in run(amodel_verify, indexed, env={}).gates.values())


def test_an_index_that_misses_neighbours_fails_the_recall_gate(indexed: str) -> None:
    """The recall gate measures the new index, whatever the planner would choose for so
    small a table: at hnsw.ef_search = 1 (a database setting the app's searches get too)
    the index finds one row where ten are asked for, and the gate fails."""
    from embedfill.application import amodel_cutover, amodel_verify
    from embedfill.errors import VerificationFailed

    start(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        dbname = conn.execute("SELECT current_database()").fetchone()
        assert dbname is not None
        conn.execute(f'ALTER DATABASE "{dbname[0]}" SET hnsw.ef_search = 1')
    verified = run(amodel_verify, indexed, env={})
    recall = verified.gates["recall_at_10"]
    assert not recall["pass"] and recall["value"] < 0.5 and recall["ef_search"] == "1", recall
    with pytest.raises(VerificationFailed, match="Gate recall_at_10 fails"):
        run(amodel_cutover, indexed)


def test_the_recall_gate_fails_while_the_new_index_is_not_there(indexed: str) -> None:
    """Its twin dropped (or left INVALID), a search scans and reads exact: the gate said
    1.0 and passed; only the cutover refused. It fails, saying what to run."""
    from embedfill.application import amodel_verify

    start(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        [(name,)] = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index"
            " WHERE indrelid = 'app.\"SupportTickets_emb_next\"'::regclass AND NOT indisprimary"
        ).fetchall()
        conn.execute(f"DROP INDEX {name}")
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert not recall["pass"] and "is missing: run model start again" in recall["note"], recall
    again = start(indexed)  # builds it again
    assert again.index == "valid"
    assert run(amodel_verify, indexed, env={}).gates["recall_at_10"]["pass"]


def test_the_recall_gate_of_an_ivfflat_index_names_probes_not_ef_search(indexed: str) -> None:
    """An IVFFlat live index: its twin's recall depends on ivfflat.probes, which the
    gate shows (it showed hnsw.ef_search, and an operator raised the wrong setting); at
    probes = lists the index searches every list and its recall is exact."""
    from embedfill.application import amodel_verify

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute("DROP INDEX app.tickets_emb_hnsw")
        conn.execute(
            'CREATE INDEX tickets_emb_ivf ON app."SupportTickets"'
            " USING ivfflat (emb vector_cosine_ops) WITH (lists = 10)"
        )
    start(indexed)
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert recall["probes"] == "1" and "ef_search" not in recall, recall
    with psycopg.connect(indexed, autocommit=True) as conn:
        dbname = conn.execute("SELECT current_database()").fetchone()
        assert dbname is not None
        conn.execute(f'ALTER DATABASE "{dbname[0]}" SET ivfflat.probes = 10')
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert (recall["probes"], recall["value"], recall["pass"]) == ("10", 1.0, True), recall


def test_the_recall_gate_measures_a_twin_of_the_default_operator_class(indexed: str) -> None:
    """A live IVFFlat index that names no operator class (``USING ivfflat (emb)``: the
    default, vector_l2_ops) has a twin that names none either. The gate read "not
    measured" and passed whatever the index found; it measures with <->, as any other
    class: at probes = 1 of 10 lists the twin misses neighbours, at 10 it finds them."""
    from embedfill.application import amodel_verify

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute("DROP INDEX app.tickets_emb_hnsw")
        conn.execute('CREATE INDEX tickets_emb_ivf ON app."SupportTickets" USING ivfflat (emb)')
    start(indexed)
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert "note" not in recall and recall["value"] is not None, recall
    with psycopg.connect(indexed, autocommit=True) as conn:
        dbname = conn.execute("SELECT current_database()").fetchone()
        assert dbname is not None
        conn.execute(f'ALTER DATABASE "{dbname[0]}" SET ivfflat.probes = 1000')
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert (recall["probes"], recall["value"], recall["pass"]) == ("1000", 1.0, True), recall


def test_the_recall_gate_measures_where_pgvector_lives_in_a_schema_that_needs_quotes(
    indexed: str,
) -> None:
    """pgvector in schema "My Ext": the twin's class is "My Ext".vector_cosine_ops as the
    server writes it, and the gate's operator named the schema quoted twice (a schema
    that does not exist): verify failed instead of measuring."""
    from embedfill.application import amodel_verify

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "My Ext"')
        conn.execute('ALTER EXTENSION vector SET SCHEMA "My Ext"')
    start(indexed)
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert (recall["value"], recall["pass"]) == (1.0, True), recall


def test_an_index_on_a_halfvec_cast_gets_its_twin_which_the_recall_gate_measures(
    indexed: str,
) -> None:
    """The live column indexed as halfvec (pgvector's way past HNSW's 2,000 dimensions):
    its twin is built on the new vectors cast to halfvec of the new width, and the recall
    gate searches it as the app would, through the cast (before, no twin was built and
    the gate passed as if searches were exact)."""
    from embedfill.application import amodel_verify

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute("DROP INDEX app.tickets_emb_hnsw")
        conn.execute(
            'CREATE INDEX tickets_emb_half ON app."SupportTickets"'
            " USING hnsw ((emb::halfvec(8)) halfvec_cosine_ops) WITH (m = 8)"
        )
    assert start(indexed).index == "valid"
    definition = twin_definition(indexed)
    assert "USING hnsw (((embedding)::halfvec(16)) halfvec_cosine_ops) WITH (m='8')" in (
        definition
    ), definition
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert (recall["value"], recall["pass"]) == (1.0, True) and "note" not in recall, recall
    with psycopg.connect(indexed, autocommit=True) as conn:
        dbname = conn.execute("SELECT current_database()").fetchone()
        assert dbname is not None
        conn.execute(f'ALTER DATABASE "{dbname[0]}" SET hnsw.ef_search = 1')
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    assert not recall["pass"] and recall["value"] < 0.5, recall


def test_the_recall_gate_measures_every_twin_and_reads_the_worst(indexed: str) -> None:
    """A plain HNSW index and an IVFFlat one on a halfvec cast: both get twins, and the
    gate measured only the first (1.0, passed) while the second, searched through its
    cast at probes = 1 of 15 lists, misses neighbours."""
    from embedfill.application import amodel_verify

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            'CREATE INDEX tickets_emb_ivf ON app."SupportTickets"'
            " USING ivfflat ((emb::halfvec(8)) halfvec_l2_ops) WITH (lists = 15)"
        )
    start(indexed)
    recall = run(amodel_verify, indexed, env={}).gates["recall_at_10"]
    by_index = {g["index"]: g for g in recall["indexes"]}
    assert sorted(by_index) == [
        "SupportTickets_emb_next_embedding_hnsw",
        "SupportTickets_emb_next_embedding_ivfflat2",
    ]
    assert by_index["SupportTickets_emb_next_embedding_hnsw"]["pass"], recall
    worst = by_index["SupportTickets_emb_next_embedding_ivfflat2"]
    assert not worst["pass"] and worst["probes"] == "1", recall
    assert (recall["index"], recall["value"], recall["pass"]) == (
        "SupportTickets_emb_next_embedding_ivfflat2",
        worst["value"],
        False,
    )


def test_a_partial_index_with_parameters_gets_a_full_twin_with_them(indexed: str) -> None:
    """``WITH (m = 8) WHERE …``: the parameters' pattern ran on into the WHERE, and the
    plan failed on "8') WHERE (…" as a number; with another parameter the twin was built
    with the live table's WHERE on the side table, which has none of its columns."""
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute("DROP INDEX app.tickets_emb_hnsw")
        conn.execute(
            'CREATE INDEX tickets_emb_part ON app."SupportTickets" USING hnsw'
            " (emb vector_cosine_ops) WITH (m = 8, ef_construction = 40) WHERE org <> 'x'"
        )
    assert start(indexed).index == "valid"
    definition = twin_definition(indexed)
    assert definition.endswith(
        "USING hnsw (embedding vector_cosine_ops) WITH (m='8', ef_construction='40')"
    ), definition


def test_a_change_given_up_before_the_cutover_drops_only_the_new_vectors(indexed: str) -> None:
    from embedfill.application import amodel_finalize, amodel_rollback

    live_before = live(indexed)
    start(indexed)
    assert run(amodel_rollback, indexed).phase == "rolled_back"
    assert run(amodel_finalize, indexed, yes=True).phase == "finalized"
    with psycopg.connect(indexed) as conn:
        gone = conn.execute("SELECT to_regclass(%s)", (SIDE,)).fetchone()
    assert gone == (None,) and live(indexed) == live_before
    assert start(indexed).phase == "ready"  # and a new change may start


def test_a_watch_job_left_without_its_watcher_ends_when_a_worker_meets_its_dropped_column(
    indexed: str, fake_openai: Any
) -> None:
    """A watch that stopped while a worker held one of its chunks leaves its job running
    for the watcher that takes over; after a cutover's finalize none can (the column is
    gone). A worker that then meets the dropped column ends the job as a stopped watch's
    ends. Before: it stayed `running` for ever once the worker only cancelled the chunk
    (and earlier still, the job failed)."""
    from embedfill import jobs
    from embedfill.application import amodel_finalize
    from embedfill.db.catalog import inspect_target
    from embedfill.db.store import Store
    from embedfill.jobs.spec import JobSpec
    from embedfill.worker import Worker
    from tests.integration.test_watch import ENV

    cfg = _watched_config(fake_openai)
    cut_over(indexed, "column")

    async def left_behind() -> int:  # what a watch leaves when it stops with a chunk out
        async with await psycopg.AsyncConnection.connect(indexed, autocommit=True) as conn:
            live = cfg.target("tickets")
            pconf = cfg.provider_for(live)
            info = await inspect_target(conn, live, pconf.expected_dimensions, pconf.label)
            spec = jobs.spec_of("watch", live, pconf, info, env=ENV)
            job = await jobs.open_watch_job(conn, spec=spec, target=live, info=info, actor="t")
            assert job is not None
            state = await Store(conn).run_state(job)
            assert state is not None
            await jobs.add_key_chunks(conn, job, JobSpec.from_record(state).queue, ["5"], 50)
            return job

    job = asyncio.run(left_behind())
    run(amodel_finalize, indexed, yes=True, force=True)

    async def work() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(Worker(cfg, Database(indexed), env=ENV).run(stop))
        for _ in range(100):
            if job_status(indexed, job)[0] != "running":
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(work())
    status, error = job_status(indexed, job)
    assert status not in ("running", "failed") and error is None


@pytest.mark.parametrize("strategy", ["column", "table"])
def test_a_config_still_naming_the_column_a_finalize_dropped_is_told_where_the_vectors_are(
    indexed: str, strategy: str
) -> None:
    """After a cutover's finalize, every command of a config that still names the live
    column stopped at "Column 'emb' ... does not exist" and nothing more (a new user ran
    `embedfill status` on the demo's built-in config after a change of its model)."""
    from embedfill.application import amodel_finalize, astatus

    cut_over(indexed, strategy)
    run(amodel_finalize, indexed, yes=True, force=True)
    with pytest.raises(SchemaMismatch) as caught:
        asyncio.run(astatus(config(), Database(indexed)))
    said = str(caught.value)
    assert said.startswith("Column 'emb' (embedding_column of target 'tickets') does not exist")
    if strategy == "column":
        assert said.endswith(
            "A change of model's finalize dropped it: point the target at its new vectors "
            '(embedding_column = "emb_next", provider = "next").'
        )
    else:
        assert said.endswith(
            "A change of model's finalize dropped it: point the target at its side table "
            'app.SupportTickets_emb_next (embedding_table = "SupportTickets_emb_next", '
            'provider = "next", without embedding_column).'
        )


@pytest.mark.parametrize("ending", ["cutover", "rollback"])
def test_a_finalize_says_whose_vectors_it_dropped(indexed: str, ending: str) -> None:
    """What a worker asks before failing a watch job on a missing column: was it dropped
    by a finalize since the job started? A cutover's finalize drops the live target's
    vectors, a rollback's the new ones (target ``tickets@next``); not the other's."""
    from embedfill import migration
    from embedfill.application import (
        amodel_cutover,
        amodel_finalize,
        amodel_rollback,
        amodel_verify,
    )

    async def dropped(target: str, since: Any) -> bool:
        async with await psycopg.AsyncConnection.connect(indexed) as conn:
            return await migration.finalized_since(conn, target, since)

    with psycopg.connect(indexed) as conn:
        before = conn.execute("SELECT now()").fetchone()[0]
    start(indexed, strategy="column")
    if ending == "cutover":
        run(amodel_verify, indexed, env={})
        run(amodel_cutover, indexed)
    else:
        run(amodel_rollback, indexed)
    assert not asyncio.run(dropped("tickets", before))  # not yet finalized
    run(amodel_finalize, indexed, yes=True, force=True)
    with psycopg.connect(indexed) as conn:
        after = conn.execute("SELECT now()").fetchone()[0]
    assert asyncio.run(dropped("tickets", before)) is (ending == "cutover")
    assert asyncio.run(dropped("tickets@next", before)) is (ending == "rollback")
    assert not asyncio.run(dropped("tickets@other", before))
    assert not asyncio.run(dropped("tickets", after))  # a job started since is not concerned
    assert not asyncio.run(dropped("tickets@next", after))


@pytest.mark.slow
def test_an_app_searching_and_writing_throughout_never_errs_or_waits_on_a_lock(
    indexed: str,
) -> None:
    import threading

    from embedfill.application import (
        amodel_cutover,
        amodel_finalize,
        amodel_rollback,
        amodel_verify,
    )

    stop, errors, searches = threading.Event(), [], [0]
    seen: set[tuple[str, int]] = set()

    def app() -> None:
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '200ms'")  # a longer wait is an error here
            n = 1000
            while not stop.is_set():
                try:
                    row = conn.execute(
                        "SELECT relation, column_name, dimensions FROM embedfill.active_models"
                        " WHERE target = 'tickets'"
                    ).fetchone()
                    relation, column, dims = row or ("SupportTickets", "emb", 8)
                    q = "[" + ",".join(["0.5"] * dims) + "]"
                    if relation == "SupportTickets":
                        sql_ = (
                            f'SELECT ticket_no FROM {T} ORDER BY "{column}" <=> %s::vector LIMIT 10'
                        )
                    else:
                        sql_ = (
                            f'SELECT t.ticket_no FROM {T} AS t JOIN app."{relation}" AS v'
                            f' ON v.embedfill_row_id = t.ticket_no ORDER BY v."{column}"'
                            " <=> %s::vector LIMIT 10"
                        )
                    conn.execute(sql_, (q,), prepare=True).fetchall()
                    seen.add((relation, dims))
                    searches[0] += 1
                    n += 1
                    if n % 5:  # a new row every fifth search, an edit every search
                        conn.execute(
                            f"UPDATE {T} SET body = body || '.' WHERE ticket_no = %s",
                            (n % 50 + 1,),
                            prepare=True,
                        )
                        continue
                    conn.execute(
                        f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (%s, 'org-a',"
                        " 'app', 'a row the app writes')",
                        (n,),
                        prepare=True,
                    )
                    conn.execute(
                        f"UPDATE {T} SET body = body || '.' WHERE ticket_no = %s",
                        (n % 50 + 1,),
                        prepare=True,
                    )
                except psycopg.Error as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

    # the app edits or adds a row of this small table every few milliseconds: the rows
    # changed during the final catch-up are behind for a moment (what this test checks is
    # that the app never errs or waits, and never compares two models' vectors)
    busy = parse_config(
        {
            "providers": _raw_providers(),
            "targets": [_raw_target()],
            "engine": {"cutover_min_coverage": 0.2},
        }
    )
    from embedfill.db.schema import amigrate

    asyncio.run(amigrate(Database(indexed)))  # embedfill.active_models, for the app to read
    thread = threading.Thread(target=app)
    thread.start()
    try:
        start(indexed)
        run(amodel_verify, indexed, cfg=busy, env={})
        run(amodel_cutover, indexed, cfg=busy)
        run(amodel_rollback, indexed, cfg=busy)
        run(amodel_cutover, indexed, cfg=busy)
        run(amodel_finalize, indexed, cfg=busy, yes=True, force=True)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and searches[0] > 50
    # every search compared its query with one model's vectors: the old, then the new
    assert seen == {("SupportTickets", 8), ("SupportTickets_emb_next", 16)}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["table", "column"])
def test_watch_keeps_the_new_vectors_fresh_while_a_change_is_under_way(
    indexed: str, fake_openai: Any, strategy: str
) -> None:
    from embedfill.config import EngineConfig
    from tests.integration.test_watch import Running, wait_for

    start(indexed, strategy=strategy)
    cfg = config()
    live_provider = dict(_raw_providers()["openai"], base_url=fake_openai.base_url)
    cfg = parse_config(
        {"providers": {**_raw_providers(), "openai": live_provider}, "targets": [_raw_target()]}
    )
    cfg = Config(providers=cfg.providers, targets=cfg.targets, engine=EngineConfig(chunk_rows=50))
    w = Running(indexed, cfg, interval_s=0.3, sweep_interval_s=1.0)
    try:
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'edited while watched' WHERE ticket_no = 7")
            conn.execute(
                f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (77, 'org-a', 'n', 'new')"
            )
        wait_for(lambda: (lambda st: (st.rows, st.coverage))(status(indexed)) == (59, 1.0))
    finally:
        w.stop()
    where = (
        (SIDE, "embedfill_row_id", "embedding")
        if strategy == "table"
        else (T, "ticket_no", "emb_next")
    )
    got, want = new_vectors(indexed, *where), texts(indexed)
    for row_id in (7, 77):
        assert np.allclose(got[row_id], hash_vector(want[row_id], 16), atol=1e-6)


@pytest.mark.parametrize("strategy", ["table", "column"])
def test_with_triggers_an_edit_reaches_the_new_vectors_without_waiting_for_a_sweep(
    indexed: str, fake_openai: Any, strategy: str
) -> None:
    """The triggers queue an edit for the live column; a change of model under way on it
    gets it too (a sweep of the new vectors, minutes apart, is not what finds it)."""
    import time

    from embedfill.application import atriggers
    from embedfill.config import EngineConfig
    from tests.integration.test_watch import Running, wait_for

    start(indexed, strategy=strategy)
    live_provider = dict(_raw_providers()["openai"], base_url=fake_openai.base_url)
    cfg = parse_config(
        {"providers": {**_raw_providers(), "openai": live_provider}, "targets": [_raw_target()]}
    )
    cfg = Config(providers=cfg.providers, targets=cfg.targets, engine=EngineConfig(chunk_rows=50))
    asyncio.run(atriggers(cfg, Database(indexed), "tickets", True, False))
    where = (
        (SIDE, "embedfill_row_id", "embedding")
        if strategy == "table"
        else (T, "ticket_no", "emb_next")
    )

    def fresh(row_id: int) -> bool:
        got = new_vectors(indexed, *where).get(row_id)
        want = hash_vector(texts(indexed)[row_id], 16)
        return got is not None and bool(np.allclose(got, want, atol=1e-6))

    # polls and sweeps an hour apart: only the queue can be this quick
    w = Running(indexed, cfg, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        time.sleep(3.0)  # both watchers' first poll and sweep are over
        assert status(indexed).coverage == 1.0
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'edited under triggers' WHERE ticket_no = 7")
        committed = time.monotonic()
        wait_for(lambda: fresh(7), timeout=15)
        assert time.monotonic() - committed < 10  # generous: "did not wait for a sweep"
    finally:
        w.stop()
    with psycopg.connect(indexed) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.changes").fetchone() == (0,)


def _watched_config(fake_openai: Any, *, with_next: bool = True) -> Config:
    """The live provider at the test server; ``with_next``: the new model's section too
    (without it, a watch cannot keep the new vectors fresh)."""
    from embedfill.config import EngineConfig

    providers = {**_raw_providers(), "openai": dict(_raw_providers()["openai"])}
    providers["openai"]["base_url"] = fake_openai.base_url
    if not with_next:
        del providers["next"]
    cfg = parse_config({"providers": providers, "targets": [_raw_target()]})
    return Config(providers=cfg.providers, targets=cfg.targets, engine=EngineConfig(chunk_rows=50))


def _fresh_new_vector(url: str, strategy: str, row_id: int) -> bool:
    where = (
        (SIDE, "embedfill_row_id", "embedding")
        if strategy == "table"
        else (T, "ticket_no", "emb_next")
    )
    got = new_vectors(url, *where).get(row_id)
    return got is not None and bool(
        np.allclose(got, hash_vector(texts(url)[row_id], 16), atol=1e-6)
    )


def test_a_watch_running_before_model_start_keeps_the_new_vectors_fresh_without_a_restart(
    indexed: str, fake_openai: Any
) -> None:
    """`model start` while `watch` runs (the usual case): the watch takes the new vectors
    on within seconds, and with the triggers an edit reaches them at once."""
    import time

    from embedfill.application import atriggers
    from tests.integration.test_watch import Running, wait_for

    cfg = _watched_config(fake_openai)
    asyncio.run(atriggers(cfg, Database(indexed), "tickets", True, False))
    w = Running(indexed, cfg, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        start(indexed, strategy="column")
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches), timeout=20)
        assert w.watches[1].target.name == "tickets@next"
        time.sleep(2.0)  # its first poll and sweep are over
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'edited after start' WHERE ticket_no = 9")
        committed = time.monotonic()
        wait_for(lambda: _fresh_new_vector(indexed, "column", 9), timeout=15)
        assert time.monotonic() - committed < 10
    finally:
        w.stop()
    assert w.error is None


@pytest.mark.parametrize("strategy", ["column", "table"])
def test_the_new_vectors_watcher_ends_quietly_when_a_rollbacks_finalize_drops_them(
    indexed: str, fake_openai: Any, strategy: str
) -> None:
    """Giving a change up (rollback, finalize) is no fault of the watch: the new vectors'
    watcher ends, the live one goes on, and the watch exits clean."""
    from embedfill.application import amodel_finalize, amodel_rollback
    from tests.integration.test_watch import Running, wait_for

    start(indexed, strategy=strategy)
    cfg = _watched_config(fake_openai)
    w = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        derived = w.watches[1]
        run(amodel_rollback, indexed)
        run(amodel_finalize, indexed, yes=True)
        wait_for(lambda: derived.job_id is None, timeout=20)
        assert derived.failed is None
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'still watched' WHERE ticket_no = 8")
        wait_for(lambda: w.watches[0].queued > 0)
    finally:
        w.stop()
    assert w.error is None


@pytest.mark.parametrize("strategy", ["column", "table"])
def test_a_drains_fan_out_racing_a_finalize_leaves_nothing_queued_for_the_dropped_vectors(
    indexed: str, strategy: str
) -> None:
    """A live watcher's drain queues its keys for the new vectors (the fan-out) in its own
    transaction; a finalize that drops those vectors marks the change finalized and
    forgets what is queued for them. A fan-out whose transaction is still open when the
    finalize runs either commits first (and is forgotten with the rest) or sees the
    change finalized: nothing is left queued for a column that nobody drains any more."""
    import threading

    from embedfill.application import amodel_finalize, amodel_rollback
    from embedfill.db import homes
    from embedfill.db import queries as q
    from embedfill.db.store import watch_key

    start(indexed, strategy=strategy)
    run(amodel_rollback, indexed)  # its finalize drops the new vectors
    with psycopg.connect(indexed) as conn:
        oid, home = conn.execute(
            "SELECT table_oid, home FROM embedfill.model_migrations WHERE phase <> 'finalized'"
        ).fetchone()
        new_oid = (
            oid
            if strategy == "column"
            else conn.execute(
                "SELECT %s::regclass::oid", (f'{home["schema"]}."{home["relation"]}"',)
            ).fetchone()[0]
        )
    new_column = home["column"] if strategy == "column" else homes.VECTOR
    with (
        psycopg.connect(indexed, autocommit=True) as watcher,  # leads the new vectors
        psycopg.connect(indexed) as drain,  # the live watcher's drain, its transaction open
    ):
        watcher.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (watch_key(new_oid, new_column),)
        )
        queued = drain.execute(
            q.FAN_OUT_CHANGES,
            {
                "table_oid": oid,
                "column": "emb",
                "keys": ["7", "8", "9"],
                "side_vector": homes.VECTOR,
            },
        ).rowcount
        assert queued == 3
        finalized: list[Any] = []
        finalize = threading.Thread(
            target=lambda: finalized.append(run(amodel_finalize, indexed, yes=True))
        )
        finalize.start()
        finalize.join(timeout=2.0)
        drain.commit()
        finalize.join(timeout=30.0)
    assert finalized and finalized[0].phase == "finalized"
    with psycopg.connect(indexed) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.changes").fetchone() == (0,)


def _queued(url: str) -> list[tuple[Any, ...]]:
    """What the change queue holds, by (table, column): how many keys, which."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT c.table_name, c.column_name, array_agg(q.row_key ORDER BY q.row_key)"
            " FROM embedfill.changes AS q JOIN embedfill.vector_columns AS c"
            " ON c.id = q.column_id GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()


def _cut_over_with_triggers(url: str, fake_openai: Any) -> tuple[int, int]:
    """A column-strategy change cut over, the change triggers installed, rows 3 and 4
    edited (queued for the live column): the live table's oid and the live column's id."""

    cut_over(url, "column", triggers=_watched_config(fake_openai))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {T} SET body = 'queued before the finalize' WHERE ticket_no IN (3, 4)"
        )
        oid, column_id = conn.execute(
            "SELECT m.table_oid, c.id FROM embedfill.model_migrations AS m"
            " JOIN embedfill.vector_columns AS c ON c.column_name = m.column_name"
            " WHERE m.phase <> 'finalized'"
        ).fetchone()
    return oid, column_id


def test_a_live_drain_and_a_cutovers_finalize_wait_in_turn_and_the_edits_reach_the_kept_vectors(
    indexed: str, fake_openai: Any
) -> None:
    """The live watcher's drain holds the change first (then takes the queue's rows and
    fans them out to the new vectors); a cutover's finalize marks the change first (then
    moves what is queued for the column it dropped). Each waits for the other, never in
    a cycle: before, the drain took the queue's rows first and the two deadlocked, and
    the drained edits never reached the new vectors, which are the ones that stay."""
    import threading
    import time

    from embedfill.application import amodel_finalize
    from embedfill.db import homes
    from embedfill.db import queries as q
    from embedfill.db.store import watch_key

    oid, column_id = _cut_over_with_triggers(indexed, fake_openai)
    failed: list[BaseException] = []
    with (
        psycopg.connect(indexed, autocommit=True) as watcher,  # leads the new vectors
        psycopg.connect(indexed) as drain,  # the live watcher's drain, as watch.py runs it
    ):
        watcher.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (watch_key(oid, "emb_next"),)
        )
        drain.execute(q.HOLD_CHANGES_OF_MODEL, {"table_oid": oid, "column": "emb"})
        keys = [
            r[0]
            for r in drain.execute(
                q.DRAIN_CHANGES, {"column_id": column_id, "inflight": [], "limit": 100}
            ).fetchall()
        ]
        assert sorted(keys) == ["3", "4"]

        def finalize() -> None:
            try:
                run(amodel_finalize, indexed, yes=True, force=True)
            except BaseException as exc:
                failed.append(exc)

        finalizing = threading.Thread(target=finalize)
        finalizing.start()
        time.sleep(1.5)  # its DDL is done; its mark waits for this drain
        drain.execute(
            q.FAN_OUT_CHANGES,
            {"table_oid": oid, "column": "emb", "keys": keys, "side_vector": homes.VECTOR},
        )
        drain.commit()
        finalizing.join(timeout=30.0)
    assert not failed, failed
    assert status(indexed).phase == "finalized"
    assert _queued(indexed) == [("SupportTickets", "emb_next", ["3", "4"])]


def test_a_cutovers_finalize_queues_what_was_queued_for_the_dropped_column_for_the_kept_one(
    indexed: str, fake_openai: Any
) -> None:
    """Edits the triggers queued for the live column, not yet drained when a cutover's
    finalize drops it, are queued for the new vectors (which stay) instead of forgotten."""
    from embedfill.application import amodel_finalize

    _cut_over_with_triggers(indexed, fake_openai)
    assert _queued(indexed) == [("SupportTickets", "emb", ["3", "4"])]
    run(amodel_finalize, indexed, yes=True, force=True)
    assert _queued(indexed) == [("SupportTickets", "emb_next", ["3", "4"])]


@pytest.mark.parametrize("strategy", ["column", "table"])
def test_a_watch_left_running_through_a_cutovers_finalize_ends_the_live_watcher_quietly(
    indexed: str, fake_openai: Any, strategy: str
) -> None:
    """A cutover's finalize drops the live column, as it was asked to: the live
    watcher ends (its job ends as a stopped watch's, not failed) and says where the
    searches went; the watch exits clean. Before, the watch exited 3 ("1 of 2 watched
    targets stopped being watched ... does not exist"). The new vectors' watcher goes
    on, fed by the triggers the finalize moved (the table strategy's stay on the live
    table and queue the side table's vectors)."""
    from embedfill.application import amodel_finalize
    from tests.integration.test_watch import Running, wait_for

    cfg = _watched_config(fake_openai)
    cut_over(indexed, strategy, triggers=cfg)
    w = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        live, new = w.watches
        live_job = live.job_id
        run(amodel_finalize, indexed, yes=True, force=True)
        wait_for(lambda: live.job_id is None, timeout=20)
        assert live.failed is None and live.retired
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'after the finalize' WHERE ticket_no = 9")
        # the sweep is an hour away: only the triggers can bring the edit this soon
        wait_for(lambda: _fresh_new_vector(indexed, strategy, 9), timeout=15)
        time.sleep(1.0)  # a few polls of the new vectors' watcher since
        assert new.job_id is not None and not new.retired
    finally:
        w.stop()
    assert w.error is None
    assert job_status(indexed, live_job)[0] != "failed"


def test_a_live_chunk_in_flight_across_a_cutovers_finalize_leaves_no_task_behind(
    indexed: str, fake_openai: Any
) -> None:
    """A chunk of the live watch job is at the provider while a cutover's finalize drops
    the live column; its write then fails on the dropped column. The session's scan,
    waiting for its next chunk, was cancelled and left its queue reader pending: it
    would have taken the next chunk handed in, which then never ended (its worker
    waited for it for ever). Before: ``['Queue.get']`` outlived the watch. The live job
    ends as a stopped watch's, not failed."""
    import threading

    from embedfill.application import amodel_finalize
    from tests.integration.test_watch import Running, wait_for

    cfg = _watched_config(fake_openai)
    cut_over(indexed, "column", triggers=cfg)
    w = Running(indexed, cfg, interval_s=3.0, sweep_interval_s=3600)
    answer = threading.Event()
    asked = threading.Event()

    def held(inputs: list[str]) -> None:  # the answer waits until the column is gone
        if any("in flight" in text for text in inputs):
            asked.set()
            answer.wait(30)

    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        live = w.watches[0]
        live_job = live.job_id
        fake_openai.on_inputs = held
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'in flight' WHERE ticket_no = 5")
        wait_for(asked.is_set, timeout=20)
        run(amodel_finalize, indexed, yes=True, force=True)
        answer.set()
        wait_for(lambda: live.job_id is None, timeout=20)
        assert live.failed is None and live.retired
    finally:
        answer.set()
        w.stop()  # asserts that no task outlived the watch
    assert job_status(indexed, live_job)[0] != "failed"


def test_a_second_change_to_the_same_provider_with_another_strategy_is_watched_without_a_restart(
    indexed: str, fake_openai: Any
) -> None:
    """The same provider section for two changes in turn (a side table, given up; then a
    shadow column): the derived target keeps its name and gets another home. The watch's
    worker judged the second change's jobs by the first's settings (text template None
    against the target's) and refused them, so its rows stayed unfilled until a restart."""
    from embedfill.application import amodel_finalize, amodel_rollback
    from tests.integration.test_watch import Running, wait_for

    cfg = _watched_config(fake_openai)
    w = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        start(indexed, strategy="table")
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches), timeout=20)
        run(amodel_rollback, indexed)
        run(amodel_finalize, indexed, yes=True)
        wait_for(lambda: w.watches[1].job_id is None, timeout=20)
        start(indexed, strategy="column")
        wait_for(lambda: len(w.watches) == 3 and bool(w.watches[2].job_id), timeout=20)
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = NULL, emb_next = NULL WHERE ticket_no = 9")
            conn.execute(f"UPDATE {T} SET body = 'the second change' WHERE ticket_no = 9")
        wait_for(lambda: _fresh_new_vector(indexed, "column", 9), timeout=20)
    finally:
        w.stop()
    assert w.error is None


def test_with_nobody_watching_the_new_vectors_the_triggers_edits_are_not_queued_for_them(
    indexed: str, fake_openai: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A watch whose config lacks the new model's section watches the live column only,
    and says so: nothing is queued for the new vectors, where nobody would ever drain it
    (their watcher's first sweep finds the edits when one starts)."""
    import time

    from embedfill.application import atriggers
    from tests.integration.test_watch import Running, wait_for

    def in_the_queue() -> int:
        with psycopg.connect(indexed) as conn:
            row = conn.execute("SELECT count(*) FROM embedfill.changes").fetchone()
        assert row is not None
        return int(row[0])

    start(indexed, strategy="column")
    cfg = _watched_config(fake_openai, with_next=False)
    asyncio.run(atriggers(cfg, Database(indexed), "tickets", True, False))
    w = Running(indexed, cfg, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        with psycopg.connect(indexed, autocommit=True) as conn:
            for n in (7, 8, 9):
                conn.execute(f"UPDATE {T} SET body = 'edited {n}' WHERE ticket_no = %s", (n,))
        # the live column's three drained (its watch's count of rows queued was no sign
        # of it: the poll's NULL rows count too, and under load the drain came later)
        wait_for(lambda: in_the_queue() == 0)
        time.sleep(1.0)  # and nothing fanned out for the new vectors meanwhile
    finally:
        w.stop()
    assert in_the_queue() == 0
    assert any(
        "a change of tickets's model to provider section 'next' is under way, and the "
        "config this process started with has no [providers.next]"
        in r.getMessage()
        and "restart it with a --config that has the section" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("strategy", ["column", "table"])
def test_verify_while_a_watch_keeps_the_new_vectors_hands_its_catch_up_to_the_watch(
    indexed: str, fake_openai: Any, strategy: str
) -> None:
    """`model verify` catches up first; with a watch running, the new vectors' column is
    its job's (a backfill there is refused): the catch-up goes through that job."""
    from embedfill.application import amodel_verify
    from tests.integration.test_watch import Running, wait_for

    start(indexed, strategy=strategy)
    cfg = _watched_config(fake_openai)
    w = Running(indexed, cfg, interval_s=3600, sweep_interval_s=3600)  # no sweep meanwhile
    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'edited before verify' WHERE ticket_no = 11")
        st = run(amodel_verify, indexed, cfg=cfg, env={})
        assert st.coverage == 1.0 and all(g["pass"] for g in st.gates.values()), st.gates
        assert _fresh_new_vector(indexed, strategy, 11)
    finally:
        w.stop()
    assert w.error is None


def test_verifys_catch_up_through_a_watch_gives_up_when_no_worker_takes_its_chunks(
    indexed: str, fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch without a worker (workers elsewhere, none running): the chunks the
    catch-up queues in its job are never done. verify says so (the coverage gate fails)
    once nothing moved for the stall time, instead of waiting for ever."""
    import time

    from embedfill import application
    from embedfill.application import amodel_verify
    from tests.integration.test_watch import Running, wait_for

    monkeypatch.setattr(application, "WATCH_CATCH_UP_STALL_S", 2.0)
    start(indexed, strategy="column")
    cfg = _watched_config(fake_openai)
    w = Running(indexed, cfg, worker=False, interval_s=3600, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 2 and all(x.job_id for x in w.watches))
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'nobody embeds this' WHERE ticket_no = 14")
        began = time.monotonic()
        st = run(amodel_verify, indexed, cfg=cfg, env={})
        assert time.monotonic() - began < 30
        assert not st.gates["coverage"]["pass"] and st.gates["coverage"]["stale"] >= 1
    finally:
        w.stop()


def test_a_change_slowed_by_the_apps_lock_is_still_watched_once_its_home_is_made(
    indexed: str, fake_openai: Any
) -> None:
    """The change is on record before its home exists (`model start` waits behind the
    app's transaction): the running watch's new watcher waits for the home, then leads."""
    import threading
    import time

    from tests.integration.test_watch import Running, wait_for

    cfg = _watched_config(fake_openai)
    w = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(w.watches) == 1 and bool(w.watches[0].job_id))
        app = psycopg.connect(indexed)
        app.execute(f"SELECT 1 FROM {T} LIMIT 1")  # ACCESS SHARE, held
        starting = threading.Thread(target=start, args=(indexed,), kwargs={"strategy": "column"})
        starting.start()
        time.sleep(8.0)  # the follower has seen the change, its watcher found no home
        app.rollback()
        app.close()
        starting.join(60)
        wait_for(lambda: len(w.watches) == 2 and bool(w.watches[1].job_id), timeout=30)
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'edited at last' WHERE ticket_no = 12")
        # no triggers: found by the new vectors' poll (NULL) or verify; here a sweep of
        # an hour would not come, so the edit shows as stale, and the watcher is alive
        assert w.watches[1].failed is None
    finally:
        w.stop()
    assert w.error is None


def test_a_standby_replica_and_a_second_change_after_a_rollbacks_finalize(
    indexed: str, fake_openai: Any
) -> None:
    """Two watch replicas (one leads, one stands by) through rollback and finalize, then
    another change of the same target to the same section: neither replica fails, and
    the second change's new vectors are watched again."""
    import time

    from embedfill.application import amodel_finalize, amodel_rollback
    from tests.integration.test_watch import Running, wait_for

    start(indexed, strategy="column")
    cfg = _watched_config(fake_openai)
    a = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=3600)
    b = Running(indexed, cfg, interval_s=0.5, sweep_interval_s=3600)
    try:
        wait_for(lambda: len(a.watches) == 2 and len(b.watches) == 2)
        wait_for(lambda: sum(bool(x.job_id) for x in (*a.watches, *b.watches)) == 2)
        run(amodel_rollback, indexed)
        run(amodel_finalize, indexed, yes=True)
        time.sleep(2.0)
        start(indexed, strategy="column")  # again, the same provider section
        wait_for(
            lambda: any(
                x.target.name == "tickets@next" and x.job_id and not x.retired
                for x in (*a.watches, *b.watches)
            ),
            timeout=30,
        )
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(
                f"UPDATE {T} SET body = NULL, subject = 'new row text' WHERE ticket_no = 13"
            )
            conn.execute(f"UPDATE {T} SET emb_next = NULL WHERE ticket_no = 13")
        wait_for(lambda: _fresh_new_vector(indexed, "column", 13), timeout=20)
    finally:
        a.stop()
        b.stop()
    assert a.error is None and b.error is None
    assert not [x for x in (*a.watches, *b.watches) if x.failed is not None]


def test_finalize_refuses_before_dropping_anything_when_another_role_owns_the_triggers(
    indexed: str, roles: Any
) -> None:
    from embedfill.application import amodel_finalize, atriggers
    from embedfill.errors import PrivilegeMissing

    cut_over(indexed, "column")
    owner = roles.create()
    # the table and embedfill's schema belong to the test's superuser; the owner of the
    # triggers' functions becomes another role
    asyncio.run(atriggers(config(), Database(indexed), "tickets", True, False))
    with psycopg.connect(indexed, autocommit=True) as conn:
        row = conn.execute(
            "SELECT id FROM embedfill.vector_columns WHERE column_name = 'emb'"
        ).fetchone()
        assert row is not None
        conn.execute(f'ALTER FUNCTION embedfill.changed_{row[0]}() OWNER TO "{owner}"')
        conn.execute(f'ALTER FUNCTION embedfill.changed_{row[0]}_rows() OWNER TO "{owner}"')
        conn.execute("CREATE ROLE ef_finalizer_tmp LOGIN PASSWORD 'pw' NOSUPERUSER")
    try:
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute('ALTER TABLE app."SupportTickets" OWNER TO ef_finalizer_tmp')
            conn.execute("GRANT ALL ON SCHEMA app, embedfill TO ef_finalizer_tmp")
            conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA embedfill TO ef_finalizer_tmp")
            conn.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA embedfill TO ef_finalizer_tmp")
        url = roles.url("ef_finalizer_tmp")
        with pytest.raises(PrivilegeMissing, match="installed by another role"):
            run(amodel_finalize, url, yes=True, force=True)
    finally:
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute('ALTER TABLE app."SupportTickets" OWNER TO CURRENT_USER')
            conn.execute(f"ALTER FUNCTION embedfill.changed_{row[0]}() OWNER TO CURRENT_USER")
            conn.execute(f"ALTER FUNCTION embedfill.changed_{row[0]}_rows() OWNER TO CURRENT_USER")
            conn.execute("DROP OWNED BY ef_finalizer_tmp")
            conn.execute("DROP ROLE ef_finalizer_tmp")
    assert "emb" in columns(indexed)  # nothing was dropped
    assert status(indexed).phase == "cut_over"


def test_a_home_whose_name_is_taken_is_refused_and_nothing_of_the_owners_is_dropped(
    indexed: str,
) -> None:
    from embedfill.errors import PlanRefused

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {SIDE} (id int, note text)")  # the user's own table
        conn.execute(f"ALTER TABLE {T} ADD COLUMN emb_next vector(16)")  # another's column
    with pytest.raises(PlanRefused, match="already exists"):
        start(indexed)
    with pytest.raises(PlanRefused, match=r"column emb_next of app\.SupportTickets"):
        start(indexed, strategy="column")
    with psycopg.connect(indexed) as conn:
        assert conn.execute("SELECT count(*) FROM embedfill.model_migrations").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass(%s)", (SIDE,)).fetchone() != (None,)
    assert "emb_next" in columns(indexed)


def test_odd_live_names_and_a_percent_in_text_sql_embed_the_live_text(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute(
            f"CREATE TABLE {T} (ticket_no bigint PRIMARY KEY, embedfill_row_id int, org text,"
            " subject text, body text, emb vector(8))"
        )
        conn.execute(
            f"INSERT INTO {T} SELECT g, 1, 'org-a', 'subject ' || g, 'body', NULL"
            " FROM generate_series(1, 20) g"
        )
    cfg = parse_config(
        {
            "providers": _raw_providers(),
            "targets": [
                {k: v for k, v in _raw_target().items() if k != "text"}
                | {"text_sql": "subject || ' (100% done)'"}
            ],
        }
    )
    st = asyncio.run(amodel_start(cfg, Database(db_url), "tickets", "next", "table", env={}))
    assert (st.phase, st.coverage) == ("ready", 1.0)
    got = new_vectors(db_url)
    for row_id in (1, 7, 20):  # its own row's text, the % as written
        assert np.allclose(got[row_id], hash_vector(f"subject {row_id} (100% done)", 16), atol=1e-6)


def test_a_row_moved_to_another_tenant_is_embedded_with_its_new_tenants_key(
    indexed: str,
) -> None:
    start(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"UPDATE {T} SET org = 'org-moved', body = 'moved' WHERE ticket_no = 3")
    start(indexed)  # the catch-up: a full mirror first
    with psycopg.connect(indexed) as conn:
        row = conn.execute(
            f"SELECT embedfill_tenant FROM {SIDE} WHERE embedfill_row_id = 3"
        ).fetchone()
    assert row == ("org-moved",)


def test_a_changed_provider_section_and_a_missing_index_keep_the_cutover_back(
    indexed: str,
) -> None:
    from embedfill.application import amodel_cutover, amodel_verify
    from embedfill.errors import ConfigError, VerificationFailed

    start(indexed)
    run(amodel_verify, indexed, env={})
    edited = parse_config(
        {
            "providers": _raw_providers()
            | {"next": {"kind": "hash", "model": "hash-v9", "dimensions": 16}},
            "targets": [_raw_target()],
        }
    )
    with pytest.raises(ConfigError, match=r"\[providers.next\] is now hash:hash-v9"):
        run(amodel_cutover, indexed, cfg=edited)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute('DROP INDEX app."SupportTickets_emb_next_embedding_hnsw"')
    with pytest.raises(VerificationFailed, match="index is none"):
        run(amodel_cutover, indexed)
    assert status(indexed).active == "old"


def test_two_starts_at_once_build_the_index_once_and_both_end_ready(indexed: str) -> None:
    """The second start waits for the first's CREATE INDEX CONCURRENTLY (held up here by
    an old snapshot) instead of building the same index beside it."""
    import concurrent.futures
    import time

    with psycopg.connect(indexed) as blocker:
        blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        blocker.execute("SELECT count(*) FROM pg_catalog.pg_class").fetchone()  # a snapshot
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(start, indexed)
            with psycopg.connect(indexed, autocommit=True) as look:
                for _ in range(200):
                    building = look.execute(
                        "SELECT count(*) FROM pg_catalog.pg_stat_progress_create_index"
                        " WHERE phase = 'waiting for old snapshots'"
                    ).fetchone()
                    if building and building[0]:
                        break
                    time.sleep(0.05)
                assert building == (1,)
                second = pool.submit(start, indexed)
                time.sleep(1.5)
                assert not first.done() and not second.done()  # both wait for the snapshot
                builds = look.execute(
                    "SELECT count(*) FROM pg_catalog.pg_stat_progress_create_index"
                ).fetchone()
                assert builds == (1,)  # the second start builds nothing beside it
            blocker.rollback()
            a, b = first.result(timeout=60), second.result(timeout=60)
    assert (a.phase, a.index) == (b.phase, b.index) == ("ready", "valid")
    with psycopg.connect(indexed) as conn:
        [(count,)] = conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass AND NOT indisprimary",
            [SIDE],
        ).fetchall()
    assert count == 1


def test_with_row_level_security_a_reader_sees_only_the_side_rows_of_its_live_rows(
    indexed: str, roles: Any
) -> None:
    reader = roles.create()
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA app TO "{reader}"')
        conn.execute(f'GRANT SELECT ON {T} TO "{reader}"')
        conn.execute(f"ALTER TABLE {T} ENABLE ROW LEVEL SECURITY")
        conn.execute(f"CREATE POLICY by_org ON {T} USING (org = current_setting('app.org', true))")
    start(indexed)
    with psycopg.connect(roles.url(reader)) as conn:
        conn.execute("SET app.org = 'org-a'")
        mine = conn.execute(f"SELECT count(*) FROM {T}").fetchone()
        side = conn.execute(f"SELECT count(*), count(embedding) FROM {SIDE}").fetchone()
        other = conn.execute(
            f"SELECT count(*) FROM {SIDE} WHERE embedfill_tenant IS DISTINCT FROM 'org-a'"
        ).fetchone()
    assert mine is not None and side is not None and 0 < mine[0] < 60
    assert side[0] == mine[0] and other == (0,)
    with psycopg.connect(indexed) as conn:  # the owner still sees (and fills) every row
        assert conn.execute(f"SELECT count(*) FROM {SIDE}").fetchone() == (60,)


def test_a_deleted_live_row_loses_its_side_row_at_the_next_catch_up(indexed: str) -> None:
    start(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f"DELETE FROM {T} WHERE ticket_no IN (1, 2, 3)")
    st = start(indexed)
    assert (st.phase, st.rows, st.coverage) == ("ready", 55, 1.0)
    assert set(new_vectors(indexed)) == set(texts(indexed))  # a side row per live row
    assert not {1, 2, 3} & set(new_vectors(indexed))


def test_serve_watch_keeps_the_new_vectors_fresh_too(indexed: str, fake_openai: Any) -> None:
    """`serve --watch` looks for changes of model under way when it starts, as `watch`
    does: the new vectors of rows added and edited meanwhile are filled."""
    import time

    from embedfill.config import EngineConfig
    from embedfill.http import create_app
    from embedfill.watch import WatchOptions
    from tests.support.http import ServerThread

    start(indexed)
    live_provider = dict(_raw_providers()["openai"], base_url=fake_openai.base_url)
    cfg = parse_config(
        {"providers": {**_raw_providers(), "openai": live_provider}, "targets": [_raw_target()]}
    )
    cfg = Config(providers=cfg.providers, targets=cfg.targets, engine=EngineConfig(chunk_rows=50))
    app = create_app(
        cfg,
        database=Database(indexed),
        env={"TEST_PLATFORM_KEY": "sk-platform-test-0000000000"},
        watch=WatchOptions(interval_s=0.3, sweep_interval_s=1.0),
    )
    with ServerThread(app):
        with psycopg.connect(indexed, autocommit=True) as conn:
            conn.execute(f"UPDATE {T} SET body = 'edited while served' WHERE ticket_no = 8")
            conn.execute(
                f"INSERT INTO {T} (ticket_no, org, subject, body) VALUES (78, 'org-b', 'n', 'new')"
            )
        deadline = time.monotonic() + 60
        while (status(indexed).rows, status(indexed).coverage) != (59, 1.0):
            assert time.monotonic() < deadline, status(indexed)
            time.sleep(0.3)
    got, want = new_vectors(indexed), texts(indexed)
    for row_id in (8, 78):
        assert np.allclose(got[row_id], hash_vector(want[row_id], 16), atol=1e-6)


def test_row_level_security_turned_on_after_the_side_table_reaches_it(
    indexed: str, roles: Any
) -> None:
    reader = roles.create()
    start(indexed)
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE ON SCHEMA app TO "{reader}"')
        conn.execute(f'GRANT SELECT ON {T} TO "{reader}"')
        conn.execute(f'GRANT SELECT ON {SIDE} TO "{reader}"')
        conn.execute(f"ALTER TABLE {T} ENABLE ROW LEVEL SECURITY")
        conn.execute(f"CREATE POLICY by_org ON {T} USING (org = current_setting('app.org', true))")
    assert start(indexed).phase == "ready"  # the next start brings the side table in line
    with psycopg.connect(roles.url(reader)) as conn:
        conn.execute("SET app.org = 'org-a'")
        mine = conn.execute(f"SELECT count(*) FROM {T}").fetchone()
        side = conn.execute(f"SELECT count(*) FROM {SIDE}").fetchone()
    assert mine == side and mine is not None and 0 < mine[0] < 60


def test_a_model_wider_than_an_hnsw_vector_index_takes_goes_to_halfvec_when_asked(
    indexed: str,
) -> None:
    """3,072 dimensions (text-embedding-3-large's) on a column with an HNSW index: a
    `vector` index takes 2,000 at most, so the plan refuses and offers halfvec; with
    --vector-type halfvec the new vectors are halfvec(3072), their index the live one's
    twin in halfvec's operator class, every gate passes, and `active()` tells the app to
    cast its query to halfvec. The app's search then uses the index."""
    from embedfill.application import aactive, amodel_cutover, amodel_verify, aplan_model
    from embedfill.errors import PlanRefused

    raw = _raw_providers() | {"wide": {"kind": "hash", "model": "hash-wide", "dimensions": 3072}}
    cfg = parse_config({"providers": raw, "targets": [_raw_target()]})
    with pytest.raises(PlanRefused) as refused:
        run(aplan_model, indexed, "wide", cfg=cfg)
    said = str(refused.value)
    assert "takes vector of at most 2,000" in said and "--vector-type halfvec" in said
    plan = run(aplan_model, indexed, "wide", cfg=cfg, vector_type="halfvec")
    assert plan.to_model["vector_type"] == "halfvec"
    assert plan.disk_bytes  # sized at 2 bytes a dimension
    with pytest.raises(UsageError, match="--vector-type must be vector or halfvec"):
        run(aplan_model, indexed, "wide", cfg=cfg, vector_type="bit")

    st = run(amodel_start, indexed, "wide", cfg=cfg, vector_type="halfvec", env={})
    assert (st.phase, st.index, st.coverage) == ("ready", "valid", 1.0)
    with psycopg.connect(indexed) as conn:
        kind = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'app.\"SupportTickets_emb_wide\"'::regclass"
            " AND attname = 'embedding'"
        ).fetchone()
        (index,) = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'SupportTickets_emb_wide'"
            " AND indexdef LIKE '%hnsw%'"
        ).fetchone()
    assert kind == ("halfvec(3072)",)
    assert "halfvec_cosine_ops" in index and "m='8'" in index
    # a start again without the flag goes on with what was recorded; another type is refused
    assert run(amodel_start, indexed, "wide", cfg=cfg, env={}).phase == "ready"
    with pytest.raises(TargetBusy, match="halfvec"):
        run(amodel_start, indexed, "wide", cfg=cfg, vector_type="vector", env={})

    gates = run(amodel_verify, indexed, cfg=cfg, env={}).gates
    assert all(g["pass"] for g in gates.values()), gates
    run(amodel_cutover, indexed, cfg=cfg)
    active = run(aactive, indexed, cfg=cfg)
    assert (active.vector_type, active.dimensions) == ("halfvec", 3072)
    query = hash_vector("a question", 3072).tolist()
    with psycopg.connect(indexed) as app:
        app.execute("SET enable_seqscan = off")
        search = sql.SQL("SELECT {id} FROM {rel} ORDER BY {col} <=> %s::{type} LIMIT 10").format(
            id=sql.Identifier(active.id_column),
            rel=sql.Identifier(active.schema, active.relation),
            col=sql.Identifier(active.column),
            type=sql.SQL(active.vector_type),
        )
        found = app.execute(search, (str(query),)).fetchall()
    assert len(found) == 10


def test_a_cut_over_target_without_a_tenant_column_counts_its_outdated_vectors(
    indexed: str, fake_openai: Any
) -> None:
    """The cut-over count is the target's total, not only a sum over its tenants: a
    target without a tenant column lists none, and read 0 outdated (helper-22)."""
    from embedfill import BackfillOptions, abackfill
    from embedfill.application import amodel_cutover, amodel_verify, astatus

    raw = _raw_providers() | {"openai": provider_settings(fake_openai.base_url, 8)}
    target = {k: v for k, v in _raw_target().items() if k != "tenant_column"}
    cfg = parse_config({"providers": raw, "targets": [target]})
    env = {"TEST_PLATFORM_KEY": "sk-platform-test-0000000000"}
    asyncio.run(abackfill(cfg, Database(indexed), BackfillOptions(), env=env))
    (before,) = asyncio.run(astatus(cfg, Database(indexed)))
    fresh = before.rows - before.missing - before.stale - before.outdated_model - before.unverified
    assert fresh > 0 and before.outdated_model == 0 and before.tenants == ()
    run(amodel_start, indexed, "next", cfg=cfg, env={})
    run(amodel_verify, indexed, cfg=cfg, env={})
    run(amodel_cutover, indexed, cfg=cfg)
    (after,) = asyncio.run(astatus(cfg, Database(indexed)))
    assert (after.outdated_model, after.stale) == (fresh, 0)
    assert after.cut_over_to == "hash:hash-v2 (16 dimensions)"


def test_a_halfvec_twin_of_an_index_with_the_default_operator_class_is_built(
    tickets: str,
) -> None:
    """An IVFFlat index made without naming its class has vector's default (L2), and
    its definition names none; halfvec's L2 class is no default, so the twin must name
    it, or its build fails after the whole fill was paid for (helper-22). The plan
    shows the class the twin gets."""
    from embedfill.application import aplan_model

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            "UPDATE app.\"SupportTickets\" SET body = NULL, subject = ' ' WHERE ticket_no IN (5, 6)"
        )
        conn.execute(f"CREATE INDEX tickets_emb_ivf ON {T} USING ivfflat (emb) WITH (lists = 1)")
    plan = run(aplan_model, tickets, "next", vector_type="halfvec")
    (index,) = plan.indexes
    assert index.opclass.endswith("halfvec_l2_ops"), index
    st = run(amodel_start, tickets, "next", vector_type="halfvec", env={})
    assert (st.phase, st.index) == ("ready", "valid"), st
    with psycopg.connect(tickets) as conn:
        (definition,) = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'SupportTickets_emb_next'"
            " AND indexdef LIKE '%ivfflat%'"
        ).fetchone()
    assert "halfvec_l2_ops" in definition and "lists='1'" in definition


def test_a_halfvec_column_fails_a_vector_beyond_its_range_with_the_reason(
    tickets: str, fake_openai: Any
) -> None:
    """A value beyond ±65,504 becomes infinity in half precision: that row fails with a
    sentence naming halfvec's range, its batch's other rows are written (helper-22:
    the server refused the whole batch, then each row, with advice about constraints)."""
    from embedfill import BackfillOptions, abackfill
    from tests.support.fake_openai import HUGE_MARKER

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {T} ALTER COLUMN emb TYPE halfvec(8)")
        conn.execute(f"UPDATE {T} SET body = body || %s WHERE ticket_no = 7", (HUGE_MARKER,))
    cfg = parse_config(
        {
            "providers": {"openai": provider_settings(fake_openai.base_url, 8)},
            "targets": [_raw_target()],
        }
    )
    report = asyncio.run(
        abackfill(
            cfg, Database(tickets), BackfillOptions(), env={"TEST_PLATFORM_KEY": "sk-t-000000000"}
        )
    )
    assert (report.embedded, report.failed) == (44, 1), report
    with psycopg.connect(tickets) as conn:
        (error,) = conn.execute("SELECT message FROM embedfill.failures").fetchone()
    assert "beyond halfvec's ±65,504" in error


def test_a_start_given_up_while_it_waits_for_the_table_makes_no_home(
    indexed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start retries its ALTER TABLE while the app holds the table; meanwhile the
    operator rolls the change back. When the table is free the start makes nothing: the
    home would belong to no change once a finalize had run (helper-22), and the next
    start refused it as existing."""
    import threading

    from embedfill import application
    from embedfill.application import amodel_finalize, amodel_rollback

    monkeypatch.setattr(application, "DDL_TRIES", 30)
    outcome: list[Any] = []
    with psycopg.connect(indexed) as app:
        app.execute(f"LOCK TABLE {T} IN ACCESS SHARE MODE")
        thread = threading.Thread(
            target=lambda: outcome.append(start(indexed, strategy="column")), daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 30
        while status(indexed).phase != "planned":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        run(amodel_rollback, indexed)
    thread.join(60)
    assert outcome and outcome[0].phase == "rolled_back", outcome
    assert "emb_next" not in columns(indexed)
    assert run(amodel_finalize, indexed, yes=True).phase == "finalized"
    st = start(indexed, strategy="column")  # a start after that is not refused
    assert (st.phase, st.index) == ("ready", "valid")


@pytest.mark.parametrize("strategy", ["table", "column"])
def test_a_row_edited_while_its_new_vector_is_asked_for_never_gets_the_old_texts(
    indexed: str, fake_openai: Any, strategy: str
) -> None:
    """The fill's write guard on the new vectors (the md5 of the row's text as rendered
    now, through the side table's subquery on the live row, or on the live row itself):
    the app edits a row while the new model embeds its old text; that vector is never
    stored (looked at when the catch-up asks for the new text's), and the catch-up
    stores the new text's."""
    providers = {
        **_raw_providers(),
        "api": provider_settings(fake_openai.base_url, 16, model="test-embed-2"),
    }
    cfg = parse_config({"providers": providers, "targets": [_raw_target()]})
    old = texts(indexed)[10]
    home = (
        ('app."SupportTickets_emb_api"', "embedfill_row_id", "embedding")
        if strategy == "table"
        else (T, "ticket_no", "emb_api")
    )
    seen: list[Any] = []

    def app_edits_row_10(inputs: list[str]) -> None:
        if old in inputs:
            with psycopg.connect(indexed, autocommit=True) as conn:
                conn.execute(f"UPDATE {T} SET body = 'edited mid-fill' WHERE ticket_no = 10")
        elif any("edited mid-fill" in text for text in inputs):  # the catch-up's request
            seen.append(new_vectors(indexed, *home).get(10))

    fake_openai.on_inputs = app_edits_row_10
    env = {"TEST_PLATFORM_KEY": "sk-platform-0123456789abcdef"}
    asyncio.run(amodel_start(cfg, Database(indexed), "tickets", "api", strategy, env=env))
    fake_openai.on_inputs = None
    assert len(seen) == 1 and seen[0] is None, seen  # the old text's was not written
    got = new_vectors(indexed, *home).get(10)
    assert got is not None
    np.testing.assert_allclose(got, hash_vector(texts(indexed)[10], 16), atol=1e-6)
    assert "edited mid-fill" in texts(indexed)[10]
