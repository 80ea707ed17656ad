"""A worker: claims chunks of jobs (jobs.py) from procrastinate's queue and embeds them.

Any process with the config and ``DATABASE_URL`` can be one: ``embedfill worker`` (long
running, any machine), ``embedfill backfill`` (works on its own job until it is over),
``serve`` (in-process, unless ``--no-worker``). A worker keeps one engine session per job
(``engine.run.Run`` fed chunk by chunk: one provider client, one rate budget per key, one
de-duplication cache, writer connections kept across chunks) and works on
``[engine] worker_chunks`` chunks at once, so the next chunk's requests overlap the tail
of the last one.

The chunks (``embedfill.chunks``) are the truth; procrastinate's queue only rings
workers ("chunk 7 of job 3 wants doing"), and a ring is a hint, not a claim. A worker
claims the chunk in one guarded UPDATE that takes it only when it is ``todo`` or its
holder is gone, so a chunk runs on one worker at a time, however often it is rung (a
duplicate ring finds it held and is dropped). A holder is gone:

- at once when its process died (``kill -9``, a lost machine once its TCP connection
  drops): each worker holds a session advisory lock while it lives;
- after ``[engine] lease_s`` when it is silent: it moves the heartbeat of its chunks
  every lease/3 seconds (a frozen process, a network partition). One that comes back
  finds its chunk taken (the attempt number fences its writes of the chunk's end).

Every worker rings (``_ring``, about every second): chunks never rung (a new job's, or
released by a gone holder), and chunks rung long ago whose queue entry is no longer
waiting (used up its retries, deleted): none is left without a ring.

A worker listens only to the queues of its own fingerprints (jobs/queue.py): a job whose
spec (jobs/spec.py) differs from this worker's resolution of its target (its config, its
environment) is never rung here. The worker notices such jobs of its targets, logs one
sentence naming the setting, and the job's workers list it with ``refused``. A ring that
reaches it anyway (the target's name means another table here; a job from before specs)
is handed back, and the worker takes no more of that job.

A worker that cannot reach the provider gives its chunk back rather than failing its
rows (``_give_back`` in engine/embed.py), at most ``MAX_CHUNK_ATTEMPTS`` times per chunk.
SIGTERM: stop claiming, finish the chunks in flight, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import procrastinate
import psycopg

from . import jobs, migration
from .config import Config, env_secret
from .context import job_id_var
from .db.connect import Database, connect
from .db.lanes import Lane, Lanes
from .db.store import Store
from .engine import BackfillOptions, Chunk, Hooks, Observer, Run, RunState, WorkerSeat
from .engine.prepare import prepare
from .errors import (
    DatabaseError,
    EmbedfillError,
    NoFreeConnection,
    RunAborted,
    UsageError,
    WriteRefused,
)
from .jobs import queue
from .jobs.spec import JobSpec, fingerprint, vector_settings
from .models import Report
from .providers import Provider, make_provider, needs_key

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 15.0
QUEUE_POLL_S = 0.5  # the queue is looked at this often for rings
RING_EVERY_S = 1.0  # chunks not rung are rung this often (a new job waits at most this)
RING_BATCH = 500
SESSION_CHUNKS = 2  # chunks of one job a worker holds at once: one scanned, one ending
# a ring of a job this worker refuses, handed back, comes round again this much later:
# rarely enough that the workers configured like the job get its chunks first
REFUSED_RING_WAIT_S = 15.0
# a request answered this recently: the provider is reachable from here
REACHABLE_S = 5.0
FULL_RING_WAIT_S = 2.0  # a ring handed back because this worker has its fill of the job

_T = TypeVar("_T")


class GiveBack(Exception):
    """This worker hands the chunk back to the queue: it is rung again ``wait_s`` later."""

    def __init__(self, message: str, wait_s: float = 1.0) -> None:
        super().__init__(message)
        # spread: rings handed back together come round at different moments, so a
        # worker polling out of step with this one gets its share of them
        self.wait_s = wait_s * (0.5 + random.random())


class _RingAgain(procrastinate.BaseRetryStrategy):
    """A ring handed back is rung again after the GiveBack's wait, for as long as it
    takes (the chunk's own attempts, counted at its claim, are what is limited); any
    other error ends the ring (the ringer rings the chunk again if it is still todo)."""

    def get_retry_decision(
        self, *, exception: BaseException, job: procrastinate.jobs.Job
    ) -> procrastinate.RetryDecision | None:
        if not isinstance(exception, GiveBack):
            return None
        return procrastinate.RetryDecision(retry_in={"milliseconds": int(exception.wait_s * 1000)})


class _ControlPool:
    """The job queue's "pool": the worker's control connection, lent to procrastinate one
    user at a time (the control lock), so the queue needs no connection of its own."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        async with self.worker.control() as store:
            yield store.conn


class Refused(Exception):
    """This worker's resolution of a job's target differs from the job's spec."""

    def __init__(self, setting: str, sentence: str) -> None:
        super().__init__(sentence)
        self.setting = setting


@dataclass
class _Session:
    run: Run
    task: asyncio.Task[Report]
    idle_close_s: float  # a watch job's session stays open longer (its kind says)
    inflight: int = 0
    closer: asyncio.TimerHandle | None = None
    done: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)  # a chunk of it ended
    waiting: int = 0  # rings of the job waiting here for a slot: chunks about to come

    async def slot(self, wait_s: float, halts: Sequence[asyncio.Event]) -> bool:
        """Whether a chunk more may be taken within ``wait_s``: at most SESSION_CHUNKS
        at once (one scanned, one ending); False at once when one of ``halts`` is set
        (the worker stops, or pauses: cut off from the provider)."""
        deadline = time.monotonic() + wait_s
        self.waiting += 1
        try:
            while self.inflight >= SESSION_CHUNKS:
                left = deadline - time.monotonic()
                if left <= 0 or any(e.is_set() for e in halts):
                    return False
                self.freed.clear()
                waits = [asyncio.ensure_future(e.wait()) for e in (self.freed, *halts)]
                try:
                    await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            return not any(e.is_set() for e in halts)
        finally:
            self.waiting -= 1


@dataclass
class Worker:
    config: Config
    db: Database
    targets: Sequence[str] | None = None  # None: every configured target
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    observer: Observer = field(default_factory=Observer)
    providers: dict[str, Provider] = field(default_factory=dict)
    concurrency: int | None = None  # chunks at once; None: [engine] worker_chunks
    on_progress: Callable[[int, Report], None] | None = None  # (job, this worker's live report)
    on_job_end: Callable[[int, str], None] | None = None  # (job, final status) it finished
    # connections its process holds besides (a watch's watchers' own: 1), in place of
    # its writer lanes
    reserved: int = 0
    # its lanes stay open when it stops: its process closes them (a watch's watchers
    # that share the table lane, runtime.py, end their jobs on it after the worker)
    keep_lanes: bool = False

    def __post_init__(self) -> None:
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.name = f"{self.host}:{self.pid}:{secrets.token_hex(3)}"
        self.sessions: dict[int, _Session] = {}
        self.chunks_done: Counter[int] = Counter()
        self.finished: set[int] = set()  # jobs this worker finished
        self.refused: dict[int, str] = {}  # jobs this worker refuses: the setting
        self.holding: set[tuple[int, int]] = set()  # (job, chunk) claimed, in hand
        self.starved: NoFreeConnection | None = None  # no free connection for a session
        self.cut_off_until = 0.0  # monotonic: it hands chunks back unclaimed until then
        self.cut_off_times = 0  # chunks handed back in a row for an unreachable provider
        self._pause = asyncio.Event()  # set: stop fetching until cut_off_until
        # set: the queues to listen to changed (a change of model began): restart the
        # queue's worker with them
        self._relisten = asyncio.Event()
        self._migrations_mark: tuple[int, int] = (0, 0)
        self._stopping = asyncio.Event()  # run()'s stop: no chunk more is claimed
        self._lock = asyncio.Lock()  # the sessions dict
        self._opening: dict[int, asyncio.Lock] = {}  # a job's session being opened
        self._control: psycopg.AsyncConnection[Any] | None = None
        self._control_lock = asyncio.Lock()
        # the table connections every session shares (db/lanes.py): with the control
        # connection, 1 + write_concurrency in all, whatever the number of jobs
        engine = self.config.engine
        self.lanes = Lanes(
            self.db,
            write_concurrency=engine.write_concurrency,
            reserved=self.reserved,
            lock_timeout_ms=engine.lock_timeout_ms,
            statement_timeout_s=engine.statement_timeout_s,
        )
        self._own_providers: list[Provider] = []
        self.app: procrastinate.App | None = None
        for name in self.targets or ():
            self.config.target(name)  # an unknown name is a config error now

    @property
    def lease_s(self) -> float:
        return float(self.config.engine.lease_s)

    def mine(self, name: str) -> tuple[dict[str, Any], bool]:
        """This worker's resolution of a target: the settings that decide its vectors
        (jobs/spec.py) and whether it has the provider's platform key."""
        target = self.config.target(name)
        pconf = self.config.provider_for(target)
        has_key = needs_key(pconf) and bool(env_secret(self.env, pconf.api_key_env))
        return vector_settings(target, pconf), has_key

    async def _include_changes_of_model(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """The derived target of each change of model under way on this worker's targets
        (migration.py), so that it takes that fill's chunks too, as it takes a backfill's:
        with its own resolution of the new provider section, which must be in its config
        and match the job's fingerprint. Looked at when the worker starts, and again when
        the changes under way change (``_notice_changes_of_model``). True when it found
        a derived target it did not take before."""
        try:
            mark = await Store(conn).open_migrations_mark()
        except psycopg.errors.UndefinedTable:  # a schema from before changes of model
            return False
        if mark[0] == 0:  # none under way: nothing to look at
            self._migrations_mark = mark
            return False
        names = list(self.targets or [t.name for t in self.config.targets])
        known = {t.name for t in self.config.targets}
        try:
            async with conn.transaction():
                # a table the app holds locked makes this wait a second at most, and the
                # next ring looks again (the mark is kept only once this went through)
                await conn.execute("SELECT pg_catalog.set_config('lock_timeout', '1s', true)")
                config, derived = await migration.changes_under_way(conn, self.config, names)
        except psycopg.errors.LockNotAvailable:
            return False
        self._migrations_mark = mark
        new = [n for n in derived if n not in known]
        # a later change to the same provider section has the same derived name and
        # another home (a side table, then a column): its jobs are judged by the new one
        changed = [n for n in derived if n in known and config.target(n) != self.config.target(n)]
        if new or changed:
            self.config = config
            if self.targets is not None:
                self.targets = list(dict.fromkeys([*self.targets, *new]))
            if changed:
                self.refused.clear()  # judged again, by the settings they have now
            log.info(
                "worker: taking the new vectors' chunks of %s too", ", ".join([*new, *changed])
            )
        return bool(new or changed)

    async def _notice_changes_of_model(self) -> None:
        """A change of model started since this worker looked: its derived target is
        taken too, and the queue's worker restarted to listen to its queue."""
        async with self.control() as store:
            if await store.open_migrations_mark() == self._migrations_mark:
                return
            if await self._include_changes_of_model(store.conn):
                self._relisten.set()

    def queues(self) -> list[str]:
        """The queues of the jobs this worker can do: its targets' at its fingerprints."""
        out: list[str] = []
        for name in self.targets or [t.name for t in self.config.targets]:
            settings, has_key = self.mine(name)
            out += queue.queues_for(name, fingerprint(settings), has_key)
        return out

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; then finish the chunks in flight and return."""
        self._stopping = stop
        self.db.check_connection_limit()
        # the provider clients (the openai SDK's import alone takes a second) and their
        # token counters are ready before the first chunk is claimed, not after
        for name in self.targets or [t.name for t in self.config.targets]:
            provider = self._provider(self.config.target(name).provider)
            await asyncio.to_thread(provider.counter)
        # the first control connection opens here: a database that refuses it (no free
        # connection, a bad URL) is an error now, not a silent retry loop
        first = await connect(self.db)
        try:
            await Store(first).hold_worker_lock(self.name)
            try:
                await self._include_changes_of_model(first)
            except psycopg.Error as exc:  # e.g. a role without SELECT on the changes
                log.warning(
                    "worker %s: cannot look for changes of model (%s); it takes the "
                    "configured targets' jobs only",
                    self.name,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                )
        except BaseException:
            await first.close()
            raise
        alive = asyncio.Event()
        liveness = asyncio.create_task(self._hold_liveness(alive, stop, first))
        try:
            await _first(alive.wait(), stop.wait())
            if stop.is_set():
                return
            self.app = app = self._app()
            # the queue's connection is the control connection, lent one user at a time
            async with app.open_async(pool=cast(Any, _ControlPool(self))):
                ringer = asyncio.create_task(self._ring(app))
                try:
                    await self._work(app, stop)
                finally:
                    ringer.cancel()
                    await asyncio.gather(ringer, return_exceptions=True)
                    await self._close_sessions()
                    if not self.keep_lanes:
                        await self.lanes.close()
        finally:
            liveness.cancel()
            await asyncio.gather(liveness, return_exceptions=True)
            for provider in self._own_providers:
                await provider.aclose()

    def _app(self) -> procrastinate.App:
        app = queue.new_app()
        app.task(
            name=queue.TASK,
            pass_context=True,
            retry=_RingAgain(),
        )(self._chunk_task)
        return app

    async def _work(self, app: procrastinate.App, stop: asyncio.Event) -> None:
        """procrastinate's worker, restarted with backoff when the database goes away."""
        delay = 0.5
        while not stop.is_set():
            run = asyncio.create_task(
                app.run_worker_async(
                    queues=self.queues(),
                    name=self.name,
                    concurrency=self.concurrency or self.config.engine.worker_chunks,
                    wait=True,
                    install_signal_handlers=False,
                    # no LISTEN connection of its own: rings are looked for twice a second
                    listen_notify=False,
                    fetch_job_polling_interval=QUEUE_POLL_S,
                    update_heartbeat_interval=max(0.5, self.lease_s / 3),
                    stalled_worker_timeout=self.lease_s,
                    delete_jobs="successful",
                )
            )
            await _first(run, stop.wait(), self._pause.wait(), self._relisten.wait())
            if not run.done() and self._relisten.is_set() and not stop.is_set():
                # more queues to listen to (a change of model began): the chunks in
                # flight are finished, then the queue's worker starts again at once
                self._relisten.clear()
                run.cancel()
                await asyncio.wait([run], timeout=self.lease_s + 60)
                continue
            if not run.done():  # asked to stop (or pause): finish the chunks in flight
                run.cancel()
                # procrastinate waits for the chunks in flight; seen stuck "cancelling"
                # after they were done, so never wait past a lease and a minute more
                await asyncio.wait([run], timeout=self.lease_s + 60)
                if stop.is_set():
                    return
                # paused: fetching nothing at all, so the chunks this worker handed back
                # go to the others instead of bouncing through it until their last try
                pause = max(0.0, self.cut_off_until - time.monotonic())
                log.warning(
                    "worker %s: the provider is unreachable from here; taking no chunk for %.0fs",
                    self.name,
                    pause,
                )
                await _first(asyncio.sleep(pause), stop.wait())
                self._pause.clear()
                continue
            exc = run.exception() if not run.cancelled() else None
            if exc is None:
                return
            log.warning(
                "worker %s: the queue failed (%s); retrying in %.1fs", self.name, exc, delay
            )
            await _first(asyncio.sleep(delay), stop.wait())
            delay = min(RECONNECT_MAX_S, delay * 2)

    async def _hold_liveness(
        self,
        alive: asyncio.Event,
        stop: asyncio.Event,
        first: psycopg.AsyncConnection[Any] | None = None,
    ) -> None:
        """Hold this worker's session lock on its control connection for as long as the
        process lives; reconnect (and take it again) when the database comes back. The
        sessions' heartbeats borrow the same connection (``control``)."""
        delay = 0.5
        while True:
            conn: psycopg.AsyncConnection[Any] | None = first
            first = None
            try:
                if conn is None:
                    conn = await connect(self.db)
                    await Store(conn).hold_worker_lock(self.name)
                await Store(conn).queue_search_path()  # procrastinate's tables, too
                self._control = conn
                alive.set()
                delay = 0.5
                while True:
                    await asyncio.sleep(max(0.5, self.lease_s / 3))
                    async with self._control_lock:  # the lease of this worker's chunks
                        await Store(conn).heartbeat_chunks(self.name, self.holding)
            except (psycopg.Error, DatabaseError) as exc:
                if not alive.is_set():
                    log.warning("worker %s: cannot reach the database: %s", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
            finally:
                self._control = None
                if conn is not None:
                    await conn.close()

    @contextlib.asynccontextmanager
    async def control(self) -> AsyncIterator[Store]:
        """The control connection, one user at a time."""
        async with self._control_lock:
            conn = self._control
            if conn is None or conn.closed:
                raise DatabaseError("The worker's control connection is down; reconnecting.")
            yield Store(conn)

    async def _ring(self, app: procrastinate.App) -> None:
        """Ring the queue for chunks that need a worker (see the module doc): released
        from holders that are gone, never rung, or whose queue entry was lost."""
        manager = app.job_manager
        stale_s = max(10.0, self.lease_s)  # a ring older than this may have been lost
        next_sweep = time.monotonic() + stale_s
        while True:
            # each step on its own: one that fails (the database away, a job this build
            # cannot read) does not keep the others from their round
            await self._step("ringing", self._ring_chunks())
            await self._step("noticing jobs it refuses", self._notice_refusals())
            await self._step("noticing changes of model", self._notice_changes_of_model())
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + stale_s
                await self._step("ringing lost chunks", self._ring_lost(manager, stale_s))
                await self._step("finishing settled jobs", self._finish_settled())
                await self._step("pruning the queue's workers", self._prune(manager))
            await asyncio.sleep(RING_EVERY_S)

    async def _step(self, what: str, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            log.debug("worker %s: %s failed: %s", self.name, what, exc)

    async def _ring_chunks(self) -> None:
        async with self.control() as store:
            for run_id, seq in await store.release_lost_chunks():
                log.warning("job %s: chunk %d lost its worker; handing it out again", run_id, seq)
            async with store.conn.transaction():  # marked rung and rung: one commit
                chunks = await store.chunks_to_ring(RING_BATCH)
                await queue.ring(store.conn, queue.rings_of(chunks))

    async def _finish_settled(self) -> None:
        """Jobs whose chunks are all settled but that are still running (the worker of
        the last chunk could not finish it then, or died): finished here."""
        async with self.control() as store:
            found = await store.finishable_jobs()
        for state in found:
            with contextlib.suppress(Refused):  # a kind this build does not know
                if not _spec(state).behaviour.open_ended:
                    await self.finish(int(state["id"]))

    async def _prune(self, manager: procrastinate.manager.JobManager) -> None:
        """procrastinate's own bookkeeping of workers that are gone; an entry it hands out
        again is one more ring, which a held chunk ignores."""
        await manager.prune_stalled_workers(self.lease_s)
        for job in await manager.get_stalled_jobs(
            task_name=queue.TASK, seconds_since_heartbeat=self.lease_s
        ):
            with contextlib.suppress(Exception):
                await manager.retry_job(job)

    async def _notice_refusals(self) -> None:
        """Running jobs of this worker's targets that it does not listen to (another
        fingerprint): said once, and listed among the job's workers as refused."""
        names = self.targets or [t.name for t in self.config.targets]
        async with self.control() as store:
            for state in await store.running_jobs_of(list(names)):
                run_id = int(state["id"])
                if run_id in self.refused:
                    continue
                try:
                    spec = _spec(state)
                except Refused as exc:
                    log.error("worker %s: %s", self.name, exc)
                    self.refused[run_id] = exc.setting
                    continue
                settings, has_key = self.mine(spec.target)
                setting = spec.differs(settings, platform_key=has_key)
                if setting is None:
                    continue
                log.error("worker %s: %s", self.name, spec.refusal(setting, settings, run_id))
                self.refused[run_id] = setting
                await store.refuse_job(run_id, self.name, self.host, self.pid, setting)

    async def _ring_lost(self, manager: procrastinate.manager.JobManager, stale_s: float) -> None:
        """Ring again the chunks rung ``stale_s`` ago and still todo whose queue entry is
        not waiting any more (the queue is read only when there are such chunks)."""
        async with self.control() as store:
            if not await store.has_stale_rung(stale_s):
                return
        waiting = await manager.list_jobs_async(task=queue.TASK, status="todo")
        pending = {f"{j.task_kwargs.get('run_id')}:{j.task_kwargs.get('seq')}" for j in waiting}
        async with self.control() as store, store.conn.transaction():
            rings = queue.rings_of(await store.chunks_to_ring(RING_BATCH, stale_s, pending))
            for run_id, seq, _ in rings:
                log.warning("job %s: chunk %d lost its queue entry; queued again", run_id, seq)
            await queue.ring(store.conn, rings)

    # ------------------------------------------------------------------ chunks

    async def _chunk_task(self, context: Any, run_id: int, seq: int) -> None:
        job_id_var.set(run_id)  # this task's log lines (and its session's) name the job
        if run_id in self.refused:  # not claimed: left to workers configured like the job
            raise GiveBack(
                f"this worker refuses job {run_id}: {self.refused[run_id]}", REFUSED_RING_WAIT_S
            )
        if time.monotonic() < self.cut_off_until:  # not claimed: no attempt of the chunk
            raise GiveBack("this worker could not reach the provider a moment ago")
        try:
            session = await self._session(run_id)
        except Refused as exc:
            await self._refuse(run_id, exc)
            raise GiveBack(str(exc), REFUSED_RING_WAIT_S) from exc
        except EmbedfillError as exc:
            if not _ends_the_job(exc):
                self._note_starved(exc)
                raise GiveBack(str(exc)) from exc  # the database, say: another try later
            if await self._home_dropped(run_id):
                await self._retire(run_id, exc)
                return
            # this worker's checks refuse the job (its config or role differs from the
            # creator's): every chunk it took would fail, so the job ends, loudly
            log.error("job %s: this worker cannot work on it: %s", run_id, exc)
            await self._fail(run_id, exc)
            return
        except psycopg.Error as exc:
            raise GiveBack(str(exc)) from exc
        if session is None:  # the job is over, or asked to stop
            try:
                await self._drop(run_id, seq)
            except (psycopg.Error, DatabaseError) as exc:
                raise GiveBack(str(exc)) from exc  # settled on another try
            return
        took = await session.slot(FULL_RING_WAIT_S, (self._stopping, self._pause))
        if self._stopping.is_set() or time.monotonic() < self.cut_off_until:
            # stopping, or cut off while it waited (a chunk went back as the slot freed):
            # not claimed, so no attempt of the chunk is spent
            raise GiveBack(f"this worker takes no chunk of job {run_id} now")
        if not took:
            # a session scans one chunk at a time: a chunk more would wait, claimed,
            # while another worker idles (`worker --concurrency 16` hoarded a job). The
            # ring waits in slot(), unclaimed, for a moment first: handed back at once,
            # every ring was out for seconds when this worker's chunks ended, and it
            # idled (`worker_chunks = 4` ran at a quarter of the speed of 2)
            raise GiveBack(
                f"this worker has {session.inflight} chunks of job {run_id} in hand",
                FULL_RING_WAIT_S,
            )
        session.inflight += 1
        if session.closer is not None:
            session.closer.cancel()
            session.closer = None
        try:
            await self._work_on(session, run_id, seq)
        finally:
            session.inflight -= 1
            session.freed.set()
            if session.inflight == 0:
                loop = asyncio.get_running_loop()
                session.closer = loop.call_later(
                    session.idle_close_s, lambda: asyncio.ensure_future(self._close_if_idle(run_id))
                )

    def _chunks_coming(self, run_id: int) -> bool:
        """Whether a chunk more of the job is about to reach its session: a ring waits
        here for one of the session's chunks to end."""
        session = self.sessions.get(run_id)
        return session is not None and session.waiting > 0

    def _note_starved(self, exc: EmbedfillError) -> None:
        """A server without a free connection for this worker's session: the job goes on
        with the workers that did connect; a backfill working on it alone says why."""
        if isinstance(exc, NoFreeConnection):
            self.starved = exc

    async def _refuse(self, run_id: int, exc: Refused) -> None:
        """Take no more of this job, say why once, and show it in the job's workers."""
        if run_id not in self.refused:
            log.error("worker %s: %s", self.name, exc)
        self.refused[run_id] = exc.setting
        try:
            async with self.control() as store:
                await store.refuse_job(run_id, self.name, self.host, self.pid, exc.setting)
        except (psycopg.Error, DatabaseError) as why:
            log.warning("job %s: could not record the refusal: %s", run_id, why)

    async def _work_on(self, session: _Session, run_id: int, seq: int) -> None:
        try:
            async with self.control() as store:
                claim = await store.claim_chunk(run_id, seq, self.name, self.lease_s)
        except (psycopg.Error, DatabaseError) as exc:
            raise GiveBack(str(exc)) from exc
        if claim is None:
            return  # done, cancelled, or a live worker holds it: this ring is spent
        self.holding.add((run_id, seq))
        try:
            await self._work_on_claimed(session, run_id, seq, claim)
        finally:
            self.holding.discard((run_id, seq))

    async def _work_on_claimed(
        self,
        session: _Session,
        run_id: int,
        seq: int,
        claim: tuple[Any, Any, int, list[str] | None, bool],
    ) -> None:
        lo, hi, attempt, keys, more = claim
        chunk = Chunk(seq=seq, lo=lo, hi=hi, attempt=attempt, keys=keys, more=more)
        try:
            await session.run.submit(chunk)
        except EmbedfillError as exc:
            if _ends_the_job(exc):
                with contextlib.suppress(psycopg.Error, DatabaseError):
                    async with self.control() as store:  # what it wrote, counted first
                        await session.run.flush(store)
                        # not left `doing` for ever in the job's view
                        await store.finish_chunk(run_id, seq, self.name, attempt, "cancelled")
                if await self._home_dropped(run_id):
                    await self._retire(run_id, exc)
                    return
                await self._fail(run_id, exc)  # every chunk would fail the same way
                return
            self._note_starved(exc)
            await self._release(run_id, seq, attempt)
            raise GiveBack(str(exc)) from exc
        except Exception as exc:  # the database went away mid-chunk, say: another try
            await self._release(run_id, seq, attempt)
            raise GiveBack(f"{type(exc).__name__}: {exc}") from exc
        if chunk.given_up:
            await self._release(run_id, seq, attempt)
            # and take no chunk for a while, longer each time it happens again (a lease,
            # then twice that, ... up to a minute): other workers get them meanwhile, and a
            # chunk is not spent on its last attempt by a worker that keeps failing
            # ... unless the provider answers this worker's other requests (one sent
            # during an outage timed out after it ended): then the chunk simply comes round
            # again (a late timeout paused a lone watch for a lease, edits waited 14 s)
            reachable = time.monotonic() - session.run.client.last_ok < REACHABLE_S
            if time.monotonic() >= self.cut_off_until and not reachable:  # one outage, one
                # pause: chunks that shared a batch go back together
                self.cut_off_times += 1
                pause = min(60.0, self.lease_s * 2 ** (self.cut_off_times - 1))
                self.cut_off_until = time.monotonic() + pause
                self._pause.set()
            raise GiveBack(f"chunk {seq} of job {run_id}: the provider is unreachable from here")
        self.cut_off_times = 0  # the provider answers again
        state = "cancelled" if session.run.stopping else "done"
        async with self.control() as store:
            await session.run.flush(store)
            if not await store.finish_chunk(run_id, seq, self.name, attempt, state):
                return  # handed to another worker meanwhile: it finishes it
            self.chunks_done[run_id] += 1
            if any(await store.open_chunks(run_id)):
                return
        await self.finish(run_id)

    async def _drop(self, run_id: int, seq: int) -> None:
        """A chunk handed out for a job asked to stop (a dead worker's chunk, handed out
        again after the cancel): it is cancelled here, and the job finished if it was the
        last open one. Else the chunk stays `doing` for ever and the job never ends."""
        async with self.control() as store:
            state = await store.run_state(run_id)
            if state is None or state["status"] != "running" or not state["cancel_requested"]:
                return
            claim = await store.claim_chunk(run_id, seq, self.name, self.lease_s)
            if claim is not None:
                await store.finish_chunk(run_id, seq, self.name, claim[2], "cancelled")
            if any(await store.open_chunks(run_id)):
                return
        await self.finish(run_id)

    async def _home_dropped(self, run_id: int) -> bool:
        """Whether a watch job's vectors are gone because a change of model was finalized
        since it started (a cutover's finalize drops the live column, a rollback's the
        new vectors): not a fault of the job. A chunk in flight then met the dropped
        column (its write failed, and the chunk came round again), and this worker
        failed the job before its watcher ended it quietly."""
        try:
            async with self.control() as store:
                state = await store.run_state(run_id)
                if state is None or not _spec(state).behaviour.open_ended:
                    return False
                return await migration.dropped_by_a_finalize(
                    store.conn,
                    str(state["target"]),
                    int(state["table_oid"]),
                    str(state["column_name"]),
                    state["started_at"],
                )
        except (psycopg.Error, DatabaseError, Refused):
            return False

    async def _retire(self, run_id: int, exc: EmbedfillError) -> None:
        """End a watch job whose vectors a finalize dropped (``_home_dropped``) as a
        stopped watch's ends, not failed: its chunks are cancelled. Its watcher, if one
        runs, ends too (it finds the job ended by the finalize); when none runs (the
        watch stopped while a worker held a chunk) nobody else would ever end it."""
        log.info("job %s: its vectors were dropped by a finalize (%s); ending it", run_id, exc)

        async def end(conn: psycopg.AsyncConnection[Any]) -> str | None:
            await Store(conn).cancel_chunks(run_id)
            return await jobs.finish(
                conn, run_id, force=True, end_watch=True, on_end=self._ender(run_id)
            )

        try:
            await self._end(run_id, end)
        except (psycopg.Error, DatabaseError) as why:
            log.warning("job %s: could not end it: %s", run_id, why)

    async def _fail(self, run_id: int, exc: EmbedfillError) -> None:
        """End the job with ``exc`` (see ``_end``)."""
        try:
            await self._end(run_id, lambda conn: jobs.fail(conn, run_id, exc, self._ender(run_id)))
        except (psycopg.Error, DatabaseError) as why:
            log.error("job %s: could not record its failure (%s): %s", run_id, why, exc)

    async def finish(self, run_id: int) -> str | None:
        """Finish the job if it is over: its final status when this call finished it."""
        return await self._end(
            run_id, lambda conn: jobs.finish(conn, run_id, on_end=self._ender(run_id))
        )

    async def _end(
        self,
        run_id: int,
        end: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]],
    ) -> _T:
        """Run a job's end on the control connection; a job whose end rebuilds vector
        indexes (hours, maybe) on a connection of its own, so the control connection
        keeps this worker's other chunks' heartbeats meanwhile."""
        async with self.control() as store:
            state = await store.run_state(run_id)
            if state is None or not (state["parameters"] or {}).get("deferred_indexes"):
                return await end(store.conn)
        conn = await connect(self.db)
        try:
            return await end(conn)
        finally:
            await conn.close()

    def cancel_local(self, run_id: int) -> None:
        session = self.sessions.get(run_id)
        if session is not None:
            session.run.hooks.cancel.set()

    def _ender(self, run_id: int) -> Callable[[str], None]:
        def ended(status: str) -> None:
            self.finished.add(run_id)
            if self.on_job_end is not None:
                self.on_job_end(run_id, status)

        return ended

    def running(self) -> int:
        """Jobs this worker is working on now."""
        return sum(
            1
            for run_id, s in self.sessions.items()
            if run_id not in self.finished and not s.task.done()
        )

    async def _release(self, run_id: int, seq: int, attempt: int) -> None:
        with contextlib.suppress(Exception):
            async with self.control() as store:
                await store.release_chunk(run_id, seq, self.name, attempt)

    # ------------------------------------------------------------------ sessions

    async def _session(self, run_id: int) -> _Session | None:
        # one opening per job at a time; other jobs' sessions open meanwhile (a job
        # whose table the app holds locked waits here, not every job of the worker)
        async with self._opening.setdefault(run_id, asyncio.Lock()):
            async with self._lock:
                session = self.sessions.get(run_id)
                if session is not None and not session.task.done():
                    return session
                ended = self.sessions.pop(run_id, None)
            if ended is not None and not ended.task.cancelled():
                ended.task.exception()  # retrieved: its chunks already went back
            lane = await self.lanes.table()  # every session's reads share it
            async with lane.hold() as conn:
                session = await self._open(lane, conn, run_id)
            if session is not None:
                async with self._lock:
                    self.sessions[run_id] = session
            return session

    async def _open(
        self, lane: Lane, conn: psycopg.AsyncConnection[Any], run_id: int
    ) -> _Session | None:
        state = await Store(conn).run_state(run_id)
        if state is None or state["status"] != "running" or state["cancel_requested"]:
            return None
        spec = _spec(state)
        names = {t.name for t in self.config.targets}
        if spec.target not in names:
            raise Refused(
                "target",
                f"job {run_id}: target {spec.target!r} is not in this worker's config; "
                "leaving its chunks to other workers.",
            )
        params = state["parameters"] or {}
        opts = BackfillOptions(
            target=spec.target,
            batch_size=params.get("batch_size"),
            tenants=tuple(params.get("tenants") or ()),
            actor=state["actor"],
            refresh=spec.behaviour.refresh,
        )
        if not spec.settings:  # nothing says what it writes: not for a worker to guess
            raise Refused(
                "spec",
                f"job {run_id} ({spec.target}) was created before jobs recorded what they "
                f"write; run `embedfill backfill --target {spec.target}` to take it over "
                "with this config, or cancel it.",
            )
        settings, has_key = self.mine(spec.target)
        # compared before the table is looked at: a table that no longer fits fails the
        # job below (every worker would meet it), a worker configured otherwise refuses
        differs = spec.differs(settings, platform_key=has_key)
        if differs is not None:
            raise Refused(differs, spec.refusal(differs, settings, run_id))
        target = self.config.target(spec.target)
        provider = self._provider(target.provider)
        target, pconf, info = await prepare(conn, self.config, opts, provider)
        if (info.oid, target.embedding_column) != (spec.table_oid, spec.column):
            # the same target name in another config, for another table or column: the
            # job is not this worker's (its chunks would be scanned in the wrong table)
            raise Refused(
                "table",
                f"job {run_id}: target {target.name!r} here is another table or column "
                "than the job's; leaving its chunks to other workers.",
            )
        seat = WorkerSeat(
            run_id=run_id,
            name=self.name,
            host=self.host,
            pid=self.pid,
            lease_s=self.lease_s,
            chunks_done=lambda: self.chunks_done[run_id],
            control=self.control,
            chunks_coming=lambda: self._chunks_coming(run_id),
            outlives_provider_faults=spec.behaviour.outlives_provider_faults,
        )
        run = Run(
            RunState(
                db=self.db,
                lane=lane,
                lanes=self.lanes,
                target=target,
                pconf=pconf,
                info=info,
                opts=opts,
                provider=provider,
                engine=self.config.engine,
                hooks=Hooks(on_progress=self._progress_hook(run_id), observer=self.observer),
                env=self.env,
                seat=seat,
            )
        )
        task = asyncio.create_task(run.serve())
        keep = spec.behaviour.idle_close_s
        return _Session(run=run, task=task, idle_close_s=keep)

    def _progress_hook(self, run_id: int) -> Callable[[Report], None] | None:
        hook = self.on_progress
        if hook is None:
            return None
        return lambda report: hook(run_id, report)

    def _provider(self, name: str) -> Provider:
        if name not in self.providers:
            provider = make_provider(self.config.providers[name])
            self.providers[name] = provider
            self._own_providers.append(provider)
        return self.providers[name]

    async def _close_if_idle(self, run_id: int) -> None:
        async with self._lock:
            session = self.sessions.get(run_id)
            if session is None or session.inflight:
                return
            del self.sessions[run_id]
        await _end(session)

    async def _close_sessions(self) -> None:
        async with self._lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            if session.closer is not None:
                session.closer.cancel()
            await _end(session)


def _spec(state: Mapping[str, Any]) -> JobSpec:
    """A job's spec; a job of a kind this build does not know is refused, not a crash."""
    try:
        return JobSpec.from_record(state)
    except ValueError as exc:
        raise Refused(
            "kind", f"job {state.get('id')}: {exc}; leaving it to newer workers."
        ) from exc


def _ends_the_job(exc: EmbedfillError) -> bool:
    """A config error (exit 2), a job stopped after writes, or a table that refuses every
    write (a relation that cannot be updated, a privilege revoked: the session halted on
    it): retrying elsewhere would only hide it. A refused table's chunk used to go back to
    the queue every few seconds, for ever, the backfill never exiting. (A server without
    a free connection for this worker is not one: the workers that did connect finish
    the job.)"""
    return exc.exit_code == 2 or isinstance(exc, (RunAborted, WriteRefused))


async def _end(session: _Session) -> None:
    session.run.close()
    with contextlib.suppress(Exception):
        await session.task


async def _first(*aws: Any) -> None:
    """Wait for the first of these to finish; cancel the others (not tasks given in)."""
    tasks = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t, a in zip(tasks, aws, strict=True):
            if t is not a:
                t.cancel()


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


JobWatch = Callable[[Report], None]


async def work_on_job(
    worker: Worker,
    run_id: int,
    *,
    cancel: asyncio.Event | None = None,
    on_progress: JobWatch | None = None,
    stop: asyncio.Event | None = None,
) -> tuple[Report, dict[str, Any]]:
    """Work on one job until it is over (``embedfill backfill``): this process's worker
    takes the job's chunks beside any other worker; ``cancel`` cancels the job for all
    of them. Returns the job's final report, merged from every worker's, and its row.
    It watches the job on the worker's control connection: no connection of its own."""
    leave = stop or asyncio.Event()  # set: this worker leaves (the job goes on)
    stop = asyncio.Event()
    others = Report(run_id=run_id, target="", dry_run=False)
    live = Report(run_id=run_id, target="", dry_run=False)

    def show(job: int, report: Report) -> None:
        nonlocal live
        if job == run_id and on_progress is not None:
            live = report
            on_progress(jobs.plus(others, live))

    worker.on_progress = show
    ended = asyncio.Event()  # this process finished the job: no need to wait for a poll
    worker.on_job_end = lambda job, _: ended.set() if job == run_id else None
    conn = await connect(worker.db)  # closed before the worker opens its own
    try:
        state = await Store(conn).run_state(run_id)
        if state is None:
            raise UsageError(f"No backfill job has id {run_id}.")
        # the others' part as it is now: the progress shown before this worker's control
        # connection is up already has the job's totals
        others = await jobs.merged_report(Store(conn), run_id, exclude=worker.name)
    finally:
        await conn.close()
    if worker.targets is None:  # `worker --job ID`: that job's queue only, not every target's
        worker.targets = [state["target"]]
    runner = asyncio.create_task(worker.run(stop))
    cancelled = False
    try:
        while not runner.done():
            try:
                async with worker.control() as store:
                    if cancel is not None and cancel.is_set() and not cancelled:
                        worker.cancel_local(run_id)  # this process at once; others soon
                        await jobs.cancel(store.conn, run_id)
                        cancelled = True
                    state = await store.run_state(run_id)
                    settled = not any(await store.open_chunks(run_id))
                    if on_progress is not None:
                        others = await jobs.merged_report(store, run_id, exclude=worker.name)
                        on_progress(jobs.plus(others, live))
            except DatabaseError:
                pass  # the worker is still connecting (or reconnecting): look again soon
            else:
                if state is None or state["status"] != "running":
                    break
                if worker.starved is not None and not worker.chunks_done[run_id]:
                    raise worker.starved  # this process cannot work on it: say why, now
                if settled and await worker.finish(run_id):
                    continue  # this process finished it (its finisher died, or none was)
            if leave.is_set():
                break
            waits = [asyncio.sleep(0.5), leave.wait(), ended.wait()]
            if cancel is not None and not cancelled:
                waits.append(cancel.wait())
            await _first(*waits, runner)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    conn = await connect(worker.db)  # the worker is gone: one connection for the last word
    try:
        final = await jobs.merged_report(Store(conn), run_id)
        state = await Store(conn).run_state(run_id)
    finally:
        await conn.close()
    if on_progress is not None:
        on_progress(final)  # the last word: every row of the job
    assert state is not None
    return final, state
