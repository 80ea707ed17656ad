"""Demo data: tenants and workflow insights that read like a real product's.

The pre-filled rows get placeholder vectors (hash-derived unit vectors) so that seeding
10,000 rows takes a second; only the rows left NULL are embedded by a real model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .errors import UsageError
from .providers.hashing import hash_vector

DEMO_COMMENT = "embedfill demo data (created by `embedfill seed`)"

TENANTS = [
    ("acme", "Acme Logistics"),
    ("globex", "Globex Health"),
    ("initech", "Initech Software"),
    ("umbrella", "Umbrella Retail"),
    ("hooli", "Hooli Media"),
    ("stark", "Stark Energy"),
    ("wayne", "Wayne Finance"),
    ("soylent", "Soylent Foods"),
    ("cyberdyne", "Cyberdyne Labs"),
    ("tyrell", "Tyrell Manufacturing"),
]
WORKFLOWS = [
    "invoice approval",
    "customer onboarding",
    "refund handling",
    "incident triage",
    "purchase order review",
    "employee offboarding",
    "contract renewal",
    "ticket escalation",
    "shipment exception",
    "lead qualification",
    "expense reimbursement",
    "access request",
]
PROBLEMS = [
    "stalls at the {step} step for {hours} hours on average",
    "is retried {count} times per week because the {system} webhook times out",
    "loses {pct}% of cases when the {system} sync fails silently",
    "needs a manual hand-off from {team} in {pct}% of runs",
    "spikes on Mondays, with {count} items waiting for {team}",
    "breaches its SLA in {pct}% of cases when {team} is understaffed",
    "duplicates work because {team} and {team2} both review the same item",
]
CAUSES = [
    "the approver list in {system} is out of date",
    "a required field is missing on {pct}% of incoming records",
    "the {system} API rate-limits the nightly batch",
    "two rules overlap and route items back to {team}",
    "notifications go to a shared inbox nobody watches on weekends",
    "the threshold for automatic approval was set too low after the last migration",
]
FIXES = [
    "Auto-assign to the on-call reviewer in {team} after {hours} hours.",
    "Validate the record before it enters the queue and bounce it to the submitter.",
    "Move the {system} sync to an idempotent job with retries and an alert.",
    "Merge the overlapping rules and add a test case for each route.",
    "Raise the auto-approval threshold for repeat vendors with a clean history.",
    "Send a daily digest to {team} leads with the oldest waiting items.",
]
STEPS = ["manager", "finance", "legal", "security", "compliance", "quality"]
SYSTEMS = ["Salesforce", "NetSuite", "Zendesk", "Jira", "Workday", "SAP", "HubSpot", "Slack"]
TEAMS = [
    "finance ops",
    "support tier 2",
    "procurement",
    "IT helpdesk",
    "sales ops",
    "the warehouse team",
    "customer success",
    "people ops",
]


@dataclass(frozen=True)
class SeedResult:
    rows: int
    missing: int
    tenants: int
    dimensions: int


def insight(rng: random.Random) -> tuple[str, str, str]:
    """(workflow, title, content) of one plausible workflow insight."""
    workflow = rng.choice(WORKFLOWS)
    fill = {
        "step": rng.choice(STEPS),
        "hours": rng.randint(2, 72),
        "count": rng.randint(3, 400),
        "pct": rng.randint(2, 45),
        "system": rng.choice(SYSTEMS),
        "team": rng.choice(TEAMS),
        "team2": rng.choice(TEAMS),
    }
    problem = rng.choice(PROBLEMS).format(**fill)
    title = f"{workflow.capitalize()} {problem.split(' because')[0].split(' when')[0]}"
    content = (
        f"The {workflow} workflow {problem}. Root cause: {rng.choice(CAUSES).format(**fill)}. "
        f"Suggested fix: {rng.choice(FIXES).format(**fill)} "
        f"Observed over the last {rng.randint(2, 12)} weeks across {rng.randint(40, 9000)} runs."
    )
    return workflow, title, content


def _check_replaceable(conn: psycopg.Connection[Any], table: str) -> None:
    row = conn.execute(
        "SELECT pg_catalog.obj_description(pg_catalog.to_regclass(%s), 'pg_class'),"
        " pg_catalog.to_regclass(%s) IS NOT NULL",
        (f"public.{table}", f"public.{table}"),
    ).fetchone()
    assert row is not None
    comment, exists = row
    if exists and comment != DEMO_COMMENT:
        raise UsageError(
            f"Table public.{table} exists and was not created by `embedfill seed`; refusing "
            "to replace it. Seed into another database (unset DATABASE_URL for the embedded one)."
        )


def _forget_provenance(conn: psycopg.Connection[Any]) -> None:
    """What embedfill recorded about the replaced table's vectors: they are gone. Kept,
    a second seed's placeholders would pass for the vectors the last run wrote (adopt
    recorded none of them, and any text the seed changed read as stale)."""
    row = conn.execute(
        # each step only when the one before holds: to_regclass of a name in a schema
        # this role may not use raises, so does has_table_privilege of a missing table
        "SELECT CASE WHEN pg_catalog.to_regnamespace('embedfill') IS NULL THEN false"
        " WHEN NOT pg_catalog.has_schema_privilege('embedfill', 'USAGE') THEN false"
        " WHEN pg_catalog.to_regclass('embedfill.vector_columns') IS NULL THEN false"
        " ELSE pg_catalog.has_table_privilege('embedfill.provenance', 'DELETE') END"
    ).fetchone()
    if row is None or not row[0]:
        return  # embedfill's schema is not there yet (nothing recorded), or not ours to edit
    conn.execute(
        "DELETE FROM embedfill.provenance AS p USING embedfill.vector_columns AS c"
        " WHERE p.column_id OPERATOR(pg_catalog.=) c.id"
        " AND c.schema_name OPERATOR(pg_catalog.=) 'public'"
        " AND c.table_name OPERATOR(pg_catalog.=) 'workflow_insights'"
    )


def seed(
    conn: psycopg.Connection[Any],
    *,
    rows: int = 10_000,
    missing: int = 382,
    tenants: int = 5,
    dims: int = 384,
    random_seed: int = 42,
) -> SeedResult:
    if rows < 1:
        raise UsageError(f"--rows must be 1 or more, not {rows}.")
    if not 0 <= missing <= rows:
        raise UsageError(f"--missing must be between 0 and --rows ({rows}), not {missing}.")
    if not 1 <= tenants <= len(TENANTS):
        raise UsageError(f"--tenants must be between 1 and {len(TENANTS)}, not {tenants}.")
    if not 1 <= dims <= 16000:
        raise UsageError(f"--dims must be between 1 and 16000, not {dims}.")
    from pgvector.psycopg import register_vector

    rng = random.Random(random_seed)
    with conn.transaction():
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        for table in ("workflow_insights", "tenants"):
            _check_replaceable(conn, table)
        conn.execute("DROP TABLE IF EXISTS public.workflow_insights, public.tenants")
        _forget_provenance(conn)
        conn.execute("CREATE TABLE public.tenants (id text PRIMARY KEY, name text NOT NULL)")
        conn.execute(
            sql.SQL(
                "CREATE TABLE public.workflow_insights ("
                " id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
                " tenant_id text NOT NULL REFERENCES public.tenants (id),"
                " workflow_id text NOT NULL, title text NOT NULL, content text NOT NULL,"
                " created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),"
                " updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),"
                " embedding vector({}))"
            ).format(sql.Literal(dims))
        )
        for table in ("tenants", "workflow_insights"):
            conn.execute(
                sql.SQL("COMMENT ON TABLE {} IS {}").format(
                    sql.Identifier("public", table), sql.Literal(DEMO_COMMENT)
                )
            )
        chosen = TENANTS[:tenants]
        with conn.cursor().copy("COPY public.tenants (id, name) FROM STDIN") as copy:
            for row in chosen:
                copy.write_row(row)
        blank = set(rng.sample(range(rows), missing))
        with conn.cursor().copy(
            "COPY public.workflow_insights (id, tenant_id, workflow_id, title, content,"
            " embedding) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "text", "text", "text", "text", "vector"])
            for i in range(rows):
                workflow, title, content = insight(rng)
                tenant = chosen[i % tenants][0]
                wf_id = f"wf-{workflow.replace(' ', '-')}-{rng.randint(1, 40):02d}"
                vector = None if i in blank else hash_vector(f"{title}\n\n{content}", dims)
                copy.write_row((i + 1, tenant, wf_id, title, content, vector))
        conn.execute(
            "SELECT pg_catalog.setval("
            "pg_catalog.pg_get_serial_sequence('public.workflow_insights', 'id'), %s)",
            (rows,),
        )
    conn.execute("ANALYZE public.workflow_insights")
    return SeedResult(rows=rows, missing=missing, tenants=tenants, dimensions=dims)
