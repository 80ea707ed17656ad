"""scan -> embed -> write -> tally: one worker's session of a job, its stages wired by
queues.

``Run`` builds one object per stage over one ``RunState``, and ``_pipeline`` runs them
as a small set of asyncio tasks: the scanner (scan.py) feeds
``max_concurrency`` embedders (embed.py) through a bounded queue, they feed
``write_concurrency`` writers (write.py) through another, and every stage counts what
it did (tally.py). ``serve`` is the session (worker.py), fed chunk by chunk, whose report
goes to its row of ``embedfill.workers`` every second. A dry run is apart: plan.py.

Every row a session writes gets its provenance in the same statement (freshness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg

from ..db.store import Store
from ..embedding import Client
from ..errors import DatabaseError, EmbedfillError
from ..models import Batch, Report
from .embed import Embedder
from .scan import Scanner
from .state import Chunk, Hooks, PendingWrite, RunState
from .tally import Ledger
from .write import Writer

log = logging.getLogger(__name__)


class Run:
    """One worker's session of a job (``serve``): its stage objects (scanner,
    embedders, writers, ledger) over one RunState (state.py), each given what it shares
    and nothing of the others."""

    def __init__(self, state: RunState) -> None:
        assert state.seat is not None and state.lanes is not None, "a worker's session"
        self.state = state
        self.ledger = Ledger(state)
        self.scanner = Scanner(state, self.ledger)
        self.embedder = Embedder(state, self.ledger)
        self.writer = Writer(state, self.ledger)

    @property
    def report(self) -> Report:
        return self.state.report

    @property
    def hooks(self) -> Hooks:
        return self.state.hooks

    @property
    def client(self) -> Client:
        return self.state.client

    @property
    def stopping(self) -> bool:
        return self.state.stopping

    async def flush(self, store: Store) -> None:
        """Record this session's failures and report now (tally.py)."""
        await self.ledger.flush(store)

    def close(self) -> None:
        """No more chunks: the session drains and ends."""
        self.scanner.close()

    async def serve(self) -> Report:
        """A worker's session of a job: embed the chunks ``submit`` hands in until
        ``close``; this worker's report goes to its row of ``embedfill.workers`` every
        second. A reason that halts the session (the provider answers another size, say)
        fails every chunk still in it, with that reason."""
        assert self.state.seat is not None
        await self.state.resolve_provenance(create=True)
        heartbeat = asyncio.create_task(self.ledger.heartbeat())
        error: BaseException | None = None
        try:
            await self._pipeline()
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.state.closed = True
            self.state.closed_by = error if isinstance(error, Exception) else None
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            with contextlib.suppress(psycopg.Error, DatabaseError):
                await asyncio.shield(self.ledger.final_flush())
            while not self.state.chunk_q.empty():
                chunk = self.state.chunk_q.get_nowait()
                if chunk is not None:
                    self.state.chunks.add(chunk)
            for chunk in list(self.state.chunks):
                chunk.resolve(error if isinstance(error, Exception) else None)
            self.state.chunks.clear()
        return self.state.report

    async def submit(self, chunk: Chunk) -> None:
        """Work on one chunk of the job (scan.py); one handed in after the process
        abandoned its requests (state.abandon_requests) goes straight back to the queue,
        not marked done (or cancelled) with its rows unread."""
        if self.state.abandoned:
            self.state.abandon_now()
            if not self.state.hooks.cancel.is_set():
                chunk.given_up = True
        await self.scanner.submit(chunk)

    async def _pipeline(self) -> None:
        embed_q: asyncio.Queue[Batch | None] = asyncio.Queue(self.state.concurrency.ceiling * 2)
        # room for about one full write of embedded batches: enough to coalesce, and a
        # bound on what a kill -9 can lose after it was paid for
        per_write = -(-self.state.engine.write_batch_rows // self.state.batch_size)
        write_q: asyncio.Queue[PendingWrite | None] = asyncio.Queue(max(2, per_write))
        assert self.state.lanes is not None, "a worker session writes on its process's lanes"
        await self.state.lanes.open()  # a server without a free connection: said before any write
        try:
            async with asyncio.TaskGroup() as tg:
                workers = [
                    tg.create_task(self.embedder.work(embed_q, write_q))
                    for _ in range(self.state.concurrency.ceiling)
                ]
                # as many writers as the process has lanes: each write takes a free one
                writers = [
                    tg.create_task(self.writer.work(write_q)) for _ in range(self.state.lanes.size)
                ]
                watcher = tg.create_task(self.state.watch_cancel())
                abandoner = tg.create_task(self.state.watch_abandon())
                kicker = (
                    tg.create_task(self.writer.kick_locked(write_q)) if self.state.seat else None
                )
                await self.scanner.produce(embed_q, write_q)
                for _ in workers:
                    await embed_q.put(None)
                await asyncio.wait(workers)
                for _ in writers:
                    await write_q.put(None)
                await asyncio.wait(writers)
                if kicker is not None:
                    kicker.cancel()
                await self.writer.settle_locked()
                watcher.cancel()
                abandoner.cancel()
        except* EmbedfillError as group:
            raise group.exceptions[0] from None
        except* psycopg.Error as group:
            raise group.exceptions[0] from None
        if self.state.halted is not None:
            raise self.state.halt_error()
