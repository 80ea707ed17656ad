"""Pure: what a provider's answer says of the key's rate limits, and when to hold off.

OpenAI (and most compatible providers) send on every answer, 200 and 429 alike::

    x-ratelimit-limit-requests: 3000        x-ratelimit-limit-tokens: 1000000
    x-ratelimit-remaining-requests: 2999    x-ratelimit-remaining-tokens: 999500
    x-ratelimit-reset-requests: 20ms        x-ratelimit-reset-tokens: 6m0s

``reset`` is the time until the bucket is full again, as a Go-style duration. When what
is left will not cover the requests that may come before a pause takes hold,
``pause_for`` says how long the key should wait: until that reset.
Nothing here is trusted: a header that does not parse is as if it were absent, and the
caller bounds every pause by ``max_retry_wait_s``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(rf"(?:{_PART.pattern})+")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_reset(value: str | None) -> float | None:
    """Seconds in a reset header: a Go duration (``20ms``, ``6m0s``, ``1h2m3.5s``) or a
    bare number of seconds; None for anything else (negative, empty, junk)."""
    if value is None:
        return None
    text = value.strip().lower()
    if _NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        return None
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
    return seconds if math.isfinite(seconds) else None


def parse_count(value: str | None) -> float | None:
    """A non-negative count (``2999``, ``999500``, ``12.5``); None for anything else."""
    if value is None:
        return None
    text = value.strip()
    return float(text) if _NUMBER.fullmatch(text) and math.isfinite(float(text)) else None


@dataclass(frozen=True)
class RateSignals:
    """What one answer said of the key's limits; None where it said nothing usable."""

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None) -> RateSignals | None:
        """The signals in an answer's headers (any case), or None when it sent none."""
        if not headers:
            return None
        h = {k.lower(): v for k, v in headers.items() if k[:12].lower() == "x-ratelimit-"}
        signals = cls(
            remaining_requests=parse_count(h.get("x-ratelimit-remaining-requests")),
            remaining_tokens=parse_count(h.get("x-ratelimit-remaining-tokens")),
            reset_requests_s=parse_reset(h.get("x-ratelimit-reset-requests")),
            reset_tokens_s=parse_reset(h.get("x-ratelimit-reset-tokens")),
        )
        return None if signals == cls() else signals


def _short(remaining: float | None, needed: float, reset_s: float | None) -> float | None:
    """The reset, when what is left is short of ``needed`` and the reset is known."""
    if remaining is None or reset_s is None or remaining >= needed or reset_s <= 0:
        return None
    return reset_s


def pause_for(
    signals: RateSignals | None, next_request_tokens: int, ahead: int = 1
) -> float | None:
    """Seconds every worker of the key should hold off, or None.

    ``ahead`` requests of ``next_request_tokens`` each may be sent before a pause takes
    hold (one, or as many as may be in flight): when the key has fewer requests or
    tokens left than they need, it waits until the matching reset, when the provider's
    bucket is full again. Not just until what they need has refilled: workers of other
    runs and processes wait on the same pause and all send when it ends.
    """
    if signals is None:
        return None
    ahead = max(1, ahead)
    tokens = max(0, next_request_tokens) * ahead
    waits = [
        _short(signals.remaining_requests, ahead, signals.reset_requests_s),
        _short(signals.remaining_tokens, tokens, signals.reset_tokens_s),
    ]
    found = [w for w in waits if w is not None]
    return max(found) if found else None
