"""Client-side rate limits per API key: requests and tokens per minute.

Providers enforce per-minute limits over shorter windows too, so the client paces
itself smoothly: a bucket that refills at the per-minute rate and holds only
``burst_s`` seconds' worth. The buckets are plain arithmetic over a clock value the
caller passes in, so tests drive them without sleeping. ``reserve`` may take the level
below zero: later callers then wait their turn, which keeps concurrent workers fair.
"""

from __future__ import annotations

from dataclasses import dataclass

BURST_S = 1.0


@dataclass
class Bucket:
    per_minute: float
    capacity: float
    level: float
    updated: float

    @classmethod
    def full(cls, per_minute: float, now: float, burst_s: float = BURST_S) -> Bucket:
        capacity = per_minute / 60.0 * burst_s
        return cls(per_minute=per_minute, capacity=capacity, level=capacity, updated=now)

    def reserve(self, amount: float, now: float) -> float:
        """Take ``amount``; return how many seconds the caller must wait first."""
        rate = self.per_minute / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
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
