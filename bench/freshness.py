"""Freshness scenarios (issue 9): ``status`` at a million rows, and what provenance costs.

Run by bench/run.py (``status_at_scale``, ``watch_latency``); each takes the Bench.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from bench.common import TABLE, target_config

if TYPE_CHECKING:
    from bench.run import Bench

DIMS = 64  # status reads no vector (IS NULL only): a small one keeps the table small


def _seed(url: str, rows: int, stale: int, missing: int) -> dict[str, Any]:
    """A table of ``rows`` rows with 300-400 character texts, every vector written by
    embedfill (provenance recorded as a backfill records it), then ``stale`` rows edited
    and ``missing`` rows set NULL by "the app"."""
    from embedfill.db.target_sql import TargetSQL
    from embedfill.freshness import ModelIdentity

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, tenant text NOT NULL, body text NOT NULL,"
                " embedding vector({}))"
            ).format(sql.Identifier(TABLE), sql.Literal(DIMS))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT i, 'tenant-' || (i %% 5), repeat(md5(i::text), 10 + i %% 3),"
                " array_fill(0.125::real, ARRAY[{}])::vector FROM generate_series(1, %s) AS i"
            ).format(sql.Identifier(TABLE), sql.Literal(DIMS)),
            (rows,),
        )
    # embedfill's schema, and provenance for every row as a backfill would record it
    from embedfill import Database
    from embedfill.application import aensure_schema

    asyncio.run(aensure_schema(Database(url)))
    config = target_config({"kind": "hash", "model": "bench-hash", "dimensions": DIMS})
    target = config.targets[0]
    model = ModelIdentity("hash", "bench-hash", DIMS)
    tsql = TargetSQL(target)
    with psycopg.connect(url, autocommit=True) as conn:
        oid = conn.execute("SELECT %s::regclass::oid", (TABLE,)).fetchone()
        assert oid is not None
        conn.execute(
            "INSERT INTO embedfill.vector_columns (schema_name, table_name, column_name)"
            " VALUES ('public', %s, 'embedding')",
            (TABLE,),
        )
        conn.execute(
            "INSERT INTO embedfill.models (provider, model, dimensions) VALUES (%s, %s, %s)",
            (model.provider, model.model, model.dimensions),
        )
        started = time.perf_counter()
        conn.execute(
            sql.SQL(
                "INSERT INTO embedfill.provenance"
                " SELECT 1, 1, {md5}, now(), t.id::text FROM {table} AS t"
            ).format(md5=tsql.text_md5("t"), table=sql.Identifier(TABLE))
        )
        recorded = time.perf_counter() - started
        conn.execute(
            sql.SQL("UPDATE {} SET body = body || ' edited' WHERE id %% %s = 1").format(
                sql.Identifier(TABLE)
            ),
            (rows // stale,),
        )
        conn.execute(
            sql.SQL("UPDATE {} SET embedding = NULL WHERE id %% %s = 2").format(
                sql.Identifier(TABLE)
            ),
            (rows // missing,),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TABLE)))
        conn.execute("VACUUM ANALYZE embedfill.provenance")
        size = conn.execute(
            "SELECT pg_total_relation_size('embedfill.provenance'),"
            " pg_relation_size('embedfill.provenance')"
        ).fetchone()
        assert size is not None
    return {"config": config, "record_s": recorded, "bytes": int(size[0]), "heap": int(size[1])}


def status_at_scale(bench: Bench) -> None:
    from bench.run import Row, log
    from embedfill import Database, astatus

    rows = bench.n(1_000_000, 100_000)
    log(f"F1. status at {rows:,} rows: missing, stale, outdated_model, unverified")
    url = bench.fresh_empty("bench_status")
    seeded = _seed(url, rows, stale=rows // 100, missing=rows // 100)
    config = seeded["config"]
    plain = sql.SQL(
        "SELECT tenant, count(*), count(*) FILTER (WHERE embedding IS NULL) FROM {} GROUP BY 1"
    ).format(sql.Identifier(TABLE))
    ours: list[float] = []
    reference: list[float] = []
    result: Any = None
    with psycopg.connect(url) as conn:
        for _ in range(3):  # alternated, so the machine's drift weighs on both alike
            started = time.perf_counter()
            conn.execute(plain).fetchall()
            reference.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = asyncio.run(astatus(config, Database(url)))[0]
            ours.append(time.perf_counter() - started)
    assert result is not None
    ours_s, ref_s = statistics.median(ours), statistics.median(reference)
    per_row = seeded["bytes"] / rows
    bench.raw["status_at_scale"] = {
        "rows": rows,
        "status_s": ours,
        "count_only_s": reference,
        "counts": {
            "missing": result.missing,
            "stale": result.stale,
            "outdated_model": result.outdated_model,
            "unverified": result.unverified,
        },
        "provenance_bytes": seeded["bytes"],
        "provenance_heap_bytes": seeded["heap"],
        "record_all_s": seeded["record_s"],
    }
    bench.add(
        Row(
            "F1 status",
            f"`status` at {rows:,} rows (1% stale, 1% NULL), median of 3",
            ours_s,
            "s",
            "count of NULL rows per tenant (status before provenance)",
            ref_s,
            ours_s / ref_s,
            f"info; 10M rows ≈ {ours_s * 10_000_000 / rows:,.0f} s",
            None,
            note=f"found {result.stale:,} stale, {result.missing:,} missing",
        )
    )
    bench.add(
        Row(
            "F1 status",
            "provenance kept per row (heap + key index)",
            per_row,
            "bytes",
            "—",
            None,
            None,
            f"info; 10M rows ≈ {per_row * 10_000_000 / 2**30:,.1f} GiB",
            None,
        )
    )
