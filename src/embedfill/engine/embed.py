"""Embed: one batch's vectors from the provider, or its rows failed with a reason.

``max_concurrency`` embedders (a fixed number, or "auto": concurrency.py) call the
provider with each tenant's key (keys.py) under the key's rate limits, shared with every
run in every process (ratelimit.py, and the provider's own signals: Retry-After,
``x-ratelimit-*``), retrying what retry.decide says, splitting a batch the provider
rejects to isolate the bad row, and checking every answer (providers/answers.py): a
malformed one is retried, a vector with NaN or infinity fails its row alone. A 400
before any success sends one probe (is the request wrong, or its inputs?), and vectors
of another size than the column's halt the run. A worker that cannot reach the provider
hands its chunk back for another worker rather than failing its rows.

Shares: batches come from the scanner's queue, vectors go to the writers' queue with
every row that waited for the same text (``inflight``) and into the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from ..errors import (
    AuthFailed,
    BadInput,
    EmbedfillError,
    NoApiKey,
    NonFiniteVector,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    RateLimited,
    SchemaMismatch,
)
from ..models import Batch
from ..planning import split_batch
from ..providers import Vector
from ..providers.answers import check_vectors, non_finite
from ..providers.base import Embeddings
from ..providers.limits import RateSignals, pause_for
from ..retry import decide, server_wait
from ..secrets import Secret
from .state import PendingWrite
from .tally import TallyStage

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CHUNK_ATTEMPTS = 3  # a chunk given back this often fails its rows like a lone run
PROBE_TEXT = "test"  # what any embedding model accepts: see _rejects_everything


class _Stopped(Exception):
    """The run is stopping (cancelled, halted or abandoned): this batch is not sent, or
    its request was abandoned; its rows stay NULL for the next run and are not
    failures."""


class EmbedStage(TallyStage):
    """Keys, limits, retries, bisection and answer checks (see the module doc)."""

    async def _embedder(
        self, embed_q: asyncio.Queue[Batch | None], write_q: asyncio.Queue[PendingWrite | None]
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

    async def _embed(self, batch: Batch, write_q: asyncio.Queue[PendingWrite | None]) -> None:
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
        write = PendingWrite([], [])
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
            await self._unless_abandoned(self.provider.embed([PROBE_TEXT], api_key=key))
        except _Stopped:
            return None  # no verdict, and nothing more is sent
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

    async def _unless_abandoned(self, request: Coroutine[Any, Any, T]) -> T:
        """The provider's answer, or ``_Stopped`` once the process abandons its requests
        in flight (state.abandon_requests): the request is cancelled, its connection
        closed, rather than waited for up to ``timeout_s``."""
        if self._abandon is None:
            return await request
        if self._abandon.is_set():
            request.close()
            self._abandon_now()
            raise _Stopped
        task = asyncio.ensure_future(request)
        abandoned = asyncio.ensure_future(self._abandon.wait())
        try:
            await asyncio.wait([task, abandoned], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this embedder is cancelled: so is its request
            task.cancel()
            raise
        finally:
            abandoned.cancel()
        if task.done():  # answered (or failed) before it was abandoned
            return task.result()
        self._abandon_now()  # before its rows are dropped: see _abandon_now
        task.cancel()
        await asyncio.wait([task], timeout=1.0)  # the client closes its connection
        raise _Stopped

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
                    answer = await self._unless_abandoned(
                        self.provider.embed(batch.texts, api_key=key)
                    )
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


def _given_up(batch: Batch) -> bool:
    chunk = batch.rows[0].chunk if batch.rows else None
    return chunk is not None and bool(chunk.given_up)


def _non_finite() -> NonFiniteVector:
    return NonFiniteVector(
        "The provider returned a vector holding NaN or infinite values for this row's text; "
        "pgvector cannot store it, so the row was not written."
    )
