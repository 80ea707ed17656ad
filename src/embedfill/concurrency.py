"""How many provider requests to keep in flight: fixed, or found by the answers.

With ``max_concurrency = "auto"`` a run starts with a few requests in flight and, like
TCP, first grows them by half each round trip (slow start: half a request more per
answer) while answers come back no slower than twice the fastest of the recent ones.
The first slower answer ends the slow start and takes back its last round trip's growth
(the load that slowed the answer was sent on it); the first 429, timeout or server error
ends it too. From then on it adds about one a round trip while answers stay fast
(additive increase), and a 429, a timeout or a server error halves it, once a round trip
(multiplicative decrease). The shared rate budget (``ratelimit``) still paces whatever
this allows. Plain arithmetic on the times and counts the caller passes in.

Two rules keep the number honest (a review measured both going wrong): an answer grows
it only when the requests at the provider filled it at some moment since that request
was sent (TCP's window validation: a watch sending one request at a time, or a run held
back by the rate budget, learns nothing about more, where it used to climb to 32
untested), and a cut halves what was at the provider, not a limit that had grown past
it (halved from 20 with 16 sent, it stayed above a provider's cap of 10 and drew a
second round of 429s).

Why slow start: climbing one a round trip from 4 to the 16-32 that a 100 ms API takes
spends 1-3 s, which is half of a 20,000-row job (measured: 0.79 of the best fixed level
in ``make bench``, 2b).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

AUTO_START = 4
AUTO_CEILING = 32
# slow start: this much more per answer (x1.5 a round trip; x2 overshot a provider's cap
# on requests at once by up to 2x before its first 429 came back)
SLOW_START_STEP = 0.5
SLOW_FACTOR = 2.0  # an answer this many times the fastest means queueing: no increase
# "the fastest" is over this many recent answers: a run-long minimum (one 33 ms answer to
# a one-row batch of a watch's trickle) held every later answer "slow", and a limit cut to
# 1 stayed there for the rest of the run
RECENT_ANSWERS = 32


@dataclass
class Concurrency:
    """The current limit on requests in flight."""

    ceiling: int
    adaptive: bool = False
    limit: float = field(default=0.0)
    fastest_s: float | None = None  # the fastest of the last RECENT_ANSWERS
    typical_s: float | None = None  # answers' smoothed time: the round trip between cuts
    slow_start: bool = True  # (adaptive) half a request more per answer until a sign of load
    _last_cut: float = float("-inf")
    _full_at: float = float("-inf")  # when requests at the provider last filled the limit
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_ANSWERS))

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

    def sending(self, busy: int, now: float) -> None:
        """A request went out at ``now``, ``busy`` at the provider with it."""
        if busy >= self.allowed:
            self._full_at = now

    def succeeded(self, latency_s: float, sent_at: float | None = None) -> None:
        """An answer to a request sent at ``sent_at`` came after ``latency_s`` (``sent_at``
        None: the limit is taken as filled meanwhile). While answers are not slower than
        SLOW_FACTOR times the fastest, and the requests sent filled the limit since this
        one went out, one more per two answers (slow start) or per round trip; the first
        slower answer ends the slow start, taking back its last round trip's growth."""
        if not self.adaptive:
            return
        recent = self._recent
        if len(recent) == recent.maxlen and recent[0] == self.fastest_s:
            recent.append(latency_s)
            self.fastest_s = min(recent)  # the fastest left the window
        else:
            recent.append(latency_s)
            if self.fastest_s is None or latency_s < self.fastest_s:
                self.fastest_s = latency_s
        typical = self.typical_s
        self.typical_s = latency_s if typical is None else typical + (latency_s - typical) / 8
        if latency_s > SLOW_FACTOR * self.fastest_s:
            if self.slow_start:
                self.slow_start = False
                # take back the last round trip's growth: the load that slowed it
                taken_back = self.limit / (1.0 + SLOW_START_STEP)
                self.limit = max(float(min(AUTO_START, self.ceiling)), taken_back)
            return
        if sent_at is not None and self._full_at < sent_at:
            return  # never filled since it went out: this says nothing about more
        step = SLOW_START_STEP if self.slow_start else 1.0 / self.limit
        self.limit = min(float(self.ceiling), self.limit + step)

    def overloaded(self, now: float, busy: int | None = None, sent_at: float | None = None) -> None:
        """A 429, timeout or server error at ``now`` for a request sent at ``sent_at``,
        with ``busy`` requests at the provider: halve what was sent, once a round trip.
        The answers to requests sent before the last cut say nothing new (the refusals
        of one overshoot come back spread over more than a round trip: each used to cut
        again)."""
        if not self.adaptive:
            return
        self.slow_start = False
        if sent_at is not None and sent_at < self._last_cut:
            return
        window = self.typical_s if self.typical_s is not None else 1.0
        if now - self._last_cut < window:
            return
        self._last_cut = now
        sent = self.limit if busy is None else float(busy)
        self.limit = max(1.0, min(self.limit, sent) / 2)
