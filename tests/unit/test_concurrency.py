from __future__ import annotations

from embedfill.concurrency import AUTO_START, RECENT_ANSWERS, Concurrency


def test_fixed_never_moves() -> None:
    c = Concurrency.fixed(7)
    for _ in range(50):
        c.succeeded(0.1)
    c.overloaded(now=100.0)
    assert c.allowed == 7


def test_auto_grows_by_half_each_round_trip_until_the_first_sign_of_load() -> None:
    c = Concurrency.auto(ceiling=32)
    assert c.allowed == AUTO_START
    for _ in range(4):  # one round trip's answers at 4 in flight: slow start, x1.5
        c.succeeded(0.1)
    assert c.allowed == 6
    for _ in range(6):
        c.succeeded(0.1)
    assert c.allowed == 9
    for _ in range(9):
        c.succeeded(0.1)
    assert c.limit == 13.5
    # 3x the fastest: the last round trip's growth queued at the provider; slow start
    # ends and takes it back
    c.succeeded(0.3)
    assert c.allowed == 9 and not c.slow_start
    for _ in range(9):  # a round trip's answers at 9: about one more
        c.succeeded(0.1)
    assert 9.9 < c.limit < 10.0
    for _ in range(1000):
        c.succeeded(0.1)
    assert c.allowed == 32  # never past the ceiling


def test_auto_leaves_slow_start_at_the_first_overload() -> None:
    c = Concurrency.auto(ceiling=32)
    for _ in range(8):
        c.succeeded(0.1)
    assert c.allowed == 8
    c.overloaded(now=5.0)
    assert c.allowed == 4 and not c.slow_start
    for _ in range(4):  # then one a round trip, not half one an answer
        c.succeeded(0.1)
    assert 4.9 < c.limit < 5.0


def test_auto_grows_only_when_the_requests_sent_filled_it() -> None:
    # a watch's trickle: one request at a time, each answered before the next goes out
    c = Concurrency.auto(ceiling=32)
    now = 0.0
    for _ in range(500):
        c.sending(1, now)
        c.succeeded(0.05, now)
        now += 0.05
    assert c.allowed == AUTO_START  # it learned nothing about more, so it did not grow
    # a burst fills it: 4 go out at once, and the 4 answers that come back grow it by half
    for busy in range(1, 5):
        c.sending(busy, now)
    for _ in range(4):
        c.succeeded(0.05, now)
    assert c.allowed == 6


def test_auto_halves_what_was_at_the_provider_not_a_limit_grown_past_it() -> None:
    c = Concurrency.auto(ceiling=32)
    for _ in range(32):
        c.succeeded(0.1)
    assert c.allowed == 20  # grown on 32 answers...
    c.overloaded(now=10.0, busy=12)  # ...but 12 were at the provider when it refused one
    assert c.allowed == 6


def test_auto_refusals_of_requests_sent_before_a_cut_do_not_cut_again() -> None:
    c = Concurrency.auto(ceiling=32)
    c.limit = 24.0
    c.overloaded(now=10.0, busy=24, sent_at=9.9)
    assert c.allowed == 12
    # the overshoot's other refusals come back later than a round trip: not cut again
    for i in range(10):
        c.overloaded(now=10.3 + i * 0.1, busy=20 - i, sent_at=9.95)
    assert c.allowed == 12
    c.overloaded(now=12.0, busy=12, sent_at=11.9)  # a request sent since: it does
    assert c.allowed == 6


def test_auto_cuts_once_per_typical_round_trip_not_per_fastest_answer() -> None:
    c = Concurrency.auto(ceiling=32)
    c.succeeded(0.002)  # a cache hit at a gateway: the fastest seen
    for _ in range(100):
        c.succeeded(0.15)
    c.limit = 32.0
    for i in range(20):  # a burst of 429s within 100 ms: one cut, not one per 2 ms
        c.overloaded(now=50.0 + i * 0.005)
    assert c.allowed == 16


def test_auto_stops_growing_when_answers_slow_down() -> None:
    c = Concurrency.auto(ceiling=32)
    c.succeeded(0.1)
    c.succeeded(0.5)  # 5x the fastest: the provider is queueing; slow start ends
    before = c.limit
    for _ in range(RECENT_ANSWERS - 2):
        c.succeeded(0.5)
    assert c.limit == before == AUTO_START


def test_auto_forgets_a_fast_answer_of_long_ago() -> None:
    """One quick answer (a one-row batch of a watch's trickle), three cuts, then answers
    at 180 ms with the limit filled: a run-long fastest held them all "slow" and the
    limit stayed at 1 for the rest of the run."""
    c = Concurrency.auto(ceiling=32)
    c.succeeded(0.033)
    for t in (1.0, 2.0, 3.0):
        c.overloaded(now=t)
    assert c.allowed == 1
    for _ in range(200):
        c.succeeded(0.18)
    assert c.fastest_s == 0.18 and c.allowed > 4


def test_auto_halves_on_overload_once_per_round_trip() -> None:
    c = Concurrency.auto(ceiling=32)
    for _ in range(1000):
        c.succeeded(0.1)
    assert c.allowed == 32
    c.overloaded(now=10.0)
    c.overloaded(now=10.05)  # answers to requests sent before the cut: no second cut
    assert c.allowed == 16
    c.overloaded(now=10.2)
    assert c.allowed == 8
    for _ in range(20):
        c.overloaded(now=100.0 + _)
    assert c.allowed == 1  # never below one


def test_config_takes_a_number_or_auto() -> None:
    import pytest

    from embedfill.config import parse_config
    from embedfill.errors import ConfigError

    def provider(value: object) -> object:
        data = {
            "providers": {"p": {"kind": "openai", "model": "m", "max_concurrency": value}},
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
        return parse_config(data).providers["p"]

    auto = provider("auto")
    assert auto.auto_concurrency and auto.max_concurrency == 32  # type: ignore[attr-defined]
    fixed = provider(8)
    assert not fixed.auto_concurrency and fixed.max_concurrency == 8  # type: ignore[attr-defined]
    for bad in ("fast", 0, -1):
        with pytest.raises(ConfigError, match="max_concurrency"):
            provider(bad)
