"""scan -> embed -> write -> tally: one run of one target, its stages wired by queues.

``_pipeline`` is a small set of asyncio tasks: the scanner (scan.py) feeds
``max_concurrency`` embedders (embed.py) through a bounded queue, they feed
``write_concurrency`` writers (write.py) through another, and every stage counts what
it did (tally.py). ``execute`` is a dry run (the scan alone: a plan, nothing sent or
written); ``serve`` is one worker's session of a job (worker.py), fed chunk by chunk,
whose report goes to its row of ``embedfill.workers`` every second.

Only one real run per table column at a time: a session advisory lock, which the
server releases if the process dies, so ``kill -9`` never leaves the target locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import psycopg

from ..db import indexes
from ..db.catalog import count_missing
from ..errors import DatabaseError, EmbedfillError, RunAborted, TargetBusy
from ..models import Batch, Report
from ..planning import estimate_cost
from .embed import EmbedStage
from .scan import ScanStage
from .state import _first_line, _Write
from .write import WriteStage

log = logging.getLogger(__name__)


def lock_key(table_oid: int, column: str) -> str:
    """One run per physical column: keyed by the table's oid, so `docs`, `public.docs` and
    two target names for one table are the same target."""
    return f"embedfill:{table_oid}:{column}"


class _Run(ScanStage, EmbedStage, WriteStage):
    """One run of one target: a dry run (``execute``) or a worker's session of a job
    (``serve``). The stages share one RunState (state.py)."""

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
