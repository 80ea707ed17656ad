"""The change triggers' cost to the application: its write throughput on a table without
them and with them (`embedfill triggers install`), on the same terms.

The application is N processes, each with its own connection in autocommit (no client
thread shares a GIL with another), started together at a barrier. Each inserts its own
ids, one row per INSERT statement (``single``) or ``batch`` rows per statement (``INSERT
... SELECT FROM unnest(...)``); or, with ``mode = "update"``, edits the text of its own
existing rows, one single-row UPDATE each. The texts are precomputed before the clock
starts. A failed statement is counted, never retried. With triggers, the queue
(embedfill.changes) must then hold exactly one row per row written.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import psycopg
from psycopg import sql

from bench.common import TABLE, target_config, texts
from embedfill import Database
from embedfill.application import atriggers
from embedfill.db.schema import amigrate

SINGLE = sql.SQL("INSERT INTO {} (id, tenant, body) VALUES (%s, %s, %s)").format(
    sql.Identifier(TABLE)
)
UPDATE = sql.SQL("UPDATE {} SET body = %s WHERE id = %s").format(sql.Identifier(TABLE))
BATCH = sql.SQL(
    "INSERT INTO {} (id, tenant, body) SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[])"
).format(sql.Identifier(TABLE))


def _app(
    url: str,
    first: int,
    rows: list[tuple[str, str]],
    batch: int,
    barrier: Any,
    results: Any,
    update: bool = False,
) -> None:
    """One application process: its rows, from id ``first`` on."""
    failed = 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT 1")
        barrier.wait()
        started = time.perf_counter()
        if update:  # one single-row UPDATE of the text per row (the rows exist)
            for i, (_, body) in enumerate(rows):
                try:
                    conn.execute(UPDATE, (body + " (edited)", first + i), prepare=True)
                except psycopg.Error:
                    failed += 1
        elif batch <= 1:
            for i, (tenant, body) in enumerate(rows):
                try:
                    conn.execute(SINGLE, (first + i, tenant, body), prepare=True)
                except psycopg.Error:
                    failed += 1
        else:
            for start in range(0, len(rows), batch):
                part = rows[start : start + batch]
                ids = list(range(first + start, first + start + len(part)))
                try:
                    conn.execute(
                        BATCH, (ids, [t for t, _ in part], [b for _, b in part]), prepare=True
                    )
                except psycopg.Error:
                    failed += len(part)
        results.put((started, time.perf_counter(), len(rows) - failed, failed))


def app_inserts(a: dict[str, Any]) -> dict[str, Any]:
    """The application's insert rate on ``a["url"]`` (an empty docs table), with the
    target's change triggers installed first when ``a["triggers"]``."""
    url, procs, per, batch = a["url"], a["connections"], a["rows_per_connection"], a["batch"]
    update = a.get("mode") == "update"
    db = Database(url)
    asyncio.run(amigrate(db))  # the same database either way; only the triggers differ
    pool = list(texts(procs * per, seed=11))
    if update:  # the rows the app then edits, in place before the clock (and triggers)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                BATCH,
                (
                    list(range(1, procs * per + 1)),
                    [t for t, _ in pool],
                    [b for _, b in pool],
                ),
            )
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TABLE)))
    if a["triggers"]:
        config = target_config({"kind": "hash", "dimensions": a["dims"]})
        asyncio.run(atriggers(config, db, None, True, False))
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(
            target=_app,
            args=(
                url,
                1 + k * per,
                pool[k * per : (k + 1) * per],
                batch,
                barrier,
                results,
                update,
            ),
        )
        for k in range(procs)
    ]
    for child in children:
        child.start()
    done = [results.get() for _ in children]
    for child in children:
        child.join()
    seconds = max(d[1] for d in done) - min(d[0] for d in done)
    inserted, failed = sum(d[2] for d in done), sum(d[3] for d in done)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM embedfill.changes").fetchone()
        queued = int(row[0]) if row else 0
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))
        ).fetchone()
        stored = int(row[0]) if row else 0
    return {
        "rows": inserted,
        "failed": failed,
        "stored": stored,
        "queued": queued,
        "seconds": seconds,
        "rows_per_s": inserted / seconds,
    }
