"""Every answer of the admin API that is not a success has the same body: exactly
{"error": "one sentence."}, plus "job_id" only when a job is concerned. And every report
names its job_id. Through a real uvicorn server, a real database and a local provider."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from embedfill import Database
from embedfill.http import AdminService, admin_router, create_app
from tests.support.fake_openai import FakeOpenAI
from tests.support.http import ServerThread, wait_for
from tests.support.tables import tickets_config

ADMIN = "admin-secret-errors-4b1c"
PLATFORM = "sk-platform-errors-88888888"
PATH = "/api/v1/admin/backfill-embeddings"
STATUS = "/api/v1/admin/embeddings/status"

# every admin route, as (method, path)
ADMIN_ROUTES = [
    ("POST", PATH),
    ("POST", f"{PATH}?dryRun=true"),
    ("GET", PATH),
    ("GET", f"{PATH}/1"),
    ("POST", f"{PATH}/1/cancel"),
    ("GET", STATUS),
]


def error_of(r: httpx.Response, status: int, *, job_id: bool = False) -> str:
    """The error sentence, after checking the status and the body's exact shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ({"error", "job_id"} if job_id else {"error"}), body
    assert isinstance(body["error"], str) and body["error"].endswith("."), body
    if job_id:
        assert isinstance(body["job_id"], int)
    return str(body["error"])


def app_for(db_url: str, fake: FakeOpenAI, **env: str) -> Any:
    env = {"TEST_PLATFORM_KEY": PLATFORM, **env}
    return create_app(tickets_config(fake.base_url), database=Database(db_url), env=env)


@pytest.fixture
def api(tickets: str, fake_openai: FakeOpenAI) -> Iterator[httpx.Client]:
    with (
        ServerThread(app_for(tickets, fake_openai, ADMIN_SECRET=ADMIN)) as base,
        httpx.Client(base_url=base, headers={"x-admin-secret": ADMIN}, timeout=60) as client,
    ):
        yield client


def test_401_and_503_bodies_on_every_admin_route(tickets: str, fake_openai: FakeOpenAI) -> None:
    with ServerThread(app_for(tickets, fake_openai, ADMIN_SECRET=ADMIN)) as base:
        for method, path in ADMIN_ROUTES:
            for headers in ({}, {"x-admin-secret": "wrong"}):
                r = httpx.request(method, base + path, headers=headers)
                assert "x-admin-secret" in error_of(r, 401)
    with ServerThread(app_for(tickets, fake_openai)) as base:  # no secret configured
        for method, path in ADMIN_ROUTES:
            r = httpx.request(method, base + path, headers={"x-admin-secret": ADMIN})
            assert "disabled until ADMIN_SECRET" in error_of(r, 503)


def test_503_when_the_database_is_down(fake_openai: FakeOpenAI) -> None:
    app = create_app(
        tickets_config(fake_openai.base_url),
        database=Database("postgresql://nobody@127.0.0.1:1/x"),
        env={"ADMIN_SECRET": ADMIN},
    )
    with (
        ServerThread(app) as base,
        httpx.Client(base_url=base, headers={"x-admin-secret": ADMIN}) as client,
    ):
        for method, path in ADMIN_ROUTES:
            r = client.request(method, path)
            assert "Cannot connect to the database" in error_of(r, 503), (method, path)
        # unauthenticated: a generic reason, the details only in the service's log
        assert "database is unavailable" in error_of(client.get("/readyz"), 503)


def test_404_405_and_422_bodies(api: httpx.Client) -> None:
    assert "No route GET /nope" in error_of(api.get("/nope"), 404)
    assert "No route GET /api/v1/admin/nope" in error_of(api.get("/api/v1/admin/nope"), 404)
    r = api.delete(PATH)
    assert "DELETE is not allowed on /api/v1/admin/backfill-embeddings" in error_of(r, 405)
    assert "POST" in r.headers["allow"]
    r = api.get(f"{PATH}/1/cancel")
    assert "GET is not allowed on /api/v1/admin/backfill-embeddings/1/cancel" in error_of(r, 405)
    assert r.headers["allow"] == "POST"
    assert "DELETE is not allowed on /healthz" in error_of(api.delete("/healthz"), 405)
    for method, path, name in (
        ("POST", f"{PATH}?batchSize=0", "batchSize"),
        ("POST", f"{PATH}?limit=ten", "limit"),
        ("POST", f"{PATH}?dryRun=perhaps", "dryRun"),
        ("GET", f"{PATH}/abc", "job_id"),
        ("POST", f"{PATH}/0/cancel", "job_id"),
        ("GET", f"{STATUS}?target={'x' * 201}", "target"),
    ):
        assert f"Parameter {name}" in error_of(api.request(method, path), 422), path
    r = api.post(PATH, params={"dryRun": "true", "tenantId": "a\x00b"})
    assert "NUL character" in error_of(r, 422)
    # a body is never read: a malformed JSON body changes nothing
    r = api.post(
        PATH,
        params={"dryRun": "true", "target": "nope"},
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert "No target named 'nope'" in error_of(r, 404)


def test_a_body_that_is_not_a_json_object_is_a_400_in_one_sentence(api: httpx.Client) -> None:
    """The routes that read a body (model-migrations) answer a body that is not JSON, or
    not an object, 400 as the reference says, in one sentence. Before (helper-33): 422,
    "Parameter 0: JSON decode error." or "Parameter body: Input should be a valid
    dictionary..."."""
    sentence = (
        "The request body is not a JSON object; send one, with the header "
        "Content-Type: application/json."
    )
    route = "/api/v1/admin/model-migrations"
    for content, headers in (
        (b"notjson", {"content-type": "application/json"}),
        (b"notjson", {}),
        (b"[1, 2]", {"content-type": "application/json"}),
    ):
        assert error_of(api.post(route, content=content, headers=headers), 400) == sentence
    # a JSON object that lacks a field is the field's 422
    r = api.post(route, json={"target": "tickets"})
    assert "Parameter to" in error_of(r, 422)


def test_404_unknown_target_and_job(api: httpx.Client) -> None:
    assert "No target named 'nope'" in error_of(api.post(PATH, params={"target": "nope"}), 404)
    assert "No target named" in error_of(api.get(STATUS, params={"target": "nope"}), 404)
    assert "No backfill job has id 999" in error_of(api.get(f"{PATH}/999"), 404)
    assert "No backfill job has id 999" in error_of(api.post(f"{PATH}/999/cancel"), 404)
    dry = api.post(PATH, params={"dryRun": "true"}).json()  # a dry run is not a job
    assert dry["job_id"] is None and dry["run_id"] is not None
    assert "No backfill job" in error_of(api.get(f"{PATH}/{dry['run_id']}"), 404)


def test_409_bodies_carry_the_job_id(api: httpx.Client, fake_openai: FakeOpenAI) -> None:
    fake_openai.latency = 0.2
    first = api.post(PATH, params={"batchSize": 2}).json()
    r = api.post(PATH)
    assert f"job {first['job_id']}" in error_of(r, 409, job_id=True)
    assert r.json()["job_id"] == first["job_id"]
    fake_openai.latency = 0.0
    wait_for(api, first["status_url"], {"succeeded"})
    r = api.post(f"{first['status_url']}/cancel")
    assert "already succeeded" in error_of(r, 409, job_id=True)
    assert r.json()["job_id"] == first["job_id"]


def test_every_report_names_its_job(api: httpx.Client) -> None:
    r = api.post(PATH, params={"wait": "true", "limit": 5})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["job_id"] == report["run_id"] and isinstance(report["job_id"], int)
    record = api.get(f"{PATH}/{report['job_id']}").json()
    assert record["job_id"] == record["report"]["job_id"] == report["job_id"]
    for key in ("would_fail", "warnings", "samples"):
        assert key in report and key in record["report"]


def test_dry_run_report_has_warnings_samples_and_would_fail(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with (
        ServerThread(app_for(tickets, fake_openai, ADMIN_SECRET=ADMIN, TEST_PLATFORM_KEY="")) as b,
        httpx.Client(base_url=b, headers={"x-admin-secret": ADMIN}) as client,
    ):
        r = client.post(PATH, params={"dryRun": "true", "tenantId": ["org-a", "nobody"]})
        assert r.status_code == 200, r.text
        body = r.json()
        real = client.post(PATH, params={"wait": "true", "tenantId": ["org-a", "nobody"]})
    assert body["would_fail"] == 15 and body["tenants"][0]["would_fail"] == 15
    assert body["warnings"] == [
        "Tenant 'nobody' matches no row of app.SupportTickets (column org); check the tenant id."
    ]
    assert [s["tenant"] for s in body["samples"]] == ["org-a", "org-a"]
    assert real.json()["warnings"] == body["warnings"] and real.json()["failed"] == 15


def test_the_router_inside_your_own_app_answers_the_same_bodies(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    service = AdminService(
        tickets_config(fake_openai.base_url),
        Database(tickets),
        {"ADMIN_SECRET": ADMIN, "TEST_PLATFORM_KEY": PLATFORM},
    )
    app = FastAPI()
    app.include_router(admin_router(service))
    with ServerThread(app) as base:
        r = httpx.get(base + STATUS)
        assert "x-admin-secret" in error_of(r, 401)
        headers = {"x-admin-secret": ADMIN}
        r = httpx.post(base + PATH, params={"batchSize": 0}, headers=headers)
        assert "Parameter batchSize" in error_of(r, 422)
        r = httpx.post(base + PATH, params={"target": "nope", "dryRun": "true"}, headers=headers)
        assert "No target named 'nope'" in error_of(r, 404)
        r = httpx.get(base + f"{PATH}/999", headers=headers)
        assert "No backfill job has id 999" in error_of(r, 404)


def test_health_routes_answer_head_as_load_balancers_probe(api: httpx.Client) -> None:
    assert api.head("/healthz").status_code == 200
    assert api.head("/readyz").status_code == 200
