"""Write: vectors into the target column, one guarded bulk UPDATE per short transaction.

``write_concurrency`` writers each own a connection (short lock and statement timeouts)
and write one batch per short transaction with one bulk UPDATE guarded by "still NULL
and text unchanged" (a row the application changed meanwhile is skipped, not
overwritten). Rows the application holds locked are set aside and tried again later
(on a timer in a worker session, at the end of a lone run), for at most
``locked_rows_wait_s``; then they are left NULL for the next run. A lock timeout, a
deadlock or a serialization failure retries the write with backoff.

No transaction is open while a provider call is in flight, and no row or table lock is
taken.

Shares: what the embedders (and cache hits of the scanner) put on the writers' queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

import psycopg

from ..db import wire
from ..errors import DatabaseError, WriteRefused
from ..errors import first_line as _first_line
from ..models import Row
from .state import PendingWrite, RunState
from .tally import Ledger

log = logging.getLogger(__name__)


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
# What the database answers every time, however often it is asked. For some rows (a
# CHECK or NOT NULL on the vector column, a trigger of the app's that raises, "ON CONFLICT
# ... cannot affect row a second time"): the batch is halved until the rows that cannot
# be written are alone; those fail with the reason (its first line only: PostgreSQL's
# DETAIL holds row values), the others are written.
_REFUSED_ROWS = (
    psycopg.errors.IntegrityError,
    psycopg.errors.DataError,
    psycopg.errors.CardinalityViolation,
    psycopg.errors.RaiseException,
    psycopg.errors.TriggeredActionException,
)
# For every row (a privilege revoked, a relation that cannot be updated): the batch fails
# and the run halts, so nothing more is paid for that could not be written.
_REFUSED_TABLE = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.WrongObjectType,
    psycopg.errors.FeatureNotSupported,
    psycopg.errors.ObjectNotInPrerequisiteState,
)
_REFUSED_WRITES = _REFUSED_ROWS + _REFUSED_TABLE


class Writer:
    """Writer connections, guarded bulk writes, locked rows (see the module doc)."""

    def __init__(self, state: RunState, ledger: Ledger) -> None:
        self.state, self.ledger = state, ledger
        self.locked: list[tuple[float, PendingWrite]] = []  # (retry at, rows) the app held locked
        self._locked_since: dict[Any, float] = {}  # when each such row was first found locked

    async def work(self, write_q: asyncio.Queue[PendingWrite | None]) -> None:
        done = False
        while not done:
            item = await write_q.get()
            if item is None:
                return
            # coalesce what is already waiting: fewer, larger statements
            while len(item.rows) < self.state.engine.write_batch_rows and not write_q.empty():
                more = write_q.get_nowait()
                if more is None:
                    done = True
                    break
                item.rows.extend(more.rows)
                item.vectors.extend(more.vectors)
            self._take_due_locked(item)
            if item.rows:
                await self._write(item)

    async def _write(self, item: PendingWrite) -> None:
        """One guarded bulk write in its own short transaction, on a lane of the process
        (db/lanes.py). Rows the app holds locked are set aside and tried again later in
        the run; a lock or statement timeout, a deadlock or a serialization failure
        retries the write with backoff."""
        ids = [r.id for r in item.rows]
        params: dict[str, Any] = {
            "ids": wire.int8_array(ids) or ids,
            "vecs": item.vectors,  # encoded on the lane (its vector type's oid)
            "md5s": wire.uuid_array([r.text_md5 for r in item.rows]),
            "tenants": wire.text_array([r.tenant for r in item.rows]),
            # the job's tally, committed with the rows (no job: nothing counted there)
            "run_id": self.state.seat.run_id if self.state.seat else None,
            "worker": self.state.seat.name if self.state.seat else "",
            **self.state.prov.params(),
        }
        if self.state.sql.integer_ids:
            params |= {"lo": min(ids), "hi": max(ids)}
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            # a run stopped by an error elsewhere cancels its writers: the write in flight
            # still finishes and is counted, so the audit trail equals what was committed
            commit = asyncio.ensure_future(self._commit_on_lane(params, len(ids)))
            try:
                result = await asyncio.shield(commit)
                break
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    self._tally_write(item, await commit)
                raise
            except _REFUSED_WRITES as exc:
                await self._refused(item, exc)
                return
            except _TRANSIENT_WRITE_ERRORS as exc:
                if self.state.stopping:  # cancelled or halted: left NULL for the next run
                    self.ledger.settle(item.rows)
                    return
                if attempt == WRITE_ATTEMPTS:
                    self.ledger.fail_rows(
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
                    self.state.report.run_id,
                    len(ids),
                    _first_line(exc),
                    delay,
                )
                await self.state.sleep(delay)
        self._tally_write(item, result)

    async def _refused(self, item: PendingWrite, exc: psycopg.Error) -> None:
        """The database refused the write for what it holds (``_REFUSED_WRITES``): halve
        the batch until the rows it refuses are alone; they fail with the reason, and the
        job ends ``partial`` rather than hand its chunk back for ever. A refusal of every
        row (``_REFUSED_TABLE``) fails the batch and halts the run."""
        whole = isinstance(exc, _REFUSED_TABLE)
        if len(item.rows) > 1 and not whole:
            mid = len(item.rows) // 2
            for part in (slice(None, mid), slice(mid, None)):
                await self._write(PendingWrite(item.rows[part], item.vectors[part]))
            return
        reason = _first_line(exc)
        what = "the vectors" if whole else "this row's vector"
        log.warning(
            "run %s: the database refused to write %s (%s)", self.state.report.run_id, what, reason
        )
        refused = WriteRefused(
            f"The database refused to write {what} ({reason}); fix what it names (a "
            "constraint, a trigger, a privilege) and run again."
        )
        self.ledger.fail_rows(item.rows, refused, 1)
        if whole:  # every row would meet it: nothing more is paid for
            self.state.halt(refused)

    async def _commit_on_lane(
        self, params: dict[str, Any], sent: int
    ) -> tuple[set[Any] | None, set[Any]]:
        assert self.state.lanes is not None, "a dry run writes no vector"
        async with self.state.lanes.writer(self.state.lane) as lane:
            types = self.state.info.types
            vector_oid = await lane.vector_oid(types.vector_type)
            vectors = params["vecs"]
            if not isinstance(vectors, wire.VectorArray):
                half = types.kind == "halfvec"
                params["vecs"] = wire.vector_array(vectors, vector_oid, half=half)
            return await self._commit(lane.conn, params, sent)

    async def _commit(
        self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any], sent: int
    ) -> tuple[set[Any] | None, set[Any]]:
        """Write one batch; the ids written (None: every one sent), and the ids the app
        held locked (still NULL and unchanged, so owed a later try). The second look
        happens only when the write could not lock every row: the common case is one
        statement."""
        row: Any = None
        with contextlib.suppress(psycopg.errors.LockNotAvailable):
            async with conn.transaction():  # the plain UPDATE, if no row is held
                await conn.execute(FAST_LOCK_TIMEOUT)
                cur = await conn.execute(self.state.sql.write_fast(self.state.refresh), params)
                row = await cur.fetchone()
        if row is None:  # something is locked: skip what the app holds
            async with conn.transaction():
                cur = await conn.execute(self.state.sql.write(self.state.refresh), params)
                row = await cur.fetchone()
        assert row is not None
        locked, written = int(row[0]), None if row[1] is None else set(row[1])
        if locked == sent:
            return written, set()
        assert written is not None  # not every row was locked, so not every one written
        cur = await conn.execute(self.state.sql.still_owed(self.state.refresh), params)
        return written, {r[0] for r in await cur.fetchall()} - written

    def _tally_write(self, item: PendingWrite, result: tuple[set[Any] | None, set[Any]]) -> None:
        written, busy = result
        if written is None:  # every row sent, and none was busy
            self._count_written(item.rows, None)
            return
        if busy:
            due = time.monotonic() + LOCKED_RETRY_S
            waiting = PendingWrite([], [])
            for row, vector in zip(item.rows, item.vectors, strict=True):
                if row.id in busy:
                    waiting.rows.append(row)
                    waiting.vectors.append(vector)
            self.locked.append((due, waiting))
            for r in waiting.rows:
                self._locked_since.setdefault(r.id, time.monotonic())
            log.info(
                "run %s: %d rows are locked by another transaction; trying them again later",
                self.state.report.run_id,
                len(busy),
            )
        self._count_written([r for r in item.rows if r.id not in busy], written)

    async def kick_locked(self, write_q: asyncio.Queue[PendingWrite | None]) -> None:
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
                    self._locked_since.get(r.id, now) + self.state.engine.locked_rows_wait_s <= now
                    for r in w.rows
                )
            ]
            if expired:
                self.locked = [(t, w) for t, w in self.locked if w not in expired]
                self._give_up_locked([r for w in expired for r in w.rows])
            if self.locked:
                await write_q.put(PendingWrite([], []))

    def _take_due_locked(self, item: PendingWrite) -> None:
        """Add the rows set aside as locked whose time to retry has come."""
        now = time.monotonic()
        due = [w for t, w in self.locked if t <= now]
        if not due:
            return
        self.locked = [(t, w) for t, w in self.locked if t > now]
        for w in due:
            item.rows.extend(w.rows)
            item.vectors.extend(w.vectors)

    async def settle_locked(self) -> None:
        """At the end of the run, retry rows the app held locked, with growing waits, for
        at most ``locked_rows_wait_s``; rows still locked then are left NULL for the next
        run and counted in ``locked`` (and ``skipped``)."""
        deadline = time.monotonic() + self.state.engine.locked_rows_wait_s
        wait = LOCKED_RETRY_S
        while self.locked and not self.state.stopping:
            now = time.monotonic()
            if now >= deadline:
                break
            if await self.state.sleep(min(wait, max(0.0, deadline - now))):
                break
            wait = min(wait * 2, 4.0)
            item = PendingWrite([], [])
            for _, w in self.locked:
                item.rows.extend(w.rows)
                item.vectors.extend(w.vectors)
            self.locked = []
            await self._write(item)
        left = [r for _, w in self.locked for r in w.rows]
        self.locked = []
        self._give_up_locked(left)

    def _give_up_locked(self, left: list[Row]) -> None:
        for r in left:
            self._locked_since.pop(r.id, None)
        if left:
            log.warning(
                "run %s: %d rows stayed locked by the application; left NULL for the next run",
                self.state.report.run_id,
                len(left),
            )
            for tenant, count in Counter(r.tenant for r in left).items():
                self.state.tenant(tenant).skipped += count
            self.state.report.skipped += len(left)
            self.state.report.locked += len(left)
            self.state.hooks.observer.rows(self.state.target.name, "skipped", len(left))
            self.ledger.settle(left)

    def _count_written(self, rows: list[Row], written: set[Any] | None) -> None:
        """Count ``rows`` settled by a write: those in ``written`` (None: every one)
        embedded, the others changed by the app meanwhile."""
        if self._locked_since:  # settled: a later lock on them is a new wait, not this one
            for r in rows:
                self._locked_since.pop(r.id, None)
        done = rows if written is None else [r for r in rows if r.id in written]
        self.state.hooks.observer.rows(self.state.target.name, "embedded", len(done))
        self.state.hooks.observer.rows(self.state.target.name, "skipped", len(rows) - len(done))
        for tenant, count in Counter(r.tenant for r in done).items():
            self.state.tenant(tenant).embedded += count
        self.state.report.embedded += len(done)
        if self.state.refresh:
            self.state.report.refreshed += sum(1 for r in done if r.refresh)
        if written is not None and len(done) < len(rows):
            # the app changed, filled or deleted these since
            changed = Counter(r.tenant for r in rows if r.id not in written)
            for tenant, count in changed.items():
                self.state.tenant(tenant).skipped += count
            self.state.report.skipped += len(rows) - len(done)
            self.state.report.changed += len(rows) - len(done)
        self.ledger.settle(rows)
        self.ledger.progress()
