"""Many tenants (issue 15, item 12): the batcher releases the same batches as a scan of
every buffer would, without the scan (the dry run was superlinear in tenants), and text
`status` writes its tenant table plainly (rich took 75 s for 100,000 tenants), with
control characters in tenant ids escaped."""

from __future__ import annotations

import io
import random

from rich.console import Console

from embedfill.models import Batch, Report, Row, TargetStatus, TenantReport, TenantStatus
from embedfill.planning import TenantBatcher
from embedfill.render import status_tables


def test_the_batcher_releases_a_largest_partial_batch_without_scanning() -> None:
    """Each early release is of a largest partial batch at that moment (the rule a scan
    of every buffer applied), every row goes out once, in id order per tenant, within
    the batch size and token cap, and no more than max_buffered rows wait."""
    rng = random.Random(7)
    ours = TenantBatcher(16, 200, 100)
    waiting: dict[str | None, int] = {}  # a shadow of the partial batches' sizes
    out: list[Batch] = []
    for i in range(20_000):
        row = Row(
            id=i,
            tenant=f"t{rng.randrange(300)}",
            text="x",
            key=str(i).encode(),
            tokens=rng.randrange(1, 40),
        )
        released = ours.add(row)
        waiting[row.tenant] = waiting.get(row.tenant, 0) + 1
        for batch in released:
            full = len(batch.rows) >= 16 or sum(r.tokens for r in batch.rows) >= 200
            capped = batch.rows[-1].id != i and batch.tenant == row.tenant  # cap reached
            if not (full or capped):  # released early: a largest one
                assert len(batch.rows) == max(waiting.values())
            waiting[batch.tenant] -= len(batch.rows)
            if not waiting[batch.tenant]:
                del waiting[batch.tenant]
        out += released
        assert ours.buffered <= 100 and ours.buffered == sum(waiting.values())
    out += ours.flush()
    ids = [r.id for b in out for r in b.rows]
    assert sorted(ids) == list(range(20_000))
    for batch in out:
        assert len(batch.rows) <= 16
        assert len(batch.rows) == 1 or sum(r.tokens for r in batch.rows) <= 200
    by_tenant: dict[str | None, list[int]] = {}
    for batch in out:
        by_tenant.setdefault(batch.tenant, []).extend(r.id for r in batch.rows)
    assert all(v == sorted(v) for v in by_tenant.values())


def test_text_status_writes_every_tenant_aligned_and_escapes_control_characters() -> None:
    tenants = tuple(TenantStatus(tenant=f"tenant-{i}", rows=10, missing=i % 3) for i in range(5000))
    tenants += (TenantStatus(tenant="evil\x1b[2J\x07", rows=1, missing=1),)
    status = TargetStatus(
        name="t",
        table="app.t",
        dimensions=8,
        rows=50_001,
        missing=3,
        vector_index=None,
        tenants=tenants,
    )
    out = io.StringIO()
    status_tables(Console(file=out, width=120), [status])
    lines = out.getvalue().splitlines()
    table = lines[1:]  # below the target's line (no unverified vector: no hint line)
    assert table[0].split() == [
        "tenant",
        "rows",
        "missing",
        "stale",
        "outdated",
        "model",
        "unverified",
    ]
    assert len(table) == 1 + len(tenants)
    assert len({len(line) for line in table}) == 1  # every line padded to the same columns
    assert "\x1b" not in out.getvalue() and "evil\\x1b[2J\\x07" in out.getvalue()


class _CountedList(list[TenantReport]):
    """A tenant list that counts the walks over it."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super().__iter__()


def test_a_report_finds_its_tenants_without_walking_the_list() -> None:
    """Report.tenant walked every tenant's entry to find one: a dry run over 100,000
    tenants took 106 s (10,000: 4 s). It is indexed now; the index follows a list set
    or grown directly, and is not part of what the report shows."""
    tenants = _CountedList()
    report = Report(run_id=None, target="t", dry_run=True, tenants=tenants)
    parts = [report.tenant(f"t{i}") for i in range(20_000)]
    assert all(report.tenant(f"t{i}") is parts[i] for i in range(0, 20_000, 7))
    assert report.tenant(None) is report.tenant(None)
    assert tenants.walks <= 1 and len(report.tenants) == 20_001
    assert "_tenant_index" not in report.to_dict()
    report.tenants = [TenantReport(tenant="x", missing=3)]
    assert report.tenant("x").missing == 3 and len(report.tenants) == 1
    report.tenants.append(TenantReport(tenant="y", missing=4))
    assert report.tenant("y").missing == 4 and len(report.tenants) == 2
