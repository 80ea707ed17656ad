"""Pure retry decisions: given an error and how many attempts were made, wait or give up."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .config import ProviderConfig
from .errors import ProviderError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 120.0  # the longest any one wait may be, whatever a server says

    @classmethod
    def for_provider(cls, config: ProviderConfig) -> RetryPolicy:
        """A provider's policy: ``max_attempts``, and ``max_retry_wait_s`` bounding every
        wait (a server's Retry-After and our own backoff alike)."""
        return cls(
            max_attempts=config.max_attempts,
            cap_s=min(cls.cap_s, config.max_retry_wait_s),
            max_retry_after_s=config.max_retry_wait_s,
        )


def server_wait(retry_after: float, policy: RetryPolicy) -> float:
    """How long to honour a server's ``Retry-After``: as asked, up to the policy's bound
    (a proxy's ``Retry-After: 3600`` must not hold a run for an hour)."""
    return max(0.0, min(retry_after, policy.max_retry_after_s))


def decide(
    error: BaseException,
    attempts: int,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up.

    ``attempts`` counts the attempts already made (1 after the first failure). Only
    transient provider errors (429, 5xx, timeouts, dropped connections, malformed
    answers) are retried. A ``Retry-After`` from the server is honoured, with a little
    jitter on top, up to ``max_retry_after_s``; otherwise the wait is exponential with
    full jitter between half and all of it.
    """
    if not isinstance(error, ProviderError) or not error.transient:
        return None
    if attempts >= policy.max_attempts:
        return None
    if error.retry_after is not None and error.retry_after >= 0:
        return server_wait(error.retry_after + 0.1 * rand(), policy)
    ceiling = min(policy.cap_s, policy.base_s * 2 ** (attempts - 1))
    return float(ceiling / 2 + ceiling / 2 * rand())
