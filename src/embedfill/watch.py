"""Continuous mode: keep targets filled and fresh until stopped (``embedfill watch``,
``serve --watch``).

A watch is a job like a backfill's (jobs.py), done by the same workers (worker.py): on
any number of machines, with the same guards, keys and shared rate budget. What differs
is who adds its chunks. For each watched target one process at a time is the target's
*watcher* (a session advisory lock elects it; any other watch process stands by, and
takes over within ``interval`` when the watcher dies). The watcher keeps one running
watch job per column and queues chunks of row ids into it as it notices them:

- **changes queued by the triggers** (``embedfill triggers install``): the app's INSERT
  or UPDATE of a text column appends the row id to ``embedfill.changes``; the process
  looks at that queue every ``CHANGES_POLL_S`` (one query for all its columns) and the
  watcher drains its column's rows when there are some, and at least every second
  (well under a second from commit to stored vector, without scanning);
- **polling, no DDL**: every ``interval`` seconds, NULL rows (a keyset walk over the ids;
  a partial index ``ON t (id) WHERE embedding IS NULL`` makes it cheap on a big table);
- **a stale sweep** every ``sweep_interval`` seconds, and once when the watcher starts:
  rows whose vector is stale or from another model (freshness.py), so changes made while
  no watcher ran, or without triggers, are found.

The watchers of one process share one connection (``WatchHub``): their elections, the
look at the change queue and their reads, whatever the number of targets; its worker has
its own few (db/lanes.py).

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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import jobs, migration
from .config import Config, ProviderConfig, TargetConfig
from .db import homes
from .db.catalog import TableInfo, inspect_target, poll_index_hint, target_shape
from .db.connect import Database, connect
from .db.lanes import Lane, Lanes
from .db.schema import ensure_schema
from .db.store import Store, watch_key
from .db.target_sql import BLANK, TargetSQL
from .engine import Observer
from .errors import EmbedfillError, ModelChanged, RunAborted
from .errors import first_line as _first_line
from .freshness import ProvenanceIds, model_change, model_identity, provenance_ids
from .jobs.spec import JobSpec
from .keys import KeyResolver

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.05  # after a change is noticed, gather what follows it for this long
BUSY_WAIT_S = 0.05  # while a chunk waits for a free worker, look again this often
DRAIN_EVERY_S = 1.0  # a watcher reads its change queue at least this often
# the hub looks this often at which of its columns have queued changes (one query for
# all): the triggers do not NOTIFY (db/triggers.py), so this is what wakes a watcher
CHANGES_POLL_S = 0.25
_STATEMENT_TIMEOUT = "SELECT pg_catalog.set_config('statement_timeout', %s, false)"
RETRY_MAX_S = 30.0
# failures of a tenant's key: its rows go again as soon as the key is another
KEY_FAILURES = ("AuthFailed", "NoApiKey")


@dataclass(frozen=True)
class WatchOptions:
    interval_s: float = 5.0  # poll for NULL rows this often (and try to lead, standing by)
    sweep_interval_s: float = 300.0  # look for stale and outdated-model rows this often
    actor: str = "watch"
    # start even when the column holds vectors of another model than configured (the
    # sweep then re-embeds them in place): runtime.startup_checks
    allow_model_change: bool = False


# failed rows that came due start the next sweep early, but no sooner than this many
# polls after the last one ended (a minute at the default 5 s poll)
RESWEEP_POLLS = 12


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


class WatchHub:
    """The one connection the watchers of a process share, whatever their number: their
    elections (a session advisory lock per column), the look at the change queue (one
    query for every column, each ``CHANGES_POLL_S``) and their reads and queuing
    transactions, one user at a time (``use``). It is a connection of its own, except
    where ``connection_limit=2`` leaves none (``lanes``): then the worker's table lane
    (db/lanes.py), taken for one watcher's statement or transaction at a time, without
    the lane's statement timeout (a sweep reads a whole big table). The look at the change
    queue wakes the watchers whose columns have queued changes; a NOTIFY wakes those it
    names (``LISTEN``: triggers of an earlier install notify; it is read with the next
    statement). When the connection breaks, every watcher sees its generation end, and
    leads again (or stands by) on the next one."""

    def __init__(
        self, db: Database, lock_timeout_ms: int = 2000, lanes: Lanes | None = None
    ) -> None:
        self.db = db
        # a watcher's read queued behind one table's lock gives way (and tries again)
        # rather than hold the connection every other target's watcher needs (the
        # lanes' own is [engine] lock_timeout_ms too)
        self.lock_timeout_ms = lock_timeout_ms
        self.lanes = lanes
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.generation = 0
        self._lane: Lane | None = None  # the table lane it is, with ``lanes``
        self._lock = asyncio.Lock()  # without: its own connection's users, one at a time
        self._opening = asyncio.Lock()
        self._changed: dict[int, asyncio.Event] = {}
        self._pump: asyncio.Task[None] | None = None

    @property
    def _usable(self) -> bool:
        return self.conn is not None and not self.conn.closed and not self.conn.broken

    async def open(self) -> int:
        """The current generation: the connection opened (again, after it broke)."""
        async with self._opening:
            if not self._usable:
                if self.lanes is not None:
                    lane = await self.lanes.table()
                    async with lane.hold() as conn:
                        await self._prepare(conn)
                    self._lane, self.conn = lane, lane.conn
                else:
                    if self.conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            await self.conn.close()
                    self.conn = None
                    conn = await connect(self.db)
                    try:
                        await conn.execute(
                            "SELECT pg_catalog.set_config('lock_timeout', %s, false)",
                            (f"{self.lock_timeout_ms}ms",),
                        )
                        await self._prepare(conn)
                    except BaseException:
                        await conn.close()
                        raise
                    self.conn = conn
                self.generation += 1
                for event in self._changed.values():
                    event.set()  # what was notified meanwhile is looked at now
            if self._pump is None or self._pump.done():
                self._pump = asyncio.create_task(self._look_at_changes())
            return self.generation

    async def _prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await ensure_schema(conn)  # the queue's tables exist before it is used
        await Store(conn).listen_changes()
        conn.add_notify_handler(lambda note: self._notified(note.payload))

    @contextlib.asynccontextmanager
    async def use(self, generation: int) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The connection, to this user alone, while it is of ``generation`` (the
        watchers' locks are held on it); a lost one is an OperationalError (the watcher
        leads again)."""
        if self.lanes is not None:
            lane = self._lane
            if lane is None or not self._usable or generation != self.generation:
                raise psycopg.OperationalError("the watch connection was lost; connecting again")
            async with lane.hold() as conn:
                if conn is not self.conn or not self._usable:  # broke while waiting
                    raise psycopg.OperationalError(
                        "the watch connection was lost; connecting again"
                    )
                try:
                    await conn.execute(_STATEMENT_TIMEOUT, ("0",))
                    yield conn
                finally:  # the worker's reads and writes have theirs again
                    await self._restore_timeout(conn)
            return
        async with self._lock:
            if not self._usable or generation != self.generation:
                raise psycopg.OperationalError("the watch connection was lost; connecting again")
            assert self.conn is not None
            yield self.conn

    async def _restore_timeout(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The lane's statement timeout back after a watcher's turn; where that fails
        (cancelled, a transaction left aborted), the lane is closed, and opened again
        with its timeouts by the next user, rather than left without one."""
        assert self.lanes is not None
        if conn.closed or conn.broken:
            return
        try:
            await conn.execute(_STATEMENT_TIMEOUT, (self.lanes.statement_timeout,))
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise

    def changes(self, column_id: int) -> asyncio.Event:
        """Set when the column's change queue holds rows (or the connection came back)."""
        return self._changed.setdefault(column_id, asyncio.Event())

    async def _look_at_changes(self) -> None:
        """Every ``CHANGES_POLL_S``, one look at the change queue for every column: the
        connection is taken for that one statement (a worker's reads and writes share
        it), not held while waiting for notifications."""
        failing: str | None = None  # the last failure logged, to log each kind once
        while True:
            await asyncio.sleep(CHANGES_POLL_S)
            if not self._changed or not self._usable:
                continue
            try:
                async with self.use(self.generation) as conn:
                    changed = await Store(conn).changed_columns(list(self._changed))
                failing = None
            except psycopg.Error as exc:  # broken: the watchers open it again
                kind = type(exc).__name__
                if kind != failing:
                    failing = kind
                    log.warning("watch: looking at the change queue failed: %s", _first_line(exc))
                continue
            for column in changed:
                self._changed[column].set()

    def _notified(self, payload: str) -> None:
        try:
            event = self._changed.get(int(payload))
        except ValueError:
            event = None
        if event is not None:
            event.set()
        elif not payload.isdigit():  # not one of ours: look at every column
            for e in self._changed.values():
                e.set()

    async def close(self) -> None:
        """Stop looking; close its own connection (a worker's table lane is the
        worker's to close)."""
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None
        if self.conn is not None and self.lanes is None:
            with contextlib.suppress(psycopg.Error):
                await self.conn.close()
        self.conn, self._lane = None, None


@dataclass
class TargetWatch:
    """The watcher of one target, when this process is elected (see the module doc)."""

    config: Config
    db: Database
    target: TargetConfig
    opts: WatchOptions
    hub: WatchHub | None = None  # shared by the process's watchers; None: its own
    env: Mapping[str, str] | None = None  # where the platform key is (None: os.environ)
    observer: Observer | None = None  # told when the target stops being watched, and why
    job_id: int | None = None
    queued: int = 0  # ids this watcher queued (tests and logs)
    # why this target is no longer watched while the others go on (its table no longer
    # fits, or its watch job failed); the watch exits 3 at its end
    failed: EmbedfillError | None = None
    # the live target whose change of model this watcher's target is the new vectors of
    # (runtime.py); it ends quietly when that change is finalized and its home dropped
    derived_from: str | None = None
    retired: bool = False  # ended without a fault (that change of model is over)
    _over: str | None = None  # why it ends without a fault, found by _step
    _leads: tuple[int, str] | None = field(default=None, repr=False)  # (generation, lock)
    _led: bool = field(default=False, repr=False)  # it has watched: start-up is over

    def __post_init__(self) -> None:
        self._own_hub = self.hub is None
        self._env: Mapping[str, str] = os.environ if self.env is None else self.env
        self._hub = self.hub or WatchHub(self.db, self.config.engine.lock_timeout_ms)
        self._due_since: Any = None  # the server's time of the last look at due failures
        self._oid: int | None = None  # the watched table's, once it is watched
        self._fan_out_failed = False  # logged once
        self._side_told = False  # that a finalize left its side table to it: logged once

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
                await _sleep(stop, self.opts.interval_s)  # stand by: try again later
                continue
            except EmbedfillError as exc:
                if exc.exit_code == 2:  # a config error: no retry fixes it
                    if self.derived_from is not None:  # the new vectors of a change of model
                        if not await self._change_open():
                            # its finalize dropped them (a rollback's), or it ended: this
                            # watcher ends, and nothing is wrong
                            await self._end(
                                None, f"the change of model of {self.derived_from} ended"
                            )
                            return
                        if not self._led:  # `model start` is still making their home
                            log.info(
                                "watch of %s: %s; looking again in %.0fs",
                                self.target.name,
                                exc,
                                wait,
                            )
                            await self._step_down()
                            await _sleep(stop, wait)
                            wait = min(wait * 2, RETRY_MAX_S)
                            continue
                    if not self._led:
                        raise  # at start-up, what can never work is refused
                    next_step = await self._dropped_by_a_change()
                    if next_step is not None:
                        # a cutover's finalize dropped the column, as it was asked to
                        await self._end(
                            None,
                            f"the finalize of its change of model dropped "
                            f"{self.target.embedding_column}. {next_step}",
                        )
                        return
                    # the table changed shape under the watch and no longer fits: this
                    # target says why and stops, the others go on
                    await self._end(exc)
                    return
                log.warning("watch of %s: %s; trying again in %.0fs", self.target.name, exc, wait)
                await self._step_down()
            except _ShapeChanged as exc:
                log.warning("watch of %s: %s; reading it again", self.target.name, exc)
                continue
            except (psycopg.Error, OSError) as exc:
                log.warning("watch of %s: %s; trying again in %.0fs", self.target.name, exc, wait)
                await self._step_down()
            await _sleep(stop, wait)
            wait = min(wait * 2, RETRY_MAX_S)

    async def _lead(self, stop: asyncio.Event) -> bool:
        """Watch the target if this process is elected; True once the watch is over
        (``stop``, or its job cancelled), False when another process watches it."""
        gen = await self._hub.open()
        pconf = self.config.provider_for(self.target)
        async with self._hub.use(gen) as conn:
            # a side table's watcher writes it itself (the mirror): its grants are checked
            side = self.target.side_of is not None
            info = await inspect_target(
                conn, self.target, pconf.expected_dimensions, pconf.label, write=side
            )
            hint = await poll_index_hint(conn, self.target, info)
            if hint is not None:
                log.warning("watch of %s: %s", self.target.name, hint)
            key = watch_key(info.oid, self.target.embedding_column)
            refused: ModelChanged | None = None
            if self._leads != (gen, key):  # taken once per connection (locks nest)
                if not await Store(conn).try_watch_lock(key):
                    return False  # another process watches it: stand by
                self._leads = (gen, key)
                refused = await self._refuse_a_model_change(conn, pconf, info)
            if refused is None:
                ids = await provenance_ids(
                    conn,
                    info,
                    self.target.embedding_column,
                    model_identity(pconf, info),
                    create=True,
                )
                spec = jobs.spec_of("watch", self.target, pconf, info, env=self._env)
                job = await jobs.open_watch_job(
                    conn, spec=spec, target=self.target, info=info, actor=self.opts.actor
                )
        if refused is not None:  # this target stops; the process's others go on
            await self._end(refused)
            return True
        while job is None:  # a backfill runs on the column: its workers fill it first
            log.info("watch of %s: waiting for the running job to end", self.target.name)
            if await _sleep(stop, self.opts.interval_s):
                return True
            async with self._hub.use(gen) as conn:
                job = await jobs.open_watch_job(
                    conn, spec=spec, target=self.target, info=info, actor=self.opts.actor
                )
        self.job_id = job
        self._led = True
        log.info("watching %s as job %s", self.target.name, job)
        async with self._hub.use(gen) as conn:
            state = await Store(conn).run_state(job)
            shape = await target_shape(conn, self.target, info)
        assert state is not None
        queue = JobSpec.from_record(state).queue  # a job resumed rings where it always did
        await self._watch(gen, info, ids, job, queue, stop, shape)
        return True

    async def _refuse_a_model_change(
        self, conn: psycopg.AsyncConnection[Any], pconf: ProviderConfig, info: TableInfo
    ) -> ModelChanged | None:
        """As at start-up (runtime.startup_checks), when this process first leads the
        column: ModelChanged when it now holds vectors of another model than this
        watch's. A standby started while the column had none, taking over from a watch
        configured with another model, re-embedded the leader's vectors in place
        (helper-31). The lock is let go first, so that a watch of the right model takes
        the column. (A leader that reconnects is not asked again: what it wrote since,
        and a backfill it let run, are its own.)"""
        if self._led or self.opts.allow_model_change or self.derived_from is not None:
            return None
        sentence = await model_change(conn, self.target, pconf, info)
        if sentence is None:
            return None
        assert self._leads is not None
        await Store(conn).release_watch_lock(self._leads[1])
        self._leads = None
        return ModelChanged(sentence)

    async def _watch(
        self,
        gen: int,
        info: TableInfo,
        ids: ProvenanceIds,
        job: int,
        queue: str,
        stop: asyncio.Event,
        shape: str | None,
    ) -> None:
        tsql = info.sql(self.target)
        self._oid = info.oid
        missing = _Walk(self.opts.interval_s)
        outdated = _Walk(self.opts.sweep_interval_s)  # due now: changes made while away
        changed = self._hub.changes(ids.column_id)
        blocked = 0.0  # the table was locked by the app: try again after this
        while not stop.is_set():
            changed.clear()  # what is notified from here on wakes the next wait
            try:
                async with self._hub.use(gen) as conn:
                    if await target_shape(conn, self.target, info) != shape:
                        # the app's migration: the target is inspected again (and may no
                        # longer fit), its statements built again
                        raise _ShapeChanged(f"{self.target.table} changed shape")
                    wait = await self._step(conn, tsql, ids, job, queue, missing, outdated)
            except psycopg.errors.LockNotAvailable:
                # the app holds the table (a migration): the other targets go on meanwhile
                blocked = min(max(1.0, blocked * 2), self.opts.interval_s * 4)
                log.info(
                    "watch of %s: the table is locked; looking again in %.0fs",
                    self.target.name,
                    blocked,
                )
                await _sleep(stop, blocked)
                continue
            blocked = 0.0
            if wait is None:
                if self._over is not None:  # see _side_table_left
                    await self._end(None, self._over)
                return
            await _wait_for(changed, stop, wait)

    async def _step(
        self,
        conn: psycopg.AsyncConnection[Any],
        tsql: TargetSQL,
        ids: ProvenanceIds,
        job: int,
        queue: str,
        missing: _Walk,
        outdated: _Walk,
    ) -> float | None:
        """Queue what is to do now; how long to wait for a change before the next step
        (None: the job is over, the target no longer watched)."""
        store = Store(conn)
        state = await store.run_state(job)
        if state is not None and state["status"] == "failed":
            self.failed = RunAborted(
                f"The watch job {job} of {self.target.name} failed: "
                f"{state['error'] or 'see its report'}"
            )
            if self.observer is not None:  # as when its table no longer fits (_end)
                self.observer.target_error(self.target.name, type(self.failed).__name__)
            log.error("watch of %s: %s; the other targets go on", self.target.name, self.failed)
            self.job_id = None
            return None
        if (
            state is not None
            and state["status"] != "running"
            and not state["error"]
            and await self._ended_by_a_finalize(conn, state)
        ):
            self.job_id = None
            return None
        if state is None or state["status"] != "running" or state["cancel_requested"]:
            log.warning(
                "watch of %s: job %s was ended or cancelled; not watching it any more",
                self.target.name,
                job,
            )
            self.job_id = None
            return None
        if self.derived_from is not None:
            self._over = await self._side_table_left(store)
            if self._over is not None:
                return None
        todo, _ = await store.open_chunks(job)
        if todo:
            # every worker is busy: what changes meanwhile gathers in the queue and goes
            # out as one chunk when one is free (one chunk per change would spend the
            # workers on per-chunk costs and fall behind)
            return BUSY_WAIT_S
        inflight = await store.open_chunk_keys(job)
        room = self.chunk_rows * 4 - len(inflight)  # the backlog queued at once
        keys: list[str] = []
        now = time.monotonic()
        if now >= missing.due:
            await self._retry_new_keys(conn, store, job)
            came_due, self._due_since = await store.failures_came_due(job, self._due_since)
            if came_due and outdated.first:
                # failed rows came due (their backoff ended, or their tenant's key
                # changed): the NULL ones are in the next page of missing rows, the
                # edited ones (stale, not NULL) only in a sweep, which waited for its
                # interval (minutes). The next one comes sooner: at most every
                # RESWEEP_POLLS polls (a sweep of a big table reads all of it)
                last_ended = outdated.due - outdated.every_s
                outdated.due = min(
                    outdated.due, max(now, last_ended + RESWEEP_POLLS * self.opts.interval_s)
                )
        for walk, is_outdated in ((missing, False), (outdated, True)):
            if room > 0 and now >= walk.due:
                if walk.first and tsql.live is not None:
                    # a side table: the live table's new rows at each poll, every live
                    # row it lacks (and none it should not have) at each sweep
                    if is_outdated:
                        await homes.secure_side(conn, tsql)
                    await conn.execute(homes.mirror(tsql, newer=not is_outdated))
                rows = await _keys_page(
                    conn,
                    tsql,
                    ids,
                    job,
                    room,
                    outdated=is_outdated,
                    after=walk.after,
                    first=walk.first,
                )
                walk.page_done(rows, room, now)
                keys.extend(r[1] for r in rows)
        # what the triggers queued leaves their queue in the transaction that puts it in
        # chunks: a watcher killed in between loses nothing
        async with conn.transaction():
            if self.derived_from is None and self._oid is not None:
                await self._hold_changes_of_model(conn, store)
            drained = await store.drain_changes(ids.column_id, inflight, self.chunk_rows)
            if drained and tsql.live is not None:  # a side table: the rows' side rows first
                await conn.execute(homes.mirror(tsql, keys=True), {"keys": drained})
            if drained and self._oid is not None:
                await self._fan_out(conn, store, drained)
            keys += drained
            fresh = list(dict.fromkeys(k for k in keys if k not in inflight))
            chunks = await jobs.add_key_chunks(conn, job, queue, fresh, self.chunk_rows)
        if fresh:
            self.queued += len(fresh)
            log.info(
                "watch of %s: %d row(s) queued in %d chunk(s)",
                self.target.name,
                len(fresh),
                chunks,
            )
        more = (not missing.first and room > 0) or (not outdated.first and room > 0)
        next_due = min(missing.due, outdated.due) - time.monotonic()
        # the queue is read at least every DRAIN_EVERY_S, whatever the hub saw
        return 0.2 if more else min(DRAIN_EVERY_S, max(0.0, next_due))

    async def _hold_changes_of_model(
        self, conn: psycopg.AsyncConnection[Any], store: Store
    ) -> None:
        """Before the drain takes queue rows: hold the change of model under way on this
        column (q.HOLD_CHANGES_OF_MODEL), so that a finalize and this drain never wait on
        each other in a cycle. In a savepoint: a role that may not (its fan-out fails
        too, and is logged) drains all the same."""
        assert self._oid is not None
        try:
            async with conn.transaction():
                await store.hold_changes_of_model(self._oid, self.target.embedding_column)
        except psycopg.Error:
            pass  # the fan-out that follows fails the same way, and says so once

    async def _fan_out(
        self, conn: psycopg.AsyncConnection[Any], store: Store, keys: list[str]
    ) -> None:
        """A change of model under way on this column gets the drained keys too (both
        models' vectors follow an edit; a no-op for a column with none). In a savepoint:
        a failure here (a role without SELECT on the changes of model) costs the new
        vectors their quick refresh (their sweep still finds the rows), never the drain."""
        assert self._oid is not None
        try:
            async with conn.transaction():
                await store.fan_out_changes(self._oid, self.target.embedding_column, keys)
        except psycopg.Error as exc:
            if not self._fan_out_failed:
                log.warning(
                    "watch of %s: the changes of model under way on it get its edits at "
                    "their sweep only: %s",
                    self.target.name,
                    _first_line(exc),
                )
            self._fan_out_failed = True

    async def _retry_new_keys(
        self, conn: psycopg.AsyncConnection[Any], store: Store, job: int
    ) -> None:
        """Rows that failed for their tenant's key (none, or rejected) go again at once
        when the tenant's key is another now (stored with `keys set`, or another answer
        from tenant_key_sql), not after their backoff."""
        waiting = await store.key_failures(job, KEY_FAILURES)
        if not waiting:
            return
        pconf = self.config.provider_for(self.target)
        keys = KeyResolver(store, conn, self.target, pconf, True, self._env)
        for tenant, digest in waiting:
            if digest is None:  # not known which key failed (an earlier release's record)
                continue
            if (await keys.resolve(tenant)).digest != digest:
                rows = await store.retry_tenant_now(tenant, job)
                log.info(
                    "watch of %s: tenant %s has another key now; its %d failed row(s) go again",
                    self.target.name,
                    tenant,
                    len(rows),
                )

    async def _end(self, exc: EmbedfillError | None, why: str = "") -> None:
        """Stop watching this target while the process's other targets go on: with
        ``exc``, a fault (its table no longer fits: the watch exits 3 at its end), its job
        ending with the reason; without, an end (``why``: the change of model whose new
        vectors it kept is over), its job ending as a stopped watch's does. Either way
        its lock is given up."""
        if exc is not None:
            self.failed = exc
            if self.observer is not None:  # embedfill_target_error{target, error_class}
                self.observer.target_error(self.target.name, type(exc).__name__)
            log.error(
                "watch of %s: %s; not watching it any more (the other targets go on)",
                self.target.name,
                exc,
            )
        else:
            self.retired = True
            log.info("watch of %s: %s; not watching it any more", self.target.name, why.rstrip("."))
        job, self.job_id = self.job_id, None
        if job is not None:
            # on its own connection when the watch had stepped down meanwhile (a database
            # error first, as row-level security raises): the job stayed `running` for
            # ever, and a backfill was refused because "a watch keeps the column"
            with contextlib.suppress(psycopg.Error, EmbedfillError):
                gen = self._leads[0] if self._leads is not None else await self._hub.open()
                async with self._hub.use(gen) as conn:
                    await Store(conn).cancel_chunks(job)
                    # forced: its chunks may be in a worker's hands, but nobody takes the
                    # target over (its home is gone, or no longer fits)
                    await jobs.finish(conn, job, error=exc, force=True, end_watch=True)
        await self._step_down()

    async def _ended_by_a_finalize(
        self, conn: psycopg.AsyncConnection[Any], state: dict[str, Any]
    ) -> bool:
        """Whether a worker ended this watch's job because a finalize since it started
        dropped its vectors (worker._retire); if so, ``_over`` says why."""
        if not await migration.dropped_by_a_finalize(
            conn,
            self.target.name,
            self._oid or 0,
            self.target.embedding_column,
            state["started_at"],
        ):
            return False
        self._over = f"the finalize of its change of model dropped {self.target.embedding_column}"
        if self.derived_from is None:
            status = await migration.status_of(conn, self.config, self.target)
            self._over += f". {status.next_step}" if status.next_step else ""
        return True

    async def _side_table_left(self, store: Store) -> str | None:
        """Why this watcher of a side table ends, when its change of model was finalized
        after a rollback: the side table is dropped. After a cutover's finalize (the
        live column dropped) it goes on: the side table is what the app searches, fed
        by this watcher's polls (new live rows) and sweeps (edits); it says once what
        the config needs so that a watch started later keeps it too."""
        assert self.derived_from is not None
        row = await store.latest_migration_of(self.derived_from)
        if row is None or row["phase"] != "finalized" or row["strategy"] != "table":
            return None
        provider = row["to_model"].get("provider")
        if migration.derived_name(self.derived_from, provider) != self.target.name:
            return None  # a later change's, by another provider section
        home = dict(row["home"])
        side = f"{home.get('schema')}.{home.get('relation')}"
        active = await store.active_model(self.derived_from)
        if active is None or (active["relation"], active["column_name"]) != (
            home.get("relation"),
            home.get("column"),
        ):
            return f"the change of model of {self.derived_from} was given up and {side} dropped"
        if not self._side_told:
            self._side_told = True
            log.warning(
                "watch of %s: the change of model of %s was finalized: the app searches the "
                "side table %s, which this watch goes on keeping fresh; %s",
                self.target.name,
                self.derived_from,
                side,
                migration.side_table_step(self.derived_from, home, provider),
            )
        return None

    async def _change_open(self) -> bool:
        """Whether the change of model whose new vectors this watcher's target is (the
        live target's, to the same provider section) is under way, not finalized; on
        doubt (the database does not answer), True."""
        try:
            gen = await self._hub.open()
            async with self._hub.use(gen) as conn:
                changes = await Store(conn).open_changes_of_model()
        except (psycopg.Error, EmbedfillError):
            return True
        return any(migration.derived_name(t, p) == self.target.name for t, p in changes)

    async def _dropped_by_a_change(self) -> str | None:
        """What the config needs (``migration.status_of``'s ``next_step``) when this
        target's column is gone because a change of model was finalized after its
        cutover; None otherwise (and on doubt: the database does not answer)."""
        try:
            gen = await self._hub.open()
            async with self._hub.use(gen) as conn:
                status = await migration.status_of(conn, self.config, self.target)
        except (psycopg.Error, EmbedfillError):
            return None
        return status.next_step

    async def close(self) -> None:
        """After the workers finished their chunks in flight: end the watch job (chunks
        not started are cancelled; their rows are found again by the next watch), then
        give up the watcher's lock. A chunk still in another process's hands keeps the
        job running: the watcher that takes over resumes it."""
        job = self.job_id
        try:
            if job is not None and self._leads is not None:
                with contextlib.suppress(psycopg.Error):
                    async with self._hub.use(self._leads[0]) as conn:
                        await Store(conn).cancel_chunks(job)
                        status = await jobs.finish(conn, job, end_watch=True)
                    if status is not None:
                        log.info("watch job %s of %s ended: %s", job, self.target.name, status)
        finally:
            await self._step_down()
            if self._own_hub:
                await self._hub.close()

    async def _step_down(self) -> None:
        """Give up the target's lock (another process may lead it), if this one holds it."""
        leads, self._leads = self._leads, None
        if leads is None:
            return
        with contextlib.suppress(psycopg.Error):
            async with self._hub.use(leads[0]) as conn:
                await Store(conn).release_watch_lock(leads[1])


class _ShapeChanged(Exception):
    """The watched table's columns changed (the app's migration): inspect it again."""


async def _wait_for(changed: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
    """Until a change is notified (then a moment more, to gather what follows it),
    ``seconds`` pass or ``stop`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in (changed, stop)]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if changed.is_set() and not stop.is_set():
        await asyncio.sleep(DEBOUNCE_S)


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Wait, waking at once on ``stop``; True when it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def _keys_page(
    conn: psycopg.AsyncConnection[Any],
    tsql: TargetSQL,
    ids: ProvenanceIds,
    job: int,
    limit: int,
    *,
    outdated: bool,
    after: Any,
    first: bool,
) -> list[Any]:
    """One page of ``(sort key, watch key)`` that a watcher of job ``job`` owes: NULL (or,
    ``outdated``, stale or of another model) with text, not held back by a failure; keys
    after ``after`` unless ``first``."""
    cur = await conn.execute(
        tsql.watch_keys(outdated=outdated, first=first),
        {"after": after, "limit": limit, "run_id": job, "blank": BLANK, **ids.params()},
    )
    return await cur.fetchall()


@dataclass(frozen=True)
class Owed:
    """How to find what a target owes as its watcher would: its SQL and its provenance ids,
    read once (:func:`owed_of`) for a catch-up that queues page after page."""

    tsql: TargetSQL
    ids: ProvenanceIds


async def owed_of(conn: psycopg.AsyncConnection[Any], config: Config, target: TargetConfig) -> Owed:
    """Inspect ``target`` and find (or make) its provenance ids, as its watcher does."""
    pconf = config.provider_for(target)
    info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
    ids = await provenance_ids(
        conn, info, target.embedding_column, model_identity(pconf, info), create=True
    )
    return Owed(info.sql(target), ids)


async def queue_owed(
    conn: psycopg.AsyncConnection[Any],
    owed: Owed,
    job: int,
    queue: str,
    limit: int,
    chunk_rows: int,
) -> set[str]:
    """Queue in watch job ``job`` (a watcher's, on ``queue``) up to ``limit`` rows of the
    target that ``owed`` reads, as its poll and sweep would find them, except those in its
    open chunks; the keys queued. For a catch-up that a running watch is in the way of
    (``model verify``): the watch job does it."""
    inflight = await Store(conn).open_chunk_keys(job)
    keys: list[str] = []
    for outdated in (False, True):
        after: Any = None
        while len(keys) < limit:
            rows = await _keys_page(
                conn,
                owed.tsql,
                owed.ids,
                job,
                limit,
                outdated=outdated,
                after=after,
                first=after is None,
            )
            keys += [k for _, k in rows if k not in inflight]
            if len(rows) < limit:
                break
            after = rows[-1][0]
    fresh = list(dict.fromkeys(keys))[:limit]
    await jobs.add_key_chunks(conn, job, queue, fresh, chunk_rows)
    return set(fresh)
