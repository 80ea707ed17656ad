"""``/console``: the read-only page behind the admin secret, through a real uvicorn server
on a loopback port and a real database; and once in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from embedfill import Database
from embedfill.http import create_app
from tests.support.fake_openai import FakeOpenAI
from tests.support.http import ServerThread
from tests.support.tables import snapshot, tickets_config

ADMIN = "console-secret-for-tests-51c2"
ARTIFACTS = Path(os.environ.get("EMBEDFILL_TEST_ARTIFACTS", "test-artifacts"))


def cookies_of(response: httpx.Response) -> dict[str, str]:
    """name -> the whole Set-Cookie line (httpx keeps no Secure cookie over http)."""
    return {line.split("=", 1)[0]: line for line in response.headers.get_list("set-cookie")}


def value(line: str) -> str:
    return line.split(";", 1)[0].split("=", 1)[1].strip('"')


def rows_of(url: str) -> Any:
    with psycopg.connect(url) as conn:
        return snapshot(conn)


def csrf_in(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


@pytest.fixture
def base(tickets: str, fake_openai: FakeOpenAI) -> Iterator[str]:
    app = create_app(
        tickets_config(fake_openai.base_url),
        database=Database(tickets),
        env={"ADMIN_SECRET": ADMIN},
        worker=False,
    )
    with ServerThread(app) as url:
        yield url


def sign_in(client: httpx.Client, secret: str = ADMIN) -> tuple[httpx.Response, str]:
    page = client.get("/console")
    csrf = value(cookies_of(page)["embedfill_csrf"])
    answer = client.post(
        "/console/sign-in",
        data={"admin_secret": secret, "csrf": csrf_in(page.text)},
        headers={"cookie": f"embedfill_csrf={csrf}"},
    )
    return answer, csrf


def test_the_sign_in_form_sets_a_strict_session_cookie(base: str, tickets: str) -> None:
    with httpx.Client(base_url=base, follow_redirects=False) as client:
        page = client.get("/console")
        assert page.status_code == 200
        assert 'label for="admin_secret"' in page.text and 'type="password"' in page.text
        assert "org-a" not in page.text  # nothing of the data before sign-in
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        csrf_cookie = cookies_of(page)["embedfill_csrf"].lower()
        for attribute in ("secure", "httponly", "samesite=strict", "path=/console"):
            assert attribute in csrf_cookie

        answer, csrf = sign_in(client)
        assert answer.status_code == 303 and answer.headers["location"] == "/console"
        session = cookies_of(answer)["embedfill_console"]
        for attribute in ("secure", "httponly", "samesite=strict", "path=/console"):
            assert attribute in session.lower()
        assert ADMIN not in session

        before = rows_of(tickets)
        shown = client.get(
            "/console",
            headers={"cookie": f"embedfill_console={value(session)}; embedfill_csrf={csrf}"},
        )
        assert shown.status_code == 200
        html = shown.text
        for text in ("tickets", "org-a", "org-b", "Missing", "Jobs", "Changes of model"):
            assert text in html
        assert '<meta http-equiv="refresh"' in html and "<script" not in html
        assert ADMIN not in html
        assert rows_of(tickets) == before  # the page only reads

        out = client.post(
            "/console/sign-out",
            data={"csrf": csrf},
            headers={"cookie": f"embedfill_console={value(session)}; embedfill_csrf={csrf}"},
        )
        assert out.status_code == 303
        assert 'embedfill_console=""' in cookies_of(out)["embedfill_console"] or (
            "max-age=0" in cookies_of(out)["embedfill_console"].lower()
        )


def test_a_wrong_secret_a_forged_session_or_a_missing_token_gets_nothing(base: str) -> None:
    with httpx.Client(base_url=base, follow_redirects=False) as client:
        wrong, _ = sign_in(client, "not-the-secret")
        assert wrong.status_code == 401 and "embedfill_console" not in cookies_of(wrong)
        assert "not the admin secret" in wrong.text

        page = client.get("/console")
        no_token = client.post("/console/sign-in", data={"admin_secret": ADMIN})
        assert no_token.status_code == 403 and "embedfill_console" not in cookies_of(no_token)
        other = client.post(
            "/console/sign-in",
            data={"admin_secret": ADMIN, "csrf": csrf_in(page.text)},
            headers={"cookie": "embedfill_csrf=another-token"},
        )
        assert other.status_code == 403

        now = time.time_ns() // 1_000_000  # the cookie's issue time is in milliseconds
        for forged in (f"{now}.{'0' * 64}", f"{now - 13 * 3600_000}.abc", "garbage", ""):
            shown = client.get("/console", headers={"cookie": f"embedfill_console={forged}"})
            assert shown.status_code == 200 and "Sign in" in shown.text
            assert "org-a" not in shown.text

        assert client.post("/console").status_code == 405  # nothing else takes a POST


def test_without_an_admin_secret_the_console_is_off(tickets: str, fake_openai: FakeOpenAI) -> None:
    app = create_app(
        tickets_config(fake_openai.base_url), database=Database(tickets), env={}, worker=False
    )
    with ServerThread(app) as url, httpx.Client(base_url=url) as client:
        page = client.get("/console")
        assert "disabled until ADMIN_SECRET" in page.text and "<form" not in page.text
        csrf = value(cookies_of(page)["embedfill_csrf"])
        answer = client.post(
            "/console/sign-in",
            data={"admin_secret": "", "csrf": csrf},
            headers={"cookie": f"embedfill_csrf={csrf}"},
        )
        assert answer.status_code == 503 and "embedfill_console" not in cookies_of(answer)


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(
    _chromium() is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_a_real_browser_signs_in_and_sees_the_page(base: str) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    found = _chromium()
    assert found is not None
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    # Chromium keeps Secure cookies from http://localhost (a secure context), not from 127.0.0.1
    page = base.replace("127.0.0.1", "localhost") + "/console"
    driver: Any = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page)
        assert driver.find_element(By.CSS_SELECTOR, "label[for=admin_secret]").text == (
            "Admin secret"
        )
        driver.find_element(By.ID, "admin_secret").send_keys(ADMIN)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        for _ in range(100):
            if driver.find_elements(By.ID, "targets-title"):
                break
            time.sleep(0.1)
        main = driver.find_element(By.TAG_NAME, "main").text
        assert "Targets" in main and "tickets" in main and "org-a" in main
        assert driver.find_elements(By.TAG_NAME, "meter")  # the coverage bars
        landmarks = [driver.find_elements(By.TAG_NAME, t) for t in ("header", "main", "nav")]
        assert all(landmarks)
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "console.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_odd_cookies_sign_out_and_guessing(base: str) -> None:
    with httpx.Client(base_url=base, follow_redirects=False, timeout=60) as client:
        for forged in ("\u00b2.abc", "9" * 5000 + ".abc", "1" * 13 + ".x"):
            header = f"embedfill_console={forged}".encode("latin-1")  # as a browser may send
            page = client.get("/console", headers={"cookie": header})
            assert page.status_code == 200 and "Sign in" in page.text  # never a 500
        assert client.head("/console").status_code == 200
        assert client.get("/console/sign-in").status_code == 303  # back to the form

        answer, csrf = sign_in(client)
        session = value(cookies_of(answer)["embedfill_console"])
        cookie = {"cookie": f"embedfill_console={session}; embedfill_csrf={csrf}"}
        assert "org-a" in client.get("/console", headers=cookie).text
        client.post("/console/sign-out", data={"csrf": csrf}, headers=cookie)
        replayed = client.get("/console", headers=cookie)  # a copy of the cookie, after
        assert "Sign in" in replayed.text and "org-a" not in replayed.text
        again, csrf = sign_in(client)  # signing in right after is a session again
        session = value(cookies_of(again)["embedfill_console"])
        cookie = {"cookie": f"embedfill_console={session}; embedfill_csrf={csrf}"}
        assert "org-a" in client.get("/console", headers=cookie).text

    # wrong secrets are checked one at a time, each holding the next half a second
    import concurrent.futures

    def guess(n: int) -> int:
        with httpx.Client(base_url=base, follow_redirects=False, timeout=60) as c:
            return sign_in(c, f"guess-{n}")[0].status_code

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(guess, range(6)))
    assert codes == [401] * 6
    assert time.monotonic() - started >= 2.5


def test_the_console_reads_only_and_shows_what_it_can(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    """A schema that is behind is reported, never migrated; a target that cannot be read
    is named while the others show."""
    import asyncio

    from embedfill.config import parse_config

    raw = tickets_config(fake_openai.base_url)
    broken = parse_config(
        {
            "providers": {"p": {"kind": "hash", "dimensions": 8}},
            "targets": [
                {
                    "name": t.name,
                    "table": str(t.table),
                    "id_column": t.id_column,
                    "text": t.text,
                    "embedding_column": t.embedding_column,
                    "tenant_column": t.tenant_column,
                    "provider": "p",
                }
                for t in raw.targets
            ]
            + [
                {
                    "name": "gone",
                    "table": "app.NoSuchTable",
                    "id_column": "id",
                    "text": "{x}",
                    "embedding_column": "emb",
                    "provider": "p",
                }
            ],
        }
    )
    app = create_app(broken, database=Database(tickets), env={"ADMIN_SECRET": ADMIN}, worker=False)

    async def visit() -> list[httpx.Response]:
        # no lifespan: the service's own start-up (which migrates) never runs
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            page = await c.get("/console")
            csrf = value(cookies_of(page)["embedfill_csrf"])
            answer = await c.post(
                "/console/sign-in",
                data={"admin_secret": ADMIN, "csrf": csrf_in(page.text)},
                headers={"cookie": f"embedfill_csrf={csrf}"},
            )
            session = value(cookies_of(answer)["embedfill_console"])
            cookie = {"cookie": f"embedfill_console={session}; embedfill_csrf={csrf}"}
            return [await c.get("/console", headers=cookie)]

    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS embedfill CASCADE")
    [page] = asyncio.run(visit())
    assert page.status_code == 200
    assert "Nothing could be read" in page.text and "embedfill migrate" in page.text
    assert "Unknown: the targets could not be read" in page.text
    with psycopg.connect(tickets) as conn:  # the page ran no DDL
        assert conn.execute("SELECT to_regnamespace('embedfill')").fetchone() == (None,)
        conn.rollback()
    # once the schema is there: the target that cannot be read is named, the others show
    from embedfill import application as appl

    asyncio.run(appl.aensure_schema(Database(tickets)))
    app = create_app(broken, database=Database(tickets), env={"ADMIN_SECRET": ADMIN}, worker=False)
    [page] = asyncio.run(visit())
    assert "Target gone could not be read" in page.text
    assert "org-a" in page.text  # tickets still shows


def test_a_form_posted_without_its_cookie_over_plain_http_says_why(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    import asyncio

    app = create_app(
        tickets_config(fake_openai.base_url),
        database=Database(tickets),
        env={"ADMIN_SECRET": ADMIN},
        worker=False,
    )

    async def post(base: str, content_type: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base) as c:
            return await c.post(
                "/console/sign-in",
                content=f"admin_secret={ADMIN}&csrf=x".encode(),
                headers={"content-type": content_type, "cookie": "embedfill_csrf=x"},
            )

    # the browser dropped the Secure cookie (plain HTTP, not localhost): said as it is
    async def dropped() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://192.0.2.2") as c:
            return await c.post("/console/sign-in", data={"admin_secret": ADMIN, "csrf": "x"})

    answer = asyncio.run(dropped())
    assert answer.status_code == 403
    assert "keeps no Secure cookie over plain HTTP from 192.0.2.2" in answer.text
    # a form's content type in capitals is a form all the same
    ok = asyncio.run(post("http://localhost", "APPLICATION/X-WWW-FORM-URLENCODED"))
    assert ok.status_code == 303


def test_the_console_shows_a_jobs_workers_and_a_change_of_models_phase_and_gates(
    indexed: str, fake_openai: FakeOpenAI
) -> None:
    """What an operator looks at the console for: a job with its progress and its
    worker (alive or not, last heartbeat), and a change of model with its phase,
    coverage and gates, as the database holds them."""
    import asyncio

    from embedfill import BackfillOptions, abackfill
    from embedfill.application import amodel_start, amodel_verify

    with psycopg.connect(indexed, autocommit=True) as conn:
        conn.execute('UPDATE app."SupportTickets" SET emb = NULL WHERE ticket_no % 4 = 0')
    next_model = {"kind": "hash", "model": "hash-v2", "dimensions": 16}
    config = tickets_config(fake_openai.base_url, providers={"next": next_model})
    db = Database(indexed)
    env = {"TEST_PLATFORM_KEY": "sk-platform-console-test"}
    report = asyncio.run(abackfill(config, db, BackfillOptions(), env=env))
    assert report.failed == 0 and report.embedded > 0
    asyncio.run(amodel_start(config, db, "tickets", "next", "table", env=env))
    asyncio.run(amodel_verify(config, db, "tickets", env=env))

    app = create_app(config, database=db, env={"ADMIN_SECRET": ADMIN}, worker=False)
    with ServerThread(app) as url, httpx.Client(base_url=url, follow_redirects=False) as client:
        answer, csrf = sign_in(client)
        session = value(cookies_of(answer)["embedfill_console"])
        html = client.get(
            "/console", headers={"cookie": f"embedfill_console={session}; embedfill_csrf={csrf}"}
        ).text
    text = " ".join(re.sub(r"<[^>]+>", " ", html).split())
    # the backfill's job, done, and the worker that did it (gone now: it was this process)
    assert f"{report.run_id} tickets succeeded" in text, text
    assert "60 of 60" in text, text  # every NULL row settled (the two blank ones skipped)
    worker = f"not alive {os.uname().nodename}:{os.getpid()}, {report.embedded:,} rows"
    assert worker in text, text
    assert "last heartbeat" in text
    # the change of model: phase, what searches use, coverage and every gate
    assert "test-embed to hash-v2 (table strategy)" in text, text
    assert "Phase ready ; searches use the old vectors" in text, text
    for gate in ("coverage", "shape", "sample", "recall_at_10"):
        assert f"Gate {gate} pass" in text, text
