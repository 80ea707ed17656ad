"""The application layer: what the CLI, the HTTP service and a worker call.

Each function takes explicit objects (a Config, a Database, BackfillOptions) and opens
the connections it needs: plan or backfill a target (a real backfill is a job, jobs.py,
worked on by workers, worker.py), rows and missing embeddings per target, the
index-aware plan, embedfill's own schema, the jobs as the admin API shows them (list,
one job, wait, cancel) and the tenants' stored keys. Everything below is the engine
(engine/), the job layer (jobs.py) and the database (db/); errors are embedfill's
(errors.py), each with its exit code and HTTP status, and the edges only render them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from . import freshness, jobs, migration, watch
from . import keys as keymod
from .config import Config, ProviderConfig, TargetConfig, env_secret
from .db import homes, indexes, triggers
from .db.catalog import (
    TableInfo,
    check_shared_columns,
    count_missing,
    count_outdated,
    inspect_target,
    target_status,
)
from .db.connect import Database, connect
from .db.lanes import Lane
from .db.queries import SNAPSHOT
from .db.schema import amigrate, ensure_schema
from .db.store import KeyInfo, Store
from .engine import BackfillOptions, Hooks, Observer, Planner, ProgressCallback, RunState
from .engine.prepare import prepare
from .errors import (
    ConfigError,
    DatabaseError,
    JobConflict,
    JobNotFound,
    ModelChanged,
    NotFound,
    PlanRefused,
    PrivilegeMissing,
    RunAborted,
    TargetBusy,
    UsageError,
    VerificationFailed,
)
from .errors import first_line as _first_line
from .jobs.spec import JobSpec
from .models import Report, TargetStatus
from .providers import Provider, make_provider, needs_key
from .verify import AdoptResult, Verifier, VerifyResult, sample_size

log = logging.getLogger(__name__)


async def abackfill(
    config: Config,
    db: Database,
    opts: BackfillOptions,
    *,
    provider: Provider | None = None,
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[int], None] | None = None,
    cancel: asyncio.Event | None = None,
    env: Mapping[str, str] | None = None,
    observer: Observer | None = None,
    exclusive: bool = False,
    enqueue: bool = False,
) -> Report:
    """Backfill (or plan, with ``dry_run``) one target; see ``embedfill.backfill``.

    A real backfill is a job (jobs.py): this creates the target's job, or joins the one
    running (``exclusive``: refuse instead, TargetBusy), and works on it until it is over
    beside any other worker, returning the job's report; ``enqueue`` only creates it and
    returns at once (workers elsewhere do the work)."""
    own_provider = provider is None
    hooks = Hooks(on_progress, on_start, cancel or asyncio.Event(), observer or Observer())
    environ = os.environ if env is None else env
    conn = await connect(db)
    try:
        if provider is None:
            provider = make_provider(config.provider_for(config.target(opts.target)))
        target, pconf, info = await prepare(conn, config, opts, provider)
        await check_shared_columns(conn, config.targets)
        await ensure_schema(conn)
        if not opts.dry_run:
            side = info.sql(target)
            if side.live is not None:  # a side table: first a row for each live row
                await homes.secure_side(conn, side)
                await conn.execute(homes.mirror(side))
            return await _job(
                conn,
                config,
                db,
                opts,
                target,
                info,
                provider,
                hooks=hooks,
                env=environ,
                exclusive=exclusive,
                enqueue=enqueue,
            )
        planner = Planner(  # its reads on this connection, no write
            RunState(
                db=db,
                lane=Lane(conn),
                target=target,
                pconf=pconf,
                info=info,
                opts=opts,
                provider=provider,
                engine=config.engine,
                hooks=hooks,
                env=environ,
            )
        )
        return await planner.plan()
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        if own_provider and provider is not None:
            await provider.aclose()
        await conn.close()


async def _job(
    conn: psycopg.AsyncConnection[Any],
    config: Config,
    db: Database,
    opts: BackfillOptions,
    target: TargetConfig,
    info: TableInfo,
    provider: Provider,
    *,
    hooks: Hooks,
    env: Mapping[str, str],
    exclusive: bool,
    enqueue: bool,
) -> Report:
    from .worker import Worker, work_on_job  # the worker imports the application

    if not enqueue:
        db.check_connection_limit()  # before anything is written
    await jobs.take_over_legacy(conn, info, target)
    provenance = None
    parameters = opts.parameters()
    if opts.refresh:
        model = freshness.model_identity(config.provider_for(target), info)
        ids = await freshness.provenance_ids(
            conn, info, target.embedding_column, model, create=True
        )
        provenance = ids.params()
    elif not opts.dry_run and await Store(conn).has_provenance():
        mixing = await freshness.filling_warning(conn, target, config.provider_for(target), info)
        if mixing is not None:  # the CLI prints the report's warnings
            parameters["warnings"] = [mixing]
    spec = jobs.spec_of(
        "refresh" if opts.refresh else "backfill",
        target,
        config.provider_for(target),
        info,
        env=env,
    )
    run_id, joined = await jobs.create_or_join(
        conn,
        spec=spec,
        target=target,
        info=info,
        parameters=parameters,
        tenants=list(opts.tenants) or None,
        limit=opts.limit,
        actor=opts.actor,
        chunk_rows=config.engine.chunk_rows,
        exclusive=exclusive,
        provenance=provenance,
    )
    if hooks.on_start:
        hooks.on_start(run_id)
    if joined:
        log.info("joining job %s of target %s", run_id, target.name)
    elif opts.defer_index and not hooks.cancel.is_set():
        # (cancelled while starting: dropping now would only buy a rebuild, hours on a
        # large table, for a job asked to stop)
        await jobs.set_aside_indexes(conn, run_id, info, target)
    store = Store(conn)
    if enqueue:
        report = await jobs.merged_report(store, run_id)
        state = await store.run_state(run_id)
    else:
        worker = Worker(
            config,
            db,
            targets=[target.name],
            env=env,
            observer=hooks.observer,
            providers={target.provider: provider},
        )
        # this connection is done with: the worker's own suffice while it works
        await conn.close()
        report, state = await work_on_job(
            worker, run_id, cancel=hooks.cancel, on_progress=hooks.on_progress
        )
    report.joined = joined
    if info.sql(target).integer_ids:  # the audit table keeps ids as text
        report.failures = [dataclasses.replace(f, id=int(f.id)) for f in report.failures]
    assert state is not None
    error = jobs.error_of(state)
    if error is not None:
        raise error
    return report


async def arefresh_warning(config: Config, db: Database, opts: BackfillOptions) -> str | None:
    """What a refresh would do meanwhile, when it re-embeds vectors of another model in
    place (they mix two vector spaces until it finishes); None when none are there."""
    conn = await connect(db)
    try:
        target = config.target(opts.target)
        pconf = config.provider_for(target)
        info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
        if not await Store(conn).has_provenance():
            return None
        model = freshness.model_identity(pconf, info)
        ids = await freshness.provenance_ids(
            conn, info, target.embedding_column, model, create=False
        )
        tsql = info.sql(target)
        _, outdated = await count_outdated(conn, tsql, list(opts.tenants) or None, ids.params())
        return freshness.mixing_warning(target.name, outdated) if outdated else None
    finally:
        await conn.close()


async def adefer_index_plan(config: Config, db: Database, opts: BackfillOptions) -> str | None:
    """What index-aware mode would do to the target, in plain words (None: no vector index)."""
    conn = await connect(db)
    try:
        target = config.target(opts.target)
        pconf = config.provider_for(target)
        info = await inspect_target(conn, target, pconf.expected_dimensions, pconf.label)
        found = await indexes.vector_indexes(conn, info.oid, target.embedding_column)
        if not found:
            return None
        missing = await count_missing(conn, info.sql(target), list(opts.tenants))
        return indexes.plan_message(found, str(target.table), min(missing, opts.limit or missing))
    finally:
        await conn.close()


async def astatus(config: Config, db: Database, target: str | None = None) -> list[TargetStatus]:
    """Rows, missing embeddings, and stale, outdated-model and unverified vectors per
    target (and per tenant); see freshness.py. Read-only."""
    targets = [config.target(target)] if target else list(config.targets)
    conn = await connect(db)
    try:
        await check_shared_columns(conn, config.targets)
        out = []
        kept = await Store(conn).has_provenance()
        for t in targets:
            pconf = config.provider_for(t)
            info = await inspect_target(conn, t, pconf.expected_dimensions, pconf.label)
            # one snapshot for the target's counts: a cut-over target is read twice (below),
            # and rows edited between two reads were counted stale by one and not the other
            async with conn.transaction():
                await conn.execute(SNAPSHOT)
                out.append(await _target_status(conn, t, pconf, info, kept))
        return out
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()


async def _target_status(
    conn: psycopg.AsyncConnection[Any],
    t: TargetConfig,
    pconf: ProviderConfig,
    info: TableInfo,
    kept: bool,
) -> TargetStatus:
    """One target's status (astatus), read in the caller's snapshot."""
    params, searched = None, None
    if kept:
        model = freshness.model_identity(pconf, info)
        ids = await freshness.provenance_ids(conn, info, t.embedding_column, model, create=False)
        params = ids.params()
        searched = await migration.searched_instead(conn, t, info)
    failing = (
        await Store(conn).failing(info.oid, t.embedding_column, info.sql(t).failing())
        if kept
        else None
    )
    status = await target_status(conn, t, info, params, failing)
    if searched is not None:
        # cut over to another model: the column's vectors are measured against the one
        # the app's searches use now too
        moved = await freshness.provenance_ids(
            conn, info, t.embedding_column, searched, create=False
        )
        against = await target_status(conn, t, info, moved.params(), None)
        status = _cut_over_status(status, against, str(searched))
    return status


def _cut_over_status(status: TargetStatus, against: TargetStatus, searched: str) -> TargetStatus:
    """A cut-over target's status: each vector of its column is of the model the app no
    longer searches (``against`` counts them outdated_model); a row edited since stays
    ``stale`` (its text changed: the searched vectors are most likely stale too, and
    that is what check and the alerts must see), the others are outdated_model."""
    by_tenant = {t.tenant: t for t in against.tenants}
    tenants = tuple(
        dataclasses.replace(
            t,
            outdated_model=max(0, by_tenant[t.tenant].outdated_model - t.stale)
            if t.tenant in by_tenant
            else t.outdated_model,
        )
        for t in status.tenants
    )
    return dataclasses.replace(
        status,
        tenants=tenants,
        # the totals' own (a target without a tenant column lists no tenants)
        outdated_model=max(0, against.outdated_model - status.stale),
        cut_over_to=searched,
    )


async def aplan_model(
    config: Config,
    db: Database,
    target: str,
    to: str,
    strategy: str = "table",
    *,
    vector_type: str | None = None,
    env: Mapping[str, str] | None = None,
) -> migration.ModelPlan:
    """What changing ``target``'s model to provider section ``to`` takes (migration.py).
    Read-only. Its warnings also say what ``model start`` would meet in this process's
    environment (``env``: os.environ by default), and what the strategy means at the end."""
    conn = await connect(db)
    try:
        plan = await migration.plan(conn, config, target, to, strategy, vector_type)
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()
    new = config.providers[to]
    if needs_key(new) and not env_secret(os.environ if env is None else env, new.api_key_env):
        plan.warnings.append(
            f"{new.api_key_env}, the API key of provider section {to!r}, is not set here: "
            "`model start` fails the rows of every tenant without a key of its own until "
            "it is (set it, or store keys with `embedfill keys set`)."
        )
    return plan


# DDL on the app's table (a shadow column) waits at most this long for its lock, and is
# tried again after a pause: a queued ALTER would hold up every later reader meanwhile
DDL_LOCK_TIMEOUT_MS = 200
DDL_TRIES = 10


async def _ddl(
    conn: psycopg.AsyncConnection[Any],
    statement: Any,
    table: str,
    *,
    unless_given_up: int | None = None,
    first: Callable[[], Awaitable[None]] | None = None,
    command: str = "start",
) -> None:
    """One DDL statement on the app's table, under a short lock_timeout, tried again
    while the app holds the table. ``unless_given_up``: a change of model whose home
    the statement makes; not run once that change was rolled back (or finalized)
    meanwhile, which a finalize would have dropped nothing of (_home_wanted). ``first``:
    what is done before it in its transaction (all or none, tried again with it)."""
    for attempt in range(1, DDL_TRIES + 1):
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_catalog.set_config('lock_timeout', %s, true)",
                    (f"{DDL_LOCK_TIMEOUT_MS}ms",),
                )
                if unless_given_up is not None and not await _home_wanted(conn, unless_given_up):
                    return
                if first is not None:
                    await first()
                await conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == DDL_TRIES:
                raise TargetBusy(
                    f"{table} stayed locked by other transactions for {DDL_TRIES} tries; "
                    f"run the same `embedfill model {command}` again when the app's long "
                    "transactions or migrations are over."
                ) from None
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))


async def _home_wanted(conn: psycopg.AsyncConnection[Any], migration_id: int) -> bool:
    """In the transaction that makes a change's home: whether the change still wants
    it (planned or filling), its row held until the commit. A `model start` retrying
    its ALTER TABLE while the operator rolled back and finalized made a home nobody
    owned, and the next start refused it as existing (helper-22)."""
    return await Store(conn).lock_migration_phase(migration_id) in ("planned", "filling")


async def _model_fill(
    conn: psycopg.AsyncConnection[Any],
    dconfig: Config,
    db: Database,
    derived: str,
    migration_id: int,
    **backfill: Any,
) -> bool:
    """The new vectors' fill, then a catch-up of the rows added or edited meanwhile
    (each run first gives a side table a row for each live row it lacks: abackfill);
    False when a run did not succeed (rows failed, or it was stopped)."""
    store = Store(conn)
    actor = backfill.pop("actor")
    for refresh in (False, True):
        report: Report | None = None
        for attempt in range(1, 4):
            try:
                report = await abackfill(
                    dconfig,
                    db,
                    BackfillOptions(target=derived, actor=actor, refresh=refresh),
                    **backfill,
                )
                break
            except TargetBusy:
                # a running watch keeps these new vectors (its job holds the column):
                # the catch-up is handed to its job
                handed = await _catch_up_in_watch(conn, dconfig, derived, backfill.get("cancel"))
                if handed is None and attempt < 3:
                    continue  # the watch ended meanwhile: nothing is in the way now
                if handed is None:
                    raise
                if not handed:
                    return False
                break
        if report is None:
            continue
        if report.run_id is not None:
            await store.set_migration_job(migration_id, report.run_id)
        if report.status != "succeeded":
            return False
    return True


#: a catch-up handed to a watch's job gives up when none of its rows was done for this long
WATCH_CATCH_UP_STALL_S = 300.0


async def _catch_up_in_watch(
    conn: psycopg.AsyncConnection[Any],
    dconfig: Config,
    derived: str,
    cancel: asyncio.Event | None,
) -> bool | None:
    """The catch-up of the new vectors when a watch keeps them (``model verify`` while
    ``watch`` runs): what they owe is queued in the watch's job, page by page, and waited
    for (done by any worker, failed rows recorded there). True once nothing is owed or in
    flight; False when it stalls (no row done for ``WATCH_CATCH_UP_STALL_S``: no worker
    takes the watch's chunks) or is cancelled; None when no job is in the way any more
    (the watch ended: the caller runs its backfill). TargetBusy again when the job in the
    way is not a watch's (a backfill of the new vectors runs)."""
    target = dconfig.target(derived)
    store = Store(conn)
    info = await inspect_target(conn, target, None, dconfig.provider_for(target).label)
    owed = await watch.owed_of(conn, dconfig, target)
    limit = dconfig.engine.chunk_rows * 8
    progress = time.monotonic()
    waiting: set[str] = set()  # the keys this catch-up queued and waits for
    seen: set[str] | None = None  # the job's open keys at the last look
    while True:
        active = await store.active_job(info.oid, target.embedding_column)
        if active is None:  # the watch ended meanwhile: nothing is in the way
            return None
        spec = JobSpec.from_record(active)
        if not spec.behaviour.open_ended:
            raise TargetBusy(
                f"A job of {derived} (run {active['id']}) is running; run this again when it ends."
            )
        job = int(active["id"])
        open_keys = await store.open_chunk_keys(job)
        if open_keys != seen:  # a chunk was done (or queued): the workers are at it
            progress, seen = time.monotonic(), open_keys
        if not waiting & open_keys:  # what it queued is done: anything owed still?
            waiting = await watch.queue_owed(
                conn, owed, job, spec.queue, limit, dconfig.engine.chunk_rows
            )
            if not waiting and not open_keys:
                return True
        if time.monotonic() - progress > WATCH_CATCH_UP_STALL_S:
            log.warning(
                "the catch-up of %s waited %.0f s for the watch's workers; giving up",
                derived,
                WATCH_CATCH_UP_STALL_S,
            )
            return False
        if cancel is not None and cancel.is_set():
            return False
        await asyncio.sleep(0.5)


async def amodel_start(
    config: Config,
    db: Database,
    target: str,
    to: str,
    strategy: str = "table",
    *,
    vector_type: str | None = None,
    actor: str = "library",
    provider: Provider | None = None,
    env: Mapping[str, str] | None = None,
    on_progress: ProgressCallback | None = None,
    on_recorded: Callable[[int], None] | None = None,
    cancel: asyncio.Event | None = None,
) -> migration.MigrationStatus:
    """Start (or go on with) changing ``target``'s model to provider section ``to``:
    make the new vectors' home, fill it as a job, build the twin of each live vector
    index concurrently; the status at the end (``phase`` ``ready`` when all went, else
    where it stopped: run it again to go on). ``vector_type``: the new vectors' type
    (``vector``, ``halfvec``; None: the live column's, or the one a start under way
    recorded). ``on_recorded``: told the change's number once it is recorded (or, for
    a change under way, once this start may go on with it), before the long steps."""
    conn = await connect(db)
    try:
        await ensure_schema(conn)
        live = config.target(target)
        pconf = config.provider_for(live)
        info = await inspect_target(conn, live, pconf.expected_dimensions, pconf.label)
        store = Store(conn)
        row = await store.open_migration(info.oid, live.embedding_column)
        recorded = row["to_model"].get("vector_type") if row is not None else None
        if row is not None:
            going = row["to_model"].get("provider")
            kind = recorded or info.types.kind
            if (going, row["strategy"]) != (to, strategy) or (
                vector_type is not None and vector_type != kind
            ):
                raise TargetBusy(
                    f"A change of {live.name}'s model to {going} ({row['strategy']} "
                    f"strategy, {kind}) is at phase {row['phase']}; finish or roll it back "
                    f"(`embedfill model status --target {live.name}`) before another."
                )
        plan = await migration.plan(conn, config, target, to, strategy, vector_type or recorded)
        new = config.providers[to]
        # the new vectors' type, named in the schema the live column's names
        new_type = migration.stored_type(
            info.types.vector_type,
            plan.to_model.get("vector_type") or info.types.kind,
        )
        if row is not None:
            migration_id, home, phase = int(row["id"]), dict(row["home"]), str(row["phase"])
        else:
            if await homes.taken(conn, info.oid, plan.home, strategy):
                what = (
                    f"table {plan.home['schema']}.{plan.home['relation']}"
                    if strategy == "table"
                    else f"column {plan.home['column']} of {live.table}"
                )
                raise PlanRefused(
                    f"The new vectors would go to {what}, which already exists; name the "
                    "provider section otherwise (the name is made from it), or drop it."
                )
            lacks = await homes.missing_privilege(conn, info.oid, plan.home["schema"], strategy)
            if lacks is not None:
                raise PrivilegeMissing(f"Cannot start the change of model: {lacks}.")
            home = dict(plan.home)
            if strategy == "table":  # the live id its rows are (catalog._check_side_table)
                home["id_column"] = live.id_column
            home["indexes"] = migration.twins(
                home,
                await indexes.vector_indexes(conn, info.oid, live.embedding_column),
                info.types.vector_type,
                new_type,
                expressions=await indexes.expression_indexes(conn, info.oid, live.embedding_column),
                column=live.embedding_column,
                dimensions=int(plan.to_model["dimensions"]),
            )
            try:
                migration_id = await store.insert_migration(
                    target=live.name,
                    table_oid=info.oid,
                    column=live.embedding_column,
                    strategy=strategy,
                    from_model=plan.from_model,
                    to_model=plan.to_model,
                    home=home,
                    actor=actor,
                )
            except psycopg.errors.UniqueViolation:
                raise TargetBusy(
                    f"Another `embedfill model start` of {live.name} began just now; "
                    f"see `embedfill model status --target {live.name}`."
                ) from None
            phase = "planned"  # recorded; its home is made next
        if on_recorded is not None:
            on_recorded(migration_id)
        derived = migration.derived_target(live, new, strategy, home)
        dconfig = migration.with_target(config, derived)
        ddl_key = f"embedfill:model:{info.oid}:{live.embedding_column}"
        async with _one_at_a_time(store, ddl_key, cancel):
            if phase in ("planned", "filling") and not await homes.taken(
                conn, info.oid, home, strategy
            ):
                if strategy == "table":
                    async with conn.transaction():  # all of it, or no side table
                        if not await _home_wanted(conn, migration_id):
                            return await migration.status_of(conn, config, live)
                        await conn.execute(
                            homes.create_side_table(
                                home["schema"],
                                home["relation"],
                                info.types.id_type,
                                new_type,
                                int(plan.to_model["dimensions"]),
                            )
                        )
                        await homes.grant_like(conn, info.oid, home["schema"], home["relation"])
                        await homes.secure_like(
                            conn, info.sql(live), info.oid, home["schema"], home["relation"]
                        )
                else:
                    await _ddl(
                        conn,
                        homes.add_column(
                            info.sql(live),
                            home["column"],
                            new_type,
                            int(plan.to_model["dimensions"]),
                        ),
                        str(live.table),
                        unless_given_up=migration_id,
                    )
            elif strategy == "table" and phase != "finalized":
                # row-level security turned on since the side table was made reaches it,
                # and so do grants of the live table given since (or that a side table
                # made by an older embedfill lacks)
                async with conn.transaction():
                    unreadable = await homes.grant_like(
                        conn, info.oid, home["schema"], home["relation"]
                    )
                    if unreadable:
                        log.warning(
                            "%s may read %s but not the side table %s.%s, and this role may "
                            "not grant it; the cutover will refuse until its owner does",
                            ", ".join(unreadable),
                            live.table,
                            home["schema"],
                            home["relation"],
                        )
                    await homes.secure_like(
                        conn, info.sql(live), info.oid, home["schema"], home["relation"]
                    )
        if phase == "planned":  # the home is made: a start killed before here goes on
            if not await store.set_migration_phase(migration_id, "filling", was="planned"):
                # another start moved it on meanwhile (this one joins its fill), or a
                # rollback gave it up
                now = await store.open_migration(info.oid, live.embedding_column)
                if now is None or int(now["id"]) != migration_id:
                    return await migration.status_of(conn, config, live)
                phase = str(now["phase"])
                if phase not in ("filling", "indexing", "ready"):
                    return await migration.status_of(conn, config, live)
            else:
                phase = "filling"
        if phase in ("filling", "ready"):  # ready: a catch-up of what changed since
            filled = await _model_fill(
                conn,
                dconfig,
                db,
                derived.name,
                migration_id,
                actor=actor,
                provider=provider,
                env=env,
                on_progress=on_progress,
                cancel=cancel,
            )
            if not filled:
                return await migration.status_of(conn, config, live)
            if phase == "filling":
                if not await store.set_migration_phase(migration_id, "indexing", was="filling"):
                    return await migration.status_of(conn, config, live)  # rolled back
                phase = "indexing"
        # ready: a twin dropped or left INVALID since (by hand, or a failed rebuild) is
        # built again too, as the docs promise of running the same command again
        if phase == "indexing" or (phase == "ready" and not await _twins_valid(conn, home)):
            # another start of this change may be building (or the server may still be
            # running the build of one that was killed: its session holds the lock
            # until the build ends): wait for it, then look again
            async with _one_at_a_time(store, ddl_key, cancel):
                await _build_twins(conn, home, config.engine.model_index_workers)
            if phase == "indexing":
                await store.set_migration_phase(migration_id, "ready", was="indexing")
        return await migration.status_of(conn, config, live)
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()


async def _twins_valid(conn: psycopg.AsyncConnection[Any], home: Mapping[str, Any]) -> bool:
    for twin in home.get("indexes", []):
        if await homes.index_state(conn, home["schema"], twin["name"]) != "valid":
            return False
    return True


async def _build_twins(
    conn: psycopg.AsyncConnection[Any], home: Mapping[str, Any], workers: int
) -> None:
    """The twin of each live vector index, built concurrently, with ``workers`` parallel
    maintenance workers at most ([engine] model_index_workers: 0 leaves the app's
    searches the database's other cores); an INVALID one (a build that failed) is
    dropped and built again."""
    await conn.execute(
        "SELECT pg_catalog.set_config('max_parallel_maintenance_workers', %s, false)",
        (str(workers),),
    )
    for twin in home.get("indexes", []):
        state = await homes.index_state(conn, home["schema"], twin["name"])
        if state == "invalid":  # a build that was killed or failed
            await conn.execute(homes.drop_index(home["schema"], twin["name"]))
        if state != "valid":
            await conn.execute(
                homes.create_index(
                    twin["name"],
                    home["schema"],
                    home["relation"],
                    home["column"],
                    twin["method"],
                    twin["opclass"],
                    twin["params"],
                    twin.get("cast", ""),
                    int(twin.get("dimensions") or 0),
                )
            )


#: how often a second `model start` looks whether the first one's DDL is over
DDL_WAIT_POLL_S = 0.5


@contextlib.asynccontextmanager
async def _one_at_a_time(
    store: Store, key: str, cancel: asyncio.Event | None
) -> AsyncIterator[None]:
    """One `model start` at a time makes the new vectors' home and builds their
    indexes. A session advisory lock, tried rather than waited on: a waiting statement
    would hold a snapshot that the other's CREATE INDEX CONCURRENTLY waits for."""
    while not await store.try_lock(key):
        if cancel is not None and cancel.is_set():
            raise RunAborted("Stopped while another `embedfill model start` built the index.")
        await asyncio.sleep(DDL_WAIT_POLL_S)
    try:
        yield
    finally:
        await store.unlock(key)


@contextlib.asynccontextmanager
async def _migration(
    config: Config, db: Database, target: str
) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], TargetConfig, Any, dict[str, Any]]]:
    """The connection, the live target, its table and its change of model under way
    (UsageError when there is none)."""
    conn = await connect(db)
    try:
        await ensure_schema(conn)
        live = config.target(target)
        pconf = config.provider_for(live)
        info = await inspect_target(conn, live, pconf.expected_dimensions, pconf.label)
        row = await Store(conn).open_migration(info.oid, live.embedding_column)
        if row is None:
            raise UsageError(
                f"No change of {live.name}'s model is under way; start one with "
                f"`embedfill model start --target {live.name} --to PROVIDER`."
            )
        yield conn, live, info, row
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()


def _derived(config: Config, live: TargetConfig, row: dict[str, Any]) -> tuple[Any, Config]:
    to_name = row["to_model"]["provider"]
    if to_name not in config.providers:
        raise ConfigError(
            f"The change of {live.name}'s model goes to provider section {to_name!r}, which "
            "this config lacks; run with the config that started it."
        )
    to, was = config.providers[to_name], row["to_model"]
    now = (to.kind, to.model, to.expected_dimensions)
    if now != (was["kind"], was["model"], was["dimensions"]):
        raise ConfigError(
            f"[providers.{to_name}] is now {to.kind}:{to.model} ({to.expected_dimensions} "
            f"dimensions), but the change of {live.name}'s model was started with "
            f"{was['kind']}:{was['model']} ({was['dimensions']}); put it back, or roll "
            "this change back and start another."
        )
    derived = migration.derived_target(
        live, config.providers[to_name], row["strategy"], dict(row["home"])
    )
    return derived, migration.with_target(config, derived)


async def amodel_verify(
    config: Config,
    db: Database,
    target: str,
    *,
    sample: int | None = None,
    provider: Provider | None = None,
    env: Mapping[str, str] | None = None,
) -> migration.MigrationStatus:
    """Fill ``gates`` (each ``{value, threshold, pass}``) after a final catch-up:
    ``coverage`` (1.0), ``shape`` (the new size), ``sample`` (re-embedded sample rows
    agree with their stored new vectors, the provider's verify_min_cosine) and
    ``recall_at_10`` (the new index against exact search). Recorded for the cutover."""
    async with _migration(config, db, target) as (conn, live, info, row):
        if row["phase"] not in ("ready", "cut_over", "rolled_back"):
            raise VerificationFailed(
                f"The change of {live.name}'s model is at phase {row['phase']}; run "
                f"`embedfill model start --target {live.name} --to "
                f"{row['to_model']['provider']}` until it is ready."
            )
        derived, dconfig = _derived(config, live, row)
        home, strategy = dict(row["home"]), str(row["strategy"])
        gates: dict[str, Any] = {}
        filled = await _model_fill(
            conn,
            dconfig,
            db,
            derived.name,
            int(row["id"]),
            actor="model verify",
            provider=provider,
            env=env,
        )
        async with _verifier(dconfig, db, derived.name, env, provider) as verifier:
            model = freshness.model_identity(verifier.pconf, verifier.info)
            ids = await freshness.provenance_ids(
                conn, verifier.info, derived.embedding_column, model, create=False
            )
            # rows the app edited since their new vector was written are stale (the
            # coverage gate counts them), not wrong: the sample takes fresh ones only
            checked = await verifier.verify(sample_size(sample, False), fresh=True, prov=ids)
        now = await migration.status_of(conn, config, live)
        least = config.engine.cutover_min_coverage
        gates["coverage"] = migration.gate(
            now.coverage,
            least,
            filled and now.coverage >= least,
            missing=now.missing,
            stale=now.stale,
        )
        gates["shape"] = await migration.shape_gate(conn, home, int(row["to_model"]["dimensions"]))
        agree = checked.checked - len(checked.mismatched)
        share = 1.0 if not checked.checked else round(agree / checked.checked, 4)
        gates["sample"] = migration.gate(
            share, 1.0, checked.ok, checked=checked.checked, min_cosine=checked.min_cosine
        )
        kind = row["to_model"].get("vector_type") or info.types.kind
        gates["recall_at_10"] = await migration.recall_gate(
            conn,
            home,
            migration.home_id_column(live, strategy),
            migration.stored_type(info.types.vector_type, kind),
        )
        await Store(conn).set_migration_gates(int(row["id"]), gates)
        return await migration.status_of(conn, config, live)


async def amodel_cutover(config: Config, db: Database, target: str) -> migration.MigrationStatus:
    """Switch the app's searches to the new vectors: refused (VerificationFailed) unless
    every gate of the last ``verify`` passed and the coverage is still 1.0; then one
    short transaction records it in embedfill.active_models."""
    async with _migration(config, db, target) as (conn, live, _info, row):
        _derived(config, live, row)  # the config still names the model it was filled with
        now = await migration.status_of(conn, config, live)
        if row["home"].get("indexes") and now.index != "valid":
            raise VerificationFailed(
                f"The new vectors' index is {now.index}; run `embedfill model start "
                f"--target {live.name} --to {row['to_model']['provider']}` to build it."
            )
        if row["phase"] not in ("ready", "rolled_back", "cut_over"):
            raise VerificationFailed(
                f"The change of {live.name}'s model is at phase {row['phase']}, not ready; "
                "run `embedfill model start` until it is, then `embedfill model verify`."
            )
        if not now.gates:
            raise VerificationFailed(
                f"No gate of {live.name}'s change of model was checked; run "
                f"`embedfill model verify --target {live.name}` first."
            )
        failed = [name for name, g in now.gates.items() if not g.get("pass")]
        least = config.engine.cutover_min_coverage
        if not failed and now.coverage < least:  # the app changed rows since the verify
            failed = ["coverage"]
            now.gates["coverage"] = migration.gate(now.coverage, least, False)
        if failed:
            name = failed[0]
            g = now.gates[name]
            raise VerificationFailed(
                f"Gate {name} fails ({g.get('value')} against {g.get('threshold')}); the "
                f"app goes on searching the old vectors. Run `embedfill model verify "
                f"--target {live.name}` again once it is fixed."
            )
        home, to = dict(row["home"]), dict(row["to_model"])
        store = Store(conn)
        if row["strategy"] == "table":  # the app reads it from now: who may read the live
            # table may read it (a role granted since the start too); before the switch's
            # short transaction, so a grant waiting on a lock does not fail the cutover
            unreadable = await homes.grant_like(conn, _info.oid, home["schema"], home["relation"])
            if unreadable:
                side = sql.Identifier(home["schema"], home["relation"]).as_string(conn)
                grantees = ", ".join(
                    r if r == "PUBLIC" else sql.Identifier(r).as_string(conn) for r in unreadable
                )
                raise PrivilegeMissing(
                    f"{', '.join(unreadable)} may read {live.table} but not the side table "
                    f"{side}, and this role may not grant it: the app's searches would fail "
                    "after the cutover. Run the cutover as the side table's owner, or grant "
                    f"it first: GRANT SELECT ON {side} TO {grantees}."
                )
        async with conn.transaction():
            await conn.execute("SELECT pg_catalog.set_config('lock_timeout', '2s', true)")
            if row["strategy"] == "table":  # its row-level security as the live table's
                await homes.secure_like(
                    conn, _info.sql(live), _info.oid, home["schema"], home["relation"]
                )
            await store.set_active_model(
                target=live.name,
                schema=home["schema"],
                relation=home["relation"],
                column=home["column"],
                provider=to["provider"],
                model=to["model"],
                dimensions=to["dimensions"],
                migration_id=row["id"],
            )
            await store.cut_over(int(row["id"]))
        return await migration.status_of(conn, config, live)


async def amodel_rollback(config: Config, db: Database, target: str) -> migration.MigrationStatus:
    """Switch the app's searches back to the live column's vectors (instant: they were
    kept); before a cutover, give the change up. ``finalize`` then drops the new ones."""
    async with _migration(config, db, target) as (conn, live, info, row):
        was = dict(row["from_model"])
        store = Store(conn)
        async with conn.transaction():
            await conn.execute("SELECT pg_catalog.set_config('lock_timeout', '2s', true)")
            await store.set_active_model(
                target=live.name,
                schema=info.schema,
                relation=live.table.name,
                column=live.embedding_column,
                provider=was["provider"],
                model=was["model"],
                dimensions=was["dimensions"],
                migration_id=row["id"],
            )
            await store.set_migration_phase(int(row["id"]), "rolled_back")
        return await migration.status_of(conn, config, live)


async def amodel_finalize(
    config: Config, db: Database, target: str, *, yes: bool = False, force: bool = False
) -> migration.MigrationStatus:
    """Drop the vectors the app no longer searches: after a cutover the live column's
    (its vector indexes, then the column), after a rollback the new ones (the side
    table, or the shadow column and its indexes). Only with ``yes``; after a cutover,
    not within ``[engine] rollback_window_days`` of it unless ``force``."""
    async with _migration(config, db, target) as (conn, live, info, row):
        phase, home = str(row["phase"]), dict(row["home"])
        if phase not in ("cut_over", "rolled_back"):
            raise UsageError(
                f"The change of {live.name}'s model is at phase {phase}: finalize follows a "
                "`model cutover` (drops the old vectors) or a `model rollback` (drops the "
                "new ones)."
            )
        dropping = "the old vectors" if phase == "cut_over" else "the new vectors"
        if not yes:
            raise UsageError(
                f"finalize drops {dropping} of {live.name} for good; pass --yes to do it."
            )
        window = config.engine.rollback_window_days
        cut = row["cut_over_at"]
        if phase == "cut_over" and window and not force and cut is not None:
            ends = cut + dt.timedelta(days=window)
            if ends > dt.datetime.now(dt.UTC):
                raise UsageError(
                    f"The rollback window of {window} days after the cutover ends at "
                    f"{ends.isoformat(timespec='minutes')}; finalize then, or pass --force."
                )
        live_sql = info.sql(live)
        kept: tuple[str, str, str] | None = None
        if phase == "cut_over":
            # checked before anything is dropped, run with the column's drop (all or none)
            moves = await _trigger_moves(conn, config, live, info, row)
            await _still_at(conn, live, int(row["id"]), phase)  # the indexes go first
            for index in await indexes.vector_indexes(conn, info.oid, live.embedding_column):
                await conn.execute(homes.drop_index(index.schema, index.name))
            drop: sql.Composable = sql.SQL("; ").join(
                [*moves, homes.drop_column(live_sql, live.embedding_column)]
            )
            relation = str(live.table)
            dropped = (info.schema, live.table.name, live.embedding_column)
            # where the target is pointed next: the column strategy's new column, the
            # table strategy's side table (embedding_table), whose watcher drains it
            if row["strategy"] == "column":
                kept = (info.schema, live.table.name, home["column"])
            else:
                kept = (home["schema"], home["relation"], homes.VECTOR)
        elif row["strategy"] == "table":
            drop = homes.drop_table(home["schema"], home["relation"])
            relation, dropped = home["relation"], (home["schema"], home["relation"], homes.VECTOR)
        else:
            for twin in home.get("indexes", []):
                await conn.execute(homes.drop_index(home["schema"], twin["name"]))
            drop, relation = homes.drop_column(live_sql, home["column"]), str(live.table)
            dropped = (info.schema, live.table.name, home["column"])

        async def mark() -> None:
            """In the drop's transaction: a finalize killed between two left the column
            dropped and the change at its phase before, which every command then refused
            for the missing column (helper-32). Marked first: drains that hold the change
            (and their queue rows) end before, and a drain's fan-out then sees the change
            finalized, or its queue rows are forgotten."""
            store = Store(conn)
            await _still_at(conn, live, int(row["id"]), phase)
            await store.finalized(int(row["id"]))
            if kept is not None:  # edits queued for the dropped column reach the kept one
                await store.move_changes(dropped, kept)
            await store.forget_changes(*dropped)

        await _ddl(conn, drop, relation, first=mark, command="finalize")
        return await migration.status_of(conn, config, live)


async def _still_at(
    conn: psycopg.AsyncConnection[Any], live: TargetConfig, migration_id: int, phase: str
) -> None:
    """UsageError unless the change is still at ``phase``, its row locked till the end of
    the caller's transaction (or of this one): a rollback while a finalize waited for
    the table pointed the app back at the column the finalize was about to drop."""
    async with conn.transaction():
        now = await Store(conn).lock_migration_phase(migration_id)
    if now != phase:
        raise UsageError(
            f"The change of {live.name}'s model went to phase {now} while this finalize "
            "waited, so it dropped nothing; run `embedfill model status`, and finalize "
            "again if that is still what you want."
        )


async def _trigger_moves(
    conn: psycopg.AsyncConnection[Any],
    config: Config,
    live: TargetConfig,
    info: TableInfo,
    row: dict[str, Any],
) -> list[sql.Composed]:
    """What a cutover's finalize runs with the live column's drop: that column's change
    triggers (if installed) would queue edits for a column that is gone, which nobody
    drains. They are replaced by the new vectors' (the target, pointed at them as the
    docs say, finds them installed): on the live table either way, queueing the new
    column, or the side table's vectors (whose watcher mirrors the live table's new
    rows). Refused (PrivilegeMissing) before anything is dropped when this role may not
    drop them."""
    store = Store(conn)
    old = await store.vector_column_id(info.oid, live.embedding_column, create=False)
    if old is None or not await triggers.installed(conn, info.oid, old):
        return []
    if not await triggers.functions_ours(conn, old):
        raise PrivilegeMissing(
            f"The change triggers of {live.table} were installed by another role, and "
            "finalize drops them with the column; run finalize as that role (or a member "
            "of it), or run `embedfill triggers uninstall` as it first."
        )
    statements = triggers.uninstall_statements(info.sql(live), old)
    to = row["to_model"].get("provider")
    home = dict(row["home"])
    new_id, vectors = None, None
    if row["strategy"] == "column" and to in config.providers:
        new = migration.derived_target(live, config.providers[to], "column", home)
        new_id = await store.vector_column_id(info.oid, home["column"], create=True)
        on = info.sql(new)
    elif row["strategy"] == "table":
        side = sql.Identifier(home["schema"], home["relation"])
        side_oid = await homes.relation_oid(conn, side)
        if side_oid is not None:
            new_id = await store.vector_column_id(side_oid, homes.VECTOR, create=True)
        on = info.sql(live)  # the live rows' id and text: what the side rows follow
        vectors = f"{side.as_string(conn)}.{sql.Identifier(homes.VECTOR).as_string(conn)}"
    if new_id is not None:
        plan = await triggers.plan(conn, on, info.oid, new_id, install=True, vectors=vectors)
        statements += plan.statements
    return statements


async def aactive(config: Config, db: Database, target: str) -> migration.ActiveModel:
    """Which vectors ``target``'s searches use now (migration.ActiveModel). Read-only."""
    conn = await connect(db)
    try:
        await ensure_schema(conn)
        return await migration.active_of(conn, config, config.target(target))
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()


async def amigration_target(db: Database, migration_id: int) -> str:
    """The target of change of model ``migration_id``, when it is its target's current
    change (under way, or the last finalized); NotFound when there is none, or when a
    later change of the target took its place (the commands act on the current one)."""
    async with open_store(db) as store:
        target = await store.migration_target(migration_id)
        current = await store.latest_migration_of(target) if target is not None else None
    if target is None or current is None:
        raise NotFound(f"There is no change of model {migration_id}.")
    if int(current["id"]) != migration_id:
        raise NotFound(
            f"Change of model {migration_id} of {target} is over; the target's current "
            f"change is {current['id']}."
        )
    return target


async def amodel_status(
    config: Config, db: Database, target: str | None = None
) -> list[migration.MigrationStatus]:
    """How far each target's change of model is (``phase`` ``none``: no change on record).
    Read-only."""
    targets = [config.target(target)] if target else list(config.targets)
    conn = await connect(db)
    try:
        await ensure_schema(conn)
        return [await migration.status_of(conn, config, t) for t in targets]
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()


# ---------------------------------------------------------------------------- schema


@contextlib.asynccontextmanager
async def open_store(db: Database) -> AsyncIterator[Store]:
    """embedfill's own tables on a connection of their own, the schema brought to this
    build's version first (when it is behind and the role may)."""
    conn = await connect(db)
    try:
        await ensure_schema(conn)
        yield Store(conn)
    finally:
        await conn.close()


async def aensure_schema(db: Database) -> None:
    """Create or upgrade embedfill's schema when it is behind (and the role may)."""
    async with open_store(db):
        pass


# ---------------------------------------------------------------------------- jobs


@contextlib.asynccontextmanager
async def _job_store(db: Database) -> AsyncIterator[Store]:
    """``open_store``, a statement the database refuses being a DatabaseError."""
    try:
        async with open_store(db) as store:
            yield store
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc


async def job_record(db: Database, job_id: int) -> dict[str, Any]:
    """A job as stored, with its workers, its chunks and, while it runs, live progress
    (JobNotFound: no such job; a dry run is not one)."""
    async with _job_store(db) as store:
        row = await store.get_run(job_id)
        if row is None or row["dry_run"]:
            raise JobNotFound(f"No backfill job has id {job_id}.")
        record = _record(row)
        live = await jobs.merged_report(store, job_id)
        watch = await _watch_progress(store, row)
    record["workers"] = live.workers
    record["chunks"] = live.chunks
    if row["status"] == "running":
        record["progress"] = live.progress()
    record["progress"] |= watch
    return record


async def _watch_progress(store: Store, row: dict[str, Any]) -> dict[str, int]:
    """A watch job has no total to reach: its progress is what is queued, in flight
    and done in the last hour (rows); other jobs have none of these."""
    if row.get("kind") != "watch":
        return {}
    return await store.watch_progress(int(row["id"]))


async def list_jobs(
    config: Config, db: Database, target: str | None, limit: int
) -> list[dict[str, Any]]:
    """Recent jobs, newest first (without their final reports)."""
    if target is not None:
        config.target(target)  # an unknown target is TargetNotFound, not an empty list
    async with _job_store(db) as store:
        records = []
        for row in await store.list_runs(target, limit):
            record = _record(row)
            exact = "tenants_before" in (row["parameters"] or {})
            record["workers"], record["chunks"] = await jobs.workers_and_chunks(
                store, row["id"], exact=exact
            )
            record["progress"] |= await _watch_progress(store, row)
            records.append(record)
    return records


def _record(row: dict[str, Any]) -> dict[str, Any]:
    """A stored run as a job."""
    status = row["status"]
    progress = row["progress"] or {"done": 0, "total": row["missing_before"], "tenants": []}
    return {
        "job_id": row["id"],
        "target": row["target"],
        "status": status,
        "actor": row["actor"],
        "parameters": row["parameters"],
        "progress": progress,
        "cancel_requested": row["cancel_requested"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "heartbeat_at": row["heartbeat_at"],
        "report": row["report"],
        "error": row["error"],
    }


async def wait_job(db: Database, job_id: int, timeout: float) -> dict[str, Any] | None:
    """The job's final report once it is over, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        async with _job_store(db) as store:
            state = await store.run_state(job_id)
        if state is not None and state["status"] != "running":
            report: dict[str, Any] | None = state["report"]
            return report
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.2)


async def cancel_job(db: Database, job_id: int) -> dict[str, Any]:
    """Cancel a job for every worker (each stops after its batches in flight); the job
    as it is then. JobConflict when it is already over."""
    record = await job_record(db, job_id)
    if record["status"] not in ("queued", "running"):
        raise JobConflict(f"Job {job_id} is already {record['status']}.", job_id)
    async with _job_store(db) as store:  # reaches every worker of the job
        await jobs.cancel(store.conn, job_id)
        await jobs.finish(store.conn, job_id)  # at once when no chunk is in flight
    return await job_record(db, job_id)


# ---------------------------------------------------------------------------- keys


async def put_key(db: Database, tenant: str, ciphertext: bytes, key_hint: str) -> None:
    """Store a tenant's key, encrypted (keys.encrypt) by the caller."""
    keymod.check_tenant_id(tenant)
    async with open_store(db) as store:
        await store.put_key(tenant, ciphertext, key_hint)


async def list_keys(db: Database) -> list[KeyInfo]:
    """Tenants with a stored key, each with its hint (the last 4 characters)."""
    async with open_store(db) as store:
        return await store.list_keys()


async def delete_key(db: Database, tenant: str) -> bool:
    """Forget a tenant's key; False when none was stored."""
    async with open_store(db) as store:
        return await store.delete_key(tenant)


# ---------------------------------------------------------------------------- verify


@contextlib.asynccontextmanager
async def _verifier(
    config: Config,
    db: Database,
    target: str | None,
    env: Mapping[str, str] | None,
    provider: Provider | None,
) -> AsyncIterator[Verifier]:
    """A Verifier for one target, checked against the live table and embedfill's schema
    (brought to this build's version first), its provider's token counter loaded."""
    t = config.target(target)
    pconf = config.provider_for(t)
    own_provider = provider is None
    conn = await connect(db)
    try:
        provider = provider or make_provider(pconf)
        info = await inspect_target(conn, t, await provider.dimensions(), pconf.label)
        await ensure_schema(conn)
        await asyncio.to_thread(provider.counter)
        yield Verifier(conn, t, pconf, info, provider, os.environ if env is None else env)
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        if own_provider and provider is not None:
            await provider.aclose()
        await conn.close()


async def averify(
    config: Config,
    db: Database,
    target: str | None = None,
    *,
    sample: int | None = None,
    all_rows: bool = False,
    dry_run: bool = False,
    fix: bool = False,
    env: Mapping[str, str] | None = None,
    provider: Provider | None = None,
) -> VerifyResult:
    """Re-embed ``sample`` random rows that hold a vector (default 100; ``all_rows``:
    every one) and compare with the stored vectors (verify.py); ``dry_run``: what it
    would send and cost, nothing sent. The wrong vectors are recorded as such in
    embedfill's provenance (stale from now on), never changed in the target; ``fix``:
    then re-embed them, with every other stale and outdated-model row of the target, as
    a ``--refresh`` backfill job (its report in ``fixed``)."""
    if fix and dry_run:
        raise UsageError("--fix re-embeds what verify finds wrong; drop --dry-run to use it.")
    size = sample_size(sample, all_rows)
    async with _verifier(config, db, target, env, provider) as verifier:
        if fix:  # its refresh would also re-embed another model's vectors: not silently
            sentence = await freshness.model_change(
                verifier.conn,
                verifier.target,
                verifier.pconf,
                verifier.info,
                doing="`verify --fix`",
                override=None,
            )
            if sentence is not None:
                raise ModelChanged(sentence)
        result = await verifier.verify(size, dry_run=dry_run)
    if fix and result.marked_wrong:
        report = await abackfill(
            config,
            db,
            BackfillOptions(target=result.target, refresh=True, actor="verify --fix"),
            env=env,
            provider=provider,
        )
        result.fixed = report.to_dict()
    return result


async def aadopt(
    config: Config,
    db: Database,
    target: str | None = None,
    *,
    verify_sample: int | None = None,
    env: Mapping[str, str] | None = None,
    provider: Provider | None = None,
) -> AdoptResult:
    """Record provenance for the target's unverified vectors without calling the
    provider; with ``verify_sample``, first check that many random unverified rows and
    refuse (VerificationFailed, nothing written) if any disagrees (verify.py)."""
    if verify_sample is not None and verify_sample < 1:
        raise UsageError(f"--verify-sample must be at least 1, not {verify_sample}.")
    async with _verifier(config, db, target, env, provider) as verifier:
        return await verifier.adopt(verify_sample)


# ---------------------------------------------------------------------------- triggers


async def atriggers(
    config: Config,
    db: Database,
    target: str | None,
    install: bool,
    print_sql: bool,
    *,
    apply: bool = True,
) -> tuple[triggers.TriggerPlan, str]:
    """``embedfill triggers install|uninstall``: the target's change triggers (see
    db/triggers.py), installed or removed in one transaction; with ``print_sql`` nothing
    is changed. Returns the plan and its SQL script (what ran, or would run).

    ``apply=False`` prepares all but the triggers themselves (embedfill's schema and the
    column's number, committed) and returns the plan, whose statements the caller runs
    in a transaction of its own: a Django migration runs them in its own (contrib/django)."""
    t = config.target(target)
    pconf = config.provider_for(t)
    conn = await connect(db)
    try:
        info = await inspect_target(conn, t, pconf.expected_dimensions, pconf.label)
        tsql, oid = info.sql(t), info.oid
        vectors = None  # on the table the triggers go on
        if tsql.live is not None:
            # a side table's rows change with its live table's: the triggers go there
            # and queue the side table's vector column (its watcher mirrors new rows)
            column = sql.Identifier(t.embedding_column).as_string(conn)
            vectors = f"{tsql.table.as_string(conn)}.{column}"
            live_oid = await homes.relation_oid(conn, tsql.live.table)
            assert live_oid is not None, "inspect_target found it"
            tsql, oid = tsql.live, live_oid
        if install and not print_sql:
            await ensure_schema(conn)  # the queue table is the schema's
        store = Store(conn)
        column_id = None
        if await store.has_provenance():
            column_id = await store.vector_column_id(info.oid, t.embedding_column, create=False)
        if not print_sql:
            problem = await triggers.refusal(conn, tsql, oid, column_id, install=install)
            if problem is not None:
                raise PrivilegeMissing(problem)
        if print_sql or not (install or column_id is not None):
            plan = await triggers.plan(conn, tsql, oid, column_id, install=install, vectors=vectors)
            return plan, triggers.printed(plan, conn)
        async with conn.transaction():  # all or nothing
            if install:
                column_id = await store.vector_column_id(info.oid, t.embedding_column, create=True)
            plan = await triggers.plan(conn, tsql, oid, column_id, install=install, vectors=vectors)
            for statement in plan.statements if apply else ():
                await conn.execute(statement)
        return plan, triggers.printed(plan, conn)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PrivilegeMissing(
            f"The database refused: {_first_line(exc)}; run this as the table's owner, with "
            "USAGE and CREATE on schema embedfill (e.g. the role that ran `embedfill migrate`)."
        ) from exc
    except psycopg.Error as exc:
        raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
    finally:
        await conn.close()


__all__ = [
    "BackfillOptions",
    "Observer",
    "ProgressCallback",
    "aadopt",
    "abackfill",
    "adefer_index_plan",
    "aensure_schema",
    "amigrate",
    "astatus",
    "atriggers",
    "averify",
    "cancel_job",
    "delete_key",
    "job_record",
    "list_jobs",
    "list_keys",
    "open_store",
    "put_key",
    "wait_job",
]
