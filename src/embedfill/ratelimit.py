"""Rate limits per API key: requests and tokens per minute, one budget for everyone.

Providers enforce per-minute limits over shorter windows too, so the client paces
itself smoothly: a token bucket that refills at the per-minute rate and holds only
``burst_s`` seconds' worth. Taking from it may drive the level below zero: the caller
then waits for the deficit to refill, which keeps concurrent callers fair.

The buckets live in PostgreSQL (``embedfill.rate_budgets``), keyed by a one-way hash of
the provider's URL, the model and the key, so ``rpm``/``tpm`` are totals across every
run and worker in every process that uses that key, and a 429's ``Retry-After`` pauses
all of them, not just the one that saw it. The arithmetic that turns levels into a wait
is a plain function (``wait_for``); the SQL does the refill under a row lock.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from .db.store import Store
from .secrets import Secret

BURST_S = 1.0
UNLIMITED = 1e18  # the capacity of a bucket that is never short
PAUSE_CHECK_S = 0.25  # an unlimited key looks for pauses set elsewhere this often


@dataclass(frozen=True)
class Rates:
    """Per-minute limits (0 = none) and the burst they allow, as per-second terms."""

    rpm: int
    tpm: int
    burst_s: float = BURST_S

    @property
    def limited(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    def terms(self, tokens: int) -> dict[str, float]:
        """The reservation's parameters: cost, refill rate and capacity per bucket."""
        req_rate, tok_rate = self.rpm / 60.0, self.tpm / 60.0
        return {
            "requests": 1.0 if self.rpm else 0.0,
            "tokens": float(tokens) if self.tpm else 0.0,
            "req_rate": req_rate,
            "req_cap": max(1.0, req_rate * self.burst_s) if self.rpm else UNLIMITED,
            "tok_rate": tok_rate,
            "tok_cap": max(float(tokens), tok_rate * self.burst_s) if self.tpm else UNLIMITED,
        }


def wait_for(rates: Rates, req_level: float, tok_level: float, paused_s: float) -> float:
    """Seconds to wait before sending, given the buckets' levels after this request's
    cost was taken (negative: a deficit that refills at the rate) and a shared pause."""
    wait = max(0.0, paused_s)
    if rates.rpm and req_level < 0:
        wait = max(wait, -req_level / (rates.rpm / 60.0))
    if rates.tpm and tok_level < 0:
        wait = max(wait, -tok_level / (rates.tpm / 60.0))
    return wait


def budget_key(scope: str, key: Secret | None) -> str:
    """The budget's id: a one-way hash, never the key itself."""
    secret = key.reveal() if key else ""
    return hashlib.sha256(f"{scope}\x00{secret}".encode()).hexdigest()[:32]


class SharedLimits:
    """The shared budget of one provider configuration's keys, through ``store``.

    Without ``rpm``/``tpm`` there is nothing to count, only pauses to honour, so the
    database is asked at most every PAUSE_CHECK_S per key (a pause another process set
    reaches this one within that), not once per request."""

    def __init__(self, store: Store, rates: Rates, scope: str) -> None:
        self.store = store
        self.rates = rates
        self.scope = scope  # base URL and model: providers limit per model
        self._paused: dict[str, tuple[float, float]] = {}  # key id: (checked, until)

    async def reserve(self, key: Secret | None, tokens: int) -> float:
        """Take one request of ``tokens`` from the key's budget; seconds to wait first."""
        key_id = budget_key(self.scope, key)
        if not self.rates.limited:
            now = time.monotonic()
            checked, until = self._paused.get(key_id, (-PAUSE_CHECK_S, 0.0))
            if now - checked >= PAUSE_CHECK_S:
                until = now + await self.store.paused_for(key_id)
                self._paused[key_id] = (now, until)
            return max(0.0, until - now)
        levels = await self.store.reserve_budget(key_id, **self.rates.terms(tokens))
        return wait_for(self.rates, *levels)

    async def pause(self, key: Secret | None, seconds: float) -> None:
        """Hold every request of this key, in every process, for ``seconds``."""
        key_id = budget_key(self.scope, key)
        await self.store.pause_budget(key_id, seconds)
        now = time.monotonic()
        _, until = self._paused.get(key_id, (now, 0.0))
        self._paused[key_id] = (now, max(until, now + seconds))
