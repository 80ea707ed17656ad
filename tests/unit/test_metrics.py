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


def test_a_target_cut_over_to_another_model_says_so_beside_its_outdated_rows() -> None:
    """The stale alert leaves out the outdated-model rows of a target whose change of
    model is cut over (deploy/prometheus; tests/e2e/alert_rules.test.yml): 1 while cut
    over, 0 before and after."""
    from embedfill.models import TargetStatus

    metrics = Metrics()
    live = TargetStatus("tickets", "app.t", 8, rows=60, missing=0, vector_index=None)
    moved = TargetStatus(
        "tickets", "app.t", 8, 60, 0, None, outdated_model=45, cut_over_to="hash:v2 (8 dimensions)"
    )
    metrics.set_status(live, 1.0)
    assert b'embedfill_model_cut_over{target="tickets"} 0.0' in metrics.render()
    metrics.set_status(moved, 2.0)
    text = metrics.render()
    assert b'embedfill_model_cut_over{target="tickets"} 1.0' in text
    assert b'embedfill_outdated_model_rows{target="tickets"} 45.0' in text
