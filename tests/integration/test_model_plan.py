"""`embedfill model plan`: what a change of model takes, read-only, and what it refuses."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import psycopg
import pytest

from embedfill import Database
from embedfill.application import aplan_model
from embedfill.config import Config, parse_config
from embedfill.errors import ConfigError, PlanRefused, UsageError
from tests.support.tables import provider_settings

NOWHERE = "http://127.0.0.1:9"  # planning sends nothing
T = 'app."SupportTickets"'


def config(**target: Any) -> Config:
    return parse_config(
        {
            "providers": {
                "openai": provider_settings(NOWHERE, 8),
                "next": {
                    "kind": "hash",
                    "model": "hash-v2",
                    "dimensions": 16,
                    "batch_size": 10,
                    "rpm": 60,
                    "tpm": 6000,
                    "price_per_1m_tokens": 0.02,
                },
                "wide": {"kind": "hash", "model": "hash-wide", "dimensions": 3072},
                "wider": {"kind": "hash", "model": "hash-wider", "dimensions": 4001},
                "same": {**provider_settings(NOWHERE, 8), "max_concurrency": 1},
                "keyed": provider_settings(NOWHERE, 16, model="test-embed-2"),
            },
            "targets": [
                {
                    "name": "tickets",
                    "table": "app.SupportTickets",
                    "id_column": "ticket_no",
                    "text": "{subject}\n\n{body}",
                    "embedding_column": "emb",
                    "tenant_column": "org",
                    "provider": "openai",
                    **target,
                }
            ],
        }
    )


def plan(url: str, to: str = "next", strategy: str = "table", **target: Any) -> Any:
    return asyncio.run(aplan_model(config(**target), Database(url), "tickets", to, strategy))


def relations(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2"
        ).fetchall()


def test_a_plan_counts_rows_tokens_cost_and_time_and_changes_nothing(indexed: str) -> None:
    before = relations(indexed)
    p = plan(indexed)
    assert relations(indexed) == before  # read-only: nothing created
    with psycopg.connect(indexed) as conn:
        texts = [
            f"{s or ''}\n\n{b or ''}"
            for s, b in conn.execute(f"SELECT subject, body FROM {T}").fetchall()
        ]
    embeddable = [t for t in texts if t.strip()]
    tokens = sum(-(-len(t) // 3) for t in embeddable)  # the hash provider counts len/3
    assert (p.rows, p.embeddable_rows) == (60, 58)
    assert (p.tokens, p.tokens_estimated, p.sample_rows) == (tokens, False, 60)
    assert p.requests == math.ceil(58 / 10)
    assert p.cost_usd == round(tokens * 0.02 / 1_000_000, 4)
    # 6,000 tokens and 60 requests a minute: whichever takes longer
    assert p.fill_seconds == round(max(tokens / 6000, p.requests / 60) * 60, 1)
    assert p.fill_bound == ("tpm" if tokens / 6000 >= p.requests / 60 else "rpm")
    assert p.from_model == {
        "provider": "openai",
        "kind": "openai",
        "model": "test-embed",
        "dimensions": 8,
    }
    assert p.to_model == {"provider": "next", "kind": "hash", "model": "hash-v2", "dimensions": 16}
    assert p.home == {"schema": "app", "relation": "SupportTickets_emb_next", "column": "embedding"}
    [index] = p.indexes
    assert index.method == "hnsw" and index.opclass.endswith("vector_cosine_ops")
    assert index.parameters == {"m": "8", "ef_construction": "32"}
    assert index.build_seconds >= 0 and index.bytes > 58 * (8 + 4 * 16)
    assert p.disk_bytes["total"] == p.disk_bytes["vectors"] + p.disk_bytes["indexes"]
    assert [s.step for s in p.steps] == ["create", "fill", "index", "cutover", "finalize"]
    fill = p.steps[1]
    assert "ACCESS SHARE on app.SupportTickets" in fill.locks and fill.blocks_app == "no"
    assert p.warnings == []
    assert 'embedding_table = "SupportTickets_emb_next"' in p.steps[-1].does


def test_the_column_strategy_says_what_it_locks_and_rewrites(indexed: str) -> None:
    p = plan(indexed, strategy="column")
    assert p.home == {"schema": "app", "relation": "SupportTickets", "column": "emb_next"}
    create, fill = p.steps[0], p.steps[1]
    assert "ACCESS EXCLUSIVE on app.SupportTickets" in create.locks
    assert "tickets_emb_hnsw" in fill.does  # every UPDATE inserts into the live graph
    assert p.disk_bytes["vectors"] == 58 * (8 + 4 * 16)
    assert any("rewrites every row" in w for w in p.warnings)


def test_a_plan_twins_an_index_on_a_halfvec_cast_and_names_any_other_expression(
    indexed: str,
) -> None:
    """An index on a cast of the column is the app's too (pgvector's way past HNSW's
    2,000 dimensions): it got no twin, the plan listed none, and the recall gate passed
    as if searches were exact. A cast to halfvec gets its twin, on the new vectors cast
    to halfvec of the new width; another expression is named, with what to do."""
    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute(
            'CREATE INDEX tickets_emb_half ON app."SupportTickets"'
            " USING hnsw ((emb::halfvec(8)) halfvec_cosine_ops) WITH (m = 12)"
        )
        conn.execute(
            'CREATE INDEX tickets_emb_bits ON app."SupportTickets"'
            " USING hnsw ((binary_quantize(emb)::bit(8)) bit_hamming_ops)"
        )
    p = plan(indexed)
    live = {i.live.split(" ON ")[0].rsplit(" ", 1)[1]: i for i in p.indexes}
    assert sorted(live) == ["tickets_emb_half", "tickets_emb_hnsw"]
    half = live["tickets_emb_half"]
    assert (half.method, half.opclass, half.parameters) == (
        "hnsw",
        "public.halfvec_cosine_ops",
        {"m": "12"},
    )
    assert half.expression == "public.halfvec(16)" and live["tickets_emb_hnsw"].expression == ""
    assert half.bytes > 0 and p.disk_bytes["indexes"] == sum(i.bytes for i in p.indexes)
    [said] = [w for w in p.warnings if "tickets_emb" in w]
    assert "tickets_emb_bits" in said and "no twin is built for it" in said
    with pytest.raises(PlanRefused, match="casts the live column to halfvec"):
        plan(indexed, to="wider")


def test_a_plan_says_when_the_new_providers_key_is_not_set_here(indexed: str) -> None:
    """Before, the plan was clean and `model start` then failed every row (the reason
    only in stderr's warnings)."""

    def warnings(env: dict[str, str]) -> list[str]:
        got = asyncio.run(
            aplan_model(config(), Database(indexed), "tickets", "keyed", "column", env=env)
        )
        return [w for w in got.warnings if "rewrites every row" not in w]

    [missing] = warnings({})
    assert missing.startswith("TEST_PLATFORM_KEY, the API key of provider section 'keyed'")
    assert "sk-" not in missing
    assert warnings({"TEST_PLATFORM_KEY": "sk-test-0000"}) == []


def test_a_big_table_is_counted_on_a_sample(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute(
            f"CREATE TABLE {T} (ticket_no bigint PRIMARY KEY, org text, subject text,"
            " body text, emb vector(8))"
        )
        conn.execute(  # every text 30 characters: 10 tokens each for the hash counter
            f"INSERT INTO {T} SELECT g, 'org-a', lpad(g::text, 10, '0'), repeat('x', 18),"
            " NULL FROM generate_series(1, 20000) g"
        )
        conn.execute(f"ANALYZE {T}")
    p = plan(db_url)
    assert p.rows == p.embeddable_rows == 20000
    assert p.tokens_estimated and 0 < p.sample_rows <= 1000
    assert p.tokens == 20000 * 10
    assert p.warnings and "no vector index" in p.warnings[0]


def test_what_cannot_work_is_refused_in_one_sentence(indexed: str) -> None:
    with pytest.raises(PlanRefused, match=r"at most 2,000; set dimensions = 2000 or fewer"):
        plan(indexed, to="wide")
    with pytest.raises(PlanRefused, match="same model, so there is nothing to change"):
        plan(indexed, to="same")
    with pytest.raises(
        ConfigError, match=r"names no provider section .*there are: keyed, next, openai"
    ):
        plan(indexed, to="nope")
    with pytest.raises(UsageError, match="--strategy must be table or column"):
        plan(indexed, strategy="shadow")


def test_without_an_index_a_wide_model_is_planned(tickets: str) -> None:
    p = plan(tickets, to="wide")
    assert p.to_model["dimensions"] == 3072 and p.indexes == []
