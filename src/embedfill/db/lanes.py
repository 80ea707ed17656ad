"""A worker process's table connections: few, shared by every job it works on.

A worker process holds its control connection (worker.py) and these *lanes*, whatever
the number of jobs and targets it serves:

- the **table lane**: every session's reads (keyset scan pages, key lookups, the shared
  rate budget, provenance numbers), one statement at a time, and writes when it is free;
- ``write_concurrency - 1`` **writer lanes** (fewer where ``connection_limit`` says so),
  which only write.

A lane is lent to one user at a time (``Lane.hold`` for reads, ``Lanes.writer`` for a
write's transaction), so no statement ever lands inside another's transaction. Each lane
has short lock and statement timeouts (``[engine] lock_timeout_ms``,
``statement_timeout_s``): a read or a write queued behind the application's table lock
gives way and is tried again, and never holds up the other targets' work.

At the defaults (``write_concurrency = 2``) a process uses 3 connections; with
``connection_limit=2`` in the URL, the table lane is the only one (slower: reads wait
for writes). A watch's watchers hold a connection in place of a writer lane, or share
the table lane where ``connection_limit=2`` leaves none (watch.WatchHub).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg.types import TypeInfo

from . import wire
from .connect import Database, connect

log = logging.getLogger(__name__)


class Lane:
    """One table connection, lent to one user at a time."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], lanes: Lanes | None = None) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()
        self._lanes = lanes  # told when the lane is free again (a writer may wait for it)
        self._types: dict[str, TypeInfo] = {}
        self._active: str | None = None  # the vector type its array dumper sends now

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The connection, for statements outside any transaction (or a transaction of
        the holder's own), while nobody else uses it."""
        try:
            async with self.lock:
                yield self.conn
        finally:  # failed or cancelled too: a writer waiting for a lane is told
            await self.released()

    async def released(self) -> None:
        if self._lanes is not None:
            await self._lanes.freed()

    @property
    def usable(self) -> bool:
        return not self.conn.closed and not self.conn.broken

    async def vector_oid(self, vector_type: str) -> int:
        """Make this lane send ``wire.VectorArray`` as arrays of ``vector_type`` (targets
        of one process may be ``vector`` and ``halfvec``); the type's oid. Call it with
        the lane held, right before the write."""
        info = self._types.get(vector_type)
        if info is None:
            info = await wire.type_info(self.conn, vector_type)
            self._types[vector_type] = info
        if self._active != vector_type:
            wire.register_arrays(self.conn, info)
            self._active = vector_type
        return int(info.oid)


class Lanes:
    """The table lane and the writer lanes of one worker process (see the module doc).
    Connections open when first needed, and again after one broke."""

    def __init__(
        self,
        db: Database,
        *,
        write_concurrency: int,
        reserved: int = 0,
        lock_timeout_ms: int,
        statement_timeout_s: float,
    ) -> None:
        self.db = db
        self.n_writers = db.writer_lanes(write_concurrency, reserved)
        self._timeouts = {
            "lock": f"{lock_timeout_ms}ms",
            "statement": f"{statement_timeout_s}s",
        }
        self._table: Lane | None = None
        self._writers: list[Lane] = []
        self._opening = asyncio.Lock()
        self._freed = asyncio.Condition()
        self._waiting = 0  # writers waiting for a free lane

    @property
    def statement_timeout(self) -> str:
        """The lanes' ``statement_timeout`` (``[engine] statement_timeout_s``)."""
        return self._timeouts["statement"]

    @property
    def size(self) -> int:
        """Connections these lanes hold at most."""
        return 1 + self.n_writers

    async def open(self) -> None:
        """Open what is not open: the table lane, then the writer lanes. A server without
        a free connection for a writer lane is a NoFreeConnection that names the setting
        to lower; nothing is written before every lane is open."""
        async with self._opening:
            if self._table is None or not self._table.usable:
                if self._table is not None:
                    await self._table.conn.close()
                self._table = None
                self._table = Lane(await self._connect(None), self)
            total = self.size
            kept = [w for w in self._writers if w.usable]
            for lane in self._writers:
                if lane not in kept:
                    await lane.conn.close()
            self._writers = kept
            while len(self._writers) < self.n_writers:
                k = len(self._writers) + 2
                self._writers.append(Lane(await self._connect((k, total)), self))

    async def table(self) -> Lane:
        """The table lane (opened, or opened again after it broke)."""
        if self._table is None or not self._table.usable or len(self._writers) < self.n_writers:
            await self.open()
        assert self._table is not None
        return self._table

    @contextlib.asynccontextmanager
    async def writer(self, table: Lane) -> AsyncIterator[Lane]:
        """A lane for one write's transaction: a free writer lane, else ``table`` (the
        session's table lane) when it is free; waits for the first that frees."""
        async with self._freed:
            while True:
                # a broken writer lane is passed over (the next session's open() replaces
                # it); a broken table lane fails its session's reads anyway
                lane = next((w for w in self._writers if w.usable and not w.lock.locked()), None)
                if lane is None and not table.lock.locked():
                    lane = table
                if lane is not None:
                    await lane.lock.acquire()  # free: taken at once
                    break
                self._waiting += 1
                try:
                    await self._freed.wait()
                finally:
                    self._waiting -= 1
        try:
            yield lane
        finally:
            lane.lock.release()
            await lane.released()

    async def freed(self) -> None:
        """A lane is free again: wake the writers waiting for one."""
        if self._waiting:
            async with self._freed:
                self._freed.notify_all()

    async def close(self) -> None:
        lanes = [self._table, *self._writers] if self._table else list(self._writers)
        self._table, self._writers = None, []
        for lane in lanes:
            if lane is not None:
                with contextlib.suppress(Exception):
                    await lane.conn.close()

    async def _connect(self, writer: tuple[int, int] | None) -> psycopg.AsyncConnection[Any]:
        conn = await connect(self.db, writer=writer)
        try:
            await conn.execute(
                "SELECT pg_catalog.set_config('lock_timeout', %(lock)s, false),"
                " pg_catalog.set_config('statement_timeout', %(statement)s, false)",
                self._timeouts,
            )
        except BaseException:
            await conn.close()
            raise
        return conn
