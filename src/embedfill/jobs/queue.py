"""The queue that rings workers: procrastinate, through its public API only.

A ring is one procrastinate job of task ``TASK`` with the chunk's ``run_id`` and
``seq``; it is only a hint that the chunk wants a worker (the claim in
``embedfill.chunks`` decides who works on it). Rings are deferred on the caller's
connection, in the caller's transaction (procrastinate's transactional defer), so a
chunk is marked rung exactly when its ring is committed.

A job's rings go to the queue of its target *and fingerprint* (jobs/spec.py), and a
worker listens only to the queues of its own fingerprints: a worker configured with
another model, template or key source never even sees the job's chunks (it takes none,
and bounces none back), while every worker configured like the job's creator does.
A job whose creator had the platform key rings a queue of its own that only workers
with the key listen to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import procrastinate
import psycopg

TASK = "embedfill.chunk"
# procrastinate's functions and tables live in embedfill's schema (migration 5)
_SEARCH_PATH = "SELECT pg_catalog.set_config('search_path', 'embedfill, pg_catalog', true)"


Ring = tuple[int, int, str]  # (run, chunk, queue)


def queue_for(target: str, fingerprint: str | None = None, platform_key: bool = False) -> str:
    """The queue of a job's rings: its target, fingerprint and whether it wants the
    platform key (a job from before fingerprints: the target's alone). A digest of the
    three: procrastinate NOTIFYs on a channel named after the queue, and PostgreSQL
    takes channel names of at most 63 bytes, 23 of which are procrastinate's prefix."""
    if fingerprint is None:
        return f"embedfill:{target}"[:128]
    key = "k" if platform_key else "n"
    digest = hashlib.sha256(f"{target}\0{fingerprint}\0{key}".encode()).hexdigest()
    return f"embedfill:{digest[:24]}"


def queues_for(target: str, fingerprint: str, has_key: bool) -> list[str]:
    """The queues a worker listens to for a target it resolves to ``fingerprint``."""
    queues = [queue_for(target), queue_for(target, fingerprint)]
    if has_key:
        queues.append(queue_for(target, fingerprint, platform_key=True))
    return queues


def new_app() -> procrastinate.App:
    """An App on a connector that is not opened: enough to defer on a given connection;
    a worker opens it on its own pool to fetch."""
    return procrastinate.App(connector=procrastinate.PsycopgConnector())


_DEFERRER = new_app()


def rings_of(chunks: Iterable[tuple[int, int, str, str | None, bool]]) -> list[Ring]:
    """Rings of chunks as the store lists them: (run, chunk, target, fingerprint, key)."""
    return [(run, seq, queue_for(t, fp, key)) for run, seq, t, fp, key in chunks]


async def ring(conn: psycopg.AsyncConnection[Any], rings: Iterable[Ring]) -> None:
    """Defer a ring per (run, chunk, queue) on ``conn``, inside its open transaction."""
    by_queue: dict[str, list[dict[str, Any]]] = {}
    for run_id, seq, queue in rings:
        by_queue.setdefault(queue, []).append({"run_id": run_id, "seq": seq})
    if not by_queue:
        return
    await conn.execute(_SEARCH_PATH)  # SET LOCAL: for this transaction only
    for queue, kwargs in by_queue.items():
        deferrer = _DEFERRER.configure_task(name=TASK, queue=queue, connection=conn)
        await deferrer.batch_defer_async(*kwargs)
