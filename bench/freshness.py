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

MODES = ("triggers", "polling")
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


def _changes(url: str, rate: float, seconds: float, rows: int) -> list[tuple[int, float]]:
    """The app: ``rate`` committed single-row edits per second for ``seconds``, each to
    a row not edited before and with a text not seen before; (row id, commit time)."""
    import random

    order = random.Random(7).sample(range(1, rows + 1), int(rate * seconds))
    done: list[tuple[int, float]] = []
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.time()
        for n, row in enumerate(order):
            due = started + n / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            conn.execute(
                sql.SQL("UPDATE {} SET body = body || %s WHERE id = %s").format(
                    sql.Identifier(TABLE)
                ),
                (f" edit {n}", row),
            )
            done.append((row, time.time()))
    return done


def _latencies(url: str, changed: list[tuple[int, float]], timeout: float) -> list[float]:
    """For each change, seconds from its commit to the write of the vector of its new
    text (provenance records the text's md5 and the write's time); waits for them all."""
    from embedfill.db.target_sql import TargetSQL

    tsql = TargetSQL(target_config({"kind": "hash", "dimensions": 8}).targets[0])
    query = sql.SQL(
        "SELECT t.id, extract(epoch FROM p.embedded_at) FROM {table} AS t"
        " JOIN embedfill.provenance AS p ON p.row_key = t.id::text"
        " WHERE t.id = ANY(%s) AND p.text_md5 = {md5} AND t.embedding IS NOT NULL"
    ).format(table=sql.Identifier(TABLE), md5=tsql.text_md5("t"))
    committed = dict(changed)
    deadline = time.monotonic() + timeout
    stored: dict[int, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        while len(stored) < len(committed) and time.monotonic() < deadline:
            left = [i for i in committed if i not in stored]
            stored.update({int(r[0]): float(r[1]) for r in conn.execute(query, (left,))})
            time.sleep(0.2)
    if len(stored) < len(committed):
        raise RuntimeError(f"{len(committed) - len(stored)} changes never got their vector")
    return sorted(stored[i] - committed[i] for i in committed)


def watch_latency(bench: Bench) -> None:
    """Change committed -> its correct vector stored, at 100 changes/s, with the change
    triggers and with polling alone (no DDL); the watch is an `embedfill watch` process,
    the test server answers in 100 ms."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from tests.support.fake_openai import FakeOpenAI

    from bench.fleet import cli_env, config_toml, embedfill
    from bench.run import Row, log, openai_provider

    rows = bench.n(20_000, 5_000)
    rate, seconds = 100.0, bench.n(30, 10)
    log(f"F2. watch latency at {rate:.0f} changes/s for {seconds}s ({rows:,}-row table)")
    tpl = bench.template(rows, 256)
    fake = FakeOpenAI(dims=256, latency=0.1).start()
    results: dict[str, list[float]] = {}
    try:
        provider = openai_provider(fake, dimensions=256)
        for mode in MODES:
            url = bench.fresh(tpl)
            with tempfile.TemporaryDirectory(prefix="embedfill-bench-") as tmp:
                cfg = Path(tmp) / "embedfill.toml"
                cfg.write_text(config_toml(provider))
                env = cli_env(url)
                embedfill(["--config", str(cfg), "backfill"], env, timeout=900)
                if mode == "triggers":
                    embedfill(
                        ["--config", str(cfg), "triggers", "install", "--target", "docs"], env
                    )
                # polling alone finds edited rows by the stale sweep: every second here
                every = ("5", "86400") if mode == "triggers" else ("1", "1")
                logfile = Path(tmp) / "watch.log"
                with logfile.open("wb") as err:
                    proc = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "embedfill",
                            "--config",
                            str(cfg),
                            "watch",
                            "--interval",
                            every[0],
                            "--sweep-interval",
                            every[1],
                        ],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                try:
                    time.sleep(3.0)  # elected, listening, first poll done
                    changed = _changes(url, rate, seconds, rows)
                    results[mode] = _latencies(url, changed, timeout=120)
                finally:
                    proc.terminate()
                    code = proc.wait(60)
                if code != 0:
                    raise RuntimeError(f"watch exited {code}:\n{logfile.read_text()[-2000:]}")
    finally:
        fake.stop()
    bench.raw["watch_latency"] = {
        mode: {
            "p50": statistics.median(v),
            "p95": v[int(len(v) * 0.95) - 1],
            "max": v[-1],
            "changes": len(v),
        }
        for mode, v in results.items()
    }
    for mode, values in results.items():
        p50 = statistics.median(values)
        p95 = values[int(len(values) * 0.95) - 1]
        target = "p95 ≤ 2 s (about a second)" if mode == "triggers" else "info (sweep every 1 s)"
        bench.add(
            Row(
                "F2 watch",
                f"{mode}: change committed → correct vector stored, p50 / p95",
                p50,
                "s",
                "p95",
                p95,
                None,
                target,
                p95 <= 2.0 if mode == "triggers" else None,
                note=f"{len(values):,} changes at {rate:.0f}/s, provider 100 ms",
            )
        )
