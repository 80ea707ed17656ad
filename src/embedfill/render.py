"""Human output for the CLI (JSON output is ``Report.to_dict`` / ``TargetStatus.to_dict``)."""

from __future__ import annotations

import json
import shlex

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .migration import MigrationStatus, ModelPlan
from .models import SAMPLE_CHARS, Report, TargetStatus
from .verify import AdoptResult, VerifyResult


def status_tables(console: Console, statuses: list[TargetStatus]) -> None:
    for s in statuses:
        index = s.vector_index or "none"
        failing = f", [red]{s.failing:,} failing[/] ({_errors(s.failing_errors)})"
        console.print(
            f"[bold]{s.name}[/] ({s.table}, vector({s.dimensions}), index: {index}): "
            f"{s.rows:,} rows, [{'red' if s.missing else 'green'}]{s.missing:,} missing[/], "
            f"[{'yellow' if s.stale else 'green'}]{s.stale:,} stale[/], "
            f"[{'yellow' if s.outdated_model else 'green'}]{s.outdated_model:,} outdated model[/], "
            f"{s.unverified:,} unverified" + (failing if s.failing else "")
        )
        if s.cut_over_to is not None:
            console.print(
                f"  cut over to {escape(s.cut_over_to)}: the app searches the new vectors, "
                f"and the {s.outdated_model:,} outdated-model ones here are kept for "
                f"`embedfill model rollback --target {s.name}` until `model finalize` "
                "drops them"
            )
        if s.unverified:
            console.print(
                f"  {s.unverified:,} vectors have no record of embedfill's: "
                f"`embedfill verify --target {s.name}` checks a sample against the provider, "
                f"then `embedfill adopt --target {s.name}` records the ones you keep"
            )
        if s.tenants:
            columns = ["tenant", "rows", "missing", "stale", "outdated model", "unverified"]
            if s.failing:
                columns.append("failing")
            rows = []
            for t in s.tenants:
                cells = [
                    printable(str(t.tenant)),
                    f"{t.rows:,}",
                    f"{t.missing:,}",
                    f"{t.stale:,}",
                    f"{t.outdated_model:,}",
                    f"{t.unverified:,}",
                ]
                if s.failing:
                    cells.append(
                        f"{t.failing:,} ({_errors(t.failing_errors)})" if t.failing else "0"
                    )
                rows.append(cells)
            plain_table(console, columns, rows)


def printable(text: str) -> str:
    """A value from the database as it may reach a terminal: control characters (an
    escape sequence in a tenant id) shown escaped, never sent."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def plain_table(console: Console, columns: list[str], rows: list[list[str]]) -> None:
    """Columns padded as rich's borderless Table pads them, written in one go: rich
    lays out every cell of a Table, which took over a minute for 100,000 tenants."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "".join(f"  {cell:<{w}}  " for cell, w in zip(cells, widths, strict=True))

    text = "\n".join(line(r) for r in [columns, *rows]) + "\n"
    console.file.write(text)
    console.file.flush()


def _errors(by_class: dict[str, int]) -> str:
    """``AuthFailed 3, ProviderUnavailable 2``: rows failing, by error class."""
    return ", ".join(f"{name} {count:,}" for name, count in sorted(by_class.items()))


def report_table(console: Console, r: Report) -> None:
    verb = "Dry run of" if r.dry_run else "Backfill of"
    console.print(f"[bold]{verb} {r.target}[/] (run {r.run_id}, {r.provider}): {r.status}")
    outcome = "would fail" if r.dry_run else "failed"
    table = Table(
        "tenant",
        "missing",
        "embedded",
        "skipped",
        outcome,
        "requests",
        "tokens",
        "key",
        box=None,
        padding=(0, 2),
    )
    for t in sorted(r.tenants, key=lambda t: str(t.tenant)):
        table.add_row(
            str(t.tenant),
            f"{t.missing:,}",
            f"{t.embedded:,}",
            f"{t.skipped:,}",
            f"{t.would_fail if r.dry_run else t.failed:,}",
            f"{t.requests:,}",
            f"{t.tokens:,}",
            t.key_source,
        )
    console.print(table)
    failed = f"would fail: {r.would_fail:,}" if r.dry_run else f"failed: {r.failed:,}"
    console.print(
        f"missing before: {r.missing_before:,}  embedded: {r.embedded:,}  "
        f"skipped: {r.skipped:,}  {failed}  requests: {r.requests:,} "
        f"(retries {r.retries:,})  tokens: {r.tokens:,}  "
        f"{'estimated ' if r.dry_run else ''}cost: ${r.estimated_cost_usd:.4f}  "
        f"time: {r.duration_s:.1f}s"
    )
    if r.stale_before or r.refreshed:
        console.print(
            f"stale or outdated-model before: {r.stale_before:,}  refreshed: {r.refreshed:,}"
        )
    if r.truncated or r.deduplicated or r.changed:
        console.print(
            f"truncated to the model's limit: {r.truncated:,}  identical texts embedded "
            f"once: {r.deduplicated:,}  changed by the app mid-run (left for the next "
            f"run): {r.changed:,}"
        )
    for i in r.deferred_indexes:
        if r.dry_run:
            console.print(
                f"would set aside vector index {i['name']} ({i['method']}) and rebuild it"
            )
        elif i.get("rebuilt"):
            console.print(f"vector index {i['name']} rebuilt in {i.get('seconds', 0):.1f}s")
        else:
            console.print(
                f"[red]{i.get('error') or 'vector index ' + i['name'] + ' not rebuilt'}[/]"
            )
    for t in r.tenants:
        if t.error:
            console.print(f"[red]tenant {t.tenant}:[/] {escape(t.error)}")
    for f in r.failures[:20]:
        console.print(f"[red]failed[/] row {f.id} (tenant {f.tenant}): {escape(f.error)}")
    if len(r.failures) > 20 or r.failed > len(r.failures):
        console.print(
            f"... {r.failed - min(20, len(r.failures)):,} more failures in "
            f"embedfill.failures (run_id = {r.run_id})"
        )
    if r.samples:
        # the operator's own data: shown whole (up to the cut), as one JSON string each so
        # newlines and spaces are visible and nothing in it is read as markup
        console.print(f"sample texts, as they would be sent (first {SAMPLE_CHARS} characters):")
        for s in r.samples:
            text = json.dumps(s.text, ensure_ascii=False)
            console.print(f"  row {s.id} (tenant {s.tenant}): {text}", markup=False)


def verify_table(console: Console, r: VerifyResult) -> None:
    what = "every row with a vector" if r.sample is None else f"a sample of {r.sample:,}"
    verb = "Dry run of verify" if r.dry_run else "Verify"
    console.print(
        f"[bold]{verb} of {r.target}[/] ({r.provider}, {what}, threshold {r.threshold:g})"
    )
    failed = "would fail" if r.dry_run else "failed"
    table = Table(
        "tenant",
        "rows",
        "checked",
        "mismatched",
        "skipped",
        failed,
        "requests",
        "tokens",
        "key",
        box=None,
        padding=(0, 2),
    )
    for t in sorted(r.tenants, key=lambda t: str(t.tenant)):
        table.add_row(
            str(t.tenant),
            f"{t.rows:,}",
            f"{t.checked:,}",
            f"{t.mismatched:,}",
            f"{t.skipped:,}",
            f"{t.failed:,}",
            f"{t.requests:,}",
            f"{t.tokens:,}",
            t.key_source,
        )
    console.print(table)
    lowest = "n/a" if r.min_cosine is None else f"{r.min_cosine:.6f}"
    console.print(
        f"rows: {r.rows:,}  checked: {r.checked:,}  mismatched: {len(r.mismatched):,}  "
        f"min cosine: {lowest}  skipped (blank text): {r.skipped:,}  {failed}: {r.failed:,}  "
        f"requests: {r.requests:,} (retries {r.retries:,})  tokens: {r.tokens:,}  "
        f"{'estimated ' if r.dry_run else ''}cost: ${r.estimated_cost_usd:.4f}"
    )
    for t in r.tenants:
        if t.error:
            console.print(f"[red]tenant {t.tenant}:[/] {escape(t.error)}")
    for m in r.mismatched[:20]:
        value = "undefined" if m.cosine is None else f"{m.cosine:.6f}"
        console.print(f"[red]mismatched[/] row {m.id} (tenant {m.tenant}): cosine {value}")
    if len(r.mismatched) > 20:
        console.print(f"... {len(r.mismatched) - 20:,} more mismatched rows (see --json)")
    if not r.dry_run:
        for f in r.failures[:20]:
            console.print(f"[red]not checked[/] row {f.id} (tenant {f.tenant}): {escape(f.error)}")
    if r.marked_wrong:
        console.print(
            f"recorded {r.marked_wrong:,} wrong vectors as stale: `status` and `check` count "
            "them, `watch` and `backfill --refresh` re-embed them, `adopt` leaves them"
            + ("" if r.fixed is not None else "; `verify --fix` re-embeds them now")
        )
    if r.fixed is not None:
        console.print(
            f"fixed: refresh job {r.fixed.get('run_id')} {r.fixed.get('status')}, "
            f"{r.fixed.get('embedded', 0):,} re-embedded, {r.fixed.get('failed', 0):,} failed"
        )


def adopt_lines(console: Console, r: AdoptResult) -> None:
    if r.verified is not None:
        v = r.verified
        lowest = "n/a" if v.min_cosine is None else f"{v.min_cosine:.6f}"
        console.print(f"verified {v.checked:,} sampled unverified rows: min cosine {lowest}")
    console.print(f"adopted {r.adopted:,} vectors of {r.target} as {r.model}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "as fast as the provider answers (no rpm or tpm configured)"
    if seconds < 1:
        return "under a second"
    if seconds < 120:
        return f"about {seconds:.0f} s"
    if seconds < 7200:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "kB", "MB"):
        if size < 1024:
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


def model_plan_text(console: Console, p: ModelPlan) -> None:
    """``embedfill model plan`` as text: the change, its costs, then each step."""
    was, to = p.from_model, p.to_model
    home = (
        p.home["relation"] if p.strategy == "table" else f"{p.home['relation']}.{p.home['column']}"
    )
    lines = [
        f"Target {p.target}: {was['kind']}:{was['model']} ({was['dimensions']} dimensions) -> "
        f"{to['kind']}:{to['model']} ({to['dimensions']} dimensions), provider {to['provider']}",
        f"Strategy: {p.strategy} (the new vectors go to {p.home['schema']}.{home}"
        + (f", as {to['vector_type']}({to['dimensions']})" if to.get("vector_type") else "")
        + ")",
        f"Rows: {p.rows:,}, of which {p.embeddable_rows:,} have text to embed",
        "Tokens: "
        + (
            f"about {p.tokens:,} (counted on a sample of {p.sample_rows:,} rows)"
            if p.tokens_estimated
            else f"{p.tokens:,}"
        )
        + f", in {p.requests:,} requests; cost ${p.cost_usd:,.2f}",
        f"Fill: {_duration(p.fill_seconds)}"
        + (f" at the provider's {p.fill_bound}" if p.fill_bound != "none" else ""),
    ]
    for i in p.indexes:
        params = ", ".join(f"{k}={v}" for k, v in i.parameters.items())
        on = f"on the new vectors cast to {i.expression}, " if i.expression else ""
        lines.append(
            f"Index: {i.method} ({on}{i.opclass}{', ' + params if params else ''}), built "
            f"concurrently in {_duration(i.build_seconds)} (rough), "
            f"{_bytes(i.bytes)}"
        )
    lines.append(
        f"Disk: {_bytes(p.disk_bytes['total'])} ({_bytes(p.disk_bytes['vectors'])} of vectors, "
        f"{_bytes(p.disk_bytes['indexes'])} of index)"
    )
    lines.append("Steps:")
    for n, step in enumerate(p.steps, 1):
        lines += [
            f"  {n}. {step.step}: {step.does}",
            f"     locks: {step.locks}",
            f"     blocks the app: {step.blocks_app}",
        ]
    lines += [f"Note: {warning}" for warning in p.warnings]
    for line in lines:
        console.print(printable(line), markup=False)


def _model_next(st: MigrationStatus) -> str | None:
    """The command that comes next, where the phase says it."""

    def command(step: str) -> str:
        return f"embedfill model {step} --target {shlex.quote(st.target)}"

    if st.phase == "ready":
        if st.gates and all(g.get("pass") for g in st.gates.values()):
            return command("cutover")
        return command("verify") + " (every gate must pass before a cutover)"
    if st.phase == "cut_over":
        return (
            f"{command('finalize')} --yes once your apps read embedfill.active() "
            f"again (or {command('rollback')})"
        )
    if st.phase == "rolled_back":
        return f"{command('finalize')} --yes drops the new vectors"
    if st.phase in ("planned", "filling", "indexing"):
        return (
            f"{command('start')} --to {shlex.quote(str(st.to_model.get('provider')))}"
            f" --strategy {st.strategy} goes on where it stopped (if none runs now)"
        )
    return None


def model_status_text(console: Console, statuses: list[MigrationStatus]) -> None:
    """``embedfill model status`` as text: one paragraph per target."""
    for st in statuses:
        if st.migration_id is None:
            console.print(printable(f"{st.target}: no change of model on record"), markup=False)
            continue
        was, to = st.from_model, st.to_model
        lines = [
            f"{st.target}: {was.get('kind')}:{was.get('model')} -> {to.get('kind')}:"
            f"{to.get('model')} ({st.strategy}), phase {st.phase}, searches use the "
            f"{st.active} vectors",
        ]
        if st.phase == "finalized":  # its rows are the target's now: no coverage to show
            home = st.home
            new = (
                f"the side table {home.get('schema')}.{home.get('relation')}"
                if st.strategy == "table"
                else f"column {home.get('column')}"
            )
            lines.append(
                f"  finalized: dropped the old vectors; the new ones are in {new}"
                if st.active == "new"
                else f"  finalized: dropped the new vectors ({new}); the live column stays"
            )
        else:
            lines.append(
                f"  coverage {st.coverage:.2%} of {st.rows:,} rows with text; {st.missing:,} "
                f"missing, {st.stale:,} stale; index {st.index}"
            )
            for name, gate in st.gates.items():
                verdict = "pass" if gate.get("pass") else "FAIL"
                value = gate.get("value")
                more = "".join(
                    f"; {k.replace('_', ' ')}: {v}"
                    for k, v in gate.items()
                    if k not in ("value", "threshold", "pass")
                )
                lines.append(
                    f"  gate {name}: {'n/a' if value is None else value} "
                    f"(threshold {gate.get('threshold')}) {verdict}{more}"
                )
        hint = st.next_step or _model_next(st)
        if hint:
            lines.append(f"  next: {hint}")
        for line in lines:
            console.print(printable(line), markup=False)
