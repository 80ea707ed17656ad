"""scan -> embed -> write -> audit.

One run of one target is a small pipeline of asyncio tasks:

- the scanner reads NULL rows in id order (keyset pages, no OFFSET), renders and
  measures their text, drops blanks, de-duplicates identical texts per tenant and cuts
  per-tenant batches (planning.TenantBatcher);
- ``max_concurrency`` embedders call the provider under per-key rate limits, retrying
  what retry.decide says, splitting a batch the provider rejects to isolate the bad row,
  and checking every answer (providers/answers.py): a malformed one is retried, a
  vector with NaN or infinity fails its row alone;
- ``write_concurrency`` writers each own a connection and write one batch per short
  transaction with one bulk UPDATE guarded by "still NULL and text unchanged".

Every wait (rate limits, Retry-After, backoff) wakes at once when the run is cancelled;
the batches not yet sent stay NULL for the next run. A problem that would fail every
batch (the provider answers another size than the column's, or rejects even a one-word
request) halts the run: nothing more is sent, what was answered is still written, and
the run ends with the reason (exit 2 if nothing was written, else RunAborted, exit 3).

No transaction is open while a provider call is in flight, and no row or table lock is
taken. Only one real run per table column at a time: a session advisory lock, which the
server releases if the process dies, so ``kill -9`` never leaves the target locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .concurrency import Concurrency
from .config import Config, ProviderConfig, TargetConfig, text_renderer
from .db import indexes, wire
from .db.catalog import TableInfo, count_missing, inspect_target, target_status
from .db.connect import Database, connect
from .db.schema import ensure_schema
from .db.store import Store
from .db.target_sql import TargetSQL
from .errors import (
    AuthFailed,
    BadInput,
    DatabaseError,
    EmbedfillError,
    NoApiKey,
    NonFiniteVector,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    RateLimited,
    RunAborted,
    SchemaMismatch,
    TargetBusy,
    UsageError,
)
from .keys import KeyResolver
from .models import Batch, Failure, Report, Row, TargetStatus, TenantReport
from .planning import BoundedCache, TenantBatcher, estimate_cost, prepare_text, split_batch
from .providers import Provider, Vector, make_provider
from .providers.answers import check_vectors, non_finite
from .providers.base import Embeddings
from .providers.limits import RateSignals, pause_for
from .ratelimit import Rates, SharedLimits
from .retry import RetryPolicy, decide, server_wait
from .secrets import Secret
from .tokens import TokenCounter

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Report], None]
MAX_REPORTED_FAILURES = 1000
PROGRESS_EVERY_S = 1.0
WRITE_ATTEMPTS = 6
# the plain bulk UPDATE gives up this soon on a lock (the app's row, or a table lock),
# before a deadlock could be detected; the SKIP LOCKED write then takes over
FAST_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '100ms'"
LOCKED_RETRY_S = 0.5  # a row found locked by the app is tried again after this, then later
_TRANSIENT_WRITE_ERRORS = (
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)
YIELD_EVERY_ROWS = 32
MAX_CHUNK_ATTEMPTS = 3  # a chunk given back this often fails its rows like a lone run
PROBE_TEXT = "test"  # what any embedding model accepts: see _rejects_everything


@dataclass(frozen=True)
class BackfillOptions:
    target: str | None = None
    dry_run: bool = False
    batch_size: int | None = None
    tenants: Sequence[str] = ()
    limit: int | None = None
    actor: str = "library"
    defer_index: bool = False  # index-aware mode: see db/indexes.py

    def parameters(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "tenants": list(self.tenants),
            "limit": self.limit,
            "defer_index": self.defer_index,
        }


@dataclass
class _Write:
    rows: list[Row]
    vectors: list[Vector]


@dataclass(eq=False)
class Chunk:
    """One chunk of a job as a worker session works on it: the rows with lo < id <= hi
    (None: unbounded) still NULL. ``done`` resolves once every row read from it has been
    written, skipped or failed (or was given back, for a chunk given up)."""

    seq: int
    lo: Any
    hi: Any
    attempt: int = 1
    pending: int = 0  # rows read, not yet written, failed or dropped
    scanned: bool = False
    given_up: bool = False  # handed back to the queue: its rows are dropped, not failed
    started: float = field(default_factory=time.monotonic)
    last_ok: float = field(default_factory=time.monotonic)
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def resolve(self, error: BaseException | None = None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


class _Stopped(Exception):
    """The run is stopping (cancelled or halted): this batch is not sent, its rows stay
    NULL for the next run and are not failures."""


class Observer:
    """Receives what a run does as it happens; the HTTP service turns it into metrics.
    The default does nothing."""

    def request(self, target: str, outcome: str, seconds: float) -> None:
        """One provider call: outcome is the HTTP status ("200", "429", ...) or "error"."""

    def rows(self, target: str, outcome: str, count: int) -> None:
        """Rows embedded, skipped or failed."""

    def tokens(self, target: str, count: int) -> None:
        """Tokens sent in successful requests."""


@dataclass
class _Hooks:
    on_progress: ProgressCallback | None = None
    on_start: Callable[[int], None] | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    observer: Observer = field(default_factory=Observer)


@dataclass(frozen=True)
class WorkerSeat:
    """Where a worker session reports: the job (run) and this worker's row for it."""

    run_id: int
    name: str  # host:pid:suffix, unique per worker process
    host: str
    pid: int
    lease_s: float
    chunks_done: Callable[[], int] = lambda: 0
    # the worker's control connection (it holds the worker's liveness lock), lent for the
    # session's heartbeat: one connection per worker, however many jobs it works on
    control: Callable[[], contextlib.AbstractAsyncContextManager[Store]] | None = None


def lock_key(table_oid: int, column: str) -> str:
    """One run per physical column: keyed by the table's oid, so `docs`, `public.docs` and
    two target names for one table are the same target."""
    return f"embedfill:{table_oid}:{column}"


async def _prepare(
    conn: psycopg.AsyncConnection[Any],
    config: Config,
    opts: BackfillOptions,
    provider: Provider,
) -> tuple[TargetConfig, ProviderConfig, TableInfo]:
    target = config.target(opts.target)
    pconf = config.provider_for(target)
    if opts.batch_size is not None and not 1 <= opts.batch_size <= 2048:
        raise UsageError(f"--batch-size must be between 1 and 2048, not {opts.batch_size}.")
    if opts.limit is not None and opts.limit < 1:
        raise UsageError(f"--limit must be at least 1, not {opts.limit}.")
    if any("\x00" in t for t in opts.tenants):
        raise UsageError("A tenant id cannot contain a NUL character; PostgreSQL text cannot.")
    if opts.tenants and not target.tenant_column:
        raise UsageError(
            f"Target {target.name!r} has no tenant_column, so --tenant cannot select rows."
        )
    info = await inspect_target(
        conn, target, await provider.dimensions(), pconf.label, write=not opts.dry_run
    )
    # load the token counter (a local model's tokenizer) now: a failure is a config error
    # before anything is read or written, and the run itself starts ready
    await asyncio.to_thread(provider.counter)
    return target, pconf, info


async def abackfill(
    config: Config,
    db: Database,
    opts: BackfillOptions,
    *,
    provider: Provider | None = None,
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[int], None] | None = None,
    cancel: asyncio.Event | None = None,
    env: Mapping[str, str] | None = None,
    observer: Observer | None = None,
    exclusive: bool = False,
    enqueue: bool = False,
) -> Report:
    """Backfill (or plan, with ``dry_run``) one target; see ``embedfill.backfill``.

    A real backfill is a job (jobs.py): this creates the target's job, or joins the one
    running (``exclusive``: refuse instead, TargetBusy), and works on it until it is over
    beside any other worker, returning the job's report; ``enqueue`` only creates it and
    returns at once (workers elsewhere do the work)."""
    own_provider = provider is None
    conn = await connect(db)
    try:
        if provider is None:
            provider = make_provider(config.provider_for(config.target(opts.target)))
        target, pconf, info = await _prepare(conn, config, opts, provider)
        await ensure_schema(conn)
        if not opts.dry_run:
            return await _job(
                conn,
                config,
                db,
                opts,
                target,
                info,
                provider,
                hooks=_Hooks(
                    on_progress, on_start, cancel or asyncio.Event(), observer or Observer()
                ),
                env=os.environ if env is None else env,
                exclusive=exclusive,
                enqueue=enqueue,
            )
        run = _Run(
            db=db,
            conn=conn,
            target=target,
            pconf=pconf,
            info=info,
            opts=opts,
            provider=provider,
            engine=config.engine,
            hooks=_Hooks(on_progress, on_start, cancel or asyncio.Event(), observer or Observer()),
            env=os.environ if env is None else env,
        )
        return await run.execute()
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        if own_provider and provider is not None:
            await provider.aclose()
        await conn.close()


async def _job(
    conn: psycopg.AsyncConnection[Any],
    config: Config,
    db: Database,
    opts: BackfillOptions,
    target: TargetConfig,
    info: TableInfo,
    provider: Provider,
    *,
    hooks: _Hooks,
    env: Mapping[str, str],
    exclusive: bool,
    enqueue: bool,
) -> Report:
    from . import jobs
    from .worker import Worker, work_on_job

    if not enqueue:
        db.check_connection_limit()  # before anything is written
    await jobs.take_over_legacy(conn, info, target)
    run_id, joined = await jobs.create_or_join(
        conn,
        target=target,
        info=info,
        parameters=opts.parameters(),
        tenants=list(opts.tenants) or None,
        limit=opts.limit,
        actor=opts.actor,
        chunk_rows=config.engine.chunk_rows,
        exclusive=exclusive,
    )
    if hooks.on_start:
        hooks.on_start(run_id)
    if joined:
        log.info("joining job %s of target %s", run_id, target.name)
    elif opts.defer_index and not hooks.cancel.is_set():
        # (cancelled while starting: dropping now would only buy a rebuild, hours on a
        # large table, for a job asked to stop)
        await jobs.set_aside_indexes(conn, run_id, info, target)
    store = Store(conn)
    if enqueue:
        report = await jobs.merged_report(store, run_id)
    else:
        worker = Worker(
            config,
            db,
            targets=[target.name],
            env=env,
            observer=hooks.observer,
            providers={target.provider: provider},
        )
        report = await work_on_job(
            worker, run_id, cancel=hooks.cancel, on_progress=hooks.on_progress, conn=conn
        )
    report.joined = joined
    if TargetSQL(target, info.types).integer_ids:  # the audit table keeps ids as text
        report.failures = [dataclasses.replace(f, id=int(f.id)) for f in report.failures]
    state = await store.run_state(run_id)
    assert state is not None
    error = jobs.error_of(state)
    if error is not None:
        raise error
    return report


async def adefer_index_plan(config: Config, db: Database, opts: BackfillOptions) -> str | None:
    """What index-aware mode would do to the target, in plain words (None: no vector index)."""
    conn = await connect(db)
    try:
        target = config.target(opts.target)
        pconf = config.provider_for(target)
        info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
        found = await indexes.vector_indexes(conn, info.oid, target.embedding_column)
        if not found:
            return None
        missing = await count_missing(conn, TargetSQL(target, info.types), list(opts.tenants))
        return indexes.plan_message(found, str(target.table), min(missing, opts.limit or missing))
    finally:
        await conn.close()


async def astatus(config: Config, db: Database, target: str | None = None) -> list[TargetStatus]:
    """Rows and missing embeddings per target (and per tenant)."""
    targets = [config.target(target)] if target else list(config.targets)
    conn = await connect(db)
    try:
        out = []
        for t in targets:
            pconf = config.provider_for(t)
            info = await inspect_target(conn, t, pconf.expected_dimensions, pconf.label)
            out.append(await target_status(conn, t, info))
        return out
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()


class _Run:
    def __init__(
        self,
        *,
        db: Database,
        conn: psycopg.AsyncConnection[Any],
        target: TargetConfig,
        pconf: ProviderConfig,
        info: TableInfo,
        opts: BackfillOptions,
        provider: Provider,
        engine: Any,
        hooks: _Hooks,
        env: Mapping[str, str],
        seat: WorkerSeat | None = None,
    ) -> None:
        self.seat = seat  # set: a worker's session of a job, fed chunk by chunk
        self.chunk_q: asyncio.Queue[Chunk | None] = asyncio.Queue()
        self.chunks: set[Chunk] = set()  # submitted, not yet resolved
        self.db, self.conn, self.target, self.pconf = db, conn, target, pconf
        self.opts, self.provider, self.engine, self.hooks = opts, provider, engine, hooks
        self.info = info
        self.sql = TargetSQL(target, info.types)
        self.store = Store(conn)
        self.keys = KeyResolver(self.store, conn, target, pconf, provider.needs_key, env)
        self.batch_size = opts.batch_size or pconf.batch_size
        self.tenants = list(opts.tenants) or None
        self.report = Report(
            run_id=seat.run_id if seat else None,
            target=target.name,
            dry_run=opts.dry_run,
            provider=provider.name,
        )
        self.policy = RetryPolicy.for_provider(pconf)
        dims = info.dimensions or 1536
        cache_rows = engine.dedup_cache_mb * 1024 * 1024 // (dims * 4 + 200)
        self.cache: BoundedCache[Vector] = BoundedCache(cache_rows)
        self.inflight: dict[str, list[Row]] = {}
        self.dead_tenants: dict[str | None, str] = {}
        # rpm/tpm and 429 pauses, per key, shared with every run in every process; a
        # provider without keys or limits (local, hash) has nothing to share
        self.concurrency = (
            Concurrency.auto(pconf.max_concurrency)
            if pconf.auto_concurrency
            else Concurrency.fixed(pconf.max_concurrency)
        )
        self._in_flight = 0
        self._slots = asyncio.Condition()
        self.limits: SharedLimits | None = None
        if provider.needs_key or pconf.rpm or pconf.tpm:
            scope = f"{pconf.kind}|{pconf.base_url or ''}|{pconf.model}"
            self.limits = SharedLimits(self.store, Rates(pconf.rpm, pconf.tpm), scope)
        self.pending_failures: list[Failure] = []
        self.locked: list[tuple[float, _Write]] = []  # (retry at, rows) the app held locked
        self._locked_since: dict[Any, float] = {}  # when each such row was first found locked
        self._last_progress = 0.0
        self._tenants: dict[str | None, TenantReport] = {}
        self.render = text_renderer(target.text, target.text_columns)
        self._counter: TokenCounter = provider.counter()  # loaded by _prepare
        self._max_tokens = provider.max_input_tokens
        self.vector_oid = 0
        self.dims = info.dimensions  # learnt from the first answer when neither side says
        self._stop = asyncio.Event()  # set on cancel or halt: every wait wakes up
        self.halted: EmbedfillError | None = None  # why the run stops early, if it does
        self.proven = False  # a request of this run succeeded: model and dimensions work
        self._probe: asyncio.Task[BadInput | None] | None = None
        self._flushing = asyncio.Lock()
        self.closed = False  # a session that ended takes no chunk
        self.closed_by: Exception | None = None

    # ------------------------------------------------------------------ top level

    async def execute(self) -> Report:
        started = time.monotonic()
        key = lock_key(self.info.oid, self.target.embedding_column)
        locked = False
        if not self.opts.dry_run:
            locked = await self.store.try_lock(key)
            if not locked:
                raise await self._busy()
        try:
            missing = await count_missing(self.conn, self.sql, self.tenants)
            self.report.missing_before = min(missing, self.opts.limit or missing)
            run_id = await self.store.create_run(
                target=self.target.name,
                actor=self.opts.actor,
                parameters=self.opts.parameters(),
                dry_run=self.opts.dry_run,
                missing_before=self.report.missing_before,
                table_oid=self.info.oid,
                column=self.target.embedding_column,
            )
            self.report.run_id = run_id
            if self.hooks.on_start:
                self.hooks.on_start(run_id)
            log.info(
                "run %s: %s %s, %d rows missing",
                run_id,
                "planning" if self.opts.dry_run else "backfilling",
                self.target.name,
                self.report.missing_before,
            )
            error: str | None = None
            # the heartbeat (its own connection) covers every phase: take-over, index
            # drop, fill and rebuild, so a live run never looks abandoned
            heartbeat = None if self.opts.dry_run else asyncio.create_task(self._heartbeat())
            try:
                if self.opts.dry_run:
                    await self._plan()
                else:
                    await self._take_over()  # runs still shown running lost their process
                    await self._fill()
            except BaseException as exc:
                self.report.status = "failed"
                error = _first_line(exc) if isinstance(exc, Exception) else "interrupted"
                if isinstance(exc, EmbedfillError) and self.report.embedded and exc.exit_code == 2:
                    # exit 2 promises that nothing was written; this run did write
                    raise RunAborted(
                        f"{exc} The run stopped after writing {self.report.embedded} rows; "
                        "they hold correct vectors."
                    ) from exc
                raise
            finally:
                if heartbeat is not None:
                    heartbeat.cancel()
                    await asyncio.gather(heartbeat, return_exceptions=True)
                self.report.duration_s = time.monotonic() - started
                self.report.estimated_cost_usd = estimate_cost(self.report.tokens, self.pconf.price)
                if self.report.status != "failed":
                    self.report.status = self._final_status()
                with contextlib.suppress(psycopg.Error):
                    await asyncio.shield(self._flush_audit(final=True, error=error))
            return self.report
        finally:
            if locked:
                with contextlib.suppress(psycopg.Error):
                    await self.store.unlock(key)

    async def serve(self) -> Report:
        """A worker's session of a job: embed the chunks ``submit`` hands in until
        ``close``; this worker's report goes to its row of ``embedfill.workers`` every
        second. A reason that halts the session (the provider answers another size, say)
        fails every chunk still in it, with that reason."""
        assert self.seat is not None
        heartbeat = asyncio.create_task(self._seat_heartbeat())
        error: BaseException | None = None
        try:
            await self._pipeline()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.closed = True
            self.closed_by = error if isinstance(error, Exception) else None
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            with contextlib.suppress(psycopg.Error, DatabaseError):
                await asyncio.shield(self._final_seat_flush())
            while not self.chunk_q.empty():
                chunk = self.chunk_q.get_nowait()
                if chunk is not None:
                    self.chunks.add(chunk)
            for chunk in list(self.chunks):
                chunk.resolve(error if isinstance(error, Exception) else None)
            self.chunks.clear()
        return self.report

    async def _fill(self) -> None:
        """The real run: set vector indexes aside (index-aware mode), fill, rebuild."""
        deferred: list[indexes.VectorIndex] = []
        # cancelled while starting (during a take-over, say): dropping now would only
        # buy a rebuild, hours on a large table, for a run that is asked to stop
        if self.opts.defer_index and not self.stopping:
            deferred = await indexes.vector_indexes(
                self.conn, self.info.oid, self.target.embedding_column
            )
        self.report.deferred_indexes = [
            {"name": i.name, "method": i.method, "rebuilt": False} for i in deferred
        ]
        if deferred:  # recorded before anything is dropped: a crash leaves the way back
            assert self.report.run_id is not None
            await self.store.set_parameters(
                self.report.run_id,
                self.opts.parameters() | {"deferred_indexes": [i.to_dict() for i in deferred]},
            )
        for index in deferred:
            log.warning(
                "run %s: dropping vector index %s for the backfill", self.report.run_id, index.name
            )
            await indexes.drop(self.conn, index)
        try:
            await self._pipeline()
        finally:
            await asyncio.shield(self._rebuild(deferred))

    def _final_status(self) -> str:
        if self.hooks.cancel.is_set():
            return "cancelled"
        unbuilt = not self.opts.dry_run and any(
            not i["rebuilt"] for i in self.report.deferred_indexes
        )
        if self.report.failed or unbuilt:
            return "partial"
        return "succeeded"

    async def _rebuild(self, deferred: list[indexes.VectorIndex]) -> None:
        """Rebuild the indexes set aside; a failure is reported, with the SQL to run."""
        for index, entry in zip(deferred, self.report.deferred_indexes, strict=True):
            log.warning("run %s: rebuilding vector index %s", self.report.run_id, index.name)
            try:
                entry["seconds"] = round(await indexes.rebuild(self.conn, index), 3)
                entry["rebuilt"] = True
            except psycopg.Error as exc:
                entry["error"] = (
                    f"Index {index.name} was NOT rebuilt ({_first_line(exc)}); vector searches "
                    f"scan the whole table until you run: {index.concurrent_definition()};"
                )
                log.error("run %s: %s", self.report.run_id, entry["error"])

    async def _take_over(self) -> None:
        """Resume after runs of this column that died: repair what they left (a vector
        index dropped, or left INVALID by a rebuild cut short), then mark them abandoned.
        A repair that fails fails this run and leaves them for the next one."""
        assert self.report.run_id is not None
        dead = await self.store.dead_runs(
            self.info.oid, self.target.embedding_column, self.report.run_id
        )
        if not dead:
            return
        log.warning("earlier runs %s had died; resuming their work", [i for i, _ in dead])
        for run_id, parameters in dead:
            for data in parameters.get("deferred_indexes") or []:
                index = indexes.VectorIndex(**data)
                state = await indexes.state(self.conn, index)
                if state != "valid":
                    log.warning(
                        "rebuilding vector index %s, left %s by run %s", index.name, state, run_id
                    )
                    await indexes.rebuild(self.conn, index)
            await self.store.abandon_run(run_id)

    async def _busy(self) -> TargetBusy:
        active = await self.store.active_run(self.info.oid, self.target.embedding_column)
        where = f"column {self.target.embedding_column!r} of {self.target.table}"
        if active:
            other = active["target"]
            other = "" if other == self.target.name else f" of target {other!r}"
            return TargetBusy(
                f"Target {self.target.name!r} ({where}) is already being backfilled by run "
                f"{active['id']}{other} (started {active['started_at']:%Y-%m-%d %H:%M:%S %Z} by "
                f"{active['actor']}); wait for it to finish or cancel it.",
                run_id=int(active["id"]),
            )
        return TargetBusy(
            f"Target {self.target.name!r} ({where}) is already being backfilled by another "
            "run; wait for it to finish."
        )

    # ------------------------------------------------------------------ scanning

    async def _pages(self, chunk: Chunk | None = None) -> Any:
        """Keyset pages of the rows to embed: the whole target (a dry run) or a chunk."""
        after: Any = None
        first = True
        remaining = self.opts.limit
        hi: Any = None
        if chunk is None:
            await self._check_tenants()
        else:  # a chunk's range is the limit
            remaining, first, after, hi = None, chunk.lo is None, chunk.lo, chunk.hi
        page_size = self.engine.scan_page_size
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            rows = await self._unless_stopped(
                self._fetch(
                    self.sql.scan(
                        first_page=first, tenants=bool(self.tenants), upto=hi is not None
                    ),
                    {"after": after, "hi": hi, "limit": size, "tenants": self.tenants},
                )
            )
            if not rows:  # none left, or the run stops
                return
            yield rows
            first, after = False, rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < size:
                return

    async def _fetch(self, statement: sql.Composed, params: dict[str, Any]) -> list[Any]:
        cur = await self.conn.execute(statement, params)
        return await cur.fetchall()

    async def _unless_stopped(self, query: Coroutine[Any, Any, list[Any]]) -> list[Any] | None:
        """A read on the table, or None when the run stops first: the read is cancelled
        (psycopg cancels it on the server), so a scan queued behind the app's table lock
        (a migration's ACCESS EXCLUSIVE, held for minutes) never holds up a SIGTERM."""
        task = asyncio.ensure_future(query)
        stops = [asyncio.ensure_future(e.wait()) for e in (self._stop, self.hooks.cancel)]
        stopped = False
        try:
            await asyncio.wait([task, *stops], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in stops:
                waiter.cancel()
            if not task.done():
                stopped = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, psycopg.errors.QueryCanceled):
                    await task
        return None if stopped else task.result()

    async def _check_tenants(self) -> None:
        """A requested tenant with no row at all is a warning (a typo, most likely), not
        a silent success."""
        if not self.tenants:
            return
        cur = await self.conn.execute(self.sql.absent_tenants(), {"tenants": self.tenants})
        for (tenant,) in await cur.fetchall():
            warning = (
                f"Tenant {tenant!r} matches no row of {self.target.table} "
                f"(column {self.target.tenant_column}); check the tenant id."
            )
            log.info("run %s: %s", self.report.run_id, warning)  # the CLI prints warnings
            self.report.warnings.append(warning)

    def _row(self, raw: Sequence[Any], chunk: Chunk | None = None) -> Row | None:
        """A row ready to embed, or None when its text is blank (counted as skipped)."""
        row_id, tenant, fingerprint, *values = raw
        tenant_report = self._tenant(tenant)
        tenant_report.missing += 1
        prepared = prepare_text(
            self.render(values),
            count=self._counter.count,
            truncate=self._counter.truncate,
            max_tokens=self._max_tokens,
        )
        if prepared is None:
            tenant_report.skipped += 1
            self.report.skipped += 1
            if not self.opts.dry_run:
                self.hooks.observer.rows(self.target.name, "skipped", 1)
            return None
        sent, tokens, truncated = prepared
        if truncated:
            tenant_report.truncated += 1
            self.report.truncated += 1
        if self.opts.dry_run:
            self.report.add_sample(row_id, tenant, sent)
        if chunk is not None:
            chunk.pending += 1
        return Row(
            id=row_id,
            tenant=tenant,
            text=sent,
            fingerprint=fingerprint,
            tokens=tokens,
            truncated=truncated,
            chunk=chunk,
        )

    def _batcher(self) -> TenantBatcher:
        return TenantBatcher(
            batch_size=self.batch_size,
            max_tokens=self.pconf.max_request_tokens,
            max_buffered=max(self.engine.scan_page_size, self.batch_size * 4),
        )

    def _count_batch(self, batch: Batch) -> None:
        self.report.batches += 1
        self._tenant(batch.tenant).batches += 1

    # ------------------------------------------------------------------ dry run

    async def _plan(self) -> None:
        """Walk the same scan and batching as a real run; send and write nothing."""
        # the same bounded memory of texts as a real run, so the estimate matches it
        seen: BoundedCache[bool] = BoundedCache(self.cache.capacity)
        batcher = self._batcher()
        async for page in self._pages():
            for raw in page:
                row = self._row(raw)
                if row is None:
                    continue
                key = row.fingerprint
                if seen.get(key):
                    self.report.deduplicated += 1
                    continue
                seen.put(key, True)
                for batch in batcher.add(row):
                    self._tally_planned(batch)
        for batch in batcher.flush():
            self._tally_planned(batch)
        for t in self.report.tenants:
            resolved = await self.keys.resolve(t.tenant)
            t.key_source = resolved.source
            t.error = resolved.error
            if resolved.error:  # every row it would send fails, as in a real run
                t.would_fail = t.missing - t.skipped
                self.report.would_fail += t.would_fail
        self.report.requests = self.report.batches

    def _tally_planned(self, batch: Batch) -> None:
        self._count_batch(batch)
        tenant = self._tenant(batch.tenant)
        tenant.requests += 1
        tenant.tokens += batch.tokens
        self.report.tokens += batch.tokens

    # ------------------------------------------------------------------ real run

    async def _pipeline(self) -> None:
        embed_q: asyncio.Queue[Batch | None] = asyncio.Queue(self.concurrency.ceiling * 2)
        # room for about one full write of embedded batches: enough to coalesce, and a
        # bound on what a kill -9 can lose after it was paid for
        per_write = -(-self.engine.write_batch_rows // self.batch_size)
        write_q: asyncio.Queue[_Write | None] = asyncio.Queue(max(2, per_write))
        writer_conns: list[psycopg.AsyncConnection[Any]] = []
        try:
            n_writers = self.db.writers(self.engine.write_concurrency)
            for k in range(1, n_writers + 1):
                writer_conns.append(await self._writer_connection(k, n_writers))
            async with asyncio.TaskGroup() as tg:
                workers = [
                    tg.create_task(self._embedder(embed_q, write_q))
                    for _ in range(self.concurrency.ceiling)
                ]
                writers = [tg.create_task(self._writer(c, write_q)) for c in writer_conns]
                watcher = tg.create_task(self._watch_cancel())
                kicker = tg.create_task(self._kick_locked(write_q)) if self.seat else None
                await self._produce(embed_q, write_q)
                for _ in workers:
                    await embed_q.put(None)
                await asyncio.wait(workers)
                for _ in writers:
                    await write_q.put(None)
                await asyncio.wait(writers)
                if kicker is not None:
                    kicker.cancel()
                await self._settle_locked(writer_conns[0])
                watcher.cancel()
        except* EmbedfillError as group:
            raise group.exceptions[0] from None
        except* psycopg.Error as group:
            raise group.exceptions[0] from None
        finally:
            for c in writer_conns:
                await c.close()
        if self.halted is not None:
            raise self._halt_error()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self.hooks.cancel.is_set()

    async def _watch_cancel(self) -> None:
        await self.hooks.cancel.wait()
        self._stop.set()

    async def _sleep(self, seconds: float) -> bool:
        """Wait, waking at once when the run is cancelled or halted; True when it was."""
        if seconds > 0 and not self.stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._stop.wait()
        return self.stopping

    def _halt(self, reason: EmbedfillError) -> None:
        """Stop for a reason that would fail every batch: nothing more is sent, what was
        answered is still written, and the pipeline then raises the reason."""
        if self.halted is None:
            self.halted = reason
            log.info("run %s: stopping: %s", self.report.run_id, reason)
        self._stop.set()

    def _halt_error(self) -> EmbedfillError:
        """The halt's reason as is (a config error, exit 2) when nothing was written;
        else RunAborted (exit 3): some rows were filled, so "nothing written" is false."""
        assert self.halted is not None
        if not self.report.embedded:
            return self.halted
        error = RunAborted(
            f"The run stopped after writing {self.report.embedded} rows: {self.halted}"
        )
        error.__cause__ = self.halted
        return error

    async def _produce(
        self, embed_q: asyncio.Queue[Batch | None], write_q: asyncio.Queue[_Write | None]
    ) -> None:
        batcher = self._batcher()
        if self.seat is None:
            await self._scan(None, batcher, embed_q, write_q)
            for batch in batcher.flush():
                self._count_batch(batch)
                await embed_q.put(batch)
            return
        await self._check_tenants()
        while (chunk := await self._next_chunk()) is not None:
            if self.stopping or chunk.given_up:
                chunk.scanned = True
                self._check_chunk(chunk)
                continue
            await self._scan(chunk, batcher, embed_q, write_q)
            # the chunk's last rows go now, in part batches: a chunk is done only once
            # every row it read is settled
            for batch in batcher.flush():
                self._count_batch(batch)
                await embed_q.put(batch)
            chunk.scanned = True
            self._check_chunk(chunk)

    async def _scan(
        self,
        chunk: Chunk | None,
        batcher: TenantBatcher,
        embed_q: asyncio.Queue[Batch | None],
        write_q: asyncio.Queue[_Write | None],
    ) -> None:
        async for page in self._pages(chunk):
            if self.stopping or (chunk is not None and chunk.given_up):
                return
            hits = _Write([], [])
            for n, raw in enumerate(page, 1):
                if n % YIELD_EVERY_ROWS == 0:
                    # rendering and counting tokens is CPU work: let responses that have
                    # arrived be handled (and the next requests sent) in between
                    await asyncio.sleep(0)
                row = self._row(raw, chunk)
                if row is None:
                    continue
                key = row.fingerprint
                cached = self.cache.get(key)
                if cached is not None:
                    self.report.deduplicated += 1
                    hits.rows.append(row)
                    hits.vectors.append(cached)
                    continue
                followers = self.inflight.get(key)
                if followers is not None:
                    self.report.deduplicated += 1
                    followers.append(row)
                    continue
                self.inflight[key] = []
                for batch in batcher.add(row):
                    self._count_batch(batch)
                    await embed_q.put(batch)
            if hits.rows:
                await write_q.put(hits)
            self._progress()

    async def _next_chunk(self) -> Chunk | None:
        """The next chunk handed in, or None when the session closes or stops."""
        if self.stopping and self.chunk_q.empty():
            return None
        getter = asyncio.ensure_future(self.chunk_q.get())
        stops = [asyncio.ensure_future(e.wait()) for e in (self._stop, self.hooks.cancel)]
        try:
            await asyncio.wait([getter, *stops], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in stops:
                waiter.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        return None

    def _settle(self, rows: Sequence[Row]) -> None:
        """These rows are done with (written, skipped, failed or dropped): a chunk whose
        every row is settled is done."""
        for row in rows:
            chunk = row.chunk
            if chunk is not None:
                chunk.pending -= 1
                if chunk.pending <= 0:
                    self._check_chunk(chunk)

    def _check_chunk(self, chunk: Chunk) -> None:
        if chunk.scanned and chunk.pending <= 0:
            self.chunks.discard(chunk)
            # halted: the chunk ends with the reason (every chunk would meet it)
            chunk.resolve(self._halt_error() if self.halted is not None else None)

    async def _final_seat_flush(self) -> None:
        assert self.seat is not None and self.seat.control is not None
        async with self.seat.control() as store:
            await self._flush_audit(final=True, store=store)

    async def flush(self, store: Store) -> None:
        """Record this session's failures and report now (before a chunk is marked done,
        so a job's totals always include its done chunks)."""
        await self._flush_audit(final=False, store=store)

    async def submit(self, chunk: Chunk) -> None:
        """Work on one chunk of the job (a worker session): returns once it is done."""
        if self.closed:  # the session ended (stopped) just now: nothing more is read
            chunk.resolve(self.closed_by)
        else:
            self.chunks.add(chunk)
            self.chunk_q.put_nowait(chunk)
        await asyncio.shield(chunk.done)

    def close(self) -> None:
        """No more chunks: the session drains and ends."""
        self.chunk_q.put_nowait(None)

    async def _embedder(
        self, embed_q: asyncio.Queue[Batch | None], write_q: asyncio.Queue[_Write | None]
    ) -> None:
        while (batch := await embed_q.get()) is not None:
            if self.stopping or _given_up(batch):
                self._forget(batch)  # left NULL for the next run (or worker)
                continue
            await self._embed(batch, write_q)

    def _forget(self, batch: Batch) -> None:
        dropped = list(batch.rows)
        for row in batch.rows:
            dropped.extend(self.inflight.pop(row.fingerprint, []))
        self._settle(dropped)

    async def _embed(self, batch: Batch, write_q: asyncio.Queue[_Write | None]) -> None:
        tenant = self._tenant(batch.tenant)
        resolved = await self.keys.resolve(batch.tenant)
        tenant.key_source = resolved.source
        if resolved.error and batch.tenant not in self.dead_tenants:
            self.dead_tenants[batch.tenant] = resolved.error
            log.warning(
                "run %s: tenant %s cannot be embedded: %s",
                self.report.run_id,
                batch.tenant,
                resolved.error,
            )
        if batch.tenant in self.dead_tenants:
            reason = self.dead_tenants[batch.tenant]
            tenant.error = reason
            self._fail(batch, NoApiKey(reason) if resolved.error else AuthFailed(reason), 0)
            return
        try:
            vectors, attempts = await self._call(batch, resolved.key)
        except _Stopped:
            self._forget(batch)  # left NULL for the next run
            return
        except BadInput as exc:
            if not self.proven and await self._rejects_everything(resolved.key):
                self._forget(batch)
                return
            if len(batch.rows) > 1:
                for half in split_batch(batch):
                    await self._embed(half, write_q)
                return
            self._fail(batch, exc, exc.attempts)
            return
        except AuthFailed as exc:
            reason = f"{exc} (tenant {batch.tenant!r}, key source {resolved.source})"
            self.dead_tenants[batch.tenant] = reason
            tenant.error = reason
            log.error("run %s: tenant %s: %s", self.report.run_id, batch.tenant, exc)
            self._fail(batch, exc, exc.attempts)
            return
        except ProviderError as exc:
            if self._give_back(batch, exc):
                self._forget(batch)
                return
            log.error(
                "run %s: tenant %s: batch of %d failed: %s",
                self.report.run_id,
                batch.tenant,
                len(batch.rows),
                exc,
            )
            self._fail(batch, exc, exc.attempts)
            return
        write = _Write([], [])
        unusable = set(non_finite(vectors))
        for i, (row, vector) in enumerate(zip(batch.rows, vectors, strict=True)):
            if i in unusable:  # pgvector refuses NaN and infinity: this row alone fails
                self._fail(Batch(batch.tenant, (row,)), _non_finite(), attempts)
                continue
            self.cache.put(row.fingerprint, vector)
            for r in [row, *self.inflight.pop(row.fingerprint, [])]:
                write.rows.append(r)
                write.vectors.append(vector)
        if write.rows:
            await write_q.put(write)

    async def _rejects_everything(self, key: Secret | None) -> bool:
        """Whether a 400 before any success is about the request (model, dimensions)
        rather than its inputs. Bisecting cannot tell: a wrong model rejects every half,
        and so do two bad inputs that land in different halves. So one probe, shared by
        all workers, asks for the embedding of a one-word text with the same key, model
        and dimensions: rejected too, the request is wrong, and the run halts with the
        provider's words; accepted, the inputs are, and bisection goes on."""
        if self._probe is None:
            self._probe = asyncio.create_task(self._send_probe(key))
        rejected = await self._probe
        if rejected is None or self.proven:
            return False
        check = f"model = {self.pconf.model!r}"
        if self.pconf.dimensions is not None:
            check += f" and dimensions = {self.pconf.dimensions}"
        self._halt(
            ProviderMisconfigured(
                "Every request was rejected, even one whose only input is the word "
                f'"{PROBE_TEXT}", so the request itself is wrong, not the rows: "{rejected}" '
                f"Check {check} of provider {self.target.provider!r}."
            )
        )
        return True

    async def _send_probe(self, key: Secret | None) -> BadInput | None:
        """The 400 the probe got, or None (accepted, or no verdict: a later 400 probes
        again)."""
        tokens = self._counter.count(PROBE_TEXT)
        if await self._reserve(key, tokens):
            return None
        self.report.requests += 1
        started = time.monotonic()
        try:
            await self.provider.embed([PROBE_TEXT], api_key=key)
        except ProviderError as exc:
            self.hooks.observer.request(
                self.target.name, str(exc.status or "error"), time.monotonic() - started
            )
            if isinstance(exc, BadInput):
                return exc
            self._probe = None
            return None
        self.hooks.observer.request(self.target.name, "200", time.monotonic() - started)
        self.report.tokens += tokens
        self.proven = True
        return None

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the requests in flight that ``self.concurrency`` allows now."""
        async with self._slots:
            await self._slots.wait_for(lambda: self._in_flight < self.concurrency.allowed)
            self._in_flight += 1
        try:
            yield
        finally:
            async with self._slots:
                self._in_flight -= 1
                self._slots.notify_all()

    async def _reserve(self, key: Secret | None, tokens: int) -> bool:
        """Wait for the key's shared budget to allow a request; True when the run stopped
        meanwhile."""
        if self.limits is None:
            return self.stopping
        return await self._sleep(await self.limits.reserve(key, tokens))

    async def _heed(
        self,
        key: Secret | None,
        signals: RateSignals | None,
        tokens: int,
        retry_after: float | None = None,
    ) -> None:
        """Hold off every worker of this key, in every process, as long as the provider's
        answer asks: its ``Retry-After``, or its rate-limit headers when what the key has
        left would not cover the requests this run may send meanwhile (as many as it
        allows in flight, each like this one). Bounded by ``max_retry_wait_s``."""
        if self.limits is None:
            return
        ahead = self.concurrency.allowed
        waits = [w for w in (retry_after, pause_for(signals, tokens, ahead)) if w]
        if waits:
            await self.limits.pause(key, server_wait(max(waits), self.policy))

    async def _call(self, batch: Batch, key: Secret | None) -> tuple[list[Vector], int]:
        """The batch's vectors, checked, and the attempts it took; raises the provider's
        error when retrying gives up, ``_Stopped`` when the run stops first."""
        tenant = self._tenant(batch.tenant)
        attempts = 0
        while True:
            try:
                # the budget is taken once a slot is ours: taken before, with "auto"
                # holding requests back, it would be spent on a request sent much later
                async with self._slot():
                    if await self._reserve(key, batch.tokens) or _given_up(batch):
                        raise _Stopped
                    attempts += 1
                    self.report.requests += 1
                    tenant.requests += 1
                    started = time.monotonic()
                    answer = await self.provider.embed(batch.texts, api_key=key)
                    vectors = check_vectors(answer, len(batch.rows))
                    self.concurrency.succeeded(time.monotonic() - started)
            except ProviderError as exc:
                self.hooks.observer.request(
                    self.target.name, str(exc.status or "error"), time.monotonic() - started
                )
                if isinstance(exc, (RateLimited, ProviderUnavailable)):
                    self.concurrency.overloaded(time.monotonic())
                await self._heed(key, exc.signals, batch.tokens, exc.retry_after)
                delay = decide(exc, attempts, self.policy)
                if delay is None or self._give_back(batch, exc, lease=True):
                    exc.attempts = attempts
                    raise
                log.info(
                    "run %s: tenant %s: %s; retrying in %.1fs",
                    self.report.run_id,
                    batch.tenant,
                    exc,
                    delay,
                )
                if await self._sleep(delay):
                    raise _Stopped from None
                self.report.retries += 1
                continue
            self.hooks.observer.request(self.target.name, "200", time.monotonic() - started)
            if isinstance(answer, Embeddings):
                await self._heed(key, answer.signals, batch.tokens)
            self.proven = True
            if batch.rows[0].chunk is not None:
                batch.rows[0].chunk.last_ok = time.monotonic()
            self._check_dimensions(vectors)
            self.hooks.observer.tokens(self.target.name, batch.tokens)
            self.report.tokens += batch.tokens
            tenant.tokens += batch.tokens
            return vectors, attempts

    def _give_back(self, batch: Batch, exc: ProviderError, *, lease: bool = False) -> bool:
        """Whether to hand this batch's chunk back to the queue instead of failing its
        rows: this worker cannot reach the provider (a connection error, a timeout, a
        5xx), so another worker may. Only a job's chunk, only while it has attempts left,
        and (``lease``, mid-retries) once the chunk has seen no success for a lease."""
        chunk = batch.rows[0].chunk
        if chunk is None or not isinstance(exc, ProviderUnavailable):
            return False
        if chunk.given_up:
            return True
        if chunk.attempt >= MAX_CHUNK_ATTEMPTS:
            return False
        if lease and self.seat and time.monotonic() - chunk.last_ok < self.seat.lease_s:
            return False
        log.warning(
            "job %s: chunk %d goes back to the queue for another worker: %s",
            self.report.run_id,
            chunk.seq,
            exc,
        )
        chunk.given_up = True
        return True

    def _check_dimensions(self, vectors: list[Vector]) -> None:
        """The one check that vectors fit the column (the column's declared size, else the
        provider's, else the first answer's). Vectors of one answer are all of one size
        (check_vectors); another size than the column's would fail every batch, so it
        halts the run, nothing of this batch written."""
        if self.dims is None:
            self.dims = vectors[0].shape[0]
        got = vectors[0].shape[0]
        if got != self.dims:
            self._halt(
                SchemaMismatch(
                    f"The provider returned {got}-dimensional vectors but column "
                    f"{self.target.embedding_column!r} of {self.target.table} holds "
                    f"{self.dims}; set dimensions = {self.dims} for provider "
                    f"{self.target.provider!r} if the model supports it, or use a model of "
                    "that size."
                )
            )
            raise _Stopped

    def _fail(self, batch: Batch, exc: EmbedfillError, attempts: int) -> None:
        rows = list(batch.rows)
        for row in batch.rows:
            rows.extend(self.inflight.pop(row.fingerprint, []))
        self._fail_rows(rows, exc, attempts)

    def _fail_rows(self, rows: Sequence[Row], exc: EmbedfillError, attempts: int) -> None:
        for row in rows:
            failure = Failure(
                id=row.id,
                tenant=row.tenant,
                error=str(exc),
                error_class=type(exc).__name__,
                attempts=attempts,
            )
            self.pending_failures.append(failure)
            if len(self.report.failures) < MAX_REPORTED_FAILURES:
                self.report.failures.append(failure)
            self._tenant(row.tenant).failed += 1
        self.report.failed += len(rows)
        self.hooks.observer.rows(self.target.name, "failed", len(rows))
        self._settle(rows)
        self._progress()

    # ------------------------------------------------------------------ writing

    async def _writer_connection(self, k: int, n: int) -> psycopg.AsyncConnection[Any]:
        """Writer k of n's connection: short lock and statement timeouts, so a write never
        queues long behind the application (a timeout is retried, not fatal)."""
        conn = await connect(self.db, writer=(k, n))
        try:
            await self._prepare_writer(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _prepare_writer(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(
            "SELECT set_config('lock_timeout', %(lock)s, false),"
            " set_config('statement_timeout', %(statement)s, false)",
            {
                "lock": f"{self.engine.lock_timeout_ms}ms",
                "statement": f"{self.engine.statement_timeout_s}s",
            },
        )
        self.vector_oid = await wire.register(conn, self.info.types.vector_type)

    async def _writer(
        self, conn: psycopg.AsyncConnection[Any], write_q: asyncio.Queue[_Write | None]
    ) -> None:
        done = False
        while not done:
            item = await write_q.get()
            if item is None:
                return
            # coalesce what is already waiting: fewer, larger statements
            while len(item.rows) < self.engine.write_batch_rows and not write_q.empty():
                more = write_q.get_nowait()
                if more is None:
                    done = True
                    break
                item.rows.extend(more.rows)
                item.vectors.extend(more.vectors)
            self._take_due_locked(item)
            if item.rows:
                await self._write(conn, item)

    async def _write(self, conn: psycopg.AsyncConnection[Any], item: _Write) -> None:
        """One guarded bulk write in its own short transaction. Rows the app holds locked
        are set aside and tried again later in the run; a lock or statement timeout, a
        deadlock or a serialization failure retries the write with backoff."""
        ids = [r.id for r in item.rows]
        params: dict[str, Any] = {
            "ids": wire.int8_array(ids) or ids,
            "fps": wire.fixed_text_array([r.fingerprint for r in item.rows], 32),
            "vecs": wire.vector_array(item.vectors, self.vector_oid),
        }
        if self.sql.integer_ids:
            params |= {"lo": min(ids), "hi": max(ids)}
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            # a run stopped by an error elsewhere cancels its writers: the write in flight
            # still finishes and is counted, so the audit trail equals what was committed
            commit = asyncio.ensure_future(self._commit(conn, params, len(ids)))
            try:
                result = await asyncio.shield(commit)
                break
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    self._tally_write(item, await commit)
                raise
            except _TRANSIENT_WRITE_ERRORS as exc:
                if self.stopping:  # cancelled or halted: left NULL for the next run
                    self._settle(item.rows)
                    return
                if attempt == WRITE_ATTEMPTS:
                    self._fail_rows(
                        item.rows,
                        DatabaseError(
                            f"The database kept refusing the write ({_first_line(exc)}); "
                            "run again to retry these rows."
                        ),
                        attempt,
                    )
                    return
                delay = min(8.0, 0.25 * 2**attempt)
                log.warning(
                    "run %s: write of %d rows failed (%s); retrying in %.1fs",
                    self.report.run_id,
                    len(ids),
                    _first_line(exc),
                    delay,
                )
                await self._sleep(delay)
        self._tally_write(item, result)

    async def _commit(
        self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any], sent: int
    ) -> tuple[set[Any], set[Any]]:
        """Write one batch; the ids written, and the ids the app held locked (still NULL
        and unchanged, so owed a later try). The second look happens only when the write
        could not lock every row: the common case is one statement."""
        row: Any = None
        with contextlib.suppress(psycopg.errors.LockNotAvailable):
            async with conn.transaction():  # the plain UPDATE, if no row is held
                await conn.execute(FAST_LOCK_TIMEOUT)
                cur = await conn.execute(self.sql.write_fast(), params)
                row = await cur.fetchone()
        if row is None:  # something is locked: skip what the app holds
            async with conn.transaction():
                cur = await conn.execute(self.sql.write(), params)
                row = await cur.fetchone()
        assert row is not None
        locked, written = int(row[0]), set(row[1] or ())
        if locked == sent:
            return written, set()
        cur = await conn.execute(self.sql.still_owed(), params)
        return written, {r[0] for r in await cur.fetchall()} - written

    def _tally_write(self, item: _Write, result: tuple[set[Any], set[Any]]) -> None:
        written, busy = result
        if busy:
            due = time.monotonic() + LOCKED_RETRY_S
            waiting = _Write([], [])
            for row, vector in zip(item.rows, item.vectors, strict=True):
                if row.id in busy:
                    waiting.rows.append(row)
                    waiting.vectors.append(vector)
            self.locked.append((due, waiting))
            for r in waiting.rows:
                self._locked_since.setdefault(r.id, time.monotonic())
            log.info(
                "run %s: %d rows are locked by another transaction; trying them again later",
                self.report.run_id,
                len(busy),
            )
        self._count_written([r for r in item.rows if r.id not in busy], written)

    async def _kick_locked(self, write_q: asyncio.Queue[_Write | None]) -> None:
        """A session never ends between chunks, so rows the app holds locked are retried
        on a timer (an empty write picks up the due ones) and given up after
        ``locked_rows_wait_s``: their chunk cannot finish before."""
        while True:
            await asyncio.sleep(LOCKED_RETRY_S)
            if not self.locked:
                continue
            now = time.monotonic()
            expired = [
                w
                for _, w in self.locked
                if all(
                    self._locked_since.get(r.id, now) + self.engine.locked_rows_wait_s <= now
                    for r in w.rows
                )
            ]
            if expired:
                self.locked = [(t, w) for t, w in self.locked if w not in expired]
                self._give_up_locked([r for w in expired for r in w.rows])
            if self.locked:
                await write_q.put(_Write([], []))

    def _take_due_locked(self, item: _Write) -> None:
        """Add the rows set aside as locked whose time to retry has come."""
        now = time.monotonic()
        due = [w for t, w in self.locked if t <= now]
        if not due:
            return
        self.locked = [(t, w) for t, w in self.locked if t > now]
        for w in due:
            item.rows.extend(w.rows)
            item.vectors.extend(w.vectors)

    async def _settle_locked(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """At the end of the run, retry rows the app held locked, with growing waits, for
        at most ``locked_rows_wait_s``; rows still locked then are left NULL for the next
        run and counted in ``locked`` (and ``skipped``)."""
        deadline = time.monotonic() + self.engine.locked_rows_wait_s
        wait = LOCKED_RETRY_S
        while self.locked and not self.stopping:
            now = time.monotonic()
            if now >= deadline:
                break
            if await self._sleep(min(wait, max(0.0, deadline - now))):
                break
            wait = min(wait * 2, 4.0)
            item = _Write([], [])
            for _, w in self.locked:
                item.rows.extend(w.rows)
                item.vectors.extend(w.vectors)
            self.locked = []
            await self._write(conn, item)
        left = [r for _, w in self.locked for r in w.rows]
        self.locked = []
        self._give_up_locked(left)

    def _give_up_locked(self, left: list[Row]) -> None:
        for r in left:
            self._locked_since.pop(r.id, None)
        if left:
            log.warning(
                "run %s: %d rows stayed locked by the application; left NULL for the next run",
                self.report.run_id,
                len(left),
            )
            for tenant, count in Counter(r.tenant for r in left).items():
                self._tenant(tenant).skipped += count
            self.report.skipped += len(left)
            self.report.locked += len(left)
            self.hooks.observer.rows(self.target.name, "skipped", len(left))
            self._settle(left)

    def _count_written(self, rows: list[Row], written: set[Any]) -> None:
        self.hooks.observer.rows(self.target.name, "embedded", len(written))
        self.hooks.observer.rows(self.target.name, "skipped", len(rows) - len(written))
        embedded = Counter(r.tenant for r in rows if r.id in written)
        for tenant, count in embedded.items():
            self._tenant(tenant).embedded += count
        self.report.embedded += len(written)
        if len(written) < len(rows):  # the app changed, filled or deleted these since
            changed = Counter(r.tenant for r in rows if r.id not in written)
            for tenant, count in changed.items():
                self._tenant(tenant).skipped += count
            self.report.skipped += len(rows) - len(written)
            self.report.changed += len(rows) - len(written)
        self._settle(rows)
        self._progress()

    def _tenant(self, tenant: str | None) -> TenantReport:
        """The tenant's report, from an index (Report.tenant scans a list)."""
        found = self._tenants.get(tenant)
        if found is None:
            found = self._tenants[tenant] = self.report.tenant(tenant)
        return found

    # ------------------------------------------------------------------ audit

    def _progress(self) -> None:
        if self.hooks.on_progress is None:
            return
        now = time.monotonic()
        if now - self._last_progress >= 0.1:
            self._last_progress = now
            self.hooks.on_progress(self.report)

    async def _seat_heartbeat(self) -> None:
        """A worker session's heartbeat, on the worker's control connection."""
        assert self.seat is not None and self.seat.control is not None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            try:
                async with self.seat.control() as store:
                    await self._flush_audit(final=False, store=store)
            except (psycopg.Error, DatabaseError) as exc:
                log.warning("job %s: heartbeat failed: %s", self.report.run_id, exc)

    async def _heartbeat(self) -> None:
        """Every PROGRESS_EVERY_S: progress, failures and a heartbeat into the run's row,
        and pick up a cancel asked for from elsewhere. Its own connection, so a long
        statement on the run's connection (an index rebuild) never silences it."""
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                await asyncio.sleep(PROGRESS_EVERY_S)
                try:
                    if conn is None or conn.closed:
                        conn = await connect(self.db)
                    await self._flush_audit(final=False, store=Store(conn))
                except (psycopg.Error, DatabaseError) as exc:
                    log.warning("run %s: heartbeat failed: %s", self.report.run_id, exc)
                    if conn is not None:
                        await conn.close()
                    conn = None
        finally:
            if conn is not None:
                await conn.close()

    async def _flush_audit(
        self, *, final: bool, error: str | None = None, store: Store | None = None
    ) -> None:
        if self.report.run_id is None:
            return
        store = store or self.store
        failures, self.pending_failures = self.pending_failures, []
        try:
            await store.record_failures(self.report.run_id, failures)
        except BaseException:
            self.pending_failures[:0] = failures  # not lost: the next flush writes them
            raise
        if self.seat is not None:  # a worker's session: its own row, the job's totals
            seat = self.seat
            self.report.estimated_cost_usd = estimate_cost(self.report.tokens, self.pconf.price)
            mine = self.report.to_dict() | {"failures": []}  # they are in failures
            async with self._flushing:  # one at a time: never an older report last
                state = await store.save_worker(
                    seat.run_id, seat.name, seat.host, seat.pid, seat.chunks_done(), mine
                )
            if state != "running" and not self.hooks.cancel.is_set():
                if state == "cancelling":
                    log.warning(
                        "job %s: cancel requested; stopping after the batches in flight",
                        seat.run_id,
                    )
                self.hooks.cancel.set()
            return
        if final:
            await store.finish_run(self.report, error)
            if self.hooks.on_progress:
                self.hooks.on_progress(self.report)
        elif await store.save_progress(self.report):
            if not self.hooks.cancel.is_set():
                log.warning(
                    "run %s: cancel requested; stopping after the batches in flight",
                    self.report.run_id,
                )
            self.hooks.cancel.set()


def _given_up(batch: Batch) -> bool:
    chunk = batch.rows[0].chunk if batch.rows else None
    return chunk is not None and bool(chunk.given_up)


def _non_finite() -> NonFiniteVector:
    return NonFiniteVector(
        "The provider returned a vector holding NaN or infinite values for this row's text; "
        "pgvector cannot store it, so the row was not written."
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
