"""Scan: the rows to embed, read, prepared and cut into batches.

The scanner reads NULL rows in id order (keyset pages, no OFFSET), renders and measures
their text, drops blanks, de-duplicates identical texts per tenant and cuts per-tenant
batches (planning.TenantBatcher). A lone run scans the whole target; a worker session
scans the chunks handed in (``submit``) one after the other, until ``close``. A dry run
(``plan``) walks the same scan and batching and sends and writes nothing. A read queued
behind the application's table lock never holds up a stop (``_unless_stopped``).

Shares: batches go to the embedders' queue, texts already embedded (the cache) straight
to the writers' queue; texts in flight (``inflight``) gather the rows that wait for the
same vector, which embed.py hands on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import psycopg
from psycopg import sql

from ..config import text_renderer
from ..errors import first_line as _first_line
from ..models import Batch, Row
from ..planning import CHARS_PER_TOKEN, BoundedCache, TenantBatcher, prepare_text
from .state import Chunk, PendingWrite, RunState
from .tally import Ledger

log = logging.getLogger(__name__)


YIELD_EVERY_ROWS = 32
# part batches left at a chunk's end wait this long at most for the next chunk's rows
CARRY_S = 1.0


class _NotYet:
    """_next_chunk's answer when no chunk came within the wait."""


_NOT_YET = _NotYet()


class Scanner:
    """Keyset pages -> rows -> per-tenant batches (see the module doc)."""

    def __init__(self, state: RunState, ledger: Ledger) -> None:
        self.state, self.ledger = state, ledger
        self.render = text_renderer(state.target.text, state.target.text_columns)
        self.max_tokens = state.provider.max_input_tokens
        # what _rows calls for every row, looked up once
        self._count, self._truncate = state.counter.count, state.counter.truncate
        self._dry_run = state.opts.dry_run

    async def _pages(self, chunk: Chunk | None = None) -> Any:
        """Keyset pages of the rows to embed: the whole target (a dry run) or a chunk.

        The next page is read while the caller works on this one (rendering and counting
        a page's texts takes about as long as the server takes to read it); a chunk's
        last page is known by its last id, so no empty read follows it."""
        after: Any = None
        first = True
        remaining = self.state.opts.limit
        hi: Any = None
        keys = None
        if chunk is None:
            await self._check_tenants()
        else:  # a chunk's range (or its ids) is the limit
            remaining, first, after, hi = None, chunk.lo is None, chunk.lo, chunk.hi
            keys = chunk.keys
        page_size = self.state.engine.scan_page_size

        def read(first: bool, after: Any, size: int) -> asyncio.Future[list[Any] | None]:
            statement = self.state.sql.scan(
                first_page=first,
                tenants=bool(self.state.tenants),
                upto=hi is not None,
                refresh=self.state.refresh,
                keys=keys is not None,
            )
            params = {
                "after": after,
                "hi": hi,
                "limit": size,
                "tenants": self.state.tenants,
                "keys": keys,
                **self.state.prov.params(),
            }
            return asyncio.ensure_future(self._unless_stopped(self._fetch(statement, params)))

        size = page_size if remaining is None else min(page_size, remaining)
        pending = read(first, after, size)
        try:
            while True:
                rows = await pending
                if not rows:  # none left, or the run stops
                    return
                after = rows[-1][0]
                if remaining is not None:
                    remaining -= len(rows)
                last = len(rows) < size or remaining == 0 or (hi is not None and after == hi)
                if not last:
                    size = page_size if remaining is None else min(page_size, remaining)
                    pending = read(False, after, size)
                yield rows
                if last:
                    return
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending

    async def _fetch(self, statement: sql.Composed, params: dict[str, Any]) -> list[Any]:
        """One page; a page that waited past the lane's lock or statement timeout (the
        app holds the table, say) is read again after a growing wait, the lane free
        meanwhile for other targets' work."""
        wait = 0.25
        while True:
            try:
                async with self.state.lane.hold() as conn:
                    cur = await conn.execute(statement, params)
                    return await cur.fetchall()
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                log.info("run %s: %s; reading again", self.state.report.run_id, _first_line(exc))
            await asyncio.sleep(wait)
            wait = min(wait * 2, 8.0)

    async def _unless_stopped(self, query: Coroutine[Any, Any, list[Any]]) -> list[Any] | None:
        """A read on the table, or None when the run stops first: the read is cancelled
        (psycopg cancels it on the server), so a scan queued behind the app's table lock
        (a migration's ACCESS EXCLUSIVE, held for minutes) never holds up a SIGTERM."""
        task = asyncio.ensure_future(query)
        stops = [
            asyncio.ensure_future(e.wait())
            for e in (self.state.stop_event, self.state.hooks.cancel)
        ]
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
        if not self.state.tenants:
            return
        async with self.state.lane.hold() as conn:
            cur = await conn.execute(
                self.state.sql.absent_tenants(), {"tenants": self.state.tenants}
            )
            absent = await cur.fetchall()
        shown = self.state.target.side_of or self.state.target  # a side table's: the app's
        for (tenant,) in absent:
            warning = (
                f"Tenant {tenant!r} matches no row of {shown.table} "
                f"(column {shown.tenant_column}); check the tenant id."
            )
            log.info("run %s: %s", self.state.report.run_id, warning)  # the CLI prints warnings
            self.state.report.warnings.append(warning)

    def _rows(self, raws: Sequence[Sequence[Any]], chunk: Chunk | None = None) -> list[Row]:
        """The rows ready to embed of these rows read; a blank text is counted as skipped.
        Many at once: a call, a report lookup and a counter update a row cost as much as
        the rest of the scan's work on it."""
        state, report = self.state, self.state.report
        render, count, max_tokens = self.render, self._count, self.max_tokens
        cap = max_tokens * CHARS_PER_TOKEN
        rows: list[Row] = []
        missing: dict[str | None, int] = {}
        keyed = self.state.target.tenant_column is not None
        for raw in raws:
            row_id, tenant, held, text_md5, *values = raw
            missing[tenant] = missing.get(tenant, 0) + 1
            text = render(values)
            # the common case of prepare_text, inline: a text to send whole
            # (isspace: strip's whitespace, without copying the text)
            if (
                len(text) <= cap
                and (tokens := count(text)) <= max_tokens
                and text
                and not text.isspace()
            ):
                truncated = False
            else:
                prepared = prepare_text(
                    text, count=count, truncate=self._truncate, max_tokens=max_tokens
                )
                if prepared is None:
                    self._skip_blank(tenant)
                    continue
                text, tokens, truncated = prepared
                if truncated:
                    state.tenant(tenant).truncated += 1
                    report.truncated += 1
            if self._dry_run:
                report.add_sample(row_id, tenant, text)
            # positional: Row's field order
            rows.append(
                Row(
                    row_id,
                    tenant,
                    text,
                    # the de-duplication key: the text as read, of one tenant
                    (tenant, text_md5) if keyed else text_md5,
                    tokens,
                    truncated,
                    bool(held),
                    text_md5,
                    chunk,
                )
            )
        for tenant, n in missing.items():
            state.tenant(tenant).missing += n
        if chunk is not None:
            chunk.pending += len(rows)
        return rows

    def _skip_blank(self, tenant: str | None) -> None:
        self.state.tenant(tenant).skipped += 1
        self.state.report.skipped += 1
        if not self._dry_run:
            self.state.hooks.observer.rows(self.state.target.name, "skipped", 1)

    def _batcher(self) -> TenantBatcher:
        self.state.batcher = TenantBatcher(
            batch_size=self.state.batch_size,
            max_tokens=self.state.pconf.max_request_tokens,
            max_buffered=max(self.state.engine.scan_page_size, self.state.batch_size * 4),
        )
        return self.state.batcher

    def _count_batch(self, batch: Batch) -> None:
        self.state.report.batches += 1
        self.state.tenant(batch.tenant).batches += 1

    async def plan(self) -> None:
        """Walk the same scan and batching as a real run; send and write nothing."""
        # the same bounded memory of texts as a real run, so the estimate matches it
        seen: BoundedCache[bool] = BoundedCache(self.state.cache.capacity)
        batcher = self._batcher()
        async for page in self._pages():
            for row in self._rows(page):
                key = row.key
                if seen.get(key):
                    self.state.report.deduplicated += 1
                    continue
                seen.put(key, True)
                for batch in batcher.add(row):
                    self._tally_planned(batch)
        for batch in batcher.flush():
            self._tally_planned(batch)
        for t in self.state.report.tenants:
            resolved = await self.state.client.key(t.tenant)
            t.key_source = resolved.source
            self.state.note_key_source(t.tenant, resolved)
            t.error = resolved.error
            if resolved.error:  # every row it would send fails, as in a real run
                t.would_fail = t.missing - t.skipped
                self.state.report.would_fail += t.would_fail
        self.state.report.requests = self.state.report.batches

    def _tally_planned(self, batch: Batch) -> None:
        self._count_batch(batch)
        tenant = self.state.tenant(batch.tenant)
        tenant.requests += 1
        tenant.tokens += batch.tokens
        self.state.report.tokens += batch.tokens

    async def produce(
        self, embed_q: asyncio.Queue[Batch | None], write_q: asyncio.Queue[PendingWrite | None]
    ) -> None:
        batcher = self._batcher()
        if self.state.seat is None:
            await self._scan(None, batcher, embed_q, write_q)
            for batch in batcher.flush():
                self._count_batch(batch)
                await embed_q.put(batch)
            return
        await self._check_tenants()
        chunk = await self._next_chunk()
        while chunk is not None:
            if self.state.stopping or chunk.given_up:
                chunk.scanned = True
                self.ledger.check_chunk(chunk)
            else:
                await self._scan(chunk, batcher, embed_q, write_q)
                chunk.scanned = True
                self.ledger.check_chunk(chunk)
            chunk = await self._after_chunk(chunk, batcher, embed_q)

    async def _after_chunk(
        self, scanned: Chunk, batcher: TenantBatcher, embed_q: asyncio.Queue[Batch | None]
    ) -> Chunk | None:
        """The next chunk, and what becomes of the part batches left by the last one. A
        chunk is done only once every row it read is settled, so they used to go at
        once, and every chunk boundary cut each tenant's batch in two (20,000 rows over
        25 tenants took 500 requests where 400 suffice). They wait for the next chunk's
        rows instead when that chunk is in hand or likely to come (other chunks of the
        job were to do when this one was claimed, or a ring waits in the worker for a
        slot). It comes when an older chunk of the session ends, so the part batches
        holding older chunks' rows go now. Otherwise, or if it does not come within
        CARRY_S, they go. A watch's chunks carry nothing: their rows are due now."""

        async def release(batches: list[Batch]) -> None:
            for batch in batches:
                self._count_batch(batch)
                await embed_q.put(batch)

        carry = (
            scanned.keys is None
            and batcher.buffered > 0
            and not self.state.stopping
            and self.state.seat is not None
        )
        if carry and self.state.chunk_q.empty():
            carry = scanned.more or (
                self.state.seat is not None and self.state.seat.chunks_coming()
            )
            if carry:  # what keeps a slot taken must go, or the next chunk never comes
                await release(batcher.flush_where(lambda row: row.chunk is not scanned))
        if carry:
            upcoming = await self._chunk_within(CARRY_S)
            if not isinstance(upcoming, _NotYet):
                if upcoming is None:
                    await release(batcher.flush())
                return upcoming
        await release(batcher.flush())
        return await self._next_chunk()

    async def _scan(
        self,
        chunk: Chunk | None,
        batcher: TenantBatcher,
        embed_q: asyncio.Queue[Batch | None],
        write_q: asyncio.Queue[PendingWrite | None],
    ) -> None:
        # closed on the way out, so a page read ahead is cancelled then, not left holding
        # the lane until the generator is collected
        async with contextlib.aclosing(self._pages(chunk)) as pages:
            async for page in pages:
                if self.state.stopping or (chunk is not None and chunk.given_up):
                    return
                await self._scan_page(page, chunk, batcher, embed_q, write_q)

    async def _scan_page(
        self,
        page: list[Any],
        chunk: Chunk | None,
        batcher: TenantBatcher,
        embed_q: asyncio.Queue[Batch | None],
        write_q: asyncio.Queue[PendingWrite | None],
    ) -> None:
        hits = PendingWrite([], [])
        # names looked up once a page, not once a row
        cached_vector, inflight, add = self.state.cache.get, self.state.inflight, batcher.add
        for start in range(0, len(page), YIELD_EVERY_ROWS):
            if start:
                # rendering and counting tokens is CPU work: let responses that have
                # arrived be handled (and the next requests sent) in between
                await asyncio.sleep(0)
            for row in self._rows(page[start : start + YIELD_EVERY_ROWS], chunk):
                key = row.key
                cached = cached_vector(key)
                if cached is not None:
                    self.state.report.deduplicated += 1
                    hits.rows.append(row)
                    hits.vectors.append(cached)
                    continue
                followers = inflight.get(key)
                if followers is not None:
                    self.state.report.deduplicated += 1
                    followers.append(row)
                    continue
                inflight[key] = []
                for batch in add(row):
                    self._count_batch(batch)
                    await embed_q.put(batch)
        if hits.rows:
            await write_q.put(hits)
        self.ledger.progress()

    async def _next_chunk(self) -> Chunk | None:
        """The next chunk handed in, or None when the session closes or stops."""
        chunk = await self._chunk_within(None)
        assert not isinstance(chunk, _NotYet)
        return chunk

    async def _chunk_within(self, wait_s: float | None) -> Chunk | _NotYet | None:
        """The next chunk, None when the session closes or stops, or (``wait_s``)
        ``_NOT_YET`` when none came within that long."""
        if self.state.stopping and self.state.chunk_q.empty():
            return None
        getter = asyncio.ensure_future(self.state.chunk_q.get())
        stops = [
            asyncio.ensure_future(e.wait())
            for e in (self.state.stop_event, self.state.hooks.cancel)
        ]
        try:
            await asyncio.wait(
                [getter, *stops], timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            # cancelled (the session's pipeline failed elsewhere: a write on a column a
            # finalize dropped): the getter must not outlive the scan. Left pending, it
            # would take the next chunk handed in, which then never ended and its
            # worker waited for it for ever; one it took just now goes back, so the
            # session's end resolves it with the others
            if getter.done() and not getter.cancelled():
                self.state.chunk_q.put_nowait(getter.result())
            else:
                getter.cancel()
            raise
        finally:
            for waiter in stops:
                waiter.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        if wait_s is not None and not (
            self.state.stop_event.is_set() or self.state.hooks.cancel.is_set()
        ):
            return _NOT_YET
        return None

    async def submit(self, chunk: Chunk) -> None:
        """Work on one chunk of the job (a worker session): returns once it is done."""
        if self.state.closed:  # the session ended (stopped) just now: nothing more is read
            chunk.resolve(self.state.closed_by)
        else:
            self.state.chunks.add(chunk)
            self.state.chunk_q.put_nowait(chunk)
        await asyncio.shield(chunk.done)

    def close(self) -> None:
        """No more chunks: the session drains and ends."""
        self.state.chunk_q.put_nowait(None)
