from __future__ import annotations

import pytest

from embedfill.errors import (
    AuthFailed,
    BadInput,
    ConfigError,
    ProviderUnavailable,
    RateLimited,
)
from embedfill.providers.openai import parse_retry_after
from embedfill.retry import RetryPolicy, decide

POLICY = RetryPolicy(max_attempts=5, base_s=1.0, cap_s=8.0)


@pytest.mark.parametrize(
    ("error", "attempts", "rand", "expected"),
    [
        (RateLimited(), 1, 0.0, 0.5),
        (RateLimited(), 1, 1.0, 1.0),
        (ProviderUnavailable(), 3, 1.0, 4.0),
        (ProviderUnavailable(), 4, 1.0, 8.0),  # capped
        (RateLimited(retry_after=7.0), 1, 0.0, 7.0),  # the server's word wins
        (RateLimited(retry_after=1000.0), 1, 0.0, 120.0),  # bounded
        (ProviderUnavailable(), 5, 0.5, None),  # out of attempts
        (AuthFailed(), 1, 0.5, None),
        (BadInput(), 1, 0.5, None),
        (ConfigError(), 1, 0.5, None),
        (ValueError(), 1, 0.5, None),
    ],
)
def test_decide(error: Exception, attempts: int, rand: float, expected: float | None) -> None:
    got = decide(error, attempts, POLICY, rand=lambda: rand)
    assert got == (None if expected is None else pytest.approx(expected))


def test_retry_after_headers() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert (
        parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0)
        == 10.0
    )
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after(None) is None
