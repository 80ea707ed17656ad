from __future__ import annotations

from embedfill.concurrency import AUTO_START, Concurrency


def test_fixed_never_moves() -> None:
    c = Concurrency.fixed(7)
    for _ in range(50):
        c.succeeded(0.1)
    c.overloaded(now=100.0)
    assert c.allowed == 7


def test_auto_doubles_each_round_trip_until_the_first_sign_of_load() -> None:
    c = Concurrency.auto(ceiling=32)
    assert c.allowed == AUTO_START
    for _ in range(4):  # one round trip's answers at 4 in flight: slow start doubles it
        c.succeeded(0.1)
    assert c.allowed == 8
    for _ in range(8):
        c.succeeded(0.1)
    assert c.allowed == 16
    c.succeeded(0.3)  # 3x the fastest: queueing; slow start ends, nothing added
    assert c.allowed == 16 and not c.slow_start
    for _ in range(16):  # a round trip's answers at 16: about one more
        c.succeeded(0.1)
    assert 16.9 < c.limit < 17.0
    for _ in range(1000):
        c.succeeded(0.1)
    assert c.allowed == 32  # never past the ceiling


def test_auto_leaves_slow_start_at_the_first_overload() -> None:
    c = Concurrency.auto(ceiling=32)
    for _ in range(8):
        c.succeeded(0.1)
    assert c.allowed == 12
    c.overloaded(now=5.0)
    assert c.allowed == 6 and not c.slow_start
    for _ in range(6):  # then one a round trip, not one an answer
        c.succeeded(0.1)
    assert 6.9 < c.limit < 7.0


def test_auto_stops_growing_when_answers_slow_down() -> None:
    c = Concurrency.auto(ceiling=32)
    c.succeeded(0.1)
    before = c.limit
    for _ in range(100):
        c.succeeded(0.5)  # 5x the fastest: the provider is queueing
    assert c.limit == before


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
