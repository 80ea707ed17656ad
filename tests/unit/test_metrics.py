"""The target error gauge (http/metrics.py): one error class at a time per target, the
one it has now; the others go to 0 so no alert lingers on a class that was fixed."""

from __future__ import annotations

from embedfill.http.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["target"], s.labels["error_class"]): s.value
        for family in metrics.target_errors.collect()
        for s in family.samples
    }


def test_a_targets_error_class_is_the_one_it_has_now() -> None:
    metrics = Metrics()
    metrics.set_target_error("docs", None)
    assert samples(metrics) == {}  # never failed: no series
    metrics.set_target_error("docs", "TargetNotFound")
    metrics.set_target_error("notes", "SchemaMismatch")
    metrics.set_target_error("docs", "SchemaMismatch")
    assert samples(metrics) == {
        ("docs", "TargetNotFound"): 0,
        ("docs", "SchemaMismatch"): 1,
        ("notes", "SchemaMismatch"): 1,
    }
    metrics.set_target_error("docs", None)
    assert samples(metrics)[("docs", "SchemaMismatch")] == 0
    assert samples(metrics)[("notes", "SchemaMismatch")] == 1
    assert b'embedfill_target_error{error_class="SchemaMismatch",target="notes"} 1.0' in (
        metrics.render()
    )
