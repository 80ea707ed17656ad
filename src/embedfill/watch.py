"""Continuous mode: keep targets filled and fresh until stopped (``embedfill watch``,
``serve --watch``).

A watch is a job like a backfill's (jobs.py), done by the same workers (worker.py): on
any number of machines, with the same guards, keys and shared rate budget. What differs
is who adds its chunks. For each watched target one process at a time is the target's
*watcher* (a session advisory lock elects it; any other watch process stands by, and
takes over within ``interval`` when the watcher dies). The watcher keeps one running
watch job per column and queues chunks of row ids into it as it notices them:

- **changes queued by the triggers** (``embedfill triggers install``): the app's INSERT
  or UPDATE of a text column appends the row id to ``embedfill.changes`` and NOTIFYs
  ``embedfill_changes`` (one transaction at a time per column does); the watcher,
  LISTENing, drains the queue when notified and at least every second (about a second
  from commit to stored vector, without scanning);
- **polling, no DDL**: every ``interval`` seconds, NULL rows (a keyset walk over the ids;
  a partial index ``ON t (id) WHERE embedding IS NULL`` makes it cheap on a big table);
- **a stale sweep** every ``sweep_interval`` seconds, and once when the watcher starts:
  rows whose vector is stale or from another model (freshness.py), so changes made while
  no watcher ran, or without triggers, are found.

Ids already in a chunk not done yet are not queued again; a change to such a row stays in
the queue until that chunk is done (its write skipped the row, whose text had changed),
then goes out in a chunk of its own. Nothing is lost when a watcher is killed: queued
changes stay in their table, NULL and stale rows are found again by the poll and the
sweep, and chunks in flight go back to the queue like any job's (kill -9 repeats at most
those). SIGTERM: the watcher stops queuing, the workers finish the chunks in flight, and
the watch job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import jobs
from .config import Config, TargetConfig
from .db.catalog import TableInfo, inspect_target, poll_index_hint
from .db.connect import Database, connect
from .db.schema import ensure_schema
from .db.store import Store
from .db.target_sql import BLANK, TargetSQL
from .engine import Observer
from .errors import EmbedfillError
from .freshness import ProvenanceIds, model_identity, provenance_ids
from .jobs.spec import JobSpec

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.05  # after a change is noticed, gather what follows it for this long
BUSY_WAIT_S = 0.05  # while a chunk waits for a free worker, look again this often
DRAIN_EVERY_S = 1.0  # the change queue is read at least this often, notified or not
LISTEN_SLICE_S = 0.5  # the longest a watcher waits before it looks at ``stop`` again
RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class WatchOptions:
    interval_s: float = 5.0  # poll for NULL rows this often (and try to lead, standing by)
    sweep_interval_s: float = 300.0  # look for stale and outdated-model rows this often
    actor: str = "watch"


@dataclass
class _Walk:
    """A keyset walk over a target's ids that resumes where the last page ended; a pass
    is over when a page comes back short, and the next one starts at ``due``."""

    every_s: float
    after: Any = None
    first: bool = True
    due: float = 0.0  # monotonic: now, for the first pass

    def page_done(self, rows: list[Any], limit: int, now: float) -> None:
        if len(rows) < limit:
            self.first, self.after, self.due = True, None, now + self.every_s
        else:
            self.first, self.after = False, rows[-1][0]


@dataclass
class TargetWatch:
    """The watcher of one target, when this process is elected (see the module doc)."""

    config: Config
    db: Database
    target: TargetConfig
    opts: WatchOptions
    job_id: int | None = None
    queued: int = 0  # ids this watcher queued (tests and logs)
    _conn: psycopg.AsyncConnection[Any] | None = field(default=None, repr=False)

    @property
    def chunk_rows(self) -> int:
        return self.config.engine.chunk_rows

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by, lead when elected, until ``stop`` (or until the watch job is
        cancelled: the target is no longer watched); a lost connection or a database
        error is retried with a growing wait, a config error ends the watch."""
        wait = 1.0
        while not stop.is_set():
            try:
                if await self._lead(stop):
                    return
                wait = 1.0
            except EmbedfillError as exc:
                if exc.exit_code == 2:  # a config error: no retry fixes it
                    raise
                log.warning("watch of %s: %s; trying again in %.0fs", self.target.name, exc, wait)
                await self._close()
            except (psycopg.Error, OSError) as exc:
                log.warning("watch of %s: %s; trying again in %.0fs", self.target.name, exc, wait)
                await self._close()
            await _sleep(stop, wait if self._conn is None else self.opts.interval_s)
            wait = min(wait * 2, RETRY_MAX_S)

    async def _lead(self, stop: asyncio.Event) -> bool:
        """Watch the target if this process is elected; True once the watch is over
        (``stop``, or its job cancelled), False when another process watches it."""
        if self._conn is None or self._conn.closed:
            self._conn = await connect(self.db)
        conn = self._conn
        await ensure_schema(conn)
        pconf = self.config.provider_for(self.target)
        info = await inspect_target(conn, self.target, pconf.expected_dimensions, pconf.label)
        hint = await poll_index_hint(conn, self.target, info)
        if hint is not None:
            log.warning("watch of %s: %s", self.target.name, hint)
        key = f"embedfill:watch:{info.oid}:{self.target.embedding_column}"
        if not await Store(conn).try_watch_lock(key):
            return False  # another process watches it: stand by
        ids = await provenance_ids(
            conn, info, self.target.embedding_column, model_identity(pconf, info), create=True
        )
        spec = jobs.spec_of(
            "watch",
            self.target,
            pconf,
            info,
            env=os.environ,
        )
        job = await jobs.open_watch_job(
            conn, spec=spec, target=self.target, info=info, actor=self.opts.actor
        )
        while job is None:  # a backfill runs on the column: its workers fill it first
            log.info("watch of %s: waiting for the running job to end", self.target.name)
            if await _sleep(stop, self.opts.interval_s):
                return True
            job = await jobs.open_watch_job(
                conn, spec=spec, target=self.target, info=info, actor=self.opts.actor
            )
        self.job_id = job
        log.info("watching %s as job %s", self.target.name, job)
        state = await Store(conn).run_state(job)
        assert state is not None
        queue = JobSpec.from_record(state).queue  # a job resumed rings where it always did
        await Store(conn).listen_changes()
        await self._watch(conn, info, ids, job, queue, stop)
        return True

    async def _watch(
        self,
        conn: psycopg.AsyncConnection[Any],
        info: TableInfo,
        ids: ProvenanceIds,
        job: int,
        queue: str,
        stop: asyncio.Event,
    ) -> None:
        store = Store(conn)
        tsql = TargetSQL(self.target, info.types)
        missing = _Walk(self.opts.interval_s)
        outdated = _Walk(self.opts.sweep_interval_s)  # due now: changes made while away
        while not stop.is_set():
            state = await store.run_state(job)
            if state is None or state["status"] != "running" or state["cancel_requested"]:
                log.warning(
                    "watch of %s: job %s was ended or cancelled; not watching it any more",
                    self.target.name,
                    job,
                )
                self.job_id = None
                return
            todo, _ = await store.open_chunks(job)
            if todo:
                # every worker is busy: what changes meanwhile gathers in the queue and
                # goes out as one chunk when one is free (one chunk per change would spend
                # the workers on per-chunk costs and fall behind)
                await _sleep(stop, BUSY_WAIT_S)
                continue
            inflight = await store.open_chunk_keys(job)
            room = self.chunk_rows * 4 - len(inflight)  # the backlog queued at once
            keys: list[str] = []
            now = time.monotonic()
            for walk, is_outdated in ((missing, False), (outdated, True)):
                if room > 0 and now >= walk.due:
                    rows = await self._page(conn, tsql, walk, is_outdated, ids, job, room)
                    walk.page_done(rows, room, now)
                    keys.extend(r[1] for r in rows)
            # what the triggers queued leaves their queue in the transaction that puts it
            # in chunks: a watcher killed in between loses nothing
            async with conn.transaction():
                keys += await store.drain_changes(ids.column_id, inflight, self.chunk_rows)
                fresh = list(dict.fromkeys(k for k in keys if k not in inflight))
                chunks = await jobs.add_key_chunks(conn, job, queue, fresh, self.chunk_rows)
            if fresh:
                self.queued += len(fresh)
                log.info(
                    "watch of %s: %d rows queued in %d chunks", self.target.name, len(fresh), chunks
                )
            more = (not missing.first and room > 0) or (not outdated.first and room > 0)
            next_due = min(missing.due, outdated.due) - time.monotonic()
            # the queue is read at least every DRAIN_EVERY_S: a trigger NOTIFYs from one
            # transaction at a time per column (db/triggers.py), so a row can be queued
            # without a notification of its own
            wait = 0.2 if more else min(DRAIN_EVERY_S, max(0.0, next_due))
            await self._wait_for_change(conn, stop, wait)

    async def _page(
        self,
        conn: psycopg.AsyncConnection[Any],
        tsql: TargetSQL,
        walk: _Walk,
        outdated: bool,
        ids: ProvenanceIds,
        job: int,
        limit: int,
    ) -> list[Any]:
        cur = await conn.execute(
            tsql.watch_keys(outdated=outdated, first=walk.first),
            {"after": walk.after, "limit": limit, "run_id": job, "blank": BLANK, **ids.params()},
        )
        return await cur.fetchall()

    async def _wait_for_change(
        self, conn: psycopg.AsyncConnection[Any], stop: asyncio.Event, timeout: float
    ) -> None:
        """Until a change is notified (then a moment more, to gather what follows it),
        ``timeout`` passes or ``stop`` is set."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            heard = False
            async for _ in conn.notifies(timeout=min(left, LISTEN_SLICE_S), stop_after=1):
                heard = True
            if heard:
                await asyncio.sleep(DEBOUNCE_S)
                async for _ in conn.notifies(timeout=0):  # what came meanwhile: one wake
                    pass
                return

    async def close(self) -> None:
        """After the workers finished their chunks in flight: end the watch job (chunks
        not started are cancelled; their rows are found again by the next watch), then
        give up the watcher's lock. A chunk still in another process's hands keeps the
        job running: the watcher that takes over resumes it."""
        conn, job = self._conn, self.job_id
        try:
            if conn is not None and not conn.closed and job is not None:
                with contextlib.suppress(psycopg.Error):
                    store = Store(conn)
                    await store.cancel_chunks(job)
                    status = await jobs.finish(conn, job, end_watch=True)
                    if status is not None:
                        log.info("watch job %s of %s ended: %s", job, self.target.name, status)
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


async def awatch(
    config: Config,
    db: Database,
    targets: Sequence[str] | None,
    stop: asyncio.Event,
    *,
    opts: WatchOptions = WatchOptions(),
    concurrency: int | None = None,
    env: Mapping[str, str] | None = None,
    observer: Observer | None = None,
    worker: bool = True,
    on_watch: Callable[[list[TargetWatch]], None] | None = None,
) -> None:
    """Watch ``targets`` (None: every configured one) until ``stop``, with an in-process
    worker (unless ``worker=False``: workers elsewhere do the chunks)."""
    from .worker import Worker  # the worker imports the application

    names = list(targets or [t.name for t in config.targets])
    conn = await connect(db)
    try:  # the queue's tables exist before the worker polls them
        await ensure_schema(conn)
    finally:
        await conn.close()
    watches = [TargetWatch(config, db, config.target(n), opts) for n in names]
    if on_watch is not None:
        on_watch(watches)
    worker_stop = asyncio.Event()
    worker_task: asyncio.Task[None] | None = None
    if worker:
        kwargs: dict[str, Any] = {"targets": names, "concurrency": concurrency}
        if env is not None:
            kwargs["env"] = env
        if observer is not None:
            kwargs["observer"] = observer
        worker_task = asyncio.create_task(Worker(config, db, **kwargs).run(worker_stop))
    watch_tasks = [asyncio.create_task(w.run(stop)) for w in watches]
    try:
        pending: set[asyncio.Task[None]] = set(watch_tasks)
        if worker_task is not None:
            pending.add(worker_task)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                if task is worker_task and not worker_stop.is_set():
                    raise RuntimeError("the watch's worker stopped")
            if all(t.done() for t in watch_tasks):
                break
    finally:
        stop.set()
        for t in watch_tasks:
            t.cancel()
        await asyncio.gather(*watch_tasks, return_exceptions=True)
        worker_stop.set()  # the chunks in flight are finished first
        if worker_task is not None:
            with contextlib.suppress(Exception):
                await worker_task
        for w in watches:
            await w.close()


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Wait, waking at once on ``stop``; True when it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()
