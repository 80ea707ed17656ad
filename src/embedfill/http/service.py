"""The admin service's state: background jobs over the same application calls as the CLI
(application.py).

A job is a backfill run; its id is the run's id in ``embedfill.runs``, so job records
survive a restart. One job per target: a second request while one runs here is answered
with the active job, and a run in another process is refused by the engine's advisory
lock (``TargetBusy``), so no work is ever done twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import psycopg

from .. import application, health
from ..application import BackfillOptions, abackfill, astatus
from ..config import Config
from ..db.catalog import check_extension
from ..db.connect import Database, connect
from ..db.schema import EXPECTED_VERSION, current_version, ensure_schema
from ..engine.state import ABANDON_AFTER_S, abandon_requests
from ..errors import ConfigError, EmbedfillError, ExtensionMissing, JobConflict, TargetBusy
from ..errors import first_line as _first_line
from ..migration import MigrationStatus
from ..models import Report, TargetStatus
from ..providers import Provider, check_available, make_provider
from ..runtime import Runtime
from ..watch import WatchOptions
from .logs import job_id_var
from .metrics import Metrics

log = logging.getLogger(__name__)

#: the status gauges of /metrics (missing, stale, outdated model, unverified rows, jobs)
#: come from one status pass per target, started by a scrape at most every this many
#: seconds after the previous pass ended (EMBEDFILL_METRICS_INTERVAL; 0: every scrape),
#: never two at once; a scrape waits for a pass at most METRICS_WAIT_S, then answers
#: with the previous values (a pass over a 10M-row table can outlast a scrape timeout)
METRICS_INTERVAL_S = 60.0
METRICS_WAIT_S = 5.0


#: what /readyz says (it needs no secret, so it never says more; the log has the details)
NOT_READY_DATABASE = "The database is unavailable; the service log says why."
NOT_READY_PGVECTOR = "pgvector is missing in the database; the service log says how to fix it."
NOT_READY_SCHEMA_BEHIND = "embedfill's schema is behind this build; run `embedfill migrate`."
NOT_READY_SCHEMA_AHEAD = "embedfill's schema is newer than this build; upgrade embedfill."


class AdminService:
    def __init__(
        self,
        config: Config,
        db: Database,
        env: Mapping[str, str],
        *,
        worker: bool = True,
        watch: WatchOptions | None = None,
    ) -> None:
        for pconf in config.providers.values():
            check_available(pconf)  # e.g. kind = "local" without its extra: fail at start
        self.config = config
        self.db = db
        self.env = env
        self.metrics = Metrics(tenant_labels=_tenant_labels(env))
        self._providers: dict[str, Provider] = {}
        # the in-process worker (``serve`` without --no-worker), which works on every
        # job's chunks beside any `embedfill worker` elsewhere, and with ``serve --watch``
        # a watcher (elected per target) that queues what it notices (runtime.py)
        self.runtime = Runtime(
            config,
            db,
            watch=watch,
            worker=worker,
            env=env,
            observer=self.metrics,
            providers=self._providers,
        )
        self.worker = self.runtime.worker
        self.watches = self.runtime.watches
        if self.worker is not None:
            self.worker.on_job_end = lambda _, status: self.metrics.jobs_total.labels(status).inc()
        self._abandon = asyncio.Event()
        self.metrics_interval = _metrics_interval(env)
        self._pass: asyncio.Task[None] | None = None
        self._pass_ended = 0.0
        self._unready: str | None = None  # the last reason logged, to log each change once
        self._later: asyncio.Task[None] | None = None  # the worker's start, deferred
        self._model_tasks: set[asyncio.Task[Any]] = set()  # `model start`s running here
        self._answered: set[asyncio.Task[Any]] = set()  # those whose refusal was the answer

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """Bring embedfill's schema to this build's version if it is behind and this role
        may; otherwise log why (readyz reports it, and the log names the command)."""
        # watchers retry on their own until the database answers
        # provider requests still in flight ABANDON_AFTER_S after shutdown begins are
        # abandoned (their rows stay NULL, their chunks go back), as a signalled worker's
        abandon_requests.set(self._abandon)  # inherited by the tasks started from here
        try:
            conn = await connect(self.db)
        except EmbedfillError as exc:
            log.warning("database not reachable at start-up: %s", exc)
            self.runtime.start(worker=False)  # the watchers retry until it answers
            if self.worker is not None:  # and the worker starts once it does
                self._later = asyncio.create_task(self._start_worker_when_reachable())
                self._later.add_done_callback(_log_later_end)
            return
        try:
            await ensure_schema(conn)
            # `serve --watch`: the new vectors of a change of model under way too
            await self.runtime.include_changes_of_model(conn)
        except EmbedfillError as exc:
            log.warning("%s", exc)
        except psycopg.Error as exc:
            log.warning("could not migrate the embedfill schema: %s", _first_line(exc))
        finally:
            await conn.close()
        self.watches = self.runtime.watches
        self.runtime.start(_log_worker_end)

    async def _start_worker_when_reachable(self) -> None:
        """The in-process worker of a service started while the database could not be
        reached: started once it can (looked at with a growing wait, up to a minute).
        Before, it never started: jobs waited, `embedfill_workers_alive` read 0."""
        wait = 1.0
        while True:
            await asyncio.sleep(wait)
            wait = min(wait * 2, 60.0)
            try:
                conn = await connect(self.db)
            except (EmbedfillError, psycopg.Error, OSError):
                continue  # a server restarting may drop the session while it is set up
            try:
                await ensure_schema(conn)
            except (EmbedfillError, psycopg.Error) as exc:
                log.warning("%s", _first_line(exc))
            finally:
                await conn.close()
            log.info("the database answers: the in-process worker starts")
            self.runtime.start_worker(_log_worker_end)
            return

    async def shutdown(self) -> None:
        """The watchers stop queuing, the in-process worker finishes its chunks in flight
        (jobs go on elsewhere, or when the service is back), then the watch jobs end."""
        if self._later is not None:
            self._later.cancel()
            await asyncio.gather(self._later, return_exceptions=True)
        asyncio.get_running_loop().call_later(ABANDON_AFTER_S, self._abandon.set)
        if self._pass is not None:
            self._pass.cancel()
        for task in self._model_tasks:  # its job goes on with the next `model start`
            task.cancel()
        await asyncio.gather(*self._model_tasks, return_exceptions=True)
        await self.runtime.stop(worker_timeout=60)
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

    async def start(self, opts: BackfillOptions) -> int:
        """Create the target's job (its chunks queued for the workers); 409 when one runs."""
        target = self.config.target(opts.target)
        try:
            report = await abackfill(
                self.config,
                self.db,
                opts,
                env=self.env,
                provider=self.provider(target.provider),
                exclusive=True,
                enqueue=True,
            )
        except TargetBusy as exc:
            raise JobConflict(
                f"Target {target.name!r} is already being backfilled by run {exc.run_id} "
                f"(job {exc.run_id}); wait for it to finish or cancel it.",
                exc.run_id,
            ) from None
        assert report.run_id is not None
        job_id_var.set(report.run_id)
        log.info("job queued for target %s", target.name)
        return report.run_id

    async def wait(self, job_id: int, timeout: float) -> dict[str, Any] | None:
        """The job's final report once it is over, or None after ``timeout`` seconds."""
        return await application.wait_job(self.db, job_id, timeout)

    async def job_record(self, job_id: int) -> dict[str, Any]:
        """The job as stored, with its workers, chunks and live progress (404: none)."""
        return await application.job_record(self.db, job_id)

    async def list_jobs(self, target: str | None, limit: int) -> list[dict[str, Any]]:
        """Recent jobs, newest first (an unknown target is a 404, not an empty list)."""
        return await application.list_jobs(self.config, self.db, target, limit)

    async def cancel(self, job_id: int) -> dict[str, Any]:
        """Cancel for every worker of the job (409 when it is already over)."""
        return await application.cancel_job(self.db, job_id)

    # ------------------------------------------------------------------ status & health

    # ------------------------------------------------------------------ model changes

    async def start_model(
        self, target: str, to: str, strategy: str, *, vector_type: str | None = None
    ) -> int:
        """``model start`` in the background; the change's number once it is recorded
        (a refusal answers now: the plan's, a change already under way, a privilege)."""
        config = self.config
        config.target(target)  # an unknown one: 404 now
        recorded: list[int] = []
        told = asyncio.Event()

        def on_recorded(migration_id: int) -> None:
            recorded.append(migration_id)
            told.set()

        task = asyncio.create_task(
            application.amodel_start(
                config,
                self.db,
                target,
                to,
                strategy,
                vector_type=vector_type,
                actor="http",
                env=self.env,
                on_recorded=on_recorded,
            )
        )
        self._model_tasks.add(task)
        task.add_done_callback(self._model_ended)
        # the start's own word: recorded (202), or refused before it was (the answer);
        # matching a change on record by its provider section alone answered 202 to a
        # start that was about to be refused for another vector type
        waiting = asyncio.ensure_future(told.wait())
        try:
            await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if recorded:
            return recorded[0]
        self._answered.add(task)
        done: MigrationStatus = task.result()  # a refusal is the answer
        assert done.migration_id is not None
        return done.migration_id

    def _model_ended(self, task: asyncio.Task[Any]) -> None:
        """A `model start` that failed after its request was answered is logged."""
        self._model_tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None and task not in self._answered:
            log.warning("model start: %s", _first_line(error))
        self._answered.discard(task)

    async def model(self, migration_id: int, action: str, **kw: Any) -> MigrationStatus:
        """``status``, ``verify``, ``cutover``, ``rollback`` or ``finalize`` of change
        ``migration_id``."""
        target = await application.amigration_target(self.db, migration_id)
        if action == "status":
            [out] = await application.amodel_status(self.config, self.db, target)
            return out
        call = {
            "verify": application.amodel_verify,
            "cutover": application.amodel_cutover,
            "rollback": application.amodel_rollback,
            "finalize": application.amodel_finalize,
        }[action]
        if action == "verify":
            kw["env"] = self.env
        result: MigrationStatus = await call(self.config, self.db, target, **kw)
        return result

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

    def refresh_running(self) -> None:
        """Jobs this process's worker is working on now."""
        self.metrics.jobs_running.set(self.worker.running() if self.worker else 0)

    async def refresh_gauges(self) -> None:
        """Start a status pass when one is due (see METRICS_INTERVAL_S) and wait for the
        pass in flight at most METRICS_WAIT_S."""
        if self._pass is None or (
            self._pass.done() and time.monotonic() - self._pass_ended >= self.metrics_interval
        ):
            self._pass = asyncio.create_task(self._gauges_pass())
        if not self._pass.done():
            await asyncio.wait([self._pass], timeout=METRICS_WAIT_S)

    async def _gauges_pass(self) -> None:
        started = time.monotonic()
        try:
            statuses, errors = await health.status_by_target(self.config, self.db)
            at = time.time()
            for status in statuses.values():
                self.metrics.set_status(status, at)
                self.metrics.set_target_error(status.name, None)
            for name, exc in errors.items():
                self.metrics.set_target_error(name, type(exc).__name__)
            running, alive = await health.job_gauges(self.db)
            self.metrics.set_jobs(running)
            if alive is not None:
                self.metrics.workers_alive.set(alive)
            self.metrics.status_pass.set(time.monotonic() - started)
        except EmbedfillError as exc:  # the database down: the timestamps say since when
            log.warning("metrics: status pass failed: %s", exc)
        except Exception:  # never let a metrics pass take the service down
            log.exception("metrics: status pass failed")
        finally:
            self._pass_ended = time.monotonic()


def _tenant_labels(env: Mapping[str, str]) -> bool:
    raw = env.get("EMBEDFILL_METRICS_TENANT_LABELS", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"EMBEDFILL_METRICS_TENANT_LABELS must be 1 or 0, not {raw!r}.")


def _metrics_interval(env: Mapping[str, str]) -> float:
    raw = env.get("EMBEDFILL_METRICS_INTERVAL", "").strip()
    if not raw:
        return METRICS_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(
            f"EMBEDFILL_METRICS_INTERVAL must be a number of seconds, 0 or more, not {raw!r}."
        )
    return value


def _log_later_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "the in-process worker could not be started: %s; jobs wait for `embedfill "
            "worker` processes",
            _first_line(task.exception()),  # type: ignore[arg-type]
        )


def _log_worker_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "the in-process worker stopped: %s; jobs wait for `embedfill worker` processes",
            task.exception(),
        )
