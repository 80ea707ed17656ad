"""How many provider requests to keep in flight: fixed, or found by AIMD.

With ``max_concurrency = "auto"`` a run starts with a few requests in flight and, like
TCP, first doubles them each round trip (slow start: one more per answer) while answers
come back as fast as the fastest seen; the first answer slower than that, or the first
429, timeout or server error, ends the slow start. From then on it adds about one more
each round trip (additive increase), and a 429, a timeout or a server error halves it,
at most once per round trip (multiplicative decrease). A provider that slows down as it
is loaded makes latency the brake before errors are; the shared rate budget
(``ratelimit``) still paces whatever this allows. Plain arithmetic on the times the
caller passes in.

Why slow start: climbing one a round trip from 4 to the 16-32 that a 100 ms API takes
spends 1-3 s, which is half of a 20,000-row job (measured: 0.79 of the best fixed level
in ``make bench``, 2b) and all of a watch's small batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

AUTO_START = 4
AUTO_CEILING = 32
SLOW_FACTOR = 2.0  # an answer this many times the fastest seen means queueing: no increase


@dataclass
class Concurrency:
    """The current limit on requests in flight."""

    ceiling: int
    adaptive: bool = False
    limit: float = field(default=0.0)
    fastest_s: float | None = None
    slow_start: bool = True  # (adaptive) one more per answer until the first sign of load
    _last_cut: float = float("-inf")

    def __post_init__(self) -> None:
        if self.limit <= 0:
            self.limit = float(min(AUTO_START, self.ceiling) if self.adaptive else self.ceiling)

    @classmethod
    def fixed(cls, n: int) -> Concurrency:
        return cls(ceiling=n)

    @classmethod
    def auto(cls, ceiling: int = AUTO_CEILING) -> Concurrency:
        return cls(ceiling=ceiling, adaptive=True)

    @property
    def allowed(self) -> int:
        return max(1, int(self.limit))

    def succeeded(self, latency_s: float) -> None:
        """An answer arrived after ``latency_s``: while answers are not slower than
        SLOW_FACTOR times the fastest, one more in flight per answer (slow start: double
        each round trip), then per round trip; a slower answer ends the slow start."""
        if not self.adaptive:
            return
        if self.fastest_s is None or latency_s < self.fastest_s:
            self.fastest_s = latency_s
        if latency_s > SLOW_FACTOR * self.fastest_s:
            self.slow_start = False
            return
        step = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(float(self.ceiling), self.limit + step)

    def overloaded(self, now: float) -> None:
        """A 429, timeout or server error at time ``now``: halve, once per round trip (the
        answers to requests sent before the cut say nothing new)."""
        if not self.adaptive:
            return
        self.slow_start = False
        window = self.fastest_s if self.fastest_s is not None else 1.0
        if now - self._last_cut < window:
            return
        self._last_cut = now
        self.limit = max(1.0, self.limit / 2)
