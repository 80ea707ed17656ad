"""The admin HTTP API: the origin story's endpoint, done as a reusable service.

``create_app(config)`` builds a FastAPI app; ``admin_router(service)`` gives the same
routes as an APIRouter to mount inside an existing app. Routes are thin: each calls
one AdminService method, which calls the same library functions as the CLI.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import types as types_module
import typing
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..application import BackfillOptions
from ..config import Config, env_secret, load_config
from ..db.connect import Database, url_from_env
from ..errors import ConfigError, EmbedfillError
from ..models import Failure, Report, Sample, TenantReport
from ..secrets import Secret
from ..watch import WatchOptions
from .console import console_router
from .service import AdminService

PREFIX = "/api/v1/admin"
WAIT_LIMIT_S = 30.0

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every non-2xx answer: ``{"error": "..."}``, plus ``job_id`` only when a job is
    concerned (409: the running job, or the finished one that cannot be cancelled)."""

    error: str = Field(description="One sentence: what is wrong and how to fix it.")
    job_id: int | None = Field(None, description="The job concerned; present only on 409.")


class JobAccepted(BaseModel):
    job_id: int
    status: str = Field(
        description="queued, running, succeeded, partial, failed, cancelled or abandoned"
    )
    status_url: str


def body_of(
    cls: type[Any],
    name: str,
    descriptions: Mapping[str, str],
    types: Mapping[Any, Any] | None = None,
    **extra: Any,
) -> type[BaseModel]:
    """The response model of a report dataclass, field for field (a field added to the
    report is in the schema and in the answer; FastAPI drops what its model lacks).
    ``types`` swaps nested dataclasses for their own bodies; ``extra`` fields come first."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = dict(extra)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        for old, new in (types or {}).items():
            if typing.get_origin(kind) is list and typing.get_args(kind) == (old,):
                kind = types_module.GenericAlias(list, (new,))
        if f.default is not dataclasses.MISSING:
            default = Field(f.default, description=descriptions.get(f.name))
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory, description=descriptions.get(f.name))
        else:
            default = Field(description=descriptions.get(f.name))
        fields[f.name] = (kind, default)
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the dataclass's own signature: no doc
        doc = ""
    body: type[BaseModel] = create_model(name, __doc__=doc or None, **fields)
    return body


TenantReportBody = body_of(
    TenantReport,
    "TenantReportBody",
    {"would_fail": "dry run: rows that would fail (no usable key)"},
)
SampleBody = body_of(
    Sample, "SampleBody", {"text": "The text as it would be sent, cut to 300 characters."}
)
FailureBody = body_of(Failure, "FailureBody", {})
ReportBody = body_of(
    Report,
    "ReportBody",
    {
        "changed": "read, embedded, then not written: the app changed or filled the row",
        "locked": "left NULL: the app held the row's lock for the whole retry window",
        "stale_before": "refresh: stale and outdated-model rows at start",
        "refreshed": "refresh: of those, rows written with a fresh vector",
        "would_fail": "dry run: rows of tenants without a usable key",
        "samples": "dry run: the first two texts",
        "warnings": "e.g. a tenantId that matches no row",
        "joined": "this request joined a job already running",
        "error_class": "a failed job: the error's class (its exit code)",
        "workers": "a job: each worker's part",
        "chunks": "a job: its chunks by state",
    },
    {TenantReport: TenantReportBody, Failure: FailureBody, Sample: SampleBody},
    job_id=(
        int | None,
        Field(
            None,
            description="The job (= run_id) of a real run; null for a dry run, not a job.",
        ),
    ),
)


class ProgressBody(BaseModel):
    done: int
    total: int | None
    tenants: list[dict[str, Any]]
    # a watch job (no total to reach): rows queued, in flight, done in the last hour
    queued: int | None = None
    in_flight: int | None = None
    done_last_hour: int | None = None


class WorkerBody(BaseModel):
    """One worker process's part of a job."""

    worker: str
    host: str
    pid: int
    chunks: int
    embedded: int
    skipped: int
    failed: int
    requests: int
    started_at: str | None
    last_heartbeat: str | None
    refused: str | None = None  # the setting in which this worker differs from the job


class JobBody(BaseModel):
    job_id: int
    target: str
    status: str
    actor: str
    parameters: dict[str, Any]
    progress: ProgressBody
    cancel_requested: bool
    started_at: Any
    finished_at: Any
    heartbeat_at: Any
    report: ReportBody | None  # type: ignore[valid-type]  # made by body_of
    error: str | None
    workers: list[WorkerBody] = []  # each worker's part (and those that refused the job)
    chunks: dict[str, int] = {}  # chunks by state


class JobList(BaseModel):
    jobs: list[JobBody]


class MigrationRequest(BaseModel):
    target: str = Field(max_length=200, description="The target whose model changes.")
    to: str = Field(max_length=200, description="The provider section with the new model.")
    strategy: str = Field(
        default="table", pattern="^(table|column)$", description="table (default) or column"
    )
    vector_type: str | None = Field(
        default=None,
        pattern="^(vector|halfvec)$",
        description="the new vectors' type: vector or halfvec (default: the live column's)",
    )


class MigrationAccepted(BaseModel):
    migration_id: int
    job_id: int | None = Field(description="the fill's job, once it started")
    phase: str
    status_url: str


class MigrationBody(BaseModel):
    target: str
    migration_id: int | None
    phase: str = Field(
        description="none, planned, filling, indexing, ready, cut_over, finalized, rolled_back"
    )
    strategy: str | None
    from_: dict[str, Any] = Field(alias="from")
    to: dict[str, Any]
    home: dict[str, Any]
    rows: int
    coverage: float
    missing: int
    stale: int
    index: str = Field(description="none, building, valid or invalid")
    gates: dict[str, Any]
    active: str = Field(description="old or new: which vectors the app's searches use")
    job_id: int | None
    updated_at: Any
    next_step: str | None = Field(
        None,
        description="what the config needs after a cutover's finalize dropped the column "
        "it names; null otherwise",
    )


class StatusBody(BaseModel):
    targets: list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "x-admin-secret missing or wrong"},
    503: {
        "model": ErrorBody,
        "description": "admin API disabled (no secret configured) or database unavailable",
    },
}


def admin_secret(env: Mapping[str, str]) -> Secret | None:
    """ADMIN_SECRET, else AUTH_SECRET, else None (the admin API then answers 503)."""
    for name in ("ADMIN_SECRET", "AUTH_SECRET"):
        value = env_secret(env, name)  # or ADMIN_SECRET_FILE, AUTH_SECRET_FILE
        if value:
            return Secret(value)
    return None


class ApiError(Exception):
    def __init__(self, status: int, message: str, job_id: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.job_id = job_id


def error_response(
    status: int,
    message: str,
    job_id: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one error body: ``{"error": ...}``, with ``job_id`` only when there is one."""
    body: dict[str, Any] = {"error": message}
    if job_id is not None:
        body["job_id"] = job_id
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    where = first.get("loc", ())
    name = where[-1] if where else "request"
    detail = str(first.get("msg", "is invalid")).rstrip(".")
    return f"Parameter {name!s}: {detail}."


def _known_error(exc: Exception) -> JSONResponse | None:
    """The error body for what the admin routes raise on purpose; None for anything else."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, str(exc), exc.job_id)
    if isinstance(exc, EmbedfillError):
        return error_response(exc.http_status, str(exc), getattr(exc, "job_id", None))
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid" or (
            tuple(first.get("loc", ())) == ("body",)
            and first.get("type") in ("model_attributes_type", "dict_type")
        ):  # the body as a whole: not JSON, or not an object (no content-type said so)
            return error_response(
                400,
                "The request body is not a JSON object; send one, with the header "
                "Content-Type: application/json.",
            )
        return error_response(422, _validation_message(exc))
    return None


class _AdminRoute(APIRoute):
    """Answers the routes' own errors (auth, validation, embedfill errors) with the error
    body inside the route, so the router keeps its contract in any app that includes it,
    not only in ``create_app``'s."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                response = _known_error(exc)
                if response is None:
                    raise
                return response

        return answer


def admin_router(service: AdminService) -> APIRouter:
    """The admin routes over one service, for ``app.include_router`` in your own app.
    The secret is read from the service's environment (``admin_secret``)."""
    secret = admin_secret(service.env)

    def require_admin(
        x_admin_secret: Annotated[
            str | None,
            Header(alias="x-admin-secret", description="Equals ADMIN_SECRET (or AUTH_SECRET)."),
        ] = None,
    ) -> None:
        if secret is None:
            raise ApiError(
                503,
                "The admin API is disabled until ADMIN_SECRET (or AUTH_SECRET) "
                "is set in the service's environment.",
            )
        given = (x_admin_secret or "").encode()
        if not hmac.compare_digest(given, secret.reveal().encode()):
            raise ApiError(401, "Missing or wrong x-admin-secret header.")

    router = APIRouter(
        prefix=PREFIX,
        dependencies=[Depends(require_admin)],
        responses=ERRORS,
        tags=["admin"],
        route_class=_AdminRoute,
    )

    @router.post(
        "/backfill-embeddings",
        summary="Backfill missing embeddings (or plan it with dryRun)",
        status_code=202,
        response_model=JobAccepted,
        responses={
            200: {"model": ReportBody, "description": "dry run, or wait=true and finished"},
            202: {"model": JobAccepted, "description": "job started (Location: status URL)"},
            404: {"model": ErrorBody, "description": "unknown target"},
            409: {"model": ErrorBody, "description": "a job for this target is running"},
            422: {"model": ErrorBody, "description": "bad parameter"},
        },
    )
    async def backfill(
        request: Request,
        response: Response,
        dry_run: Annotated[
            bool,
            Query(
                alias="dryRun",
                description=(
                    "Plan only: missing rows, requests, tokens, cost, key source per tenant."
                ),
            ),
        ] = False,
        batch_size: Annotated[
            int | None,
            Query(alias="batchSize", ge=1, le=2048, description=("Inputs per embedding request.")),
        ] = None,
        target: Annotated[
            str | None,
            Query(
                max_length=200, description=("Target name; default: the first configured target.")
            ),
        ] = None,
        tenant_id: Annotated[
            list[str] | None,
            Query(alias="tenantId", description=("Only these tenants (repeatable).")),
        ] = None,
        limit: Annotated[
            int | None, Query(ge=1, le=2**31 - 1, description=("At most this many rows."))
        ] = None,
        wait: Annotated[
            bool,
            Query(
                description=(
                    f"Answer when done (up to {WAIT_LIMIT_S:.0f} s), else 202 with the job."
                )
            ),
        ] = False,
        refresh: Annotated[
            bool,
            Query(
                description=(
                    "Also re-embed stale and outdated-model rows (see status), not only NULL ones."
                )
            ),
        ] = False,
    ) -> Any:
        opts = BackfillOptions(
            target=target,
            dry_run=dry_run,
            batch_size=batch_size,
            tenants=tuple(tenant_id or ()),
            limit=limit,
            actor="http",
            refresh=refresh,
        )
        if dry_run:
            report = await service.dry_run(opts)
            return JSONResponse(_report_body(report.to_dict(), None), status_code=200)
        job_id = await service.start(opts)
        url = str(request.url_for("job_status", job_id=job_id).path)
        if wait:
            final = await service.wait(job_id, WAIT_LIMIT_S)
            if final is not None:
                return JSONResponse(_report_body(final, job_id), status_code=200)
        response.headers["Location"] = url
        record = await service.job_record(job_id)
        return JobAccepted(job_id=job_id, status=record["status"], status_url=url)

    @router.get(
        "/backfill-embeddings",
        response_model=JobList,
        summary="Recent jobs, newest first (each without its final report)",
        responses={404: {"model": ErrorBody, "description": "unknown target"}},
    )
    async def list_jobs(
        target: Annotated[
            str | None, Query(max_length=200, description="Only this target's jobs.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=200, description="At most this many.")] = 20,
    ) -> Any:
        return jsonable_encoder({"jobs": await service.list_jobs(target, limit)})

    @router.get(
        "/backfill-embeddings/{job_id}",
        name="job_status",
        response_model=JobBody,
        summary="A job's status, live progress and final report",
        responses={404: {"model": ErrorBody, "description": "no such job"}},
    )
    async def job_status(job_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Any:
        record = await service.job_record(job_id)
        if record["report"] is not None:
            record["report"] = _report_body(record["report"], record["job_id"])
        return jsonable_encoder(record)

    @router.post(
        "/backfill-embeddings/{job_id}/cancel",
        response_model=JobBody,
        status_code=202,
        summary="Stop a job after the batches in flight",
        responses={
            404: {"model": ErrorBody, "description": "no such job"},
            409: {"model": ErrorBody, "description": "job already finished"},
        },
    )
    async def cancel(job_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Any:
        return jsonable_encoder(await service.cancel(job_id))

    @router.post(
        "/model-migrations",
        status_code=202,
        response_model=MigrationAccepted,
        summary="Change a target's model: `embedfill model start` in the background",
        responses={
            400: {"model": ErrorBody, "description": "the body is not JSON"},
            403: {"model": ErrorBody, "description": "the role lacks a privilege it needs"},
            404: {"model": ErrorBody, "description": "unknown target"},
            409: {"model": ErrorBody, "description": "another change of the column is under way"},
            422: {"model": ErrorBody, "description": "the change cannot work as asked"},
        },
    )
    async def start_model(request: Request, response: Response, body: MigrationRequest) -> Any:
        migration_id = await service.start_model(
            body.target, body.to, body.strategy, vector_type=body.vector_type
        )
        url = str(request.url_for("model_migration", migration_id=migration_id).path)
        response.headers["Location"] = url
        status = await service.model(migration_id, "status")
        return MigrationAccepted(
            migration_id=migration_id, job_id=status.job_id, phase=status.phase, status_url=url
        )

    @router.get(
        "/model-migrations/{migration_id}",
        name="model_migration",
        response_model=MigrationBody,
        summary="A change of model's phase, coverage, index, gates and active vectors",
        responses={404: {"model": ErrorBody, "description": "no such change"}},
    )
    async def model_migration(migration_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Any:
        return jsonable_encoder((await service.model(migration_id, "status")).to_dict())

    def _model_action(action: str, summary: str, **extra: Any) -> None:
        @router.post(
            f"/model-migrations/{{migration_id}}/{action}",
            response_model=MigrationBody,
            summary=summary,
            responses={
                404: {"model": ErrorBody, "description": "no such change"},
                409: {"model": ErrorBody, "description": "a gate fails"},
                422: {"model": ErrorBody, "description": "not at a phase that allows it"},
            },
            name=f"model_{action}",
        )
        async def act(
            migration_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
            yes: Annotated[bool, Query(description="finalize: drop them (no undo).")] = False,
            force: Annotated[
                bool, Query(description="finalize: even within the rollback window.")
            ] = False,
        ) -> Any:
            kw = {"yes": yes, "force": force} if action == "finalize" else {}
            return jsonable_encoder((await service.model(migration_id, action, **kw)).to_dict())

    _model_action("verify", "Check the new vectors: the gates (as `model verify`)")
    _model_action("cutover", "Switch the app's searches to the new vectors")
    _model_action("rollback", "Switch the app's searches back to the old vectors")
    _model_action("finalize", "Drop the vectors the app no longer searches (yes=true)")

    @router.get(
        "/embeddings/status",
        response_model=StatusBody,
        summary="Rows and missing embeddings per target (as `status --json`)",
        responses={404: {"model": ErrorBody, "description": "unknown target"}},
    )
    async def embeddings_status(
        target: Annotated[str | None, Query(max_length=200)] = None,
    ) -> Any:
        return {"targets": [s.to_dict() for s in await service.status(target)]}

    return router


def _report_body(report: dict[str, Any], job_id: int | None) -> Any:
    """A report as the API shows it: the library's Report plus the job it belongs to
    (``job_id``, the same number as ``run_id``; null for a dry run, which is not a job)."""
    return jsonable_encoder({"job_id": job_id, **report})


def create_app(
    config: Config | None = None,
    *,
    database: Database | None = None,
    env: Mapping[str, str] | None = None,
    worker: bool = True,
    watch: WatchOptions | None = None,
) -> FastAPI:
    """The admin service. Reads ADMIN_SECRET/AUTH_SECRET and, without ``database``,
    DATABASE_URL from ``env`` (default: the environment); with neither, ConfigError
    (``embedfill.database(embedded=True)`` gives the bundled server explicitly)."""
    env = dict(os.environ if env is None else env)
    config = config or load_config(env.get("EMBEDFILL_CONFIG") or None)
    url = url_from_env(env)
    if database is None and not url:
        raise ConfigError(
            "No database: pass database=... or set DATABASE_URL "
            "(embedfill.database(embedded=True) uses the bundled server)."
        )
    db = database or Database(url=url)
    service = AdminService(config, db, env, worker=worker, watch=watch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if admin_secret(env) is None:  # said where the operator looks first, not at a 503
            log.warning(
                "the admin API is disabled: set ADMIN_SECRET (or AUTH_SECRET, or either's "
                "_FILE) to use it; /healthz, /readyz and /metrics answer without it"
            )
        await service.startup()
        yield
        await service.shutdown()

    app = FastAPI(
        title="embedfill admin API",
        version="0.1.0",
        description="Find and fill missing pgvector embeddings. Admin routes need the "
        "`x-admin-secret` header.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(admin_router(service))
    app.include_router(console_router(service, admin_secret(env)))

    @app.get("/healthz", tags=["health"], summary="The process is alive (no database check)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Database reachable, pgvector present, schema at the expected version",
        description="Reads only (never migrates). Needs no secret, so a 503 says one of: "
        "the database is unavailable, pgvector is missing, embedfill's schema is behind "
        "(run `embedfill migrate`) or newer than this build; the service's log has the details.",
        responses={503: {"model": ErrorBody}},
    )
    async def readyz() -> Any:
        ok, message = await service.readiness()
        if ok:
            return {"status": "ok", "detail": message}
        return JSONResponse({"error": message}, status_code=503)

    # some load balancers probe health with HEAD: the same answers, out of the schema
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)

    @app.get(
        "/metrics", tags=["health"], response_class=PlainTextResponse, summary="Prometheus metrics"
    )
    async def metrics() -> Response:
        await service.refresh_gauges()
        service.refresh_running()
        return Response(
            service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.exception_handler(ApiError)
    @app.exception_handler(EmbedfillError)
    @app.exception_handler(RequestValidationError)
    async def known_error(request: Request, exc: Exception) -> JSONResponse:
        response = _known_error(exc)
        assert response is not None
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            message = f"No route {method} {path}; see /docs for the routes."
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{method} is not allowed on {path}; use {allowed or 'another method'}."
        else:
            message = str(exc.detail).rstrip(".") + "."
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "Internal error; see the service's logs.")

    return app
