"""One measurement, in its own process (so peak RSS is its own): prints one JSON line.

python -m bench.worker NAME '{"url": ..., ...}'
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import psycopg
from pgvector.psycopg import register_vector

from bench.common import missing, peak_rss_mb, target_config, timed, unit_vectors
from embedfill import BackfillOptions, Database, abackfill
from embedfill.providers import make_provider


def report_fields(report: Any) -> dict[str, Any]:
    return {
        "embedded": report.embedded,
        "failed": report.failed,
        "requests": report.requests,
        "retries": report.retries,
        "tokens": report.tokens,
        "seconds": report.duration_s,
        "rows_per_s": report.embedded / report.duration_s if report.duration_s else 0.0,
        "deferred_indexes": report.deferred_indexes,
    }


def embedfill_run(a: dict[str, Any]) -> dict[str, Any]:
    """A backfill with the given provider/engine settings (warm provider, timed by the report)."""
    config = target_config(a["provider"], a.get("engine"))
    provider = make_provider(config.providers["p"])
    env = {"BENCH_KEY": "sk-bench-0000000000"}

    async def go() -> Any:
        if a.get("warm"):  # load the local model before the clock starts
            await provider.embed(["warm up the model"], api_key=None)
        opts = BackfillOptions(
            dry_run=a.get("dry_run", False),
            defer_index=a.get("defer_index", False),
            limit=a.get("limit"),
            actor="bench",
        )
        return await abackfill(config, Database(a["url"]), opts, provider=provider, env=env)

    with timed() as t:
        report = asyncio.run(go())
    out = report_fields(report)
    out["wall_s"] = t.seconds
    out["peak_rss_mb"] = peak_rss_mb()
    if not a.get("dry_run"):
        out["missing_after"] = missing(a["url"])
    return out


def raw_sql(a: dict[str, Any]) -> dict[str, Any]:
    """The database's limit: keyset read of (id, text) + one bulk binary UPDATE per batch of
    1000 with precomputed vectors, one connection, no embedfill code. With ``distinct``,
    every row gets its own vector (an HNSW index inserts repeats faster)."""
    pool = unit_vectors(a.get("distinct") or 1000, a["dims"])
    done = 0
    with psycopg.connect(a["url"], autocommit=True) as conn, timed() as t:
        register_vector(conn)
        after = 0
        while True:
            rows = conn.execute(
                "SELECT id, body FROM docs WHERE embedding IS NULL AND id > %s ORDER BY id "
                "LIMIT 1000",
                (after,),
            ).fetchall()
            if not rows:
                break
            ids = [r[0] for r in rows]
            with conn.transaction():
                conn.execute(
                    "UPDATE docs SET embedding = u.v FROM unnest(%s::bigint[], %b::vector[])"
                    " AS u(id, v) WHERE docs.id = u.id AND docs.id BETWEEN %s AND %s",
                    (ids, pool[done % len(pool) :][: len(ids)], ids[0], ids[-1]),
                )
            done += len(ids)
            after = ids[-1]
    return {
        "rows": done,
        "seconds": t.seconds,
        "rows_per_s": done / t.seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def naive(a: dict[str, Any]) -> dict[str, Any]:
    from bench.naive import naive_backfill

    with timed() as t:
        done = naive_backfill(a["url"], a["base_url"], a["model"], "sk-bench-0000000000", a["rows"])
    return {"rows": done, "seconds": t.seconds, "rows_per_s": done / t.seconds}


def raw_encode(a: dict[str, Any]) -> dict[str, Any]:
    """sentence-transformers alone on the same texts, in batches of the same size."""
    from embedfill.providers.local import model_location

    with psycopg.connect(a["url"]) as conn:
        texts = [
            r[0]
            for r in conn.execute(
                "SELECT body FROM docs WHERE embedding IS NULL ORDER BY id LIMIT %s", (a["limit"],)
            )
        ]
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_location("all-MiniLM-L6-v2"), device="cpu")
    model.encode(["warm up"])
    with timed() as t:
        for start in range(0, len(texts), a["batch_size"]):
            model.encode(
                texts[start : start + a["batch_size"]],
                normalize_embeddings=True,
                batch_size=a["batch_size"],
                show_progress_bar=False,
            )
    return {"rows": len(texts), "seconds": t.seconds, "rows_per_s": len(texts) / t.seconds}


MEASUREMENTS = {
    "embedfill": embedfill_run,
    "raw_sql": raw_sql,
    "naive": naive,
    "raw_encode": raw_encode,
}

if __name__ == "__main__":
    started = time.perf_counter()
    result = MEASUREMENTS[sys.argv[1]](json.loads(sys.argv[2]))
    result["process_s"] = time.perf_counter() - started
    print(json.dumps(result, default=str))
