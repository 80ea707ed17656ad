"""Tally: every row read is accounted for once, and what happened goes where it is read.

A row is settled exactly once (written, skipped, failed or dropped); a chunk whose rows
are all settled, and whose scan is over, is done. The counts go to the run's Report
(and its per-tenant reports), to the Observer (the service's metrics) and to
``on_progress``; failures and the report go to the audit trail every PROGRESS_EVERY_S
(a lone run: its row of ``embedfill.runs``, on its own connection; a worker session:
its row of ``embedfill.workers``, on the worker's control connection), which is also
where a cancel asked for from elsewhere is picked up.

The ``Ledger`` is given the run's state (its report, the session's chunks) and keeps the
failures not yet recorded; the scanner, embedders and writers report to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

import psycopg

from ..db.store import Store
from ..errors import BadInput, DatabaseError, EmbedfillError, NonFiniteVector
from ..models import Failure, Retry, Row
from ..planning import estimate_cost
from .state import Chunk, RunState

log = logging.getLogger(__name__)


MAX_REPORTED_FAILURES = 1000
PROGRESS_EVERY_S = 1.0


class Ledger:
    """Counting, chunk settlement, progress and the audit trail (see the module doc), for
    the session whose state it is given; the other stages report to it."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.pending_failures: list[tuple[Failure, Retry]] = []  # not yet recorded
        self._last_progress = 0.0
        self._flushing = asyncio.Lock()

    def settle(self, rows: Sequence[Row]) -> None:
        """These rows are done with (written, skipped, failed or dropped): a chunk whose
        every row is settled is done."""
        settled: dict[Chunk, int] = {}  # most often one chunk: counted, then settled once
        for row in rows:
            chunk = row.chunk
            if chunk is not None:
                settled[chunk] = settled.get(chunk, 0) + 1
        for chunk, n in settled.items():
            chunk.pending -= n
            if chunk.pending <= 0:
                self.check_chunk(chunk)

    def check_chunk(self, chunk: Chunk) -> None:
        if chunk.scanned and chunk.pending <= 0:
            self.state.chunks.discard(chunk)
            # halted: the chunk ends with the reason (every chunk would meet it)
            chunk.resolve(self.state.halt_error() if self.state.halted is not None else None)

    def fail_rows(self, rows: Sequence[Row], exc: EmbedfillError, attempts: int) -> None:
        # the provider rejected these texts themselves: they wait for their text to
        # change; any other cause passes, and a watch sends them again (watch.py)
        rejected = isinstance(exc, BadInput | NonFiniteVector)
        for row in rows:
            failure = Failure(
                id=row.id,
                tenant=row.tenant,
                error=str(exc),
                error_class=type(exc).__name__,
                attempts=attempts,
            )
            resolved = self.state.keys.last(row.tenant)
            md5 = row.text_md5
            retry = Retry(
                text_md5=uuid.UUID(bytes=md5) if isinstance(md5, bytes) else md5,
                rejected_input=rejected,
                key_digest=resolved.digest if resolved is not None else None,
            )
            self.pending_failures.append((failure, retry))
            if len(self.state.report.failures) < MAX_REPORTED_FAILURES:
                self.state.report.failures.append(failure)
            self.state.tenant(row.tenant).failed += 1
        self.state.report.failed += len(rows)
        self.state.hooks.observer.rows(self.state.target.name, "failed", len(rows))
        self.settle(rows)
        self.progress()

    def progress(self) -> None:
        if self.state.hooks.on_progress is None:
            return
        now = time.monotonic()
        if now - self._last_progress >= 0.1:
            self._last_progress = now
            self.state.hooks.on_progress(self.state.report)

    async def heartbeat(self) -> None:
        """A worker session's heartbeat, on the worker's control connection."""
        assert self.state.seat is not None and self.state.seat.control is not None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            try:
                async with self.state.seat.control() as store:
                    await self.flush_audit(final=False, store=store)
            except (psycopg.Error, DatabaseError) as exc:
                log.warning("job %s: heartbeat failed: %s", self.state.report.run_id, exc)

    async def flush_audit(
        self, *, final: bool, error: str | None = None, store: Store | None = None
    ) -> None:
        if self.state.report.run_id is None:
            return
        store = store or self.state.store
        failures, self.pending_failures = self.pending_failures, []
        try:
            await store.record_failures(
                self.state.report.run_id,
                failures,
                retry_s=self.state.engine.retry_failed_s,
                retry_max_s=self.state.engine.retry_failed_max_s,
            )
        except BaseException:
            self.pending_failures[:0] = failures  # not lost: the next flush writes them
            raise
        if self.state.seat is not None:  # a worker's session: its own row, the job's totals
            seat = self.state.seat
            self.state.report.estimated_cost_usd = estimate_cost(
                self.state.report.tokens, self.state.pconf.price
            )
            mine = self.state.report.to_dict() | {"failures": []}  # they are in failures
            async with self._flushing:  # one at a time: never an older report last
                state = await store.save_worker(
                    seat.run_id, seat.name, seat.host, seat.pid, seat.chunks_done(), mine
                )
            if state != "running" and not self.state.hooks.cancel.is_set():
                if state == "cancelling":
                    log.warning(
                        "job %s: cancel requested; stopping after the batches in flight",
                        seat.run_id,
                    )
                self.state.hooks.cancel.set()
            return
        if final:
            await store.finish_run(self.state.report, error)
            if self.state.hooks.on_progress:
                self.state.hooks.on_progress(self.state.report)
        elif await store.save_progress(self.state.report):
            if not self.state.hooks.cancel.is_set():
                log.warning(
                    "run %s: cancel requested; stopping after the batches in flight",
                    self.state.report.run_id,
                )
            self.state.hooks.cancel.set()

    async def flush(self, store: Store) -> None:
        """Record this session's failures and report now (before a chunk is marked done,
        so a job's totals always include its done chunks)."""
        await self.flush_audit(final=False, store=store)

    async def final_flush(self) -> None:
        assert self.state.seat is not None and self.state.seat.control is not None
        async with self.state.seat.control() as store:
            await self.flush_audit(final=True, store=store)
