"""The admin API's response models against the types the CLI and library return."""

from __future__ import annotations


def test_the_http_report_is_the_report_field_for_field() -> None:
    """The admin API's response model is made from the report dataclass (FastAPI drops
    what a response model lacks: `locked`, `workers` and `chunks` were missing)."""
    import dataclasses

    from embedfill.http.app import FailureBody, ReportBody, SampleBody, TenantReportBody
    from embedfill.models import Failure, Report, Sample, TenantReport

    for body, cls in (
        (ReportBody, Report),
        (TenantReportBody, TenantReport),
        (FailureBody, Failure),
        (SampleBody, Sample),
    ):
        fields = [f.name for f in dataclasses.fields(cls)]
        assert [f for f in body.model_fields if f != "job_id"] == fields
    report = Report(run_id=3, target="t", dry_run=False, locked=2, chunks={"done": 1})
    answer = ReportBody.model_validate(report.to_dict() | {"job_id": 3}).model_dump()
    assert answer == report.to_dict() | {"job_id": 3}
