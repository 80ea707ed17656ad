"""Static SQL on embedfill's own tables. ``store.Store`` is the only caller (and
``schema`` for the version table)."""

# a session lock, taken before the migration's transaction begins: a transaction that
# starts after the other migrator's commit sees its tables (one that began before, then
# waited, keeps stale catalog caches and would create them again)
MIGRATION_LOCK = "SELECT pg_advisory_lock(hashtextextended('embedfill:migrate', 0))"
MIGRATION_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('embedfill:migrate', 0))"
CREATE_SCHEMA_VERSION = """
CREATE TABLE IF NOT EXISTS embedfill.schema_version (
    version    integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
# pg_class read with the statement's own snapshot, not to_regclass: that answers from the
# backend's catalog cache, which can still say "missing" after another session created
# the table while this one waited for the migration lock (advisory locks do not refresh it)
SCHEMA_VERSION_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'embedfill' AND c.relname = 'schema_version')"""
SCHEMA_VERSION = "SELECT max(version) FROM embedfill.schema_version"
RECORD_VERSION = "INSERT INTO embedfill.schema_version (version) VALUES (%(version)s)"
SCHEMA_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s)"
WHO_AM_I = "SELECT current_user, current_database()"

TRY_TARGET_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%(key)s, 0))"
RELEASE_TARGET_LOCK = "SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0))"

INSERT_RUN = """
INSERT INTO embedfill.runs
    (target, actor, parameters, dry_run, status, missing_before, table_oid, column_name)
VALUES (%(target)s, %(actor)s, %(parameters)s, %(dry_run)s, %(status)s, %(missing_before)s,
        %(table_oid)s, %(column)s)
RETURNING id"""

HEARTBEAT = "UPDATE embedfill.runs SET heartbeat_at = now() WHERE id = %(id)s"
SET_RUN_PARAMETERS = "UPDATE embedfill.runs SET parameters = %(parameters)s WHERE id = %(id)s"

UPDATE_RUN_PROGRESS = """
UPDATE embedfill.runs
SET status = %(status)s, missing_before = %(missing_before)s, embedded = %(embedded)s,
    skipped = %(skipped)s, failed = %(failed)s, requests = %(requests)s, tokens = %(tokens)s,
    progress = %(progress)s, heartbeat_at = now()
WHERE id = %(id)s
RETURNING cancel_requested"""

FINISH_RUN = """
UPDATE embedfill.runs
SET status = %(status)s, missing_before = %(missing_before)s, embedded = %(embedded)s,
    skipped = %(skipped)s, failed = %(failed)s, requests = %(requests)s, tokens = %(tokens)s,
    estimated_cost_usd = %(estimated_cost_usd)s, report = %(report)s, error = %(error)s,
    progress = %(progress)s,
    heartbeat_at = now(), finished_at = now()
WHERE id = %(id)s"""

# Only called while holding the column's advisory lock: any other run still marked
# running for the same table and column lost its process (the lock dies with the
# connection). Runs are keyed by the table's oid, never by the config's spelling.
DEAD_RUNS = """
SELECT id, parameters FROM embedfill.runs
WHERE table_oid = %(table_oid)s AND column_name = %(column)s AND id <> %(own)s
  AND status IN ('queued', 'running') AND NOT dry_run
ORDER BY id"""

ABANDON_RUN = """
UPDATE embedfill.runs SET status = 'abandoned', finished_at = now()
WHERE id = %(id)s AND status IN ('queued', 'running')"""

ACTIVE_RUN = """
SELECT id, actor, started_at, target FROM embedfill.runs
WHERE table_oid = %(table_oid)s AND column_name = %(column)s AND status = 'running'
  AND NOT dry_run
ORDER BY started_at DESC LIMIT 1"""

REQUEST_CANCEL = """
UPDATE embedfill.runs SET cancel_requested = true
WHERE id = %(id)s AND status IN ('queued', 'running') RETURNING id"""

GET_RUN = """
SELECT id, target, actor, parameters, dry_run, status, missing_before, embedded, skipped,
       failed, requests, tokens, estimated_cost_usd, progress, report, error, started_at,
       heartbeat_at, finished_at, cancel_requested, now() - heartbeat_at AS silent_for
FROM embedfill.runs WHERE id = %(id)s"""

# recent jobs, newest first: everything but the final report (a job's own route has it)
LIST_RUNS = """
SELECT id, target, actor, parameters, dry_run, status, missing_before, embedded, skipped,
       failed, requests, tokens, estimated_cost_usd, progress, NULL::jsonb AS report, error,
       started_at, heartbeat_at, finished_at, cancel_requested,
       now() - heartbeat_at AS silent_for
FROM embedfill.runs
WHERE NOT dry_run AND (%(target)s::text IS NULL OR target = %(target)s)
ORDER BY id DESC LIMIT %(limit)s"""

INSERT_FAILURE = """
INSERT INTO embedfill.failures (run_id, row_id, tenant, error_class, message, attempts)
VALUES (%(run_id)s, %(row_id)s, %(tenant)s, %(error_class)s, %(message)s, %(attempts)s)"""

UPSERT_KEY = """
INSERT INTO embedfill.tenant_keys (tenant, ciphertext, key_hint)
VALUES (%(tenant)s, %(ciphertext)s, %(key_hint)s)
ON CONFLICT (tenant) DO UPDATE
SET ciphertext = excluded.ciphertext, key_hint = excluded.key_hint, updated_at = now()"""
GET_KEY = "SELECT ciphertext FROM embedfill.tenant_keys WHERE tenant = %(tenant)s"
LIST_KEYS = "SELECT tenant, key_hint, updated_at FROM embedfill.tenant_keys ORDER BY tenant"
DELETE_KEY = "DELETE FROM embedfill.tenant_keys WHERE tenant = %(tenant)s"

# Token buckets in the database, so every run of every process draws on one budget per
# key: refill by the time elapsed at the configured rate (at most the burst capacity),
# take this request's cost, and answer the levels (negative: the caller waits for the
# deficit to refill) and any pause a provider's 429 imposed. One row lock per request.
RESERVE_BUDGET = """
INSERT INTO embedfill.rate_budgets AS b (key_id, req_level, tok_level)
VALUES (%(key_id)s, %(req_cap)s - %(requests)s, %(tok_cap)s - %(tokens)s)
ON CONFLICT (key_id) DO UPDATE SET
    req_level = least(%(req_cap)s, b.req_level
        + extract(epoch FROM clock_timestamp() - b.updated_at) * %(req_rate)s) - %(requests)s,
    tok_level = least(%(tok_cap)s, b.tok_level
        + extract(epoch FROM clock_timestamp() - b.updated_at) * %(tok_rate)s) - %(tokens)s,
    updated_at = clock_timestamp()
RETURNING req_level, tok_level,
    greatest(0, extract(epoch FROM b.paused_until - clock_timestamp()))::float8"""

PAUSED_FOR = """
SELECT greatest(0, extract(epoch FROM paused_until - clock_timestamp()))::float8
FROM embedfill.rate_budgets WHERE key_id = %(key_id)s"""

PAUSE_BUDGET = """
INSERT INTO embedfill.rate_budgets AS b (key_id, req_level, tok_level, paused_until)
VALUES (%(key_id)s, 0, 0, clock_timestamp() + make_interval(secs => %(seconds)s))
ON CONFLICT (key_id) DO UPDATE SET paused_until = greatest(b.paused_until, excluded.paused_until)"""
