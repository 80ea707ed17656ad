"""scan -> embed -> write -> audit.

One run of one target is a small pipeline of asyncio tasks:

- the scanner reads NULL rows in id order (keyset pages, no OFFSET), renders and
  measures their text, drops blanks, de-duplicates identical texts per tenant and cuts
  per-tenant batches (planning.TenantBatcher);
- ``max_concurrency`` embedders call the provider under per-key rate limits, retrying
  what retry.decide says, splitting a batch the provider rejects to isolate the bad row;
- ``write_concurrency`` writers each own a connection and write one batch per short
  transaction with one bulk UPDATE guarded by "still NULL and text unchanged".

No transaction is open while a provider call is in flight, and no row or table lock is
taken. Only one real run per table column at a time: a session advisory lock, which the
server releases if the process dies, so ``kill -9`` never leaves the target locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

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
    ProviderError,
    SchemaMismatch,
    TargetBusy,
    UsageError,
)
from .keys import KeyResolver
from .models import Batch, Failure, Report, Row, TargetStatus, TenantReport
from .planning import BoundedCache, TenantBatcher, estimate_cost, prepare_text, split_batch
from .providers import Provider, Vector, make_provider
from .ratelimit import KeyLimiter
from .retry import RetryPolicy, decide
from .secrets import Secret
from .tokens import TokenCounter

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Report], None]
MAX_REPORTED_FAILURES = 1000
PROGRESS_EVERY_S = 1.0
YIELD_EVERY_ROWS = 32


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


def lock_key(target: TargetConfig) -> str:
    t = target.table
    return f"embedfill:{t.schema or ''}.{t.name}.{target.embedding_column}"


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
    info = await inspect_target(conn, target, await provider.dimensions(), pconf.label)
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
) -> Report:
    """Backfill (or plan, with ``dry_run``) one target; see ``embedfill.backfill``."""
    own_provider = provider is None
    conn = await connect(db)
    try:
        if provider is None:
            provider = make_provider(config.provider_for(config.target(opts.target)))
        target, pconf, info = await _prepare(conn, config, opts, provider)
        await ensure_schema(conn)
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
    ) -> None:
        self.db, self.conn, self.target, self.pconf = db, conn, target, pconf
        self.opts, self.provider, self.engine, self.hooks = opts, provider, engine, hooks
        self.info = info
        self.sql = TargetSQL(target, info.types)
        self.store = Store(conn)
        self.keys = KeyResolver(self.store, conn, target, pconf, provider.needs_key, env)
        self.batch_size = opts.batch_size or pconf.batch_size
        self.tenants = list(opts.tenants) or None
        self.report = Report(
            run_id=None, target=target.name, dry_run=opts.dry_run, provider=provider.name
        )
        self.policy = RetryPolicy(max_attempts=pconf.max_attempts)
        dims = info.dimensions or 1536
        cache_rows = engine.dedup_cache_mb * 1024 * 1024 // (dims * 4 + 200)
        self.cache: BoundedCache[Vector] = BoundedCache(cache_rows)
        self.inflight: dict[str, list[Row]] = {}
        self.dead_tenants: dict[str | None, str] = {}
        self.limiters: dict[str, KeyLimiter] = {}
        self.pending_failures: list[Failure] = []
        self._last_progress = 0.0
        self._tenants: dict[str | None, TenantReport] = {}
        self.render = text_renderer(target.text, target.text_columns)
        self._counter: TokenCounter = provider.counter()  # loaded by _prepare
        self._max_tokens = provider.max_input_tokens
        self.vector_oid = 0
        self.dims = info.dimensions  # learnt from the first answer when neither side says

    # ------------------------------------------------------------------ top level

    async def execute(self) -> Report:
        started = time.monotonic()
        key = lock_key(self.target)
        locked = False
        if not self.opts.dry_run:
            locked = await self.store.try_lock(key)
            if not locked:
                raise await self._busy()
        try:
            if locked:  # any run still shown running lost its process
                await self._take_over(await self.store.abandon_runs(self.target.name))
            deferred: list[indexes.VectorIndex] = []
            if self.opts.defer_index:
                deferred = await indexes.vector_indexes(
                    self.conn, self.info.oid, self.target.embedding_column
                )
            missing = await count_missing(self.conn, self.sql, self.tenants)
            self.report.missing_before = min(missing, self.opts.limit or missing)
            run_id = await self.store.create_run(
                target=self.target.name,
                actor=self.opts.actor,
                parameters=self.opts.parameters()
                | {"deferred_indexes": [i.to_dict() for i in deferred]},
                dry_run=self.opts.dry_run,
                missing_before=self.report.missing_before,
            )
            self.report.run_id = run_id
            self.report.deferred_indexes = [
                {"name": i.name, "method": i.method, "rebuilt": False} for i in deferred
            ]
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
            try:
                if self.opts.dry_run:
                    await self._plan()
                else:
                    for index in deferred:
                        log.warning(
                            "run %s: dropping vector index %s for the backfill", run_id, index.name
                        )
                        await indexes.drop(self.conn, index)
                    try:
                        await self._pipeline()
                    finally:
                        await asyncio.shield(self._rebuild(deferred))
            except BaseException as exc:
                self.report.status = "failed"
                error = _first_line(exc) if isinstance(exc, Exception) else "interrupted"
                raise
            finally:
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

    async def _take_over(self, abandoned: list[tuple[int, dict[str, Any]]]) -> None:
        """Resume after runs that died: rebuild vector indexes one of them left dropped."""
        if not abandoned:
            return
        log.warning("earlier runs %s had died; resuming their work", [i for i, _ in abandoned])
        for run_id, parameters in abandoned:
            for data in parameters.get("deferred_indexes") or []:
                index = indexes.VectorIndex(**data)
                if not await indexes.exists(self.conn, index):
                    log.warning(
                        "rebuilding vector index %s, left dropped by run %s", index.name, run_id
                    )
                    await indexes.rebuild(self.conn, index)

    async def _busy(self) -> TargetBusy:
        active = (
            await self.store.active_run(self.target.name) if await _has_schema(self.conn) else None
        )
        if active:
            return TargetBusy(
                f"Target {self.target.name!r} is already being backfilled by run "
                f"{active['id']} (started {active['started_at']:%Y-%m-%d %H:%M:%S %Z} by "
                f"{active['actor']}); wait for it to finish or cancel it.",
                run_id=int(active["id"]),
            )
        return TargetBusy(
            f"Target {self.target.name!r} is already being backfilled by another run; "
            "wait for it to finish."
        )

    # ------------------------------------------------------------------ scanning

    async def _pages(self) -> Any:
        await self._check_tenants()
        after: Any = None
        first = True
        remaining = self.opts.limit
        page_size = self.engine.scan_page_size
        while remaining is None or remaining > 0:
            size = page_size if remaining is None else min(page_size, remaining)
            cur = await self.conn.execute(
                self.sql.scan(first_page=first, tenants=bool(self.tenants)),
                {"after": after, "limit": size, "tenants": self.tenants},
            )
            rows = await cur.fetchall()
            if not rows:
                return
            yield rows
            first, after = False, rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < size:
                return

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

    def _row(self, raw: Sequence[Any]) -> Row | None:
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
        return Row(
            id=row_id,
            tenant=tenant,
            text=sent,
            fingerprint=fingerprint,
            tokens=tokens,
            truncated=truncated,
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
        embed_q: asyncio.Queue[Batch | None] = asyncio.Queue(self.pconf.max_concurrency * 2)
        # room for about one full write of embedded batches: enough to coalesce, and a
        # bound on what a kill -9 can lose after it was paid for
        per_write = -(-self.engine.write_batch_rows // self.batch_size)
        write_q: asyncio.Queue[_Write | None] = asyncio.Queue(max(2, per_write))
        writer_conns: list[psycopg.AsyncConnection[Any]] = []
        try:
            for _ in range(self.engine.write_concurrency):
                writer_conns.append(await connect(self.db))
                self.vector_oid = await wire.register(writer_conns[-1], self.info.types.vector_type)
            async with asyncio.TaskGroup() as tg:
                workers = [
                    tg.create_task(self._embedder(embed_q, write_q))
                    for _ in range(self.pconf.max_concurrency)
                ]
                writers = [tg.create_task(self._writer(c, write_q)) for c in writer_conns]
                ticker = tg.create_task(self._ticker())
                await self._produce(embed_q, write_q)
                for _ in workers:
                    await embed_q.put(None)
                await asyncio.wait(workers)
                for _ in writers:
                    await write_q.put(None)
                await asyncio.wait(writers)
                ticker.cancel()
        except* EmbedfillError as group:
            raise group.exceptions[0] from None
        except* psycopg.Error as group:
            raise group.exceptions[0] from None
        finally:
            for c in writer_conns:
                await c.close()

    async def _produce(
        self, embed_q: asyncio.Queue[Batch | None], write_q: asyncio.Queue[_Write | None]
    ) -> None:
        batcher = self._batcher()
        async for page in self._pages():
            if self.hooks.cancel.is_set():
                return
            hits = _Write([], [])
            for n, raw in enumerate(page, 1):
                if n % YIELD_EVERY_ROWS == 0:
                    # rendering and counting tokens is CPU work: let responses that have
                    # arrived be handled (and the next requests sent) in between
                    await asyncio.sleep(0)
                row = self._row(raw)
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
        for batch in batcher.flush():
            self._count_batch(batch)
            await embed_q.put(batch)

    async def _embedder(
        self, embed_q: asyncio.Queue[Batch | None], write_q: asyncio.Queue[_Write | None]
    ) -> None:
        while (batch := await embed_q.get()) is not None:
            if self.hooks.cancel.is_set():
                self._forget(batch)  # left NULL for the next run
                continue
            await self._embed(batch, write_q)

    def _forget(self, batch: Batch) -> None:
        for row in batch.rows:
            self.inflight.pop(row.fingerprint, None)

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
            raw = await self._call(batch, resolved.key)
        except BadInput as exc:
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
        for row, vector in zip(batch.rows, raw, strict=True):
            self.cache.put(row.fingerprint, vector)
            for r in [row, *self.inflight.pop(row.fingerprint, [])]:
                write.rows.append(r)
                write.vectors.append(vector)
        await write_q.put(write)

    def _limiter(self, key: Secret | None) -> KeyLimiter:
        name = key.fingerprint if key else "-"
        limiter = self.limiters.get(name)
        if limiter is None:
            limiter = KeyLimiter(self.pconf.rpm, self.pconf.tpm, time.monotonic())
            self.limiters[name] = limiter
        return limiter

    async def _call(self, batch: Batch, key: Secret | None) -> list[Vector]:
        tenant = self._tenant(batch.tenant)
        limiter = self._limiter(key)
        attempts = 0
        while True:
            wait = limiter.reserve(batch.tokens, time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
            attempts += 1
            self.report.requests += 1
            tenant.requests += 1
            started = time.monotonic()
            try:
                vectors = await self.provider.embed(batch.texts, api_key=key)
            except ProviderError as exc:
                self.hooks.observer.request(
                    self.target.name, str(exc.status or "error"), time.monotonic() - started
                )
                if exc.retry_after:
                    limiter.pause(exc.retry_after, time.monotonic())
                delay = decide(exc, attempts, self.policy)
                if delay is None or self.hooks.cancel.is_set():
                    exc.attempts = attempts
                    raise
                self.report.retries += 1
                log.info(
                    "run %s: tenant %s: %s; retrying in %.1fs",
                    self.report.run_id,
                    batch.tenant,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self.hooks.observer.request(self.target.name, "200", time.monotonic() - started)
            self._check_dimensions(vectors)
            self.hooks.observer.tokens(self.target.name, batch.tokens)
            self.report.tokens += batch.tokens
            tenant.tokens += batch.tokens
            return vectors

    def _check_dimensions(self, vectors: list[Vector]) -> None:
        """The one check that vectors fit the column (the column's declared size, else the
        provider's, else the first answer's). A mismatch stops the run, nothing of this
        batch written, rather than failing every batch."""
        if self.dims is None and vectors:
            self.dims = vectors[0].shape[0] if vectors[0].ndim else 0
        want = self.dims
        bad = next((v for v in vectors if v.shape != (want,)), None)
        if bad is not None:
            got = bad.shape[0] if bad.ndim else 0
            raise SchemaMismatch(
                f"The provider returned {got}-dimensional vectors but column "
                f"{self.target.embedding_column!r} of {self.target.table} holds {want}; "
                f"set dimensions = {want} for provider {self.target.provider!r} if the model "
                "supports it, or use a model of that size."
            )

    def _fail(self, batch: Batch, exc: EmbedfillError, attempts: int) -> None:
        rows = list(batch.rows)
        for row in batch.rows:
            rows.extend(self.inflight.pop(row.fingerprint, []))
        tenant = self._tenant(batch.tenant)
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
        tenant.failed += len(rows)
        self.report.failed += len(rows)
        self.hooks.observer.rows(self.target.name, "failed", len(rows))
        self._progress()

    async def _writer(
        self, conn: psycopg.AsyncConnection[Any], write_q: asyncio.Queue[_Write | None]
    ) -> None:
        statement = self.sql.write()
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
            ids = [r.id for r in item.rows]
            params = {
                "ids": wire.int8_array(ids) or ids,
                "fps": wire.fixed_text_array([r.fingerprint for r in item.rows], 32),
                "vecs": wire.vector_array(item.vectors, self.vector_oid),
                "lo": min(ids),
                "hi": max(ids),
            }
            async with conn.transaction():
                cur = await conn.execute(statement, params)
                written = {r[0] for r in await cur.fetchall()}
            self._count_written(item.rows, written)

    def _count_written(self, rows: list[Row], written: set[Any]) -> None:
        self.hooks.observer.rows(self.target.name, "embedded", len(written))
        self.hooks.observer.rows(self.target.name, "skipped", len(rows) - len(written))
        embedded = Counter(r.tenant for r in rows if r.id in written)
        for tenant, count in embedded.items():
            self._tenant(tenant).embedded += count
        self.report.embedded += len(written)
        if len(written) < len(rows):  # the app changed or filled these since we read them
            changed = Counter(r.tenant for r in rows if r.id not in written)
            for tenant, count in changed.items():
                self._tenant(tenant).skipped += count
            self.report.skipped += len(rows) - len(written)
            self.report.changed += len(rows) - len(written)
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

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            await self._flush_audit(final=False)

    async def _flush_audit(self, *, final: bool, error: str | None = None) -> None:
        if self.report.run_id is None:
            return
        failures, self.pending_failures = self.pending_failures, []
        await self.store.record_failures(self.report.run_id, failures)
        if final:
            await self.store.finish_run(self.report, error)
            if self.hooks.on_progress:
                self.hooks.on_progress(self.report)
        elif await self.store.save_progress(self.report):
            if not self.hooks.cancel.is_set():
                log.warning(
                    "run %s: cancel requested; stopping after the batches in flight",
                    self.report.run_id,
                )
            self.hooks.cancel.set()


async def _has_schema(conn: psycopg.AsyncConnection[Any]) -> bool:
    from .db.schema import current_version

    return await current_version(conn) is not None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
