"""One process's long-running parts, started and stopped in one order: its worker
(worker.py: the control connection and the lanes its jobs share) and its watchers
(watch.py: one ``WatchHub`` connection for all of them, in place of one of the worker's
writer lanes: 3 connections at the defaults; where ``connection_limit=2`` leaves none,
the worker's table lane). ``embedfill watch`` and ``embedfill serve`` run one each
(``embedfill worker`` is a runtime without watchers).

Stopping goes: the watchers stop queuing; the worker finishes the chunks in flight
(jobs go on elsewhere, or when a worker is back); then the watch jobs end and the
watchers' locks go with their connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg

from . import migration
from .config import Config
from .db.catalog import check_shared_columns, inspect_target
from .db.connect import Database, connect
from .db.schema import ensure_schema
from .db.store import Store
from .engine import Observer
from .errors import EmbedfillError, ModelChanged, RunAborted
from .freshness import model_change
from .providers import Provider
from .watch import TargetWatch, WatchHub, WatchOptions
from .worker import Worker

log = logging.getLogger(__name__)

# a running watch looks this often for a change of model started since (model start, by
# CLI, HTTP or library): its new vectors are watched from then on, without a restart
MODEL_CHANGES_EVERY_S = 5.0


class Runtime:
    """A worker (unless ``worker=False``: workers elsewhere do the chunks) and, with
    ``watch``, a watcher per target (``targets``; None: every configured one)."""

    def __init__(
        self,
        config: Config,
        db: Database,
        *,
        targets: Sequence[str] | None = None,
        watch: WatchOptions | None = None,
        worker: bool = True,
        concurrency: int | None = None,
        env: Mapping[str, str] | None = None,
        observer: Observer | None = None,
        providers: dict[str, Provider] | None = None,
    ) -> None:
        names = list(targets or [t.name for t in config.targets])
        self.config, self.db, self.env, self._watch_opts = config, db, env, watch
        self._observer = observer
        self.worker: Worker | None = None
        # the watchers' connection: their own, in place of one of the worker's writer
        # lanes; the worker's table lane where connection_limit=2 leaves none for them
        share = worker and watch is not None and db.watchers_share_the_table_lane()
        if worker:
            kwargs: dict[str, Any] = {
                "targets": list(targets) if targets else None,
                "concurrency": concurrency,
                "reserved": 1 if watch is not None and not share else 0,
                "keep_lanes": share,  # closed by stop(), after the watchers' jobs end
            }
            if env is not None:
                kwargs["env"] = env
            if observer is not None:
                kwargs["observer"] = observer
            if providers is not None:
                kwargs["providers"] = providers
            self.worker = Worker(config, db, **kwargs)
        # opened by the first watcher that needs it
        self.hub = WatchHub(
            db,
            config.engine.lock_timeout_ms,
            lanes=self.worker.lanes if share and self.worker is not None else None,
        )
        self.watches = (
            [
                TargetWatch(config, db, config.target(n), watch, self.hub, env, observer)
                for n in names
            ]
            if watch is not None
            else []
        )
        self._watch_stop = asyncio.Event()
        self._worker_stop = asyncio.Event()
        self._watch_tasks: list[asyncio.Task[None]] = []
        self._worker_task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._migrations_mark: tuple[int, int] | None = None
        # told of the watchers added while running (a change of model started since)
        self.on_new_watches: Callable[[list[TargetWatch]], None] | None = None

    async def include_changes_of_model(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        """A watcher more for the new vectors of each change of model under way on the
        watched targets (migration.changes_under_way: its derived target), added before
        ``start``; their names.
        The worker takes the derived targets' chunks by itself (Worker.run)."""
        if self._watch_opts is None:
            return []
        names = [w.target.name for w in self.watches if not w.retired]
        mark = await Store(conn).open_migrations_mark()
        config, derived = await migration.changes_under_way(conn, self.config, names)
        self._migrations_mark = mark
        known = set(names)
        derived = [n for n in derived if n not in known]
        if derived:
            self.config = config
            self.watches += [
                TargetWatch(
                    config,
                    self.db,
                    config.target(n),
                    self._watch_opts,
                    self.hub,
                    self.env,
                    self._observer,
                    derived_from=next((live for live in names if n.startswith(f"{live}@")), None),
                )
                for n in derived
            ]
            log.info("watch: keeping the new vectors of %s fresh too", ", ".join(derived))
        return derived

    async def _follow_changes_of_model(self) -> None:
        """A change of model started while this process watches (``model start`` by the
        CLI, the HTTP API or the library, anywhere): its new vectors' watcher starts here
        too, within ``MODEL_CHANGES_EVERY_S``, not at the next restart. (The worker takes
        their chunks by itself: Worker._notice_changes_of_model.) Looked at on the
        watchers' connection, a table the app holds locked given up on after a second."""
        failing = ""  # the last failure logged: each is logged once, not every 5 s
        while not await _stopped(self._watch_stop, MODEL_CHANGES_EVERY_S):
            try:
                gen = await self.hub.open()
                async with self.hub.use(gen) as conn:
                    if await Store(conn).open_migrations_mark() == self._migrations_mark:
                        continue
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT pg_catalog.set_config('lock_timeout', '1s', true)"
                        )
                        before = len(self.watches)
                        await self.include_changes_of_model(conn)
            except (psycopg.Error, OSError, EmbedfillError) as exc:
                if str(exc) != failing:
                    failing = str(exc)
                    log.info("watch: looking for changes of model: %s; looking again later", exc)
                continue
            failing = ""
            added = self.watches[before:]
            if not added:
                continue
            self._watch_tasks += [asyncio.create_task(w.run(self._watch_stop)) for w in added]
            if self.on_new_watches is not None:
                self.on_new_watches(added)

    async def open(self) -> None:
        """Connect the watchers now: a database that cannot be reached (or an
        embedfill schema this role may not bring up to date) is an error at once, not a
        retry loop. (``serve`` does not call it: its watchers retry until the database
        answers.)"""
        await self.hub.open()

    def start(
        self,
        on_worker_end: Callable[[asyncio.Task[None]], None] | None = None,
        *,
        worker: bool = True,
    ) -> None:
        """Start the watchers and (unless ``worker=False``: the database could not be
        reached) the worker, in the caller's context: the tasks inherit its context
        variables, such as the abandon event of a shutdown."""
        self._watch_tasks = [asyncio.create_task(w.run(self._watch_stop)) for w in self.watches]
        if self._watch_opts is not None:
            self._follower = asyncio.create_task(self._follow_changes_of_model())
        if worker:
            self.start_worker(on_worker_end)

    def start_worker(
        self, on_worker_end: Callable[[asyncio.Task[None]], None] | None = None
    ) -> None:
        """Start the worker (once; ``start(worker=False)`` left it for later: the database
        could not be reached then)."""
        if self.worker is None or self._worker_task is not None or self._worker_stop.is_set():
            return
        self._worker_task = asyncio.create_task(self.worker.run(self._worker_stop))
        if on_worker_end is not None:
            self._worker_task.add_done_callback(on_worker_end)

    async def wait(self, stop: asyncio.Event) -> None:
        """Until ``stop``, or until every watcher is over (their jobs were cancelled);
        a watcher's error (a config error: no retry fixes it) or a worker that stopped on
        its own is raised."""
        stopping = asyncio.ensure_future(stop.wait())
        looked: set[asyncio.Task[None]] = set()  # ended tasks already looked at
        try:
            while True:
                # every task as it is now: a watcher may have been added (and may have
                # ended) since the last look
                tasks = [*self._watch_tasks]
                if self._worker_task is not None:
                    tasks.append(self._worker_task)
                for task in tasks:
                    if not task.done() or task in looked:
                        continue
                    looked.add(task)
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    if task is self._worker_task:
                        raise RuntimeError("the worker stopped")
                if self._watch_tasks and all(t.done() for t in self._watch_tasks):
                    return
                pending = {stopping, *(t for t in tasks if not t.done())}
                done, _ = await asyncio.wait(
                    pending, timeout=MODEL_CHANGES_EVERY_S, return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    return
        finally:
            stopping.cancel()

    def raise_failures(self) -> None:
        """RunAborted (exit 3) when a watched target stopped being watched on the way (its
        table no longer fits, its watch job failed), naming each; nothing otherwise."""
        failed = [w for w in self.watches if w.failed is not None]
        if not failed:
            return
        reasons = "; ".join(f"{w.target.name}: {w.failed}" for w in failed)
        raise RunAborted(
            f"{len(failed)} of {len(self.watches)} watched targets stopped being watched "
            f"({reasons.rstrip('.')}); fix what the reason names and start the watch again."
        )

    async def stop(self, *, worker_timeout: float | None = None) -> None:
        """The watchers stop queuing, the worker finishes its chunks in flight (waited
        for at most ``worker_timeout``), then the watch jobs end."""
        self._watch_stop.set()
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        for task in self._watch_tasks:
            task.cancel()
        await asyncio.gather(*self._watch_tasks, return_exceptions=True)
        self._worker_stop.set()
        if self._worker_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait([self._worker_task], timeout=worker_timeout)
        for w in self.watches:
            await w.close()
        await self.hub.close()
        if self.worker is not None and self.worker.keep_lanes:
            await self.worker.lanes.close()  # the watchers' connection too


async def startup_checks(
    config: Config,
    db: Database,
    targets: Sequence[str] | None = None,
    *,
    allow_model_change: bool = False,
) -> None:
    """What `watch`, `worker` and `serve --watch` refuse to start with (exit 2): two
    targets on one vector column with different ids, and (unless ``allow_model_change``)
    a target whose column holds vectors of another model than configured now
    (freshness.model_change: they would re-embed the live column silently). A target that
    cannot be inspected now is left to the command's own start-up checks."""
    conn = await connect(db)
    try:
        await check_shared_columns(conn, config.targets)
        if allow_model_change or not await Store(conn).has_provenance():
            return
        for name in targets or [t.name for t in config.targets]:
            target = config.target(name)
            pconf = config.provider_for(target)
            try:
                info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
            except EmbedfillError:
                continue
            sentence = await model_change(conn, target, pconf, info)
            if sentence is not None:
                raise ModelChanged(sentence)
    finally:
        await conn.close()


async def awatch(
    config: Config,
    db: Database,
    targets: Sequence[str] | None,
    stop: asyncio.Event,
    *,
    opts: WatchOptions | None = None,
    concurrency: int | None = None,
    env: Mapping[str, str] | None = None,
    observer: Observer | None = None,
    worker: bool = True,
    on_watch: Callable[[list[TargetWatch]], None] | None = None,
) -> None:
    """Watch ``targets`` (None: every configured one) until ``stop``, with an in-process
    worker (unless ``worker=False``: workers elsewhere do the chunks)."""
    opts = opts or WatchOptions()
    await startup_checks(config, db, targets, allow_model_change=opts.allow_model_change)
    names = list(targets or [t.name for t in config.targets])
    runtime = Runtime(
        config,
        db,
        targets=names,
        watch=opts,
        worker=worker,
        concurrency=concurrency,
        env=env,
        observer=observer,
    )
    # a change of model under way: its new vectors are kept fresh too (migration.py)
    conn = await connect(db)
    try:
        await ensure_schema(conn)  # its tables exist before they are read
        await runtime.include_changes_of_model(conn)
    finally:
        await conn.close()
    await runtime.open()  # the queue's tables exist before the worker polls them
    if on_watch is not None:
        on_watch(runtime.watches)
        runtime.on_new_watches = on_watch
    runtime.start()
    try:
        await runtime.wait(stop)
    finally:
        stop.set()
        await runtime.stop()
    runtime.raise_failures()


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
