"""The admin service's state: background jobs over the same library calls as the CLI.

A job is a backfill run; its id is the run's id in ``embedfill.runs``, so job records
survive a restart. One job per target: a second request while one runs here is answered
with the active job, and a run in another process is refused by the engine's advisory
lock (``TargetBusy``), so no work is ever done twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..config import Config
from ..db.catalog import check_extension, count_missing, inspect_target
from ..db.connect import Database, connect
from ..db.schema import EXPECTED_VERSION, current_version, ensure_schema
from ..db.store import Store
from ..db.target_sql import TargetSQL
from ..engine import BackfillOptions, abackfill, astatus
from ..errors import DatabaseError, EmbedfillError, ExtensionMissing, JobConflict, JobNotFound
from ..models import Report, TargetStatus
from ..providers import Provider, check_available, make_provider
from .logs import job_id_var
from .metrics import Metrics

log = logging.getLogger(__name__)

#: a run still marked running whose heartbeat is older than this lost its process
ABANDONED_AFTER_S = 15.0
MISSING_REFRESH_S = 30.0


@dataclass
class Job:
    target: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[Report] | None = None
    live: Report | None = None

    @property
    def job_id(self) -> int | None:
        return self.started.result() if self.started.done() else None


def _pair(job: Job) -> list[asyncio.Future[Any]]:
    assert job.task is not None
    return [job.started, job.task]


#: what /readyz says (it needs no secret, so it never says more; the log has the details)
NOT_READY_DATABASE = "The database is unavailable; the service log says why."
NOT_READY_PGVECTOR = "pgvector is missing in the database; the service log says how to fix it."
NOT_READY_SCHEMA_BEHIND = "embedfill's schema is behind this build; run `embedfill migrate`."
NOT_READY_SCHEMA_AHEAD = "embedfill's schema is newer than this build; upgrade embedfill."


class AdminService:
    def __init__(self, config: Config, db: Database, env: Mapping[str, str]) -> None:
        for pconf in config.providers.values():
            check_available(pconf)  # e.g. kind = "local" without its extra: fail at start
        self.config = config
        self.db = db
        self.env = env
        self.metrics = Metrics()
        self.jobs: dict[str, Job] = {}  # active, by target name
        self._providers: dict[str, Provider] = {}
        self._missing_at = 0.0
        self._unready: str | None = None  # the last reason logged, to log each change once

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """Bring embedfill's schema to this build's version if it is behind and this role
        may; otherwise log why (readyz reports it, and the log names the command)."""
        try:
            conn = await connect(self.db)
        except EmbedfillError as exc:
            log.warning("database not reachable at start-up: %s", exc)
            return
        try:
            await ensure_schema(conn)
        except EmbedfillError as exc:
            log.warning("%s", exc)
        except psycopg.Error as exc:
            log.warning("could not migrate the embedfill schema: %s", _first_line(exc))
        finally:
            await conn.close()

    async def shutdown(self) -> None:
        """Stop running jobs after their batches in flight."""
        for job in list(self.jobs.values()):
            job.cancel.set()
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        for provider in self._providers.values():
            await provider.aclose()

    def provider(self, name: str) -> Provider:
        """One provider (client, model) per configured provider, for the app's lifetime."""
        if name not in self._providers:
            self._providers[name] = make_provider(self.config.providers[name])
        return self._providers[name]

    # ------------------------------------------------------------------ jobs

    async def dry_run(self, opts: BackfillOptions) -> Report:
        target = self.config.target(opts.target)
        return await abackfill(
            self.config, self.db, opts, env=self.env, provider=self.provider(target.provider)
        )

    async def start(self, opts: BackfillOptions) -> Job:
        """Start a backfill in the background; returns once its run is recorded."""
        target = self.config.target(opts.target)
        active = self.jobs.get(target.name)
        if active is not None:
            if not active.started.done():  # a request a moment ago is still starting it
                await asyncio.wait(_pair(active), return_when=asyncio.FIRST_COMPLETED)
                if self.jobs.get(target.name) is not active:
                    return await self.start(opts)  # it failed to start; try ours
            raise JobConflict(
                f"A backfill of target {target.name!r} is already running as job {active.job_id}.",
                active.job_id,
            )
        job = Job(target=target.name)
        self.jobs[target.name] = job
        job.task = asyncio.create_task(self._run(job, opts, self.provider(target.provider)))
        await asyncio.wait(_pair(job), return_when=asyncio.FIRST_COMPLETED)
        if not job.started.done():
            # failed before the run was recorded: a config error or another process's run
            self.jobs.pop(target.name, None)
            exc = job.task.exception()
            if isinstance(exc, EmbedfillError) and getattr(exc, "run_id", None) is not None:
                raise JobConflict(str(exc), exc.run_id)  # type: ignore[attr-defined]
            assert exc is not None
            raise exc
        return job

    async def _run(self, job: Job, opts: BackfillOptions, provider: Provider) -> Report:
        def on_start(run_id: int) -> None:
            job_id_var.set(run_id)
            job.started.set_result(run_id)

        def on_progress(report: Report) -> None:
            job.live = report

        self.metrics.jobs_running.inc()
        state = "failed"
        try:
            report = await abackfill(
                self.config,
                self.db,
                opts,
                provider=provider,
                on_start=on_start,
                on_progress=on_progress,
                cancel=job.cancel,
                env=self.env,
                observer=self.metrics,
            )
            state = report.status
            log.info(
                "job finished: %s, %d embedded, %d failed",
                report.status,
                report.embedded,
                report.failed,
            )
            return report
        except Exception as exc:
            if job.started.done():  # else start() re-raises it to the caller
                log.error("job failed: %s", exc)
            raise
        finally:
            self.metrics.jobs_running.dec()
            self.metrics.jobs_total.labels(state).inc()
            if self.jobs.get(job.target) is job:
                del self.jobs[job.target]

    def active_job(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs.values() if j.job_id == job_id), None)

    async def wait(self, job: Job, timeout: float) -> Report | None:
        assert job.task is not None
        done, _ = await asyncio.wait([job.task], timeout=timeout)
        if not done:
            return None
        return job.task.result()

    async def job_record(self, job_id: int) -> dict[str, Any]:
        """The job as stored, with live progress when it runs in this process."""
        async with self._store() as store:
            row = await store.get_run(job_id)
        if row is None or row["dry_run"]:
            raise JobNotFound(f"No backfill job has id {job_id}.")
        return self._record(row)

    async def list_jobs(self, target: str | None, limit: int) -> list[dict[str, Any]]:
        """Recent jobs, newest first (without their final reports)."""
        if target is not None:
            self.config.target(target)  # an unknown target is a 404, not an empty list
        async with self._store() as store:
            rows = await store.list_runs(target, limit)
        return [self._record(row) for row in rows]

    def _record(self, row: dict[str, Any]) -> dict[str, Any]:
        """A stored run as a job, with live progress when it runs in this process."""
        job_id = row["id"]
        job = self.active_job(job_id)
        status = row["status"]
        if status in ("queued", "running") and job is None:
            silent: dt.timedelta = row["silent_for"]
            if silent.total_seconds() > ABANDONED_AFTER_S:
                status = "abandoned"
        progress = row["progress"] or {"done": 0, "total": row["missing_before"], "tenants": []}
        if job is not None and job.live is not None:
            progress = job.live.progress()
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

    async def cancel(self, job_id: int) -> dict[str, Any]:
        record = await self.job_record(job_id)
        if record["status"] not in ("queued", "running"):
            raise JobConflict(f"Job {job_id} is already {record['status']}.", job_id)
        job = self.active_job(job_id)
        if job is not None:
            job.cancel.set()
        async with self._store() as store:  # reaches the run in any process
            await store.request_cancel(job_id)
        return await self.job_record(job_id)

    # ------------------------------------------------------------------ status & health

    async def status(self, target: str | None) -> list[TargetStatus]:
        return await astatus(self.config, self.db, target)

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz. Reads only: never migrates, never runs DDL. The
        reason is one of a few generic phrases; the details (scrubbed) go to the log."""
        try:
            conn = await connect(self.db)
        except EmbedfillError as exc:
            return self._not_ready(NOT_READY_DATABASE, str(exc))
        try:
            await check_extension(conn)
            version = await current_version(conn)
        except ExtensionMissing as exc:
            return self._not_ready(NOT_READY_PGVECTOR, str(exc))
        except (EmbedfillError, psycopg.Error) as exc:
            return self._not_ready(
                NOT_READY_DATABASE, f"the database refused a check: {_first_line(exc)}"
            )
        finally:
            await conn.close()
        if version is None or version < EXPECTED_VERSION:
            state = "missing" if version is None else f"at version {version}"
            return self._not_ready(
                NOT_READY_SCHEMA_BEHIND,
                f"embedfill's schema is {state}, this build needs {EXPECTED_VERSION}; "
                "run `embedfill migrate` as the schema owner",
            )
        if version > EXPECTED_VERSION:
            return self._not_ready(
                NOT_READY_SCHEMA_AHEAD,
                f"embedfill's schema is at version {version}, this build expects "
                f"{EXPECTED_VERSION}; upgrade embedfill",
            )
        self._unready = None
        return True, f"ok: database reachable, pgvector present, schema v{version}"

    def _not_ready(self, reason: str, detail: str) -> tuple[bool, str]:
        if detail != self._unready:
            log.warning("not ready (%s): %s", reason, detail)
            self._unready = detail
        return False, reason

    async def refresh_missing(self) -> None:
        """Update the missing-rows gauge, at most every MISSING_REFRESH_S seconds."""
        now = time.monotonic()
        if now - self._missing_at < MISSING_REFRESH_S:
            return
        self._missing_at = now
        try:
            conn = await connect(self.db)
        except EmbedfillError:
            return
        try:
            for target in self.config.targets:
                pconf = self.config.provider_for(target)
                try:
                    info = await inspect_target(
                        conn, target, pconf.expected_dimensions, pconf.label
                    )
                    missing = await count_missing(conn, TargetSQL(target, info.types), None)
                except (EmbedfillError, psycopg.Error):
                    continue
                self.metrics.missing.labels(target.name).set(missing)
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def _store(self) -> Any:
        conn = await connect(self.db)
        try:
            await ensure_schema(conn)
            yield Store(conn)
        except psycopg.Error as exc:
            raise DatabaseError(f"The database refused a statement: {_first_line(exc)}") from exc
        finally:
            await conn.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
