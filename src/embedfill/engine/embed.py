"""Embed: one batch's vectors from the provider, or its rows failed with a reason.

``max_concurrency`` embedders (a fixed number, or "auto": concurrency.py) send batches
through the run's embedding client (embedding/client.py: each tenant's key, the key's
limits shared with every run in every process, retries, answer checks, the probe and
bisection), which ``verify`` uses too. Here: sending again the halves of a batch the
provider rejects, failing the one row it rejects and a row whose vector holds NaN or
infinity alone, halting the run when the probe says the request itself is wrong or
vectors come back of another size than the column's, and handing a chunk back for
another worker when this one cannot reach the provider rather than failing its rows.

Shares: batches come from the scanner's queue, vectors go to the writers' queue with
every row that waited for the same text (``inflight``) and into the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TypeVar

from ..embedding import Stopped
from ..errors import (
    AuthFailed,
    BadInput,
    EmbedfillError,
    NoApiKey,
    NonFiniteVector,
    ProviderError,
    ProviderMisconfigured,
    ProviderRejectsAll,
    ProviderUnavailable,
    SchemaMismatch,
    VectorsMisfit,
)
from ..models import Batch, Row
from ..providers import Matrix
from ..providers.answers import non_finite
from ..secrets import Secret
from .state import Chunk, PendingWrite, RunState
from .tally import Ledger

log = logging.getLogger(__name__)

HALFVEC_MAX = 65504.0  # the largest half-precision value: beyond, halfvec stores infinity

T = TypeVar("T")

MAX_CHUNK_ATTEMPTS = 3  # a chunk given back this often fails its rows like a lone run


class Embedder:
    """Keys, limits, retries, bisection and answer checks (see the module doc)."""

    def __init__(self, state: RunState, ledger: Ledger) -> None:
        self.state, self.ledger = state, ledger
        self._failed_batches = 0  # batches (and single rows) failed, for any cause

    async def work(
        self, embed_q: asyncio.Queue[Batch | None], write_q: asyncio.Queue[PendingWrite | None]
    ) -> None:
        while (batch := await embed_q.get()) is not None:
            if self.state.stopping:
                self._forget(batch)  # left NULL for the next run (or worker)
                continue
            # a batch may hold rows of two chunks (scan.py carries part batches over a
            # chunk's end): those of a chunk handed back meanwhile are dropped
            kept, orphans = self._drop_given_up(batch)
            if kept is not None:
                await self._embed(kept, write_q)
            await self._adopt(orphans, write_q)

    def _drop_given_up(self, batch: Batch) -> tuple[Batch | None, list[Row]]:
        """The batch without the rows of chunks handed back to the queue (settled as
        dropped: another worker embeds them), None when none is left; and the orphans
        (see _forget)."""
        if not any(row.chunk is not None and row.chunk.given_up for row in batch.rows):
            return batch, []
        dropped = tuple(r for r in batch.rows if r.chunk is not None and r.chunk.given_up)
        kept = tuple(r for r in batch.rows if r.chunk is None or not r.chunk.given_up)
        orphans = self._forget(Batch(batch.tenant, dropped))
        return (Batch(batch.tenant, kept) if kept else None), orphans

    def _forget(self, batch: Batch) -> list[Row]:
        """Drop the batch's rows (left NULL: their chunk went back to the queue, or the
        run stops) and the rows waiting for their texts' vectors. Returns the orphans:
        waiting rows of a chunk that goes on, not dropped (their chunk would end with
        them NULL and the job succeed): the caller sends them (_adopt) or fails them."""
        dropped = list(batch.rows)
        orphans: list[Row] = []
        over = self.state.stopping or self.state.halted is not None
        for row in batch.rows:
            for waiting in self.state.inflight.pop(row.key, []):
                chunk = waiting.chunk
                if over or chunk is None or chunk.given_up:
                    dropped.append(waiting)
                else:
                    orphans.append(waiting)
        self.ledger.settle(dropped)
        return orphans

    async def _adopt(self, orphans: list[Row], write_q: asyncio.Queue[PendingWrite | None]) -> None:
        """Send the orphans' texts themselves: one row of each text, the others wait for
        its vector as before. A text whose row the scan has read again since (a new
        leader, on its way) is waited for instead: replacing its list of waiting rows
        would leave them unsettled, and their chunk would never end."""
        leaders: dict[Any, Row] = {}
        for row in orphans:
            waiting = self.state.inflight.get(row.key)
            if waiting is not None:
                waiting.append(row)
            else:
                leaders[row.key] = row
                self.state.inflight[row.key] = []
        if leaders:
            rows = tuple(leaders.values())
            await self._embed(Batch(rows[0].tenant, rows), write_q)

    async def _embed(self, batch: Batch, write_q: asyncio.Queue[PendingWrite | None]) -> None:
        if len(batch.rows) > self.state.batch_size:  # cut before the provider's limit was learned
            size = self.state.batch_size
            for i in range(0, len(batch.rows), size):
                await self._embed(Batch(batch.tenant, batch.rows[i : i + size]), write_q)
            return
        tenant = self.state.tenant(batch.tenant)
        # a tenant whose key failed: its key is looked up again, not taken from the
        # cache (a watch sends its rows again because the key changed: sent with the
        # cached old one, they failed again and waited out their backoff)
        resolved = await self.state.client.key(
            batch.tenant, fresh=batch.tenant in self.state.dead_tenants
        )
        tenant.key_source = resolved.source
        self.state.note_key_source(batch.tenant, resolved)
        dead = self.state.dead_tenants.get(batch.tenant)
        if dead is not None and dead[1] != resolved.digest:
            # its key changed (stored, or tenant_key_sql answers another): try it
            del self.state.dead_tenants[batch.tenant]
            tenant.error = None
        if resolved.error and batch.tenant not in self.state.dead_tenants:
            self.state.dead_tenants[batch.tenant] = (resolved.error, resolved.digest)
            log.warning(
                "run %s: tenant %s cannot be embedded: %s",
                self.state.report.run_id,
                batch.tenant,
                resolved.error,
            )
        if batch.tenant in self.state.dead_tenants:
            reason = self.state.dead_tenants[batch.tenant][0]
            tenant.error = reason
            self._fail(batch, NoApiKey(reason) if resolved.error else AuthFailed(reason), 0)
            return
        try:
            vectors, attempts = await self._call(batch, resolved.key)
        except Stopped:  # the run stops, or the batch's chunks went back to the queue
            await self._adopt(self._forget(batch), write_q)  # left NULL for another run
            return
        except BadInput as exc:
            try:
                halves = await self.state.client.rejected(batch, resolved.key, exc)
            except Stopped:  # as above: the run stops before the verdict
                await self._adopt(self._forget(batch), write_q)
                return
            if isinstance(halves, ProviderMisconfigured):  # the request, not the rows
                self.state.halt(halves)
                self._forget(batch)  # halted: nothing is orphaned
                return
            if isinstance(halves, ProviderRejectsAll):  # an incident: sent again later
                self._fail_told(batch, halves, exc.attempts, logging.WARNING)
                return
            if halves:
                self.state.report.retries += 1  # its rows are sent again, in halves
                failed = self._failed_batches
                for half in halves:
                    await self._embed(half, write_q)
                if len(halves) > 1 and self._failed_batches == failed:
                    # each half went through (none rejected, none failed otherwise, such
                    # as in a provider's incident): the batch was too big for it
                    self._learn_batch_size(len(batch.rows))
                return
            self._fail(batch, exc, exc.attempts)
            return
        except AuthFailed as exc:
            reason = f"{exc} (tenant {batch.tenant!r}, key source {resolved.source})"
            self.state.dead_tenants[batch.tenant] = (reason, resolved.digest)
            tenant.error = reason
            log.error("run %s: tenant %s: %s", self.state.report.run_id, batch.tenant, exc)
            self._fail(batch, exc, exc.attempts)
            return
        except ProviderError as exc:
            if self._give_back(batch, exc):
                await self._adopt(self._forget(batch), write_q)
                return
            self._fail_told(batch, exc, exc.attempts, logging.ERROR)
            return
        write = PendingWrite([], [])
        halfvec = self.state.info.types.kind == "halfvec"
        unusable = set(non_finite(vectors, HALFVEC_MAX if halfvec else None))
        remember, waiting = self.state.cache.put, self.state.inflight.pop
        rows, vecs = write.rows, write.vectors
        for i, (row, vector) in enumerate(zip(batch.rows, vectors, strict=True)):
            if unusable and i in unusable:  # pgvector refuses NaN and infinity: this row fails
                self._fail(Batch(batch.tenant, (row,)), _non_finite(halfvec), attempts)
                continue
            remember(row.key, vector)
            rows.append(row)
            vecs.append(vector)
            for follower in waiting(row.key, ()):  # rows of the same text
                rows.append(follower)
                vecs.append(vector)
        if write.rows:
            await write_q.put(write)

    def _learn_batch_size(self, refused: int) -> None:
        """A batch of ``refused`` rows was rejected (400) while each half of it went
        through: the provider takes fewer inputs per request than ``batch_size`` says.
        Later batches of this session are cut at half that, so the 400s stop at the
        first (a batch_size above the provider's limit made 61 of 144 requests 400s)."""
        size = max(1, refused // 2)
        if size >= self.state.batch_size:
            return
        log.warning(
            "run %s: the provider refused a request of %d inputs that it took in halves; "
            "sending at most %d per request from now on (lower batch_size in the config)",
            self.state.report.run_id,
            refused,
            size,
        )
        self.state.batch_size = size
        if self.state.batcher is not None:
            self.state.batcher.batch_size = size
        if not any("batch_size" in w for w in self.state.report.warnings):
            self.state.report.warnings.append(
                f"The provider refused requests of {refused} inputs; batches were cut to "
                f"{size} from then on. Set batch_size = {size} (or less) for provider "
                f"{self.state.pconf.name!r} to avoid the refused requests."
            )

    async def _call(self, batch: Batch, key: Secret | None) -> tuple[Matrix, int]:
        """The batch's vectors, checked, and the attempts it took; raises the provider's
        error when retrying gives up, ``Stopped`` when the run stops first."""

        def give_back(exc: ProviderError) -> bool:
            return self._give_back(batch, exc, lease=True)

        vectors, attempts = await self.state.client.vectors(
            batch, key, give_back=give_back, skip=lambda: _given_up(batch)
        )
        now = time.monotonic()
        for chunk in _chunks(batch):
            chunk.last_ok = now
        self._check_dimensions(vectors)
        return vectors, attempts

    def _give_back(self, batch: Batch, exc: ProviderError, *, lease: bool = False) -> bool:
        """Whether to hand this batch's chunk back to the queue instead of failing its
        rows: this worker cannot reach the provider (a connection error, a timeout, a
        5xx), so another worker may. Only a job's chunk, only while it has attempts left,
        and (``lease``, mid-retries) once the chunk has seen no success for a lease."""
        chunks = _chunks(batch)
        if not chunks or not isinstance(exc, ProviderUnavailable):
            return False
        live = [c for c in chunks if not c.given_up]
        if not live:
            return True
        now = time.monotonic()
        if (
            lease
            and self.state.seat
            and any(now - c.last_ok < self.state.seat.lease_s for c in live)
        ):
            return False
        may = [c for c in live if c.attempt < MAX_CHUNK_ATTEMPTS]
        if lease and len(may) < len(live):
            return False  # mid-retries, a batch of two chunks goes back whole or not at all
        # retries spent: the chunks that may go back do; the rows of those on their last
        # attempt fail (_fail drops the others' rows)
        for chunk in sorted(may, key=lambda c: c.seq):
            log.warning(
                "job %s: chunk %d goes back to the queue for another worker: %s",
                self.state.report.run_id,
                chunk.seq,
                exc,
            )
            chunk.given_up = True
        return len(may) == len(live)

    def _check_dimensions(self, vectors: Matrix) -> None:
        """The one check that vectors fit the column (the column's declared size, else the
        provider's, else the first answer's). Vectors of one answer are all of one size
        (check_vectors); another size than the column's would fail every batch, so it
        halts the run, nothing of this batch written."""
        if self.state.dims is None:
            self.state.dims = vectors[0].shape[0]
        got = vectors[0].shape[0]
        if got != self.state.dims:
            sentence = (
                f"The provider returned {got}-dimensional vectors but column "
                f"{self.state.target.embedding_column!r} of {self.state.target.table} holds "
                f"{self.state.dims}; set dimensions = {self.state.dims} for provider "
                f"{self.state.target.provider!r} if the model supports it, or use a model of "
                "that size."
            )
            seat = self.state.seat
            if seat is not None and seat.outlives_provider_faults:
                # a watch: a proxy misrouted for a while fails these rows, not the watch
                raise VectorsMisfit(f"{sentence} (its rows are sent again later)")
            self.state.halt(SchemaMismatch(sentence))
            raise Stopped

    def _fail_told(self, batch: Batch, exc: ProviderError, attempts: int, level: int) -> None:
        """``_fail``, logged: the batch's tenant, size and why."""
        log.log(
            level,
            "run %s: tenant %s: batch of %d failed: %s",
            self.state.report.run_id,
            batch.tenant,
            len(batch.rows),
            exc,
        )
        self._fail(batch, exc, attempts)

    def _fail(self, batch: Batch, exc: EmbedfillError, attempts: int) -> None:
        self._failed_batches += 1
        # a handed-back chunk's rows are not failed; the rows of chunks that go on and
        # wait for their texts are (the same text fails the same way)
        kept, orphans = self._drop_given_up(batch)
        rows = list(orphans)
        for row in kept.rows if kept is not None else ():
            rows.append(row)
            rows.extend(self.state.inflight.pop(row.key, []))
        if rows:
            self.ledger.fail_rows(rows, exc, attempts)


def _chunks(batch: Batch) -> set[Chunk]:
    return {row.chunk for row in batch.rows if row.chunk is not None}


def _given_up(batch: Batch) -> bool:
    """Every chunk the batch holds rows of was handed back (its request is not sent)."""
    chunks = _chunks(batch)
    return bool(chunks) and all(chunk.given_up for chunk in chunks)


def _non_finite(half: bool = False) -> NonFiniteVector:
    if half:
        return NonFiniteVector(
            "The provider returned a vector holding NaN, infinite values or values beyond "
            f"halfvec's ±{HALFVEC_MAX:,.0f} for this row's text; the halfvec column cannot "
            "store it, so the row was not written (a vector(N) column would take values "
            "that large)."
        )
    return NonFiniteVector(
        "The provider returned a vector holding NaN or infinite values for this row's text; "
        "pgvector cannot store it, so the row was not written."
    )
