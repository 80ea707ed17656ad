"""scan -> embed -> write -> tally: one run of one target, its stages wired by queues.

``_pipeline`` is a small set of asyncio tasks: the scanner (scan.py) feeds
``max_concurrency`` embedders (embed.py) through a bounded queue, they feed
``write_concurrency`` writers (write.py) through another, and every stage counts what
it did (tally.py). ``execute`` is a dry run (the scan alone: a plan, nothing sent or
written); ``serve`` is one worker's session of a job (worker.py), fed chunk by chunk,
whose report goes to its row of ``embedfill.workers`` every second.

Every row a session writes gets its provenance in the same statement (freshness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from ..db.catalog import count_missing, count_outdated
from ..errors import DatabaseError, EmbedfillError
from ..errors import first_line as _first_line
from ..freshness import mixing_warning
from ..models import Batch, Report
from ..planning import estimate_cost
from .embed import EmbedStage
from .scan import ScanStage
from .state import Chunk, PendingWrite
from .write import WriteStage

log = logging.getLogger(__name__)


class Run(ScanStage, EmbedStage, WriteStage):
    """One run of one target: a dry run (``execute``) or a worker's session of a job
    (``serve``). The stages share one RunState (state.py)."""

    async def execute(self) -> Report:
        """A dry run: the scan and batching of a real run, with nothing sent or written
        but its row in the audit trail. A real backfill is a job (jobs.py), served by
        workers (``serve``)."""
        assert self.opts.dry_run, "a real backfill is a job: see application.abackfill"
        started = time.monotonic()
        await self._resolve_provenance(create=False)
        missing = await count_missing(self.conn, self.sql, self.tenants)
        self.report.missing_before = min(missing, self.opts.limit or missing)
        if self.refresh:
            stale, outdated = await count_outdated(
                self.conn, self.sql, self.tenants, self.prov.params()
            )
            self.report.stale_before = stale + outdated
            if outdated:
                self.report.warnings.append(mixing_warning(self.target.name, outdated))
        run_id = await self.store.create_run(
            target=self.target.name,
            actor=self.opts.actor,
            parameters=self.opts.parameters(),
            dry_run=True,
            missing_before=self.report.missing_before,
            table_oid=self.info.oid,
            column=self.target.embedding_column,
        )
        self.report.run_id = run_id
        if self.hooks.on_start:
            self.hooks.on_start(run_id)
        log.info("run %s: planning %s, %d rows missing", run_id, self.target.name, missing)
        error: str | None = None
        try:
            await self._plan()
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

    async def serve(self) -> Report:
        """A worker's session of a job: embed the chunks ``submit`` hands in until
        ``close``; this worker's report goes to its row of ``embedfill.workers`` every
        second. A reason that halts the session (the provider answers another size, say)
        fails every chunk still in it, with that reason."""
        assert self.seat is not None
        await self._resolve_provenance(create=True)
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

    async def submit(self, chunk: Chunk) -> None:
        """Work on one chunk of the job (scan.py); one handed in after the process
        abandoned its requests (state.abandon_requests) goes straight back to the queue,
        not marked done (or cancelled) with its rows unread."""
        if self.abandoned:
            self._abandon_now()
            if not self.hooks.cancel.is_set():
                chunk.given_up = True
        await super().submit(chunk)

    def _final_status(self) -> str:
        if self.hooks.cancel.is_set():
            return "cancelled"
        return "partial" if self.report.failed else "succeeded"

    async def _pipeline(self) -> None:
        embed_q: asyncio.Queue[Batch | None] = asyncio.Queue(self.concurrency.ceiling * 2)
        # room for about one full write of embedded batches: enough to coalesce, and a
        # bound on what a kill -9 can lose after it was paid for
        per_write = -(-self.engine.write_batch_rows // self.batch_size)
        write_q: asyncio.Queue[PendingWrite | None] = asyncio.Queue(max(2, per_write))
        assert self.lanes is not None, "a worker session writes on its process's lanes"
        await self.lanes.open()  # a server without a free connection: said before any write
        try:
            async with asyncio.TaskGroup() as tg:
                workers = [
                    tg.create_task(self._embedder(embed_q, write_q))
                    for _ in range(self.concurrency.ceiling)
                ]
                # as many writers as the process has lanes: each write takes a free one
                writers = [tg.create_task(self._writer(write_q)) for _ in range(self.lanes.size)]
                watcher = tg.create_task(self._watch_cancel())
                abandoner = tg.create_task(self._watch_abandon())
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
                await self._settle_locked()
                watcher.cancel()
                abandoner.cancel()
        except* EmbedfillError as group:
            raise group.exceptions[0] from None
        except* psycopg.Error as group:
            raise group.exceptions[0] from None
        if self.halted is not None:
            raise self._halt_error()
