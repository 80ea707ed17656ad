"""``/console``: a read-only page of what the 3 a.m. engineer asks first.

Per target and tenant: rows, missing, stale, outdated-model, failing and unverified
counts, with a bar for coverage; running and recent jobs with their progress and
workers (alive or not, last heartbeat); each change of model's phase and gates. It
refreshes itself. Server-rendered (Jinja2, one stylesheet, no script, nothing from
elsewhere), so it works offline.

Behind the admin secret: a sign-in form sets a session cookie (``Secure``,
``HttpOnly``, ``SameSite=Strict``, path ``/console``), an HMAC of its issue time keyed by
the admin secret (so a new secret signs everyone out); the form carries a CSRF token that
must equal its cookie's (double submit). Nothing on the page changes data. The API's own
auth (the ``x-admin-secret`` header) is unchanged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import secrets
import time
import urllib.parse
from importlib import resources
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from .. import application, health
from ..errors import first_line as _first_line
from ..models import NO_TENANT
from ..secrets import Secret
from .service import AdminService

log = logging.getLogger(__name__)

PATH = "/console"
SESSION = "embedfill_console"
CSRF = "embedfill_csrf"
SESSION_S = 12 * 3600  # a session lasts a working night
REFRESH_S = 10  # the page reloads itself this often
SNAPSHOT_S = 5.0  # the figures are read at most this often, whatever the open tabs
MAX_TENANTS_SHOWN = 200  # per target, the tenants with the most missing rows first
WRONG_SECRET_PAUSE_S = 0.5  # each wrong secret costs a guesser this long
HEADERS = {
    # no script, no frame, nothing from elsewhere; forms post here only
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("embedfill.http", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _sign(secret: Secret, issued: int) -> str:
    mac = hmac.new(secret.reveal().encode(), f"console:{issued}".encode(), hashlib.sha256)
    return f"{issued}.{mac.hexdigest()}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _signed_in(
    secret: Secret | None, cookie: str | None, now_ms: int, signed_out_ms: int = 0
) -> bool:
    """A cookie signed with this secret, less than SESSION_S old, issued after the last
    sign-out of this process (``signed_out_ms``). Its issue time is in milliseconds, so a
    sign-in right after a sign-out is a new session."""
    if secret is None or not cookie or len(cookie) > 200:
        return False
    issued, _, _ = cookie.partition(".")
    if not (issued.isascii() and issued.isdigit() and len(issued) <= 15):
        return False
    age = now_ms - int(issued)
    if not 0 <= age <= SESSION_S * 1000 or int(issued) <= signed_out_ms:
        return False
    return hmac.compare_digest(cookie.encode(), _sign(secret, int(issued)).encode())


def _page(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = _env.get_template(template).render(path=PATH, no_tenant=NO_TENANT, **values)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PATH, secure=True, httponly=True, samesite="strict"
    )


MAX_FORM_BYTES = 8192


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (first value each); {} for anything else or too big."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != (
        "application/x-www-form-urlencoded"
    ):
        return {}
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > MAX_FORM_BYTES:
            return {}
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8"), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in fields.items() if v}


def _ago(when: str | None, now: dt.datetime) -> str:
    if not when:
        return "never"
    seconds = int((now - dt.datetime.fromisoformat(when)).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _share(part: int, whole: int) -> float:
    return 1.0 if whole <= 0 else max(0.0, min(1.0, part / whole))


LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _no_cookie_reason(request: Request) -> str:
    """Why a sign-in form came back without its CSRF cookie, in words."""
    host = (request.url.hostname or "").lower()
    if request.url.scheme == "http" and host not in LOCAL_HOSTS and not host.endswith(".localhost"):
        return (
            f"This browser keeps no Secure cookie over plain HTTP from {host}: serve the "
            "console over HTTPS, or reach it through a tunnel to localhost."
        )
    return "The form expired or came from elsewhere; sign in again."


class Snapshot:
    """What the page shows, read at most every SNAPSHOT_S whatever the number of open
    tabs (one read at a time): every read is a status pass over each target."""

    def __init__(self, service: AdminService) -> None:
        self.service = service
        self.at = 0.0
        self.values: dict[str, Any] = {}
        self.lock = asyncio.Lock()

    async def get(self) -> dict[str, Any]:
        async with self.lock:
            if time.monotonic() - self.at >= SNAPSHOT_S:
                self.values = await self._read()
                self.at = time.monotonic()
            return self.values

    async def _read(self) -> dict[str, Any]:
        """Reads only: a schema that is missing or behind is reported, never migrated
        (the readiness check first); a target that cannot be read is named, the others
        shown."""
        service = self.service
        problems: list[str] = []
        out: dict[str, Any] = {"problems": problems, "targets": None, "jobs": None}
        out["changes"] = None
        ready, why = await service.readiness()
        if not ready:
            problems.append(f"Nothing could be read: {why}")
            return out
        statuses, errors = await health.status_by_target(service.config, service.db)
        out["targets"] = list(statuses.values())
        for name, exc in errors.items():
            problems.append(f"Target {name} could not be read: {_first_line(exc)}")
        try:
            out["jobs"] = await service.list_jobs(None, 20)
        except Exception as exc:
            log.warning("console: jobs unavailable: %s", _first_line(exc))
            problems.append(f"Jobs could not be read: {_first_line(exc)}")
        changes = []
        for target in service.config.targets:
            if target.name in errors:
                continue
            try:
                changes += await application.amodel_status(service.config, service.db, target.name)
            except Exception as exc:
                problems.append(
                    f"The change of model of {target.name} could not be read: {_first_line(exc)}"
                )
        out["changes"] = [c for c in changes if c.phase != "none"]
        return out


def console_router(service: AdminService, secret: Secret | None) -> APIRouter:
    """The console's routes over the service (``create_app`` mounts them)."""
    router = APIRouter(prefix=PATH, include_in_schema=False)
    snapshot = Snapshot(service)
    # a sign-out ends every session this process signed before it; and sign-ins are
    # checked one at a time, a wrong secret holding the next WRONG_SECRET_PAUSE_S
    state = {"signed_out_ms": 0}
    one_at_a_time = asyncio.Lock()

    def sign_in_page(request: Request, status: int = 200, error: str | None = None) -> Response:
        token = secrets.token_urlsafe(24)
        response = _page(
            "sign_in.html",
            status,
            csrf=token,
            error=error,
            disabled=secret is None,
        )
        _cookie(response, CSRF, token, SESSION_S)
        return response

    def signed_in(request: Request) -> bool:
        cookie = request.cookies.get(SESSION)
        return _signed_in(secret, cookie, _now_ms(), state["signed_out_ms"])

    @router.api_route("", methods=["GET", "HEAD"])
    async def console(request: Request) -> Response:
        if not signed_in(request):
            return sign_in_page(request)
        return await dashboard(request)

    @router.get("/sign-in")
    async def sign_in_again() -> Response:
        """The address a failed sign-in leaves in the address bar: the form."""
        return RedirectResponse(PATH, status_code=303, headers=HEADERS)

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        form = await _form(request)
        admin_secret, csrf = form.get("admin_secret", ""), form.get("csrf", "")
        expected = request.cookies.get(CSRF) or ""
        if not expected:
            return sign_in_page(request, 403, _no_cookie_reason(request))
        if not hmac.compare_digest(csrf.encode(), expected.encode()):
            return sign_in_page(
                request, 403, "The form expired or came from elsewhere; sign in again."
            )
        if secret is None:
            return sign_in_page(request, 503)
        async with one_at_a_time:
            right = hmac.compare_digest(admin_secret.encode(), secret.reveal().encode())
            if not right:
                await asyncio.sleep(WRONG_SECRET_PAUSE_S)
        if not right:
            return sign_in_page(request, 401, "That is not the admin secret.")
        response = RedirectResponse(PATH, status_code=303, headers=HEADERS)
        issued = max(_now_ms(), state["signed_out_ms"] + 1)
        _cookie(response, SESSION, _sign(secret, issued), SESSION_S)
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        csrf = (await _form(request)).get("csrf", "")
        expected = request.cookies.get(CSRF) or ""
        if expected and hmac.compare_digest(csrf.encode(), expected.encode()):
            if signed_in(request):
                state["signed_out_ms"] = _now_ms()
            response = RedirectResponse(PATH, status_code=303, headers=HEADERS)
            response.delete_cookie(SESSION, path=PATH, secure=True, httponly=True)
            return response
        return sign_in_page(request, 403, "The form expired or came from elsewhere.")

    @router.api_route("/console.css", methods=["GET", "HEAD"])
    async def stylesheet() -> Response:
        css = resources.files("embedfill.http").joinpath("static/console.css").read_text()
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    async def dashboard(request: Request) -> Response:
        now = dt.datetime.now(dt.UTC)
        seen = await snapshot.get()
        lease = service.config.engine.lease_s
        jobs = None
        if seen["jobs"] is not None:
            jobs = []
            for found in seen["jobs"]:
                job = {**found, "workers": [dict(w) for w in found.get("workers", [])]}
                for worker in job["workers"]:
                    beat = worker.get("last_heartbeat")
                    age = (now - dt.datetime.fromisoformat(beat)).total_seconds() if beat else None
                    worker["alive"] = (
                        job["status"] == "running" and age is not None and age <= lease
                    )
                    worker["seen"] = _ago(beat, now)
                progress = job.get("progress") or {}
                job["share"] = _share(
                    int(progress.get("done") or 0), int(progress.get("total") or 0)
                )
                jobs.append(job)
        targets = None
        if seen["targets"] is not None:
            targets = []
            for st in seen["targets"]:
                tenants = [
                    {**t.__dict__, "share": _share(t.rows - t.missing, t.rows)}
                    for t in sorted(
                        st.tenants, key=lambda t: (-t.missing, -t.failing, str(t.tenant))
                    )[:MAX_TENANTS_SHOWN]
                ]
                targets.append(
                    {
                        **st.__dict__,
                        "tenants": tenants,
                        "more_tenants": max(0, len(st.tenants) - MAX_TENANTS_SHOWN),
                        "share": _share(st.rows - st.missing, st.rows),
                    }
                )
        csrf = request.cookies.get(CSRF) or secrets.token_urlsafe(24)
        response = _page(
            "console.html",
            targets=targets,
            jobs=jobs,
            changes=seen["changes"],
            problems=seen["problems"],
            refresh=REFRESH_S,
            now=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            csrf=csrf,
        )
        _cookie(response, CSRF, csrf, SESSION_S)
        return response

    return router
