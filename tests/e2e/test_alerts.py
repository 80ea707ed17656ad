"""Alerting: `embedfill check` as cron/CI runs it, the status and job gauges of /metrics,
and the shipped Prometheus rules and Grafana dashboard, whose every metric must exist on
a real /metrics (a real admin service, a real PostgreSQL, the real test server)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from embedfill import Database
from embedfill.errors import ConfigError
from embedfill.http import create_app
from tests.support.cli import cli_env, embedfill, write_config
from tests.support.fake_openai import FakeOpenAI, Fault
from tests.support.http import ServerThread, wait_for
from tests.support.tables import tickets_config

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "embedfill-alerts.yml"
RULES_TEST = Path(__file__).with_name("alert_rules.test.yml")
DASHBOARD = ROOT / "deploy" / "grafana" / "embedfill-dashboard.json"
ADMIN = "admin-secret-for-alerts-5c1e"
PLATFORM = "sk-platform-alerts-4242424242"
PATH = "/api/v1/admin/backfill-embeddings"


# ---------------------------------------------------------------------------- PromQL names

# PromQL words that are not metric names (functions are told apart by their "(")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
KEYWORDS |= {"unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana one) reads: every identifier
    left once strings, Grafana variables, label matchers, ranges and by/on(...) label
    lists are removed, that is no keyword and no function call."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group(0).lower() in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_the_name_parser_itself() -> None:
    expr = (
        'sum by (target) (rate(a_total{status!~"200|429", x="b_c"}[10m])) / on (target) '
        "group_left b_gauge > 0.05 and time() - max without (le) (c:rec) > 1e3 "
        'unless histogram_quantile(0.95, rate(d_bucket{target=~"$target"}[$__rate_interval]))'
    )
    assert metric_names(expr) == {"a_total", "b_gauge", "c:rec", "d_bucket"}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    out = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        out.extend(group["rules"])
    return out


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":  # label_values(metric, label)
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            exprs.append(m.group(1))
    return exprs


def minutes(duration: str) -> float:
    m = re.fullmatch(r"(\d+)([smh])", duration)
    assert m, f"not a Prometheus duration: {duration!r}"
    return int(m.group(1)) * {"s": 1 / 60, "m": 1, "h": 60}[m.group(2)]


def test_rules_are_complete_alerting_rules() -> None:
    seen = rules()
    names = [r["alert"] for r in seen]
    assert len(names) == len(set(names))
    for rule in seen:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Embedfill[A-Za-z]+", rule["alert"])
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])
        assert minutes(rule["for"]) >= 5
        assert metric_names(rule["expr"]), rule["expr"]
    by_metric = {n: r for r in seen for n in metric_names(r["expr"])}
    # what the issue asks: missing or stale rows above a bound for 10 minutes, a job
    # stuck, provider errors rising
    for metric in ("embedfill_missing_rows", "embedfill_stale_rows"):
        assert minutes(by_metric[metric]["for"]) >= 10
    assert "embedfill_outdated_model_rows" in metric_names(
        by_metric["embedfill_stale_rows"]["expr"]
    )
    # a stuck job, decided by worker liveness and queued work (an idle watch is neither)
    assert "embedfill_workers_alive" in by_metric
    assert "embedfill_job_chunks_queued" in metric_names(
        by_metric["embedfill_workers_alive"]["expr"]
    )
    assert "embedfill_job_rows_done" in by_metric
    assert "embedfill_job_chunks_queued" in metric_names(
        by_metric["embedfill_job_rows_done"]["expr"]
    )
    errors = [r for r in seen if "embedfill_provider_requests_total" in r["expr"]]
    assert any('status!~"200|429"' in r["expr"] for r in errors)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_they_fire_when_they_should(tmp_path: Path) -> None:
    """Prometheus's own checker, and its rule unit tests (tests/e2e/alert_rules.test.yml:
    each alert fires after its `for`, not before, and once for two replicas); the
    dashboard's queries too, checked as recording rules (its variables filled in)."""
    queries = [
        e.replace("$__rate_interval", "5m").replace("$target", ".*") for e in dashboard_exprs()
    ]
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(queries)],
            }
        ]
    }
    panels = tmp_path / "dashboard-rules.yml"
    panels.write_text(yaml.safe_dump(as_rules))
    for args in (
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULES_TEST)],
        ["check", "rules", str(panels)],
    ):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_shows_what_on_call_needs() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    names = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for needed in (
        "embedfill_missing_rows",
        "embedfill_stale_rows",
        "embedfill_unverified_rows",
        "embedfill_rows_total",
        "embedfill_provider_requests_total",
        "embedfill_provider_latency_seconds_bucket",
        "embedfill_tokens_total",
        "embedfill_jobs_running",
    ):
        assert needed in names
    text = DASHBOARD.read_text()
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.95," in text
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------- the service


def scrape(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        m = re.match(r"^(embedfill_\w+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def sample_names(samples: dict[str, float]) -> set[str]:
    return {key.split("{")[0] for key in samples}


class Gate:
    """Holds the fake provider's requests after the first ``free`` until opened."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.opened = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, inputs: list[str]) -> None:
        with self.lock:
            self.free -= 1
            wait = self.free < 0
        if wait:
            self.opened.wait(timeout=60)


@pytest.fixture
def service(tickets: str, fake_openai: FakeOpenAI) -> Iterator[httpx.Client]:
    config = tickets_config(fake_openai.base_url, provider_overrides={"timeout_s": 60})
    env = {"TEST_PLATFORM_KEY": PLATFORM, "ADMIN_SECRET": ADMIN, "EMBEDFILL_METRICS_INTERVAL": "0"}
    app = create_app(config, database=Database(tickets), env=env)
    with (
        ServerThread(app) as base,
        httpx.Client(base_url=base, headers={"x-admin-secret": ADMIN}, timeout=60) as client,
    ):
        yield client


def test_every_metric_of_the_rules_and_dashboard_is_on_metrics(
    service: httpx.Client, fake_openai: FakeOpenAI
) -> None:
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    used |= set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert len(used) >= 15
    # there once a target cannot be read: see test_a_target_that_cannot_be_read_...
    used.remove("embedfill_target_error")

    # a job in flight (the job gauges exist only then) after two requests went through,
    # one answered 500 (a retry)
    fake_openai.faults.append(Fault(500))
    gate = Gate(free=2)
    fake_openai.on_inputs = gate
    try:
        job = service.post(PATH).json()["job_id"]
        during: dict[str, float] = {}
        for _ in range(300):
            during = scrape(service)
            if {"embedfill_job_rows_done", "embedfill_rows_total"} <= sample_names(during):
                break
        assert during['embedfill_job_running_seconds{target="tickets"}'] >= 0
        assert during['embedfill_job_heartbeat_age_seconds{target="tickets"}'] < 60
        assert during['embedfill_job_rows_done{target="tickets"}'] >= 0
    finally:
        gate.opened.set()
    assert wait_for(service, f"{PATH}/{job}", {"succeeded"})["status"] == "succeeded"
    after = scrape(service)
    assert used - sample_names(during) - sample_names(after) == set()
    # the job is over: its gauges are gone, so no stuck-job alert can linger
    assert not any(k.startswith("embedfill_job_") for k in after)
    assert after['embedfill_missing_rows{target="tickets"}'] == 0
    assert after['embedfill_provider_retries_total{status="500",target="tickets"}'] == 1


def edit(db_url: str, ids: list[int]) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            'UPDATE app."SupportTickets" SET body = body || %s WHERE ticket_no = ANY(%s)',
            (" (edited)", ids),
        )


def test_status_gauges_follow_the_table(service: httpx.Client, tickets: str) -> None:
    before = scrape(service)
    assert before['embedfill_missing_rows{target="tickets"}'] == 45
    assert before['embedfill_unverified_rows{target="tickets"}'] == 15
    assert before['embedfill_stale_rows{target="tickets"}'] == 0
    assert service.post(PATH, params={"wait": "true"}).status_code == 200
    edit(tickets, [1, 2, 3, 5, 6, 7, 9])  # rows embedfill embedded (not every 4th)
    now = scrape(service)
    assert now['embedfill_missing_rows{target="tickets"}'] == 0
    assert now['embedfill_stale_rows{target="tickets"}'] == 7
    assert now['embedfill_outdated_model_rows{target="tickets"}'] == 0
    assert now['embedfill_unverified_rows{target="tickets"}'] == 15
    assert now['embedfill_status_timestamp_seconds{target="tickets"}'] > 1.7e9
    assert now["embedfill_status_pass_seconds"] >= 0


def test_a_scrape_does_not_run_a_status_pass_within_the_interval(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    env = {"TEST_PLATFORM_KEY": PLATFORM, "ADMIN_SECRET": ADMIN}  # the default: 60 s
    app = create_app(tickets_config(fake_openai.base_url), database=Database(tickets), env=env)
    with ServerThread(app) as base, httpx.Client(base_url=base) as client:
        first = scrape(client)
        with psycopg.connect(tickets, autocommit=True) as conn:
            conn.execute('UPDATE app."SupportTickets" SET emb = NULL WHERE ticket_no = 4')
        second = scrape(client)
    assert first['embedfill_missing_rows{target="tickets"}'] == 45
    assert second['embedfill_missing_rows{target="tickets"}'] == 45  # the first pass's 45
    stamp = 'embedfill_status_timestamp_seconds{target="tickets"}'
    assert first[stamp] == second[stamp]


def test_a_target_that_cannot_be_read_keeps_its_last_numbers_and_says_why(
    service: httpx.Client, tickets: str
) -> None:
    stamp = 'embedfill_status_timestamp_seconds{target="tickets"}'
    first = scrape(service)
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" RENAME TO gone')
    second = scrape(service)  # a pass ran (interval 0) and could not read the target
    assert second[stamp] == first[stamp]  # what EmbedfillStatusNotRefreshed watches
    assert second['embedfill_missing_rows{target="tickets"}'] == 45
    assert second["embedfill_status_pass_seconds"] >= 0
    # and says so, by the error's class (EmbedfillTargetUnreadable), until it reads again
    error = 'embedfill_target_error{error_class="SchemaMismatch",target="tickets"}'
    assert not any(k.startswith("embedfill_target_error") for k in first)
    assert second[error] == 1
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('ALTER TABLE app.gone RENAME TO "SupportTickets"')
        conn.execute('ALTER TABLE app."SupportTickets" ALTER COLUMN emb TYPE vector(16) USING NULL')
    assert scrape(service)[error] == 1  # another vector size: it no longer fits either
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" ALTER COLUMN emb TYPE vector(8) USING NULL')
    fixed = scrape(service)
    assert fixed[error] == 0
    assert fixed[stamp] > first[stamp] and fixed['embedfill_missing_rows{target="tickets"}'] == 60


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_metrics_interval_is_a_config_error(
    tickets: str, fake_openai: FakeOpenAI, value: str
) -> None:
    env = {"EMBEDFILL_METRICS_INTERVAL": value}
    with pytest.raises(ConfigError, match="EMBEDFILL_METRICS_INTERVAL must be a number"):
        create_app(tickets_config(fake_openai.base_url), database=Database(tickets), env=env)


# ---------------------------------------------------------------------------- check


def check(cfg: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = embedfill("--config", str(cfg), "check", *args, env=env)
    return result.returncode, result.stdout, result.stderr


def test_check_exits_3_over_a_bound_and_0_within(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)

    code, out, err = check(cfg, env)
    assert (code, err) == (3, "")
    assert out == (
        "FAIL tickets: 45 missing (max 0), 0 stale + 0 outdated model (max 0), 15 unverified\n"
    )
    code, out, _ = check(cfg, env, "--max-missing", "45")
    assert code == 0 and out.startswith("ok tickets: 45 missing (max 45), ")

    assert embedfill("--config", str(cfg), "backfill", "--json", env=env).returncode == 0
    edit(tickets, [1, 2, 3])
    code, out, _ = check(cfg, env)
    assert code == 3
    assert out == (
        "FAIL tickets: 0 missing (max 0), 3 stale + 0 outdated model (max 0), 15 unverified\n"
    )
    code, out, _ = check(cfg, env, "--max-stale", "3")
    assert code == 0 and out.startswith("ok tickets: 0 missing (max 0), 3 stale")

    code, out, _ = check(cfg, env, "--max-stale", "2", "--json")
    assert code == 3
    assert json.loads(out) == {
        "ok": False,
        "targets": [
            {
                "target": "tickets",
                "ok": False,
                "over": ["stale"],
                "rows": 60,
                "missing": 0,
                "max_missing": 0,
                "stale": 3,
                "outdated_model": 0,
                "max_stale": 2,
                "unverified": 15,
            }
        ],
    }

    # another model in the config: the 45 vectors embedfill wrote are outdated, and count
    # against --max-stale too (the 3 edited rows are outdated, not stale: the model wins)
    other = tmp_path / "other"
    other.mkdir()
    moved = write_config(other, fake_openai.base_url)
    moved.write_text(moved.read_text().replace('model = "test-embed"', 'model = "test-embed-2"'))
    code, out, _ = check(moved, env, "--max-stale", "44")
    assert code == 3
    assert out == (
        "FAIL tickets: 0 missing (max 0), 0 stale + 45 outdated model (max 44), 15 unverified\n"
    )
    assert check(moved, env, "--max-stale", "45")[0] == 0


def test_check_targets_and_errors_keep_their_own_codes(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    twin = """
[[targets]]
name = "twin"
table = "app.SupportTickets"
id_column = "ticket_no"
text = "{subject}"
embedding_column = "emb"
provider = "openai"
"""
    cfg = write_config(tmp_path, fake_openai.base_url, extra=twin)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)

    code, out, _ = check(cfg, env, "--max-missing", "100")
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["ok tickets", "ok twin"]
    code, out, _ = check(cfg, env, "--target", "twin", "--target", "twin", "--json")
    assert code == 3 and [t["target"] for t in json.loads(out)["targets"]] == ["twin"]

    code, out, err = check(cfg, env, "--target", "nope")
    assert (code, out) == (2, "") and "No target named 'nope'" in err
    code, out, err = check(cfg, env, "--max-missing", "-1")
    assert (code, out) == (2, "") and "--max-missing must be 0 or more" in err
    down = cli_env("postgresql://nobody@127.0.0.1:1/none", TEST_PLATFORM_KEY=PLATFORM)
    code, out, err = check(cfg, down)
    assert code == 1 and out == "" and err.startswith("embedfill: ")


def test_check_bounds_each_tenant_with_tenant_max_missing(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """A tenant whose rows are all NULL (its key revoked) fails the check even when the
    target's total is within --max-missing."""
    cfg = write_config(tmp_path, fake_openai.base_url)
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    with psycopg.connect(tickets) as conn:
        per_tenant = dict(
            conn.execute(
                'SELECT org, count(*) FROM app."SupportTickets" WHERE emb IS NULL GROUP BY org'
            ).fetchall()
        )
    worst = max(per_tenant.values())
    code, out, _ = check(cfg, env, "--max-missing", "45", "--tenant-max-missing", str(worst - 1))
    assert code == 3
    over = sorted((n, t) for t, n in per_tenant.items() if n > worst - 1)
    assert out.startswith("FAIL tickets: 45 missing (max 45), ")
    assert f"; {len(over)} tenants over {worst - 1} missing: " in out
    code, out, _ = check(
        cfg, env, "--max-missing", "45", "--tenant-max-missing", str(worst - 1), "--json"
    )
    [result] = json.loads(out)["targets"]
    assert result["over"] == ["tenant_missing"] and result["tenant_max_missing"] == worst - 1
    assert {(t["tenant"], t["missing"]) for t in result["tenants_over"]} == {
        (t, n) for n, t in over
    }
    code, out, _ = check(cfg, env, "--max-missing", "45", "--tenant-max-missing", str(worst))
    assert code == 0 and out.startswith("ok tickets: ") and "0 tenants over" in out
    assert check(cfg, env, "--tenant-max-missing", "-1")[0] == 2


def test_row_gauges_by_tenant_only_when_asked(tickets: str, fake_openai: FakeOpenAI) -> None:
    config = tickets_config(fake_openai.base_url)
    with psycopg.connect(tickets) as conn:
        missing = dict(
            conn.execute(
                'SELECT org, count(*) FROM app."SupportTickets" WHERE emb IS NULL GROUP BY org'
            ).fetchall()
        )
    base_env = {"ADMIN_SECRET": ADMIN, "EMBEDFILL_METRICS_INTERVAL": "0"}
    for asked in ("1", ""):
        env = {**base_env, "EMBEDFILL_METRICS_TENANT_LABELS": asked}
        app = create_app(config, database=Database(tickets), env=env, worker=False)
        with ServerThread(app) as base, httpx.Client(base_url=base, timeout=60) as client:
            samples = scrape(client)
        tenants = {
            key: value for key, value in samples.items() if key.startswith("embedfill_tenant_")
        }
        if not asked:
            assert tenants == {}  # off by default: one series per tenant is a cost
            continue
        for org, count in missing.items():
            key = f'embedfill_tenant_missing_rows{{target="tickets",tenant="{org}"}}'
            assert tenants[key] == count
        assert samples['embedfill_missing_rows{target="tickets"}'] == sum(missing.values())
        assert {k.split("{")[0] for k in tenants} == {
            f"embedfill_tenant_{f}_rows"
            for f in ("missing", "stale", "outdated_model", "unverified", "failing")
        }
    with pytest.raises(ConfigError, match="EMBEDFILL_METRICS_TENANT_LABELS must be 1 or 0"):
        create_app(config, database=Database(tickets), env={"EMBEDFILL_METRICS_TENANT_LABELS": "x"})


def test_tenant_bounds_need_a_tenant_column_and_names_stay_on_one_line(
    tickets: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, fake_openai.base_url)
    flat = tmp_path / "flat.toml"
    flat.write_text(
        "\n".join(
            line
            for line in cfg.read_text().splitlines()
            if not line.startswith(("tenant_column", "tenant_key_sql"))
        )
    )
    env = cli_env(tickets, TEST_PLATFORM_KEY=PLATFORM)
    code, _, err = check(flat, env, "--tenant-max-missing", "0")
    assert code == 2 and "has no tenant_column" in err
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute(
            'UPDATE app."SupportTickets" SET org = %s WHERE org = %s',
            ["evil\nok tickets: fake line", "org-a"],
        )
    code, out, _ = check(cfg, env, "--max-missing", "100", "--tenant-max-missing", "0")
    assert code == 3 and out.count("\n") == 1  # one line per target, whatever the names
    assert "evil\\nok tickets: fake line" in out


def test_a_null_tenant_and_an_empty_one_are_two_series(
    tickets: str, fake_openai: FakeOpenAI
) -> None:
    with psycopg.connect(tickets, autocommit=True) as conn:
        conn.execute('ALTER TABLE app."SupportTickets" ALTER COLUMN org DROP NOT NULL')
        conn.execute(
            'UPDATE app."SupportTickets" SET org = NULL WHERE org = %s AND emb IS NULL', ["org-a"]
        )
        conn.execute(
            'UPDATE app."SupportTickets" SET org = %s WHERE org = %s AND emb IS NULL', ["", "org-b"]
        )
    env = {"ADMIN_SECRET": ADMIN, "EMBEDFILL_METRICS_INTERVAL": "0"}
    env["EMBEDFILL_METRICS_TENANT_LABELS"] = "1"
    app = create_app(
        tickets_config(fake_openai.base_url), database=Database(tickets), env=env, worker=False
    )
    with ServerThread(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        samples = scrape(client)
    series = {k: v for k, v in samples.items() if k.startswith("embedfill_tenant_missing_rows")}
    assert series['embedfill_tenant_missing_rows{target="tickets",tenant="(no tenant)"}'] == 15
    assert series['embedfill_tenant_missing_rows{target="tickets",tenant=""}'] == 15
    assert sum(series.values()) == samples['embedfill_missing_rows{target="tickets"}']
