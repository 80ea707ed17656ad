"""`check`'s verdict, a pure function of a target's status and the bounds."""

from __future__ import annotations

import pytest

from embedfill.errors import UsageError
from embedfill.health import Bounds, evaluate
from embedfill.models import TargetStatus


def status(
    missing: int = 0, stale: int = 0, outdated: int = 0, unverified: int = 0
) -> TargetStatus:
    return TargetStatus(
        name="tickets",
        table='app."SupportTickets"',
        dimensions=8,
        rows=100,
        missing=missing,
        vector_index=None,
        stale=stale,
        outdated_model=outdated,
        unverified=unverified,
    )


@pytest.mark.parametrize(
    ("counts", "bounds", "over"),
    [
        ((0, 0, 0, 0), Bounds(), []),
        ((0, 0, 0, 99), Bounds(), []),  # unverified vectors are shown, never judged
        ((1, 0, 0, 0), Bounds(), ["missing"]),
        ((5, 0, 0, 0), Bounds(max_missing=5), []),
        ((0, 1, 0, 0), Bounds(), ["stale"]),
        ((0, 0, 1, 0), Bounds(), ["stale"]),  # an outdated model counts as stale
        ((0, 3, 2, 0), Bounds(max_stale=5), []),
        ((0, 3, 3, 0), Bounds(max_stale=5), ["stale"]),  # their sum is bounded
        ((9, 9, 0, 0), Bounds(max_missing=8, max_stale=8), ["missing", "stale"]),
    ],
)
def test_verdict(counts: tuple[int, int, int, int], bounds: Bounds, over: list[str]) -> None:
    result = evaluate(status(*counts), bounds)
    assert result.over == over and result.ok is (not over)
    assert result.to_dict()["over"] == over and result.to_dict()["ok"] is (not over)


def test_line() -> None:
    ok = evaluate(status(0, 3, 0, 15), Bounds(max_stale=10))
    assert ok.line() == (
        "ok tickets: 0 missing (max 0), 3 stale + 0 outdated model (max 10), 15 unverified"
    )
    bad = evaluate(status(40, 0, 2, 0), Bounds(max_stale=10))
    assert bad.line().startswith("FAIL tickets: 40 missing (max 0), 0 stale + 2 outdated")


@pytest.mark.parametrize("kwargs", [{"max_missing": -1}, {"max_stale": -5}])
def test_negative_bounds_are_a_usage_error(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError, match="must be 0 or more"):
        Bounds(**kwargs)
