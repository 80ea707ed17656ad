"""The provider's rate-limit headers: parsing them, and when they pause the key."""

from __future__ import annotations

import pytest

from embedfill.providers.limits import RateSignals, parse_count, parse_reset, pause_for
from tests.support.fake_openai import go_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("20ms", 0.02),
        ("0s", 0.0),
        ("1h2m3.5s", 3723.5),
        ("7.66s", 7.66),
        ("1m30.5s", 90.5),
        ("500us", 0.0005),
        ("250µs", 0.00025),
        ("2H", 7200.0),  # case does not matter
        (" 12s ", 12.0),
        ("12", 12.0),  # a bare number: seconds
        ("0.5", 0.5),
        ("", None),
        ("soon", None),
        ("-1s", None),
        ("-5", None),
        ("1.2.3s", None),
        ("s", None),
        ("6m0", None),  # a number without a unit after a unit
        ("1d", None),  # Go has no days
        ("nan", None),
        ("inf", None),
        ("9" * 400 + "h", None),  # overflows a float: not a duration any clock holds
        (None, None),
    ],
)
def test_parse_reset(value: str | None, seconds: float | None) -> None:
    assert parse_reset(value) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("value", "count"),
    [("2999", 2999.0), ("0", 0.0), ("12.5", 12.5), ("-3", None), ("many", None), (None, None)],
)
def test_parse_count(value: str | None, count: float | None) -> None:
    assert parse_count(value) == count


def test_signals_from_openai_headers_any_case() -> None:
    headers = {
        "X-RateLimit-Limit-Requests": "3000",
        "x-ratelimit-remaining-requests": "2999",
        "x-ratelimit-reset-requests": "20ms",
        "x-ratelimit-limit-tokens": "1000000",
        "x-ratelimit-remaining-tokens": "999500",
        "x-ratelimit-reset-tokens": "6m0s",
        "content-type": "application/json",
    }
    assert RateSignals.from_headers(headers) == RateSignals(
        remaining_requests=2999,
        remaining_tokens=999500,
        reset_requests_s=0.02,
        reset_tokens_s=360.0,
    )


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"content-type": "application/json"}, {"x-ratelimit-remaining-tokens": "lots"}],
)
def test_no_usable_signals(headers: dict[str, str] | None) -> None:
    assert RateSignals.from_headers(headers) is None


def S(**kw: float) -> RateSignals:
    return RateSignals(**kw)


@pytest.mark.parametrize(
    ("signals", "tokens", "ahead", "pause"),
    [
        (None, 100, 1, None),
        (S(), 100, 1, None),
        # plenty left: no pause
        (S(remaining_requests=2999, reset_requests_s=0.02), 100, 1, None),
        (S(remaining_tokens=999_500, reset_tokens_s=360.0), 100, 1, None),
        # no requests left: wait until the reset, when the bucket is full again
        (S(remaining_requests=0, reset_requests_s=1.5), 100, 1, 1.5),
        (S(remaining_requests=1, reset_requests_s=1.5), 100, 1, None),
        # tokens below one more request: until the reset
        (S(remaining_tokens=50, reset_tokens_s=9.5), 300, 1, 9.5),
        (S(remaining_tokens=299, reset_tokens_s=7.0), 300, 1, 7.0),
        (S(remaining_tokens=300, reset_tokens_s=7.0), 300, 1, None),
        # what may be in flight counts: 4 requests of 100 tokens, 350 left
        (S(remaining_tokens=350, reset_tokens_s=7.5), 100, 4, 7.5),
        (S(remaining_tokens=400, reset_tokens_s=7.5), 100, 4, None),
        (S(remaining_requests=3, reset_requests_s=8.0), 100, 4, 8.0),
        (S(remaining_requests=4, reset_requests_s=8.0), 100, 4, None),
        (S(remaining_tokens=0, reset_tokens_s=5.0), 0, 1, None),  # an empty request fits
        # the longer of the two
        (
            S(remaining_requests=0, reset_requests_s=0.5, remaining_tokens=0, reset_tokens_s=6.0),
            100,
            1,
            6.0,
        ),
        # short, but nothing says how long: no pause (a 429's Retry-After will)
        (S(remaining_requests=0), 100, 1, None),
        (S(remaining_tokens=0, reset_tokens_s=0.0), 100, 1, None),
        # an absurd reset is passed on as is; the engine bounds it by max_retry_wait_s
        (S(remaining_requests=0, reset_requests_s=86_400.0), 100, 1, 86_400.0),
    ],
)
def test_pause_for(
    signals: RateSignals | None, tokens: int, ahead: int, pause: float | None
) -> None:
    got = pause_for(signals, tokens, ahead)
    assert got == (pytest.approx(pause) if pause is not None else None)


@pytest.mark.parametrize("seconds", [0.0, 0.02, 0.999, 1.0, 7.66, 90.5, 360.0, 3723.5])
def test_the_fake_servers_durations_parse_back(seconds: float) -> None:
    assert parse_reset(go_duration(seconds)) == pytest.approx(seconds, abs=0.001)
