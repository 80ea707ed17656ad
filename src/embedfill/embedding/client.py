"""One target's provider as embedfill calls it, for a run and for ``verify`` alike.

``Client.vectors`` sends one batch with its tenant's key and comes back with its
vectors, checked (providers/answers.py), or the provider's error once retrying gives up:

- **limits**: the key's rate budget, shared with every run in every process
  (ratelimit.py), taken once a slot is ours; the provider's own signals (Retry-After,
  ``x-ratelimit-*``) hold off every worker of the key;
- **concurrency**: the requests in flight that ``Concurrency`` allows now (a fixed
  number, or "auto", which backs off when the provider is overloaded);
- **retries**: what retry.decide says, each wait cut short when the caller stops;
- **the probe** (``probe``): after a 400 before any success, one request of one word
  tells a wrong request (model, dimensions) from wrong inputs; shared by every batch;
- **bisection** (``rejected``): after a 400, the probe's verdict, else the halves of the
  batch to send again, until the one input the provider rejects is alone; that input is
  checked once more against the one-word probe when nothing succeeded since it was sent
  (a provider that rejects every request for a while is an incident, not a bad input:
  ``ProviderRejectsAll``, its rows sent again later). ``misconfig_ends`` False (a
  watch): a probe rejected before any success is such an incident too, not the end.

What becomes of failed rows is the caller's: a run fails rows in its audit trail (and
learns a smaller batch size), a verify lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from ..concurrency import Concurrency
from ..config import ProviderConfig
from ..errors import (
    BadInput,
    ProviderError,
    ProviderMisconfigured,
    ProviderRejectsAll,
    ProviderUnavailable,
    RateLimited,
)
from ..keys import KeyResolver, ResolvedKey
from ..models import Batch
from ..planning import split_batch
from ..providers import Matrix, Provider
from ..providers.answers import check_vectors
from ..providers.base import Embeddings
from ..providers.limits import RateSignals, pause_for
from ..ratelimit import SharedLimits
from ..retry import RetryPolicy, decide, server_wait
from ..secrets import Secret

T = TypeVar("T")

PROBE_TEXT = "test"  # what any embedding model accepts: see Client.probe
NO_VERDICT = ProviderError("the probe was not sent")  # the caller stopped first


class Stopped(Exception):
    """The caller stops (cancelled, halted or abandoned): this batch is not sent, or its
    request was abandoned."""


class Tally(Protocol):
    """What the caller counts, as the client sends."""

    def sent(self, tenant: str | None) -> None:
        """A request of a tenant's batch is sent."""

    def probed(self) -> None:
        """The probe is sent."""

    def retrying(self, tenant: str | None, exc: ProviderError, delay: float) -> None:
        """A failed request of a tenant's batch is tried again after ``delay`` s."""

    def retried(self) -> None:
        """... and is being tried again now."""

    def answered(self, tenant: str | None, tokens: int) -> None:
        """A request of a tenant's batch succeeded, its tokens paid."""

    def probe_answered(self, tokens: int) -> None:
        """The probe succeeded, its tokens paid."""

    def observed(self, status: str, seconds: float) -> None:
        """A request ended with this status ("200", "429", "error", ...)."""


def _no_turn() -> AbstractAsyncContextManager[Any]:
    return contextlib.nullcontext()


async def _plain_sleep(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return False


class Client:
    """One target's provider with its keys, limits, concurrency and retries (see the
    module doc). ``db_turn`` lends the database connection that keys and limits use (a
    run's table lane: one statement at a time); ``sleep`` waits and says whether the
    caller stopped meanwhile; ``abandon``, once set, cancels the requests in flight."""

    def __init__(
        self,
        *,
        provider: Provider,
        pconf: ProviderConfig,
        keys: KeyResolver,
        limits: SharedLimits | None,
        concurrency: Concurrency,
        tally: Tally,
        db_turn: Callable[[], AbstractAsyncContextManager[Any]] = _no_turn,
        sleep: Callable[[float], Awaitable[bool]] = _plain_sleep,
        abandon: asyncio.Event | None = None,
        on_abandon: Callable[[], None] | None = None,
        count_tokens: Callable[[str], int] | None = None,
        misconfig_ends: bool = True,
    ) -> None:
        self.provider, self.pconf, self.keys, self.limits = provider, pconf, keys, limits
        self.concurrency, self.tally = concurrency, tally
        self.policy = RetryPolicy.for_provider(pconf)
        self._db_turn, self._sleep = db_turn, sleep
        self._abandon, self._on_abandon = abandon, on_abandon
        self._count = count_tokens or (lambda text: 1)
        self.in_flight = 0  # requests holding a slot (some wait for the rate budget)
        self.at_provider = 0  # of them, those sent and not yet answered
        self._slots = asyncio.Condition()
        self.proven = False  # a request succeeded: model and dimensions work
        self.last_ok = float("-inf")  # monotonic: when a request last succeeded
        # the probe's 400: every request is wrong, so none more is sent (the callers
        # probe, and stop with the probe's verdict)
        self.misconfigured: BadInput | None = None
        self._probe: asyncio.Task[BadInput | None] | None = None
        # a probe rejected before any success stops the caller (ProviderMisconfigured),
        # or (False: a watch, left running) is a passing incident like the one below
        self.misconfig_ends = misconfig_ends
        # the 400 the one-word probe got while every request is rejected (an incident),
        # until a request succeeds again: batches rejected meanwhile are not bisected
        self.rejects_all: dict[Secret | None, BadInput] = {}  # by key: another may work
        self._recheck: dict[Secret | None, asyncio.Task[ProviderError | None]] = {}

    async def key(self, tenant: str | None, *, fresh: bool = False) -> ResolvedKey:
        """The tenant's key (looked up once, then cached; ``fresh``: looked up now)."""
        known = None if fresh else self.keys.cached(tenant)
        if known is not None:
            return known
        async with self._db_turn():
            return await self.keys.resolve(tenant)

    async def vectors(
        self,
        batch: Batch,
        key: Secret | None,
        *,
        give_back: Callable[[ProviderError], bool] | None = None,
        skip: Callable[[], bool] | None = None,
    ) -> tuple[Matrix, int]:
        """The batch's vectors, checked, and the attempts it took; the provider's error
        when retrying gives up (or ``give_back`` says to hand the batch to someone
        else, mid-retries), ``Stopped`` when the caller stops first or ``skip`` says the
        batch is no longer wanted."""
        attempts = 0
        while True:
            if self.misconfigured is not None:  # the probe said every request is wrong
                raise self.misconfigured
            started, busy = time.monotonic(), None  # busy: requests at the provider
            try:
                # the budget is taken once a slot is ours: taken before, with "auto"
                # holding requests back, it would be spent on a request sent much later
                async with self._slot():
                    await self._await_verdict()
                    if self.misconfigured is not None:
                        raise self.misconfigured
                    if await self._reserve(key, batch.tokens) or (skip and skip()):
                        raise Stopped
                    attempts += 1
                    self.tally.sent(batch.tenant)
                    started = time.monotonic()
                    self.at_provider += 1
                    self.concurrency.sending(self.at_provider, started)
                    try:
                        answer = await self._unless_abandoned(
                            self.provider.embed(batch.texts, api_key=key)
                        )
                    finally:
                        busy, self.at_provider = self.at_provider, self.at_provider - 1
                    vectors = check_vectors(answer, len(batch.rows))
                    self.concurrency.succeeded(time.monotonic() - started, started)
            except ProviderError as exc:
                if isinstance(exc, BadInput):
                    exc.sent_at = started  # for ``rejected``: did anything succeed since?
                self.tally.observed(str(exc.status or "error"), time.monotonic() - started)
                if isinstance(exc, (RateLimited, ProviderUnavailable)):
                    self.concurrency.overloaded(time.monotonic(), busy, started)
                await self._heed(key, exc.signals, batch.tokens, exc.retry_after)
                delay = decide(exc, attempts, self.policy)
                if delay is None or (give_back is not None and give_back(exc)):
                    exc.attempts = attempts
                    raise
                self.tally.retrying(batch.tenant, exc, delay)
                if await self._sleep(delay):
                    raise Stopped from None
                self.tally.retried()
                continue
            self.tally.observed("200", time.monotonic() - started)
            if isinstance(answer, Embeddings):
                await self._heed(key, answer.signals, batch.tokens)
            self.proven = True
            self.rejects_all.pop(key, None)
            self.last_ok = time.monotonic()
            self.tally.answered(batch.tenant, batch.tokens)
            return vectors, attempts

    async def _await_verdict(self) -> None:
        """While the probe tells a wrong request from wrong inputs, nothing more is sent:
        sent meanwhile, every batch was rejected too (11 requests where the batches in
        flight and the probe, 8, were expected)."""
        pending = self._probe
        if pending is None or self.proven:
            return
        await asyncio.wait([pending])  # neither cancels the probe nor raises its error
        if pending.cancelled() or pending.exception() is not None:
            return
        rejected = pending.result()
        if rejected is not None and not self.proven and self.misconfig_ends:
            self.misconfigured = rejected

    async def probe(self, key: Secret | None) -> ProviderMisconfigured | None:
        """After a 400 before any success: is the request wrong (model, dimensions), or
        its inputs? Bisecting cannot tell: a wrong model rejects every half, and so do
        two bad inputs that land in different halves. So one probe, shared by every
        batch, asks for the embedding of a one-word text with the same key, model and
        dimensions: rejected too, the request is wrong (the error to stop with);
        accepted, the inputs are (None: bisect on)."""
        if self.proven:
            return None
        if self._probe is None:
            self._probe = asyncio.create_task(self._verdict(key))
        # shielded: a caller cancelled does not cancel the verdict the others wait for
        rejected = await asyncio.shield(self._probe)
        if rejected is None or self.proven:
            return None
        if not self.misconfig_ends:  # a watch: an incident, asked again at the next 400
            self._probe = None
            self.rejects_all[key] = rejected
            return None
        return self._misconfigured(rejected)

    def _misconfigured(self, rejected: BadInput) -> ProviderMisconfigured:
        """The error to stop with: every request is wrong, the one-word probe's too."""
        self.misconfigured = rejected
        check = f"model = {self.pconf.model!r}"
        if self.pconf.dimensions is not None:
            check += f" and dimensions = {self.pconf.dimensions}"
        return ProviderMisconfigured(
            "Every request was rejected, even one whose only input is the word "
            f'"{PROBE_TEXT}", so the request itself is wrong, not the rows: "{rejected}" '
            f"Check {check} of provider {self.pconf.name!r}."
        )

    async def rejected(
        self, batch: Batch, key: Secret | None, error: BadInput | None = None
    ) -> ProviderMisconfigured | ProviderRejectsAll | tuple[Batch, ...]:
        """After a 400 for ``batch`` (``error``), the bisection's next step: the error to
        stop with when the request itself is wrong (``probe``); ``ProviderRejectsAll``
        when the provider refuses every request of this key for now (its rows are sent
        again later); else the batches to send again, each on its own: the halves, to
        isolate the input the provider rejects, or the batch itself when it was sent
        during an incident that is over; none when ``batch`` is that one input.
        ``Stopped`` when the caller stops first."""
        during = key in self.rejects_all  # an incident of this key was known when it came
        if not during:
            wrong = await self.probe(key)
            if wrong is not None:
                return wrong
            if key in self.rejects_all:  # the first probe of a watch found the incident
                return self._incident(self.rejects_all[key])
        sent_at = None if error is None else error.sent_at
        if not during and (len(batch.rows) > 1 or (sent_at and self.last_ok > sent_at)):
            # its halves; or its one input, rejected while the provider took others
            return split_batch(batch) if len(batch.rows) > 1 else ()
        # one input rejected with nothing accepted since it was sent, or a batch of a
        # key whose every request was refused a moment ago: this text, or every request?
        task = self._recheck.get(key)
        if task is None or task.done():
            task = self._recheck[key] = asyncio.create_task(self._send_probe(key))
        verdict = await asyncio.shield(task)
        if verdict is NO_VERDICT:
            raise Stopped
        if verdict is None:  # the one word went through: the provider takes requests
            self.rejects_all.pop(key, None)
            if during:  # sent while every request was refused: sent again as it is
                return (batch,)
            return ()  # its one input is what the provider rejects
        if isinstance(verdict, BadInput):
            if not self.proven and self.misconfig_ends:  # never accepted: the config
                return self._misconfigured(verdict)
            self.rejects_all[key] = verdict
        return self._incident(verdict)

    @staticmethod
    def _incident(verdict: ProviderError) -> ProviderRejectsAll:
        return ProviderRejectsAll(
            "The provider refuses every request for now, even one whose only input is the "
            f'word "{PROBE_TEXT}" ({verdict}); its rows are sent again later.'
        )

    async def _send_probe(self, key: Secret | None) -> ProviderError | None:
        """None when the probe was accepted; else its error: a 400 (BadInput) is the
        verdict, any other (or ``NO_VERDICT``: the caller stopped) is none."""
        tokens = self._count(PROBE_TEXT)
        if await self._reserve(key, tokens):
            return NO_VERDICT
        self.tally.probed()
        started = time.monotonic()
        try:
            await self._unless_abandoned(self.provider.embed([PROBE_TEXT], api_key=key))
        except Stopped:
            return NO_VERDICT  # nothing more is sent
        except ProviderError as exc:
            self.tally.observed(str(exc.status or "error"), time.monotonic() - started)
            return exc
        self.tally.observed("200", time.monotonic() - started)
        self.tally.probe_answered(tokens)
        self.proven = True
        self.last_ok = time.monotonic()
        return None

    async def _verdict(self, key: Secret | None) -> BadInput | None:
        """The first probe's 400, or None (accepted, or no verdict: a later 400 probes
        again)."""
        answer = await self._send_probe(key)
        if isinstance(answer, BadInput):
            return answer
        if answer is not None:
            self._probe = None
        return None

    async def _unless_abandoned(self, request: Coroutine[Any, Any, T]) -> T:
        """The provider's answer, or ``Stopped`` once the caller abandons its requests
        in flight (``abandon``): the request is cancelled, its connection closed, rather
        than waited for up to ``timeout_s``."""
        if self._abandon is None:
            return await request
        if self._abandon.is_set():
            request.close()
            if self._on_abandon is not None:
                self._on_abandon()
            raise Stopped
        task = asyncio.ensure_future(request)
        abandoned = asyncio.ensure_future(self._abandon.wait())
        try:
            await asyncio.wait([task, abandoned], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller is cancelled: so is its request
            task.cancel()
            raise
        finally:
            abandoned.cancel()
        if task.done():  # answered (or failed) before it was abandoned
            return task.result()
        if self._on_abandon is not None:
            self._on_abandon()  # before the batch's rows are dropped
        task.cancel()
        await asyncio.wait([task], timeout=1.0)  # the client closes its connection
        raise Stopped

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the requests in flight that ``concurrency`` allows now."""
        async with self._slots:
            await self._slots.wait_for(lambda: self.in_flight < self.concurrency.allowed)
            self.in_flight += 1
        try:
            yield
        finally:
            async with self._slots:
                self.in_flight -= 1
                self._slots.notify_all()

    async def _reserve(self, key: Secret | None, tokens: int) -> bool:
        """Wait for the key's shared budget to allow a request; True when the caller
        stopped meanwhile."""
        if self.limits is None:
            return await self._sleep(0)
        async with self._db_turn():
            wait = await self.limits.reserve(key, tokens)
        return await self._sleep(wait)

    async def _heed(
        self,
        key: Secret | None,
        signals: RateSignals | None,
        tokens: int,
        retry_after: float | None = None,
    ) -> None:
        """Hold off every worker of this key, in every process, as long as the provider's
        answer asks: its ``Retry-After``, or its rate-limit headers when what the key has
        left would not cover the requests this caller may send meanwhile (as many as it
        allows in flight, each like this one). Bounded by ``max_retry_wait_s``."""
        if self.limits is None:
            return
        ahead = self.concurrency.allowed
        waits = [w for w in (retry_after, pause_for(signals, tokens, ahead)) if w]
        if waits:
            async with self._db_turn():
                await self.limits.pause(key, server_wait(max(waits), self.policy))
