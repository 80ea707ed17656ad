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

from ..errors import first_line as _first_line
from ..secrets import Secret
from .service import AdminService

log = logging.getLogger(__name__)

PATH = "/console"
SESSION = "embedfill_console"
CSRF = "embedfill_csrf"
SESSION_S = 12 * 3600  # a session lasts a working night
REFRESH_S = 10  # the page reloads itself this often
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


def _signed_in(secret: Secret | None, cookie: str | None, now: float) -> bool:
    if secret is None or not cookie:
        return False
    issued, _, _ = cookie.partition(".")
    if not issued.isdigit() or not 0 <= now - int(issued) <= SESSION_S:
        return False
    return hmac.compare_digest(cookie.encode(), _sign(secret, int(issued)).encode())


def _page(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = _env.get_template(template).render(path=PATH, **values)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _cookie(response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PATH, secure=True, httponly=True, samesite="strict"
    )


MAX_FORM_BYTES = 8192


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (first value each); {} for anything else or too big."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
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


def console_router(service: AdminService, secret: Secret | None) -> APIRouter:
    """The console's routes over the service (``create_app`` mounts them)."""
    router = APIRouter(prefix=PATH, include_in_schema=False)

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

    @router.get("")
    async def console(request: Request) -> Response:
        if not _signed_in(secret, request.cookies.get(SESSION), time.time()):
            return sign_in_page(request)
        return await dashboard(request)

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        form = await _form(request)
        admin_secret, csrf = form.get("admin_secret", ""), form.get("csrf", "")
        expected = request.cookies.get(CSRF) or ""
        if not expected or not hmac.compare_digest(csrf.encode(), expected.encode()):
            return sign_in_page(
                request, 403, "The form expired or came from elsewhere; sign in again."
            )
        if secret is None:
            return sign_in_page(request, 503)
        if not hmac.compare_digest(admin_secret.encode(), secret.reveal().encode()):
            await asyncio.sleep(WRONG_SECRET_PAUSE_S)
            return sign_in_page(request, 401, "That is not the admin secret.")
        response = RedirectResponse(PATH, status_code=303, headers=HEADERS)
        _cookie(response, SESSION, _sign(secret, int(time.time())), SESSION_S)
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        csrf = (await _form(request)).get("csrf", "")
        expected = request.cookies.get(CSRF) or ""
        if expected and hmac.compare_digest(csrf.encode(), expected.encode()):
            response = RedirectResponse(PATH, status_code=303, headers=HEADERS)
            response.delete_cookie(SESSION, path=PATH, secure=True, httponly=True)
            return response
        return sign_in_page(request, 403, "The form expired or came from elsewhere.")

    @router.get("/console.css")
    async def stylesheet() -> Response:
        css = resources.files("embedfill.http").joinpath("static/console.css").read_text()
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    async def dashboard(request: Request) -> Response:
        now = dt.datetime.now(dt.UTC)
        problems: list[str] = []

        async def read(what: str, call: Any) -> Any:
            try:
                return await call
            except Exception as exc:  # the page still shows what it could read
                log.warning("console: %s unavailable: %s", what, _first_line(exc))
                problems.append(f"{what} could not be read: {_first_line(exc)}")
                return []

        statuses = await read("Targets", service.status(None))
        jobs = await read("Jobs", service.list_jobs(None, 20))
        changes = await read("Changes of model", service.models())
        lease = service.config.engine.lease_s
        for job in jobs:
            for worker in job.get("workers", []):
                beat = worker.get("last_heartbeat")
                age = (now - dt.datetime.fromisoformat(beat)).total_seconds() if beat else None
                worker["alive"] = job["status"] == "running" and age is not None and age <= lease
                worker["seen"] = _ago(beat, now)
            progress = job.get("progress") or {}
            job["share"] = _share(int(progress.get("done") or 0), int(progress.get("total") or 0))
        targets = []
        for st in statuses:
            tenants = [
                {**t.__dict__, "share": _share(t.rows - t.missing, t.rows)} for t in st.tenants
            ]
            targets.append(
                {**st.__dict__, "tenants": tenants, "share": _share(st.rows - st.missing, st.rows)}
            )
        csrf = request.cookies.get(CSRF) or secrets.token_urlsafe(24)
        response = _page(
            "console.html",
            targets=targets,
            jobs=jobs,
            changes=[c for c in changes if c.phase != "none"],
            problems=problems,
            refresh=REFRESH_S,
            now=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            csrf=csrf,
        )
        _cookie(response, CSRF, csrf, SESSION_S)
        return response

    return router
