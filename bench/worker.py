"""One measurement, in its own process (so peak RSS is its own): prints one JSON line.

python -m bench.worker NAME '{"url": ..., ...}'
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import psycopg

from bench.common import cpu, missing, peak_rss_mb, target_config, timed, unit_vectors
from bench.triggers import app_inserts
from embedfill import BackfillOptions, Database, abackfill
from embedfill.config import EngineConfig
from embedfill.db import wire
from embedfill.providers import make_provider

ENGINE = EngineConfig()  # embedfill's defaults, which the raw-SQL reference matches
PAGE = ENGINE.write_batch_rows  # rows per read and per write (= scan_page_size)


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

    with timed() as t, cpu(a["url"]) as used:
        report = asyncio.run(go())
    out = report_fields(report) | used.per_1000(report.embedded)
    out["wall_s"] = t.seconds
    out["peak_rss_mb"] = peak_rss_mb()
    if not a.get("dry_run"):
        out["missing_after"] = missing(a["url"])
    return out


def raw_sql(a: dict[str, Any]) -> dict[str, Any]:
    """The database's limit for the same job, on the same terms as embedfill: keyset pages
    of ``(id, body)`` of 1,000 rows; writers each write a page with one ``UPDATE … FROM
    unnest(int8[], vector[])`` bounded by ``id BETWEEN lo AND hi``, its arrays encoded whole
    in PostgreSQL's binary format (``embedfill.db.wire``, as embedfill's writes are).
    Vectors are precomputed; no text is rendered, counted, fingerprinted or sent anywhere.
    With ``distinct``, every row gets its own vector (an HNSW index inserts repeats faster).

    Two shapes. By default one connection reads and ``writers`` others (default:
    embedfill's ``write_concurrency``) write. With ``job``, what a job must do and nothing
    more, on the connections embedfill's worker has for it (db/lanes.py): the pages carry
    the md5 of each row's text (computed by the server, as embedfill's scan does), each
    write upserts the rows' provenance in the same statement (the shape of
    ``embedfill.provenance``), and one connection reads and writes while the others only
    write (2 at the defaults).
    """
    job = bool(a.get("job"))
    if job:
        writers = 1 + Database(a["url"]).writer_lanes(ENGINE.write_concurrency)
    else:
        writers = int(a.get("writers") or ENGINE.write_concurrency)
    pool = np.stack(unit_vectors(a.get("distinct") or PAGE, a["dims"]))
    update = (
        "UPDATE docs SET embedding = u.v FROM unnest(%b::bigint[], %b::vector[]) AS u(id, v)"
        " WHERE docs.id = u.id AND docs.id BETWEEN %s AND %s"
    )
    if job:
        update = (
            "WITH w AS (UPDATE docs SET embedding = u.v"
            " FROM unnest(%b::bigint[], %b::vector[], %s::uuid[]) AS u(id, v, md5)"
            " WHERE docs.id = u.id AND docs.id BETWEEN %s AND %s AND docs.embedding IS NULL"
            " RETURNING docs.id, u.md5)"
            " INSERT INTO ref_provenance AS p (column_id, model_id, text_md5, embedded_at, row_key)"
            " SELECT 1, 1, w.md5, now(), w.id::text FROM w"
            " ON CONFLICT (column_id, row_key) DO UPDATE SET model_id = excluded.model_id,"
            " text_md5 = excluded.text_md5, embedded_at = excluded.embedded_at"
        )
    read = (
        "SELECT id, md5(body)::uuid FROM docs WHERE embedding IS NULL AND id > %s"
        " ORDER BY id LIMIT %s"
        if job
        else "SELECT id, body FROM docs WHERE embedding IS NULL AND id > %s ORDER BY id LIMIT %s"
    )

    async def go() -> tuple[int, float]:
        conns = [await psycopg.AsyncConnection.connect(a["url"], autocommit=True)]
        try:
            if job:
                await conns[0].execute(
                    "CREATE TABLE IF NOT EXISTS ref_provenance (column_id integer NOT NULL,"
                    " model_id integer NOT NULL, text_md5 uuid NOT NULL,"
                    " embedded_at timestamptz NOT NULL, row_key text NOT NULL,"
                    " PRIMARY KEY (column_id, row_key)) WITH (fillfactor = 90)"
                )
            for _ in range(writers - 1 if job else writers):
                conns.append(await psycopg.AsyncConnection.connect(a["url"], autocommit=True))
            writing = conns if job else conns[1:]  # job: the reader's connection writes too
            for conn in writing:
                vector_oid = await wire.register(conn)
            locks = {id(c): asyncio.Lock() for c in conns}
            pages: asyncio.Queue[tuple[list[int], list[Any], int] | None] = asyncio.Queue(writers)
            written = 0

            async def reader() -> None:
                after, done = 0, 0
                while True:
                    async with locks[id(conns[0])]:
                        cur = await conns[0].execute(read, (after, PAGE))
                        rows = await cur.fetchall()
                    if not rows:
                        break
                    ids = [r[0] for r in rows]
                    await pages.put((ids, [r[1] for r in rows], done))
                    done += len(ids)
                    after = ids[-1]
                    if len(ids) < PAGE:
                        break
                for _ in writing:
                    await pages.put(None)

            async def writer(conn: psycopg.AsyncConnection[Any]) -> None:
                nonlocal written
                while (page := await pages.get()) is not None:
                    ids, md5s, offset = page
                    vectors = pool.take(range(offset, offset + len(ids)), axis=0, mode="wrap")
                    arrays = (wire.int8_array(ids), wire.vector_array(vectors, vector_oid))
                    params = (*arrays, md5s, ids[0], ids[-1]) if job else (*arrays, ids[0], ids[-1])
                    async with locks[id(conn)]:
                        await conn.execute(update, params)
                    written += len(ids)

            started = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(reader())
                for conn in writing:
                    tg.create_task(writer(conn))
            return written, time.perf_counter() - started
        finally:
            for conn in conns:
                await conn.close()

    with cpu(a["url"]) as used:
        done, seconds = asyncio.run(go())
    return {
        "rows": done,
        "writers": writers,
        "seconds": seconds,
        "rows_per_s": done / seconds,
        "peak_rss_mb": peak_rss_mb(),
        **used.per_1000(done),
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


def model_fill(a: dict[str, Any]) -> dict[str, Any]:
    """The fill of a change of model (``model start``'s fill step, alone): the live column
    first filled with the old model's vectors into its HNSW graph (untimed), then, timed,
    the new vectors' home made and filled by a job of the derived target: a side table
    (``strategy = "table"``) or a shadow column (``"column"``: every UPDATE also inserts
    into the live HNSW graph). Then the twin index is built, timed, with
    ``max_parallel_maintenance_workers`` 0 and 1. The same steps as
    ``application.amodel_start``, without its plan and catch-up."""
    from embedfill import migration
    from embedfill.db import homes
    from embedfill.db.catalog import inspect_target
    from embedfill.db.connect import connect
    from embedfill.db.schema import ensure_schema
    from embedfill.db.store import Store

    dims, strategy = a["dims"], a["strategy"]
    old = {"kind": "hash", "model": "old-model", "dimensions": dims}
    new = {"kind": "hash", "model": "new-model", "dimensions": dims}
    config = target_config(old, others={"next": new})
    with psycopg.connect(a["url"], autocommit=True) as conn:  # the old vectors, untimed
        conn.execute(
            "UPDATE docs SET embedding = (SELECT array_agg(random())"
            f" FROM generate_series(1, {dims}) WHERE docs.id > 0)::vector"
        )
        conn.execute("VACUUM ANALYZE docs")

    async def fill() -> tuple[int, float, float]:
        db = Database(a["url"])
        conn = await connect(db)
        try:
            live = config.target("docs")
            info = await inspect_target(conn, live, dims, "hash:old-model")
            plan = await migration.plan(conn, config, "docs", "next", strategy)
            home: dict[str, Any] = dict(plan.home)
            home["indexes"] = []  # built below, timed apart
            if strategy == "table":
                home["id_column"] = live.id_column
            derived = migration.derived_target(live, config.providers["next"], strategy, home)
            dconfig = migration.with_target(config, derived)
            await ensure_schema(conn)
            # the change's record, as model start makes it (untimed): a side table is a
            # target's only when a change of its table made it (catalog._check_side_table)
            await Store(conn).insert_migration(
                target=live.name,
                table_oid=info.oid,
                column=live.embedding_column,
                strategy=strategy,
                from_model=plan.from_model,
                to_model=plan.to_model,
                home=home,
                actor="bench",
            )
            started = time.perf_counter()
            if strategy == "table":
                await conn.execute(
                    homes.create_side_table(
                        home["schema"],
                        home["relation"],
                        info.types.id_type,
                        info.types.vector_type,
                        dims,
                    )
                )
                dinfo = await inspect_target(conn, derived, dims, "hash:new-model")
                await conn.execute(homes.mirror(dinfo.sql(derived)))
            else:
                await conn.execute(
                    homes.add_column(info.sql(live), home["column"], info.types.vector_type, dims)
                )
            made = time.perf_counter() - started
            report = await abackfill(
                dconfig, db, BackfillOptions(target=derived.name, actor="bench")
            )
            # the fill on the reference's clock (the report's: from the start of the run,
            # after connecting and checking the table, to its last commit); making the
            # home (the side table and its rows, or the column) is reported apart
            return report.embedded, report.duration_s, made
        finally:
            await conn.close()

    with cpu(a["url"]) as used:
        embedded, seconds, home_s = asyncio.run(fill())
    out: dict[str, Any] = {
        "rows": embedded,
        "seconds": seconds,
        "home_s": home_s,
        "rows_per_s": embedded / seconds,
        **used.per_1000(embedded),
    }
    if a.get("index"):
        relation = "docs_embedding_next" if strategy == "table" else "docs"
        column = "embedding" if strategy == "table" else "embedding_next"
        with psycopg.connect(a["url"], autocommit=True) as conn:
            for workers in (0, 1):
                conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
                t0 = time.perf_counter()
                conn.execute(
                    f'CREATE INDEX twin ON "{relation}" USING hnsw ("{column}" vector_cosine_ops)'
                )
                out[f"index_rows_per_s_{workers}"] = embedded / (time.perf_counter() - t0)
                conn.execute("DROP INDEX twin")
    return out


def app_search(a: dict[str, Any]) -> dict[str, Any]:
    """The app's searches, in a process of their own (so that no other work in the
    measuring process holds them up): the 10 nearest rows of a random query vector,
    ``SELECT id FROM docs ORDER BY embedding <=> $1 LIMIT 10``, prepared, at a steady
    ``rate`` a second (each query starts on its schedule, not after the last ends: a slow
    one does not hide the next), until the file ``stop`` exists. Each query's start (on
    the monotonic clock, which every process shares) and latency go to ``out``."""
    from pathlib import Path

    rng = np.random.default_rng(7)
    stop, out, rate = Path(a["stop"]), Path(a["out"]), float(a["rate"])
    rows: list[tuple[float, float]] = []
    with psycopg.connect(a["url"], autocommit=True, prepare_threshold=0) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        query = "SELECT id FROM docs ORDER BY embedding <=> %s LIMIT 10"
        due = time.monotonic()
        while not stop.exists():
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            vector = rng.standard_normal(a["dims"]).astype(np.float32)
            began = time.monotonic()
            conn.execute(query, (vector,)).fetchall()
            rows.append((began, time.monotonic() - began))
            due += 1.0 / rate
    out.write_text(json.dumps(rows))
    return {"queries": len(rows)}


def model_search(a: dict[str, Any]) -> dict[str, Any]:
    """The app's search latency before and during a change of model (issue: p99 during
    the fill and the cutover at most 1.5 x before). The live column is filled first
    (untimed) into its HNSW graph; the app process (``app_search``) searches it at a
    steady rate for ``before_s``, then on while ``model start`` (side table: create,
    fill from the provider at ``base_url``, the twin HNSW index built concurrently),
    ``model verify`` and ``model cutover`` run here. The latencies of the two windows
    are compared."""
    import tempfile
    from pathlib import Path

    from embedfill import application
    from embedfill.application import amodel_cutover, amodel_start, amodel_verify

    dims = a["dims"]
    old = {"kind": "hash", "model": "old-model", "dimensions": dims}
    config = target_config(old, others={"next": a["new_provider"]})
    env = {"BENCH_KEY": "sk-bench-0000000000"}
    with psycopg.connect(a["url"], autocommit=True) as conn:  # the old vectors, untimed
        conn.execute(
            "UPDATE docs SET embedding = (SELECT array_agg(random())"
            f" FROM generate_series(1, {dims}) WHERE docs.id > 0)::vector"
        )
        conn.execute("VACUUM ANALYZE docs")
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    stop, out = tmp / "stop", tmp / "latencies.json"
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.worker",
            "app_search",
            json.dumps(
                {
                    "url": a["url"],
                    "dims": dims,
                    "rate": a["rate"],
                    "stop": str(stop),
                    "out": str(out),
                }
            ),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(a["before_s"] + 1.0)  # the app's first second (connecting) is left out
        began = time.monotonic()

        marks: dict[str, float] = {}
        build = application._build_twins

        async def timed_build(*args: Any) -> None:  # the steps of `model start`, apart
            marks["fill"] = time.monotonic()
            await build(*args)
            marks["index"] = time.monotonic()

        application._build_twins = timed_build  # type: ignore[assignment]

        async def change() -> Any:
            db = Database(a["url"])
            await amodel_start(config, db, "docs", "next", "table", actor="bench", env=env)
            marks["start"] = time.monotonic()
            verified = await amodel_verify(config, db, "docs", env=env)
            marks["verify"] = time.monotonic()
            await amodel_cutover(config, db, "docs")
            marks["cutover"] = time.monotonic()
            return verified

        verified = asyncio.run(change())
        ended = time.monotonic()
    finally:
        stop.touch()
        app.wait(timeout=60)
    latencies = json.loads(out.read_text())
    before = [ms for t, ms in latencies if began - a["before_s"] <= t < began]
    during = [ms for t, ms in latencies if began <= t < ended]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")

    windows, since = {}, began
    for step, until in marks.items():
        part = [ms for t, ms in latencies if since <= t < until]
        windows[step] = {"s": until - since, "queries": len(part), "p99_ms": pct(part, 99)}
        since = until
    return {
        "rows": verified.rows,
        "change_s": ended - began,
        "steps": windows,
        "queries_before": len(before),
        "queries_during": len(during),
        "p50_before_ms": pct(before, 50),
        "p99_before_ms": pct(before, 99),
        "p50_during_ms": pct(during, 50),
        "p99_during_ms": pct(during, 99),
        "max_during_ms": pct(during, 100),
        "gates_pass": all(g["pass"] for g in (verified.gates or {}).values()),
    }


MEASUREMENTS = {
    "app_inserts": app_inserts,
    "embedfill": embedfill_run,
    "raw_sql": raw_sql,
    "naive": naive,
    "raw_encode": raw_encode,
    "model_fill": model_fill,
    "model_search": model_search,
    "app_search": app_search,
}


def profiled(kind: str, args: dict[str, Any], folder: str) -> dict[str, Any]:
    """The measurement under cProfile, its stats written to FOLDER/KIND-PID.prof (read them
    with ``python -m pstats``). Profiling slows Python code: its figures are for finding
    where the time goes, never for the results table."""
    import cProfile
    import os

    profile = cProfile.Profile()
    try:
        return dict(profile.runcall(MEASUREMENTS[kind], args))
    finally:
        os.makedirs(folder, exist_ok=True)
        profile.dump_stats(os.path.join(folder, f"{kind}-{os.getpid()}.prof"))


if __name__ == "__main__":
    import os

    started = time.perf_counter()
    if os.environ.get("BENCH_PROFILE"):  # a folder: see profiled()
        result = profiled(sys.argv[1], json.loads(sys.argv[2]), os.environ["BENCH_PROFILE"])
    else:
        result = MEASUREMENTS[sys.argv[1]](json.loads(sys.argv[2]))
    result["process_s"] = time.perf_counter() - started
    print(json.dumps(result, default=str))
