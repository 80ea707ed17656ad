from __future__ import annotations

import pytest

from embedfill.config import ProviderConfig, parse_config
from embedfill.errors import (
    AuthFailed,
    BadInput,
    ConfigError,
    ProviderUnavailable,
    RateLimited,
)
from embedfill.providers.openai import parse_retry_after
from embedfill.retry import RetryPolicy, decide, server_wait

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


def _provider(**keys: object) -> ProviderConfig:
    data = {"kind": "openai", "model": "m"} | keys
    config = parse_config(
        {
            "providers": {"p": data},
            "targets": [
                {
                    "name": "t",
                    "table": "t",
                    "id_column": "id",
                    "text": "{a}",
                    "embedding_column": "e",
                    "provider": "p",
                }
            ],
        }
    )
    return config.providers["p"]


def test_waits_are_capped_by_max_retry_wait_s() -> None:
    assert _provider().max_retry_wait_s == 120
    policy = RetryPolicy.for_provider(_provider(max_retry_wait_s=5, max_attempts=3))
    assert policy.max_attempts == 3
    assert server_wait(3600.0, policy) == 5.0
    assert server_wait(2.0, policy) == 2.0
    # a server's Retry-After, jitter included, and our own backoff never wait longer
    assert decide(RateLimited(retry_after=3600.0), 1, policy, rand=lambda: 1.0) == 5.0
    assert decide(ProviderUnavailable(), 2, policy, rand=lambda: 1.0) == 1.0
    assert RetryPolicy.for_provider(_provider(max_retry_wait_s=0.5)).cap_s == 0.5


@pytest.mark.parametrize("value", [0, -1, "10", True])
def test_max_retry_wait_s_must_be_a_positive_number(value: object) -> None:
    with pytest.raises(ConfigError, match="max_retry_wait_s"):
        _provider(max_retry_wait_s=value)
