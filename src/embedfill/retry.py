"""Pure retry decisions: given an error and how many attempts were made, wait or give up."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ProviderError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 120.0


def decide(
    error: BaseException,
    attempts: int,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up.

    ``attempts`` counts the attempts already made (1 after the first failure). Only
    transient provider errors (429, 5xx, timeouts, dropped connections) are retried.
    A ``Retry-After`` from the server is honoured (bounded) with a little jitter on top;
    otherwise the wait is exponential with full jitter between half and all of it.
    """
    if not isinstance(error, ProviderError) or not error.transient:
        return None
    if attempts >= policy.max_attempts:
        return None
    if error.retry_after is not None and error.retry_after >= 0:
        return min(error.retry_after, policy.max_retry_after_s) + 0.1 * rand()
    ceiling = min(policy.cap_s, policy.base_s * 2 ** (attempts - 1))
    return float(ceiling / 2 + ceiling / 2 * rand())
