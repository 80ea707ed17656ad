"""The model-migration routes: the HTTP twins of `embedfill model start|status|verify|
cutover|rollback|finalize`."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from embedfill import Database
from embedfill.config import parse_config
from embedfill.http import create_app
from tests.support.http import ServerThread
from tests.support.tables import provider_settings

ADMIN = "admin-secret-for-model-routes"
PATH = "/api/v1/admin/model-migrations"


@pytest.fixture
def api(tickets: str) -> Iterator[httpx.Client]:
    config = parse_config(
        {
            "providers": {
                "openai": provider_settings("http://127.0.0.1:9", 8),
                "next": {"kind": "hash", "model": "hash-v2", "dimensions": 16},
                "wide": {"kind": "hash", "model": "hash-wide", "dimensions": 3072},
            },
            "targets": [
                {
                    "name": "tickets",
                    "table": "app.SupportTickets",
                    "id_column": "ticket_no",
                    "text": "{subject}\n\n{body}",
                    "embedding_column": "emb",
                    "tenant_column": "org",
                    "provider": "openai",
                }
            ],
        }
    )
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('CREATE INDEX ON app."SupportTickets" USING hnsw (emb vector_cosine_ops)')
    app = create_app(config, database=Database(tickets), env={"ADMIN_SECRET": ADMIN}, worker=False)
    with (
        ServerThread(app) as base,
        httpx.Client(base_url=base, headers={"x-admin-secret": ADMIN}, timeout=60) as client,
    ):
        yield client


def test_a_change_of_model_through_the_admin_api(api: httpx.Client) -> None:
    refused = api.post(PATH, json={"target": "tickets", "to": "nope"})
    assert refused.status_code == 422 and "names no provider section" in refused.json()["error"]
    assert api.post(PATH, json={"target": "nope", "to": "next"}).status_code == 404
    started = api.post(PATH, json={"target": "tickets", "to": "next"})
    assert started.status_code == 202, started.text
    body = started.json()
    url = body["status_url"]
    assert started.headers["Location"] == url and url.endswith(f"/{body['migration_id']}")
    deadline = time.monotonic() + 60
    while (status := api.get(url).json())["phase"] != "ready":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert (status["coverage"], status["index"], status["active"]) == (1.0, "valid", "old")
    again = api.post(PATH, json={"target": "tickets", "to": "next", "strategy": "column"})
    assert again.status_code == 409  # one change of the column at a time
    assert api.post(f"{url}/cutover").status_code == 409  # no gate checked yet
    verified = api.post(f"{url}/verify")
    assert verified.status_code == 200 and all(g["pass"] for g in verified.json()["gates"].values())
    assert api.post(f"{url}/cutover").json()["active"] == "new"
    assert api.post(f"{url}/rollback").json()["active"] == "old"
    assert api.post(f"{url}/finalize").status_code == 422  # without yes=true
    done = api.post(f"{url}/finalize", params={"yes": "true"})
    assert done.status_code == 200 and done.json()["phase"] == "finalized"
    assert api.get(f"{PATH}/999999").status_code == 404


def test_an_old_changes_number_never_acts_on_the_current_change(api: httpx.Client) -> None:
    first = api.post(PATH, json={"target": "tickets", "to": "next"}).json()["status_url"]
    deadline = time.monotonic() + 60
    while api.get(first).json()["phase"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert api.post(f"{first}/rollback").status_code == 200
    assert api.post(f"{first}/finalize", params={"yes": "true"}).status_code == 200
    second = api.post(PATH, json={"target": "tickets", "to": "next"}).json()["status_url"]
    assert second != first
    retried = api.post(f"{first}/finalize", params={"yes": "true"})
    assert retried.status_code == 404 and "is over" in retried.json()["error"]
    assert api.get(first).status_code == 404


def test_a_change_to_halfvec_through_the_admin_api(api: httpx.Client) -> None:
    """`vector_type` is the twin of --vector-type: a model wider than the HNSW index's
    2,000 is refused (422, the sentence offering halfvec) until the body asks for it."""
    refused = api.post(PATH, json={"target": "tickets", "to": "wide"})
    assert refused.status_code == 422 and "--vector-type halfvec" in refused.json()["error"]
    bad = api.post(PATH, json={"target": "tickets", "to": "wide", "vector_type": "bit"})
    assert bad.status_code == 422
    started = api.post(PATH, json={"target": "tickets", "to": "wide", "vector_type": "halfvec"})
    assert started.status_code == 202, started.text
    url = started.json()["status_url"]
    deadline = time.monotonic() + 60
    while (status := api.get(url).json())["phase"] != "ready":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["to"]["vector_type"] == "halfvec" and status["index"] == "valid"


def test_a_start_of_another_vector_type_while_one_is_under_way_is_refused_not_accepted(
    api: httpx.Client,
) -> None:
    """A change to `next` (vector) under way, then a POST to `next` as halfvec: 409, not
    a 202 carrying the first change's number (matched by its provider section alone,
    while the start itself was refused in the background: helper-22)."""
    first = api.post(PATH, json={"target": "tickets", "to": "next"})
    assert first.status_code == 202, first.text
    other = api.post(PATH, json={"target": "tickets", "to": "next", "vector_type": "halfvec"})
    assert other.status_code == 409, other.text
    assert "to next (table strategy, vector) is at phase" in other.json()["error"]
    same = api.post(PATH, json={"target": "tickets", "to": "next"})
    assert same.status_code == 202 and same.json()["migration_id"] == first.json()["migration_id"]
