"""Jobs: one backfill of a target, cut into chunks that workers anywhere claim.

A job is a row of ``embedfill.runs`` (its id is the job id, in the CLI, the HTTP API and
the audit trail). Creating it cuts the rows that need an embedding into chunks of about
``[engine] chunk_rows`` consecutive ids (``embedfill.chunks``: lo < id <= hi, compared
by the server) and queues one procrastinate job per chunk, in one transaction. Workers
(``worker.py``) claim chunks, embed and write their rows, and record what they did in
their row of ``embedfill.workers``; the job's totals are the sum of those rows. The worker
that settles the last chunk finishes the job: it rebuilds the indexes set aside and
writes the final report, merged from every worker's.

Only one job per table column runs at a time: a second start joins it (``joined`` in the
report) unless it asks to be exclusive (``TargetBusy``, exit 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from .. import errors
from ..config import ProviderConfig, TargetConfig, env_secret
from ..db import indexes
from ..db.catalog import TableInfo, count_missing_by_tenant, count_outdated_by_tenant
from ..db.store import Store, watch_key
from ..db.target_sql import TargetSQL
from ..errors import EmbedfillError, RunAborted, TargetBusy
from ..errors import first_line as _first_line
from ..freshness import mixing_warning
from ..models import Report, TenantReport
from ..providers import needs_key
from .queue import ring
from .spec import JobSpec, vector_settings

log = logging.getLogger(__name__)

MAX_REPORTED_FAILURES = 1000
_SUMMED = (
    "embedded",
    "skipped",
    "failed",
    "truncated",
    "changed",
    "locked",
    "deduplicated",
    "refreshed",
    "batches",
    "requests",
    "retries",
    "tokens",
)
_TENANT_SUMMED = (
    "missing",
    "embedded",
    "skipped",
    "failed",
    "batches",
    "requests",
    "tokens",
    "truncated",
)


def spec_of(
    kind: str,
    target: TargetConfig,
    pconf: ProviderConfig,
    info: TableInfo,
    *,
    env: Mapping[str, str],
) -> JobSpec:
    """The spec of a job of ``kind`` on ``target`` as this process resolves it (its
    config, the live table, its environment): what a job is created with, and what a
    worker compares with a job's before it works on it."""
    settings = vector_settings(target, pconf)
    return JobSpec(
        kind=kind,
        target=target.name,
        table_oid=info.oid,
        column=target.embedding_column,
        settings=settings,
        platform_key=needs_key(pconf) and bool(env_secret(env, pconf.api_key_env)),
    )


def lock_key(table_oid: int, column: str) -> str:
    """One job per physical column: keyed by the table's oid, so `docs`, `public.docs` and
    two target names for one table are the same target."""
    return f"embedfill:{table_oid}:{column}"


def _bound(value: Any) -> Any:
    """A chunk bound as JSON: an integer as is, any other id as its text."""
    return value if isinstance(value, int) else str(value)


async def plan_chunks(
    conn: psycopg.AsyncConnection[Any],
    tsql: TargetSQL,
    tenants: list[str] | None,
    limit: int | None,
    chunk_rows: int,
    provenance: dict[str, Any] | None = None,
) -> list[tuple[Any, Any]]:
    """(lo, hi] bounds cutting the rows to embed into chunks of ``chunk_rows``. The last
    chunk is open-ended (rows added later are in it), unless ``limit`` ends it. With
    ``provenance`` (a refresh), outdated rows count as rows to embed."""
    bounds: list[tuple[Any, Any]] = []
    after: Any = None
    left = limit
    while True:
        step = chunk_rows if left is None else min(chunk_rows, left)
        cur = await conn.execute(
            tsql.chunk_end(
                first=after is None, tenants=bool(tenants), refresh=provenance is not None
            ),
            {"after": after, "step": step - 1, "tenants": tenants, **(provenance or {})},
        )
        row = await cur.fetchone()
        if row is None:  # fewer rows than a chunk are left
            bounds.append((after, None))
            return bounds
        end = _bound(row[0])
        bounds.append((after, end))
        after = end
        if left is not None:
            left -= step
            if left <= 0:
                return bounds


async def create_or_join(
    conn: psycopg.AsyncConnection[Any],
    *,
    spec: JobSpec,
    target: TargetConfig,
    info: TableInfo,
    parameters: dict[str, Any],
    tenants: list[str] | None,
    limit: int | None,
    actor: str,
    chunk_rows: int,
    exclusive: bool,
    provenance: dict[str, Any] | None = None,
) -> tuple[int, bool]:
    """(job id, joined): the running job of this table column, or a new one of
    ``spec``. With ``provenance`` (a refresh: the column's and model's numbers) the job
    re-embeds stale and outdated-model rows besides NULL ones. Only a job of the same
    kind and fingerprint is joined: a refresh does not join a plain backfill (it would
    leave the outdated rows), nothing joins a watch job, and a job that writes other
    vectors (another model, template, key source) is refused, naming the setting."""
    store = Store(conn)
    tsql = info.sql(target)
    await _end_orphaned_watch(conn, info, target)
    key = lock_key(info.oid, target.embedding_column)
    async with conn.transaction():
        await store.lock_for_create(key)
        active = await store.active_job(info.oid, target.embedding_column)
        if active is not None:
            running = JobSpec.from_record(active)
            if not running.settings and running.behaviour.joinable:
                # a job from before specs: the backfill that joins it says what it writes
                # (its workers refuse it until then)
                adopted = JobSpec(
                    running.kind,
                    running.target,
                    running.table_oid,
                    running.column,
                    spec.settings,
                    spec.platform_key,
                )
                running = JobSpec.from_record(
                    await store.adopt_spec(int(active["id"]), running.kind, adopted.to_json())
                )
            if not running.behaviour.open_ended and not await store.has_chunks(active["id"]):
                raise _busy(target, active)  # a live run of an embedfill before jobs
            if not running.behaviour.joinable:
                raise _busy(target, active, f"it is a {running.kind} job: {running.behaviour.ends}")
            if spec.behaviour.refresh and not running.behaviour.refresh:
                raise _busy(
                    target, active, "it re-embeds no outdated rows; wait for it, then refresh"
                )
            if exclusive or active["target"] != target.name:
                raise _busy(target, active)
            differs = running.differs(spec.settings, platform_key=spec.platform_key)
            if differs is not None:
                raise _busy(
                    target,
                    active,
                    f"it writes vectors with {running.refusal_detail(differs, spec.settings)}; "
                    "wait for it or cancel it",
                )
            return int(active["id"]), True
        # what each tenant has to do, counted once: a tenant's `missing` in the report
        # (however often its rows are read again after a kill) never exceeds its rows
        todo = await count_missing_by_tenant(conn, tsql, tenants)
        missing = sum(todo.values())
        if provenance is not None:
            by_tenant = await count_outdated_by_tenant(conn, tsql, tenants, provenance)
            stale = sum(s for s, _ in by_tenant.values())
            outdated = sum(o for _, o in by_tenant.values())
            for tenant, (s, o) in by_tenant.items():
                todo[tenant] = todo.get(tenant, 0) + s + o
            parameters = parameters | {"stale_before": stale + outdated}
            if outdated:
                parameters["warnings"] = [mixing_warning(target.name, outdated)]
        parameters = parameters | {"tenants_before": sorted(todo.items(), key=_tenant_order)}
        run_id = await store.create_run(
            target=target.name,
            actor=actor,
            parameters=parameters,
            dry_run=False,
            missing_before=min(missing, limit or missing),
            table_oid=info.oid,
            column=target.embedding_column,
            kind=spec.kind,
            spec=spec.to_json(),
        )
        bounds = await plan_chunks(conn, tsql, tenants, limit, chunk_rows, provenance)
        seqs = await store.add_chunks(run_id, bounds)
        await ring(conn, [(run_id, seq, spec.queue) for seq in seqs])
    log.info("job %s: %d rows in %d chunks", run_id, missing, len(bounds))
    return run_id, False


async def take_over_legacy(
    conn: psycopg.AsyncConnection[Any], info: TableInfo, target: TargetConfig
) -> None:
    """Runs of an embedfill from before jobs (no chunks) still shown running for this
    column whose process is gone (the column's session lock is free): repair what they
    left (a vector index dropped, or left INVALID by a rebuild cut short), then mark them
    abandoned. A repair that fails raises, and leaves them for the next try."""
    store = Store(conn)
    key = lock_key(info.oid, target.embedding_column)
    if not await store.try_lock(key):
        return  # one is alive (or another process takes over right now)
    try:
        for run_id, parameters in await store.dead_runs(info.oid, target.embedding_column, 0):
            if parameters.get("watch") or await store.has_chunks(run_id):
                continue  # a job: it goes on, whoever works on it
            log.warning("run %s had died; repairing what it left", run_id)
            for data in parameters.get("deferred_indexes") or []:
                index = indexes.VectorIndex(**data)
                if await indexes.state(conn, index) != "valid":
                    log.warning("rebuilding vector index %s, left by run %s", index.name, run_id)
                    await indexes.rebuild(conn, index)
            await store.abandon_run(run_id)
    finally:
        with contextlib.suppress(psycopg.Error):
            await store.unlock(key)


def _tenant_order(item: tuple[str | None, int]) -> tuple[bool, str]:
    return item[0] is not None, item[0] or ""


def _busy(target: TargetConfig, active: dict[str, Any], why: str | None = None) -> TargetBusy:
    where = f"column {target.embedding_column!r} of {target.table}"
    other = active["target"]
    other = "" if other == target.name else f" of target {other!r}"
    how = "wait for it to finish or cancel it"
    if why is not None:
        how = why
    elif not other:
        how += ", or run without --exclusive to join it"
    return TargetBusy(
        f"Target {target.name!r} ({where}) is already being backfilled by run "
        f"{active['id']}{other} (started {active['started_at']:%Y-%m-%d %H:%M:%S %Z} by "
        f"{active['actor']}); {how}.",
        run_id=int(active["id"]),
    )


async def open_watch_job(
    conn: psycopg.AsyncConnection[Any],
    *,
    spec: JobSpec,
    target: TargetConfig,
    info: TableInfo,
    actor: str,
) -> int | None:
    """The column's watch job (``embedfill watch``): the one running (a watch that died
    left it: resumed), or a new one; None while another job (a backfill) runs on the
    column, which the watch waits for. A watch job re-embeds outdated rows too, its
    chunks are lists of ids the watcher adds as it notices them, and it ends only when
    the watch stops (``finish(..., end_watch=True)``). Call it as the column's elected
    watcher: a watch job left by a watcher configured otherwise (another model, say) is
    ended, and a new one of ``spec`` opened, since no worker of this config would take
    its chunks."""
    store = Store(conn)
    async with conn.transaction():
        await store.lock_for_create(lock_key(info.oid, target.embedding_column))
        active = await store.active_job(info.oid, target.embedding_column)
        if active is not None:
            running = JobSpec.from_record(active)
            if not running.behaviour.open_ended:
                return None
            if active["cancel_requested"]:
                # its end was asked for (a backfill that found no watch holding it, a
                # cancel): ended, not resumed only for its watcher to stop at once
                why = "whose end was asked for"
            elif active["target"] != target.name:
                if not str(active["target"]).startswith(f"{target.name}@"):
                    return None  # another target's (of the same column): it ends first
                # the new vectors of a change of this target's model, which the config
                # names as the target's own after the finalize; the column's watch lock
                # is ours, so the watch that opened the job is gone (killed meanwhile)
                why = f"left by a watch of {active['target']} that no longer runs"
            elif running.settings:
                differs = running.differs(spec.settings, platform_key=spec.platform_key)
                if differs is None:
                    return int(active["id"])
                why = f"which wrote vectors with {running.refusal_detail(differs, spec.settings)}"
            else:  # from before job specs: nothing says what it writes
                why = "which was opened before jobs recorded what they write"
            log.warning("watch of %s: ending watch job %s, %s", target.name, active["id"], why)
            await store.request_cancel(int(active["id"]))
            await store.cancel_chunks(int(active["id"]))
        else:
            return await _create_watch_job(store, spec, target, info, actor)
    await finish(conn, int(active["id"]), force=True)
    async with conn.transaction():
        await store.lock_for_create(lock_key(info.oid, target.embedding_column))
        if await store.active_job(info.oid, target.embedding_column) is not None:
            return None
        return await _create_watch_job(store, spec, target, info, actor)


async def _end_orphaned_watch(
    conn: psycopg.AsyncConnection[Any], info: TableInfo, target: TargetConfig
) -> None:
    """End the column's watch job when no watcher holds its watch lock: the watch that
    opened it is gone (a kill -9, a lost host), and nobody else would end it. Before
    (helper-31), every backfill of the column was refused until a watch was started
    again, told to "stop the watch" that no longer ran. A watch that starts later (or
    was only reconnecting) opens its job again once the backfill's is over."""
    store = Store(conn)
    async with conn.transaction():
        # under the lock a watch job is resumed with (open_watch_job), after which a
        # watcher that took the watch lock meanwhile sees the job ending, not resumed
        await store.lock_for_create(lock_key(info.oid, target.embedding_column))
        active = await store.active_job(info.oid, target.embedding_column)
        if active is None or not JobSpec.from_record(active).behaviour.open_ended:
            return
        if await store.watch_held(watch_key(info.oid, target.embedding_column)):
            return
        log.warning(
            "ending watch job %s of %s: no watch runs it any more (its process is gone)",
            active["id"],
            active["target"],
        )
        await store.request_cancel(int(active["id"]))
        await store.cancel_chunks(int(active["id"]))
    await finish(conn, int(active["id"]), force=True)


async def _create_watch_job(
    store: Store, spec: JobSpec, target: TargetConfig, info: TableInfo, actor: str
) -> int:
    return await store.create_run(
        target=target.name,
        actor=actor,
        # "tenants_before": its counts are the rows committed (embedfill.tallies), not
        # what its workers' sessions reported: a worker's next session of the job
        # replaced its last one's report (598 rows written, "2 embedded")
        parameters={"watch": True, "refresh": True, "tenants_before": []},
        dry_run=False,
        missing_before=0,
        table_oid=info.oid,
        column=target.embedding_column,
        kind=spec.kind,
        spec=spec.to_json(),
    )


async def add_key_chunks(
    conn: psycopg.AsyncConnection[Any], run_id: int, queue: str, keys: list[str], size: int
) -> int:
    """Add ``keys`` (ids as text) as chunks of at most ``size`` to a watch job, and ring
    them, in one transaction; the number of chunks."""
    parts = [keys[i : i + size] for i in range(0, len(keys), size)]
    if parts:
        async with conn.transaction():
            seqs = await Store(conn).add_key_chunks(run_id, parts)
            await ring(conn, [(run_id, seq, queue) for seq in seqs])
    return len(parts)


async def set_aside_indexes(
    conn: psycopg.AsyncConnection[Any], run_id: int, info: TableInfo, target: TargetConfig
) -> list[indexes.VectorIndex]:
    """Index-aware mode: record the column's vector indexes in the job, then drop them
    (rebuilt when the job finishes)."""
    found = await indexes.vector_indexes(conn, info.oid, target.embedding_column)
    if not found:
        return []
    store = Store(conn)
    state = await store.run_state(run_id)
    assert state is not None
    await store.set_parameters(
        run_id, state["parameters"] | {"deferred_indexes": [i.to_dict() for i in found]}
    )
    for index in found:
        log.warning("job %s: dropping vector index %s for the backfill", run_id, index.name)
        await indexes.drop(conn, index)
    return found


async def cancel(conn: psycopg.AsyncConnection[Any], run_id: int) -> bool:
    """Ask every worker of the job to stop after its chunks in flight; the chunks not
    started are cancelled now. False when the job is not running."""
    store = Store(conn)
    if not await store.request_cancel(run_id):
        return False
    await store.cancel_chunks(run_id)
    return True


async def fail(
    conn: psycopg.AsyncConnection[Any],
    run_id: int,
    error: EmbedfillError,
    on_end: Callable[[str], None] | None = None,
) -> None:
    """A reason that fails every chunk (a config error found mid-job) ends the job for
    every worker: its chunks are cancelled and it is finished as failed."""
    await Store(conn).cancel_chunks(run_id)
    await finish(conn, run_id, error=error, force=True, on_end=on_end)


async def finish(
    conn: psycopg.AsyncConnection[Any],
    run_id: int,
    *,
    error: EmbedfillError | None = None,
    force: bool = False,
    on_end: Callable[[str], None] | None = None,
    end_watch: bool = False,
) -> str | None:
    """Finish the job if every chunk is settled (or ``force``): rebuild the indexes set
    aside (repairing one a dead finisher left invalid), merge the workers' reports and
    record the end. One finisher at a time (the column's session lock); the job's final
    status when this call finished it, else None."""
    store = Store(conn)
    state = await store.run_state(run_id)
    if state is None or state["status"] != "running":
        return None
    key = lock_key(int(state["table_oid"]), str(state["column_name"]))
    if not await store.try_lock(key):
        return None
    try:
        state = await store.run_state(run_id)
        if state is None or state["status"] != "running":
            return None
        if not force and any(await store.open_chunks(run_id)):
            return None
        open_ended = JobSpec.from_record(state).behaviour.open_ended
        if open_ended and not (force or end_watch or state["cancel_requested"]):
            return None  # a watch job has no last chunk: it ends with the watch
        report = await merged_report(store, run_id)
        rebuilt = await _rebuild(conn, run_id, state["parameters"], report)
        report.status = _final_status(report, state, error, rebuilt)
        if error is not None and report.embedded and error.exit_code == 2:
            error = RunAborted(
                f"{error} The job stopped after writing {report.embedded} rows; "
                "they hold correct vectors."
            )
        report.error_class = type(error).__name__ if error is not None else None
        if not await store.finish_job(report, str(error) if error is not None else None):
            return None
        if on_end is not None:  # before anything else is awaited: no one sees it half done
            on_end(report.status)
        log.info(
            "job %s finished: %s, %d embedded, %d failed",
            run_id,
            report.status,
            report.embedded,
            report.failed,
        )
        return report.status
    finally:
        with contextlib.suppress(psycopg.Error):
            await store.unlock(key)


def _final_status(
    report: Report, state: dict[str, Any], error: EmbedfillError | None, rebuilt: bool
) -> str:
    if error is not None:
        return "failed"
    if state["cancel_requested"]:
        return "cancelled"
    if report.failed or not rebuilt:
        return "partial"
    return "succeeded"


async def _rebuild(
    conn: psycopg.AsyncConnection[Any], run_id: int, parameters: dict[str, Any], report: Report
) -> bool:
    """Rebuild what index-aware mode set aside; False when one could not be rebuilt."""
    ok = True
    for data in parameters.get("deferred_indexes") or []:
        index = indexes.VectorIndex(**data)
        entry: dict[str, Any] = {"name": index.name, "method": index.method, "rebuilt": False}
        report.deferred_indexes.append(entry)
        try:
            if await indexes.state(conn, index) != "valid":
                log.warning("job %s: rebuilding vector index %s", run_id, index.name)
                entry["seconds"] = round(await indexes.rebuild(conn, index), 3)
            entry["rebuilt"] = True
        except psycopg.Error as exc:
            ok = False
            entry["error"] = (
                f"Index {index.name} was NOT rebuilt ({_first_line(exc)}); vector searches "
                f"scan the whole table until you run: {index.concurrent_definition()};"
            )
            log.error("job %s: %s", run_id, entry["error"])
    return ok


async def merged_report(store: Store, run_id: int, *, exclude: str | None = None) -> Report:
    """The job's report: every worker's (but ``exclude``), summed (tenants too), with the
    first failures. Without ``exclude``, rows embedded and failed are what was committed
    (the writes' tallies, the failures recorded) and each tenant's rows to do are counted
    once, when the job was created: exact after kill -9 or a restart of the server.
    (``exclude`` is for a live view: the other workers' reports, to which the caller adds
    its own live counts.)"""
    state = await store.run_state(run_id)
    assert state is not None
    report = Report(run_id=run_id, target=state["target"], dry_run=False)
    spec = JobSpec.from_record(state)
    if spec.settings:  # the job's provider, whichever workers did it
        report.provider = spec.provider_label
    report.missing_before = int(state["missing_before"] or 0)
    parameters = state["parameters"] or {}
    report.stale_before = int(parameters.get("stale_before") or 0)
    report.warnings = list(parameters.get("warnings") or [])
    report.status = state["status"]
    report.duration_s = float(state["age_s"] or 0.0)
    tenants: dict[str | None, TenantReport] = {}
    price = 0.0
    for worker in await store.job_workers(run_id):
        if worker["worker"] == exclude:
            continue
        part = worker["report"] or {}
        report.provider = report.provider or part.get("provider", "")
        for name in _SUMMED:
            setattr(report, name, getattr(report, name) + int(part.get(name) or 0))
        cost = float(part.get("estimated_cost_usd") or 0.0)
        price += cost
        for warning in part.get("warnings") or []:
            if warning not in report.warnings:
                report.warnings.append(warning)
        for t in part.get("tenants") or []:
            mine = tenants.get(t["tenant"])
            if mine is None:
                mine = tenants[t["tenant"]] = report.tenant(t["tenant"])
            for name in _TENANT_SUMMED:
                setattr(mine, name, getattr(mine, name) + int(t.get(name) or 0))
            if t.get("key_source") and t["key_source"] != "none":
                mine.key_source = t["key_source"]
            mine.error = mine.error or t.get("error")
    report.estimated_cost_usd = price
    if exclude is None and "tenants_before" in parameters:  # a job from before: as reported
        await _exact_counts(store, report, tenants, parameters["tenants_before"])
    final = state["report"] or {}  # the finisher's: what only it knows
    report.deferred_indexes = list(final.get("deferred_indexes") or [])
    report.failures = await store.first_failures(run_id, MAX_REPORTED_FAILURES)
    exact = "tenants_before" in parameters
    report.workers, report.chunks = await workers_and_chunks(store, run_id, exact=exact)
    return report


async def _exact_counts(
    store: Store,
    report: Report,
    tenants: dict[str | None, TenantReport],
    before: list[tuple[str | None, int]],
) -> None:
    """Rows embedded and failed as committed, and each tenant's rows to do as counted
    when the job was created."""
    assert report.run_id is not None

    def tenant(name: str | None) -> TenantReport:
        if name not in tenants:
            tenants[name] = report.tenant(name)
        return tenants[name]

    written: dict[str | None, int] = {}
    for name, _, rows in await store.job_tallies(report.run_id):
        written[name] = written.get(name, 0) + rows
    failed = await store.job_failed(report.run_id)
    report.embedded, report.failed = sum(written.values()), sum(failed.values())
    for t in tenants.values():
        t.embedded, t.failed = written.get(t.tenant, 0), failed.get(t.tenant, 0)
    for name, rows in written.items():
        tenant(name).embedded = rows
    for name, rows in failed.items():
        tenant(name).failed = rows
    todo = {name: int(n) for name, n in before}
    for t in tenants.values():
        t.missing = todo.get(t.tenant, 0)
    for name, n in todo.items():
        tenant(name).missing = n


async def workers_and_chunks(
    store: Store, run_id: int, *, exact: bool = True
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Who works on the job (or refused it) and its chunks by state, as every view of a
    job shows them; each worker's rows written as committed (``exact``: a job with
    tallies), else as it reported them."""
    written: dict[str, int] = {}
    for _, worker, rows in await store.job_tallies(run_id):
        written[worker] = written.get(worker, 0) + rows
    found = await store.job_workers(run_id)
    workers = [_worker_view(w, written.get(w["worker"], 0) if exact else None) for w in found]
    chunks = {k: int(v) for k, v in (await store.job_chunks(run_id)).items()}
    return workers, chunks


def plus(base: Report, live: Report) -> Report:
    """``base`` (the other workers' part of a job) with this process's live counts added."""
    out = dataclasses.replace(base)
    for name in _SUMMED:
        setattr(out, name, getattr(base, name) + getattr(live, name))
    return out


def _worker_view(row: dict[str, Any], embedded: int | None) -> dict[str, Any]:
    """A worker's part of a job: the rows it wrote as committed (``embedded``; None: as
    it reported them), the rest as it last reported."""
    part = row["report"] or {}
    return {
        "worker": row["worker"],
        "host": row["host"],
        "pid": row["pid"],
        "chunks": row["chunks"],
        "embedded": int(part.get("embedded") or 0) if embedded is None else embedded,
        "skipped": int(part.get("skipped") or 0),
        "failed": int(part.get("failed") or 0),
        "requests": int(part.get("requests") or 0),
        "started_at": _iso(row["started_at"]),
        "last_heartbeat": _iso(row["heartbeat_at"]),
        "refused": row["refused"],
    }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def error_of(state: dict[str, Any]) -> EmbedfillError | None:
    """The error a failed job ended with, as its class (for the exit code)."""
    if state["status"] != "failed":
        return None
    report = state["report"] or {}
    cls = getattr(errors, str(report.get("error_class") or ""), None)
    message = state["error"] or "The job failed."
    if isinstance(cls, type) and issubclass(cls, EmbedfillError):
        try:
            return cls(message)
        except TypeError:
            pass
    return EmbedfillError(message)
