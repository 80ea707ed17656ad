"""Client-side rate limits per API key: requests and tokens per minute.

The buckets are plain arithmetic over a clock value the caller passes in, so tests can
drive them without sleeping. ``reserve`` may take the level below zero: later callers
then wait their turn, which keeps concurrent workers fair.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Bucket:
    per_minute: float
    level: float
    updated: float

    @classmethod
    def full(cls, per_minute: float, now: float) -> Bucket:
        return cls(per_minute=per_minute, level=per_minute, updated=now)

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount``; return how many seconds the caller must wait first."""
        rate = self.per_minute / 60.0
        self.level = min(self.per_minute, self.level + (now - self.updated) * rate)
        self.updated = now
        self.level -= amount
        return 0.0 if self.level >= 0 else -self.level / rate


class KeyLimiter:
    """rpm and tpm for one key (0 = unlimited), plus a pause a 429 can impose."""

    def __init__(self, rpm: int, tpm: int, now: float) -> None:
        self.requests = Bucket.full(rpm, now) if rpm > 0 else None
        self.tokens = Bucket.full(tpm, now) if tpm > 0 else None
        self.paused_until = 0.0

    def reserve(self, tokens: int, now: float) -> float:
        wait = max(0.0, self.paused_until - now)
        if self.requests is not None:
            wait = max(wait, self.requests.reserve(1, now))
        if self.tokens is not None:
            wait = max(wait, self.tokens.reserve(tokens, now))
        return wait

    def pause(self, seconds: float, now: float) -> None:
        self.paused_until = max(self.paused_until, now + seconds)
