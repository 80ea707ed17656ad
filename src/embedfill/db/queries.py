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
# every connection renders values as text the same way, whatever the server, database,
# role or client (PGTZ, PGDATESTYLE, PGOPTIONS) defaults are: the text of a timestamptz,
# date, interval or float column in a template (what is embedded, and its provenance
# fingerprint) must not depend on who reads it, or every row looks stale to a session
# with other settings (TimeZone, DateStyle and IntervalStyle are also kept by pgbouncer)
PIN_TEXT_SETTINGS = """
SELECT pg_catalog.set_config('TimeZone', 'UTC', false),
       pg_catalog.set_config('DateStyle', 'ISO, YMD', false),
       pg_catalog.set_config('IntervalStyle', 'postgres', false),
       pg_catalog.set_config('extra_float_digits', '1', false),
       pg_catalog.set_config('row_security', 'off', false),
       -- the change triggers skip embedfill's own writes (db/triggers.py)
       pg_catalog.set_config('embedfill.writer', 'on', false)"""

# The search_path every embedfill connection runs with, whatever the URL, the role or
# the database set: a function or operator named like a built-in (a ``concat(text, text,
# text)`` in public, say, a better match than pg_catalog's VARIADIC "any") never runs as
# embedfill's role; every other name embedfill uses is qualified. The path the
# connection came with is kept (the first column) for the user's own names: an
# unqualified target table, ``tenant_key_sql`` (``db.connect.user_context``).
# ``row_security = off`` (PIN_TEXT_SETTINGS): a policy that would hide rows from embedfill fails
# its statement instead (catalog refuses such a target at start-up, in one sentence).
PIN_SEARCH_PATH = """
SELECT pg_catalog.current_setting('search_path'),
       pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)"""
VECTOR_SCHEMA = """
SELECT n.nspname FROM pg_catalog.pg_extension e
JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"""
# the user's context for the user's own SQL (db.connect.user_context), and back; local
# to the transaction, or (``local`` false) the session's until set back
USER_CONTEXT = """
SELECT pg_catalog.set_config('search_path', %(path)s, %(local)s),
       pg_catalog.set_config('row_security', 'on', %(local)s)"""
EMBEDFILL_CONTEXT = """
SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', %(local)s),
       pg_catalog.set_config('row_security', 'off', %(local)s)"""

TRY_TARGET_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%(key)s, 0))"
RELEASE_TARGET_LOCK = "SELECT pg_advisory_unlock(hashtextextended(%(key)s, 0))"

INSERT_RUN = """
INSERT INTO embedfill.runs
    (target, actor, parameters, dry_run, status, missing_before, table_oid, column_name,
     kind, spec)
VALUES (%(target)s, %(actor)s, %(parameters)s, %(dry_run)s, %(status)s, %(missing_before)s,
        %(table_oid)s, %(column)s, %(kind)s, %(spec)s)
RETURNING id"""

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

REQUEST_CANCEL = """
UPDATE embedfill.runs SET cancel_requested = true
WHERE id = %(id)s AND status IN ('queued', 'running') RETURNING id"""

GET_RUN = """
SELECT id, target, actor, parameters, dry_run, status, missing_before, embedded, skipped,
       failed, requests, tokens, estimated_cost_usd, progress, report, error, started_at,
       heartbeat_at, finished_at, cancel_requested, now() - heartbeat_at AS silent_for, kind
FROM embedfill.runs WHERE id = %(id)s"""

# recent jobs, newest first: everything but the final report (a job's own route has it)
LIST_RUNS = """
SELECT id, target, actor, parameters, dry_run, status, missing_before, embedded, skipped,
       failed, requests, tokens, estimated_cost_usd, progress, NULL::jsonb AS report, error,
       started_at, heartbeat_at, finished_at, cancel_requested,
       now() - heartbeat_at AS silent_for, kind
FROM embedfill.runs
WHERE NOT dry_run AND (%(target)s::text IS NULL OR target = %(target)s)
ORDER BY id DESC LIMIT %(limit)s"""

# the metrics' view of jobs not over yet, one row per target: the oldest one's age, the
# most silent one's time since a worker last reported, rows done (the partial index
# runs_physical_active of 0003 covers exactly these rows: cheap however long the history)
RUNNING_JOBS = """
SELECT r.target,
       extract(epoch FROM now() - min(r.started_at))::float8,
       extract(epoch FROM now() - min(r.heartbeat_at))::float8,
       sum(r.embedded + r.skipped + r.failed)::bigint,
       sum((SELECT pg_catalog.count(*) FROM embedfill.chunks c
            WHERE c.run_id = r.id AND c.state IN ('todo', 'doing')))::bigint
FROM embedfill.runs r
WHERE r.status IN ('queued', 'running') AND NOT r.dry_run
GROUP BY r.target ORDER BY r.target"""

# worker processes alive in this database: the sessions holding the workers' shared
# advisory lock (WORKER_LOCK), which goes with the process (exact, no heartbeat to age)
WORKERS_ALIVE = """
SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks AS l
CROSS JOIN (SELECT pg_catalog.hashtextextended('embedfill:workers', 0) AS k) AS h
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.mode = 'ShareLock'
  AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                    WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
  AND l.classid OPERATOR(pg_catalog.=) ((h.k OPERATOR(pg_catalog.>>) 32)
      OPERATOR(pg_catalog.&) 4294967295)::pg_catalog.oid
  AND l.objid OPERATOR(pg_catalog.=) (h.k OPERATOR(pg_catalog.&) 4294967295)::pg_catalog.oid"""

# A row's failure in a job, one record per (job, row): a row that failed for a passing
# cause may go again (watch.py) after a backoff that doubles with each try, from
# %(base_s)s up to %(max_s)s seconds; one whose input the provider rejected waits for
# its text to change (retry_at NULL). A try that fails again updates the record.
INSERT_FAILURE = """
INSERT INTO embedfill.failures AS f
    (run_id, row_id, tenant, error_class, message, attempts, text_md5, key_digest, retry_at)
VALUES (%(run_id)s, %(row_id)s, %(tenant)s, %(error_class)s, %(message)s, %(attempts)s,
        %(text_md5)s, %(key_digest)s,
        CASE WHEN %(rejected_input)s THEN NULL
             ELSE pg_catalog.now() + pg_catalog.make_interval(
                 secs => LEAST(%(max_s)s::float8, %(base_s)s::float8)) END)
ON CONFLICT (run_id, row_id) DO UPDATE
SET tenant = excluded.tenant, error_class = excluded.error_class,
    message = excluded.message, attempts = excluded.attempts,
    text_md5 = excluded.text_md5, key_digest = excluded.key_digest,
    created_at = pg_catalog.now(), tries = f.tries + 1,
    retry_at = CASE WHEN %(rejected_input)s THEN NULL
                    ELSE pg_catalog.now() + pg_catalog.make_interval(secs => LEAST(
                        %(max_s)s::float8,
                        %(base_s)s::float8
                        * pg_catalog.power(2::float8, LEAST(20, f.tries)::float8))) END"""

# a tenant's key changed: its failed rows that wait for a retry go at once
RETRY_TENANT_NOW = """
UPDATE embedfill.failures SET retry_at = pg_catalog.now()
WHERE tenant IS NOT DISTINCT FROM %(tenant)s AND retry_at > pg_catalog.now()
  AND (%(run_id)s::bigint IS NULL OR run_id = %(run_id)s)
RETURNING row_id"""

# whether failed rows of the job came due for a retry since %(since)s (None: any due), and
# the server's now (the next call's since)
FAILURES_CAME_DUE = """
SELECT EXISTS (SELECT 1 FROM embedfill.failures
               WHERE run_id = %(run_id)s AND retry_at <= pg_catalog.now()
                 AND (%(since)s::timestamptz IS NULL OR retry_at > %(since)s::timestamptz)),
       pg_catalog.now()"""

# the tenants whose rows wait for a retry after a key failure, with the key then tried
KEY_FAILURES = """
SELECT DISTINCT ON (tenant) tenant, key_digest FROM embedfill.failures
WHERE run_id = %(run_id)s AND retry_at > pg_catalog.now()
  AND error_class = ANY (%(classes)s::text[])
ORDER BY tenant, created_at DESC"""

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

# ------------------------------------------------------------------------ jobs (jobs.py)

# held for the transaction that looks for a running job of the column and creates one,
# so two starts at once make one job (the second joins it)
JOB_CREATE_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))"

ACTIVE_JOB = """
SELECT id, actor, started_at, target, parameters, kind, spec, table_oid, column_name,
       cancel_requested
FROM embedfill.runs
WHERE table_oid = %(table_oid)s AND column_name = %(column)s AND status = 'running'
  AND NOT dry_run
ORDER BY id DESC LIMIT 1"""

# jobs whose chunks are all settled but that no one finished (the last chunk's worker
# could not take the column's lock at that moment, or died in between): any worker does
FINISHABLE_JOBS = """
SELECT r.id, r.kind, r.spec, r.parameters, r.target, r.table_oid, r.column_name
FROM embedfill.runs r
WHERE r.status = 'running' AND NOT r.dry_run
  AND EXISTS (SELECT 1 FROM embedfill.chunks c WHERE c.run_id = r.id)
  AND NOT EXISTS (SELECT 1 FROM embedfill.chunks c
                  WHERE c.run_id = r.id AND c.state IN ('todo', 'doing'))
ORDER BY r.id LIMIT 10"""

# a job from before specs (migration 7) takes its first worker's: compared from then on
ADOPT_SPEC = """
UPDATE embedfill.runs SET spec = %(spec)s, kind = coalesce(kind, %(kind)s)
WHERE id = %(id)s AND spec IS NULL"""

RUNNING_JOBS_OF = """
SELECT id, target, kind, spec, parameters, table_oid, column_name FROM embedfill.runs
WHERE status = 'running' AND NOT dry_run AND target = ANY(%(targets)s::text[])"""

INSERT_CHUNKS = """
INSERT INTO embedfill.chunks (run_id, seq, lo, hi, rung_at)
SELECT %(run_id)s, u.seq, u.lo, u.hi, pg_catalog.now()
FROM unnest(%(seqs)s::int[], %(los)s::jsonb[], %(his)s::jsonb[]) AS u(seq, lo, hi)"""

# a watch job's progress, in rows (its chunks are lists of ids): queued, in a worker's
# hands, and done in the last hour
WATCH_PROGRESS = """
SELECT coalesce(sum(pg_catalog.jsonb_array_length(keys)) FILTER (WHERE state = 'todo'), 0),
       coalesce(sum(pg_catalog.jsonb_array_length(keys)) FILTER (WHERE state = 'doing'), 0),
       coalesce(sum(pg_catalog.jsonb_array_length(keys)) FILTER (
           WHERE state = 'done' AND finished_at > pg_catalog.now() - interval '1 hour'), 0)
FROM embedfill.chunks WHERE run_id = %(run_id)s AND keys IS NOT NULL"""

# a watch job's chunks are lists of ids (watch.py), added while it runs
NEXT_CHUNK_SEQ = "SELECT coalesce(max(seq), 0) + 1 FROM embedfill.chunks WHERE run_id = %(run_id)s"
INSERT_KEY_CHUNKS = """
INSERT INTO embedfill.chunks (run_id, seq, keys, rung_at)
SELECT %(run_id)s, %(first)s::int + u.n::int - 1, u.keys, pg_catalog.now()
FROM unnest(%(keys)s::jsonb[]) WITH ORDINALITY AS u(keys, n)"""
# the ids in a watch job's chunks not done yet: not queued again meanwhile
OPEN_CHUNK_KEYS = """
SELECT DISTINCT k.key FROM embedfill.chunks AS c, jsonb_array_elements_text(c.keys) AS k(key)
WHERE c.run_id = %(run_id)s AND c.state IN ('todo', 'doing') AND c.keys IS NOT NULL"""
# what the change triggers queued for a column, but not ids in flight (left queued until
# their chunk is done: the change came after the text its chunk read)
DRAIN_CHANGES = """
DELETE FROM embedfill.changes
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM embedfill.changes
    WHERE column_id = %(column_id)s AND NOT (row_key = ANY(%(inflight)s::text[]))
    LIMIT %(limit)s FOR UPDATE SKIP LOCKED))
RETURNING row_key"""
# A watcher leads its column while it holds this session advisory lock (watch.py).
WATCH_KEY = "embedfill:watch:{oid}:{column}"
# The rows the triggers queued for a live column, queued again for the new vectors of a
# change of model under way on it (migration.py: a shadow column of the same table, or a
# side table's vector, keyed by the same id), until it is finalized (a rollback may be
# followed by another cutover), so that an edit reaches both models within a second, not
# at the new vectors' next stale sweep. Only while a watcher leads the new vectors (its
# WATCH_KEY lock is held, by any process): with none, nothing would drain them (its
# watcher's first sweep finds the rows when it starts). A change of model has one home:
# at most one row is inserted per key. %(side_vector)s is homes.VECTOR.
FAN_OUT_CHANGES = """
WITH home AS MATERIALIZED (
    SELECT c.id AS column_id,
           pg_catalog.hashtextextended(
               'embedfill:watch:' OPERATOR(pg_catalog.||) h.oid::pg_catalog.text
               OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) c.column_name, 0) AS lock_key
    FROM embedfill.model_migrations AS m
    JOIN pg_catalog.pg_class AS r ON r.oid OPERATOR(pg_catalog.=) m.table_oid
    JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) r.relnamespace
    LEFT JOIN pg_catalog.pg_namespace AS sn
      ON sn.nspname OPERATOR(pg_catalog.=) (m.home ->> 'schema')::pg_catalog.name
    LEFT JOIN pg_catalog.pg_class AS s
      ON s.relnamespace OPERATOR(pg_catalog.=) sn.oid
     AND s.relname OPERATOR(pg_catalog.=) (m.home ->> 'relation')::pg_catalog.name
    CROSS JOIN LATERAL (
        SELECT CASE WHEN m.strategy = 'column' THEN m.table_oid ELSE s.oid END AS oid,
               CASE WHEN m.strategy = 'column' THEN n.nspname::pg_catalog.text
                    ELSE m.home ->> 'schema' END AS schema_name,
               CASE WHEN m.strategy = 'column' THEN r.relname::pg_catalog.text
                    ELSE m.home ->> 'relation' END AS table_name,
               CASE WHEN m.strategy = 'column' THEN m.home ->> 'column'
                    ELSE %(side_vector)s END AS column_name) AS h
    JOIN embedfill.vector_columns AS c
      ON c.schema_name = h.schema_name AND c.table_name = h.table_name
     AND c.column_name = h.column_name
    WHERE m.table_oid = %(table_oid)s AND m.column_name = %(column)s
      AND m.phase <> 'finalized' AND h.oid IS NOT NULL
    -- a finalize's mark waits for this transaction (then forgets what it queued), or
    -- this waits for the finalize and sees the change finalized: never queued after
    -- (the drain holds the row already: HOLD_CHANGES_OF_MODEL)
    FOR SHARE OF m)
INSERT INTO embedfill.changes (column_id, row_key)
SELECT home.column_id, k.row_key
FROM home CROSS JOIN pg_catalog.unnest(%(keys)s::pg_catalog.text[]) AS k(row_key)
WHERE EXISTS (
    SELECT 1 FROM pg_catalog.pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                        WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
      AND l.classid OPERATOR(pg_catalog.=) ((home.lock_key OPERATOR(pg_catalog.>>) 32)
          OPERATOR(pg_catalog.&) 4294967295)::pg_catalog.oid
      AND l.objid OPERATOR(pg_catalog.=)
          (home.lock_key OPERATOR(pg_catalog.&) 4294967295)::pg_catalog.oid)"""
# Taken by a live watcher's drain before it locks queue rows, in the drain's transaction:
# the change of model under way on its column, held FOR SHARE as the fan-out holds it. A
# finalize marks the change (waiting for drains that hold it) before it moves or forgets
# the queue's rows: both take the change's row first, so neither waits on the other in
# a cycle (with the queue rows taken first, a drain's fan-out and a finalize deadlocked).
HOLD_CHANGES_OF_MODEL = """
SELECT m.id FROM embedfill.model_migrations AS m
WHERE m.table_oid = %(table_oid)s AND m.column_name = %(column)s AND m.phase <> 'finalized'
FOR SHARE OF m"""
# what is queued for the live column that a cutover's finalize dropped goes to the new
# vectors, which stay (and which the change triggers queue for from then on)
MOVE_CHANGES = """
UPDATE embedfill.changes AS q SET column_id = k.id
FROM embedfill.vector_columns AS d, embedfill.vector_columns AS k
WHERE q.column_id = d.id AND d.schema_name = %(schema)s AND d.table_name = %(table)s
  AND d.column_name = %(column)s AND k.schema_name = %(to_schema)s
  AND k.table_name = %(to_table)s AND k.column_name = %(to_column)s"""
# what is queued for a column that a finalize dropped: nobody drains it any more
FORGET_CHANGES = """
DELETE FROM embedfill.changes AS q USING embedfill.vector_columns AS c
WHERE q.column_id = c.id AND c.schema_name = %(schema)s AND c.table_name = %(table)s
  AND c.column_name = %(column)s"""
WATCH_LOCK = "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtextextended(%(key)s, 0))"
WATCH_UNLOCK = "SELECT pg_catalog.pg_advisory_unlock(pg_catalog.hashtextextended(%(key)s, 0))"
# whether a session (any, this one too) holds WATCH_LOCK's lock: a bigint key is shown
# in pg_locks as its high (classid) and low (objid) 32 bits, objsubid 1
WATCH_HELD = """
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_locks AS l,
         (SELECT pg_catalog.hashtextextended(%(key)s, 0) AS k) AS h
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                        WHERE d.datname = pg_catalog.current_database())
      AND l.classid = ((h.k >> 32) & 4294967295)::oid
      AND l.objid = (h.k & 4294967295)::oid)"""
LISTEN_CHANGES = "LISTEN embedfill_changes"  # what triggers of an earlier install NOTIFY
# which of a watch process's columns have rows in the change queue (looked at several
# times a second: the triggers do not NOTIFY). The queue has no index (the app's INSERT
# into it stays cheap), so the look reads at most its first CHANGES_POLL_ROWS rows: a
# backlog (of a column nobody watches, say) costs each look a millisecond, not a scan of
# all of it; a column whose rows lie beyond is drained at its watcher's own look, every
# second (watch.DRAIN_EVERY_S)
CHANGES_POLL_ROWS = 10_000
CHANGED_COLUMNS = f"""
SELECT DISTINCT q.column_id FROM (SELECT column_id FROM embedfill.changes
                                  LIMIT {CHANGES_POLL_ROWS}) AS q
WHERE q.column_id OPERATOR(pg_catalog.=) ANY(%(columns)s::int4[])"""

# A worker's liveness (worker.py): the session lock its control connection holds while
# its process lives; a chunk's holder is alive while that lock is held and its heartbeat
# is younger than the lease. Written once, used by the claim and by the release of lost
# chunks (a function call of pg_catalog's only, whatever the search_path).
# The lease is the holder's own (``c.lease_s``, set at its claim), not the looker's: a
# worker started with a shorter lease never takes a live worker's chunk.
_HOLDER_GONE = """(
    c.heartbeat_at IS NULL OR c.lease_s IS NULL
    OR c.heartbeat_at OPERATOR(pg_catalog.<) (pg_catalog.now()
        OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => c.lease_s::float8))
    OR NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_locks l
        CROSS JOIN LATERAL (SELECT pg_catalog.hashtextextended(
            'embedfill:worker:' OPERATOR(pg_catalog.||) c.worker, 0) AS k) h
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                            WHERE d.datname = pg_catalog.current_database())
          AND l.classid = ((h.k OPERATOR(pg_catalog.>>) 32)
                           OPERATOR(pg_catalog.&) 4294967295)::oid
          AND l.objid = (h.k OPERATOR(pg_catalog.&) 4294967295)::oid))"""

# A worker takes a chunk: one that is todo, or doing for a holder that is gone; never one
# a live worker holds (a chunk runs on one worker at a time, whatever the queue rings).
# Two claims at once: the second re-reads the row after the first commits, and misses.
# The attempt number fences out an old holder that comes back (SIGSTOP past the lease).
CLAIM_CHUNK = (
    """
UPDATE embedfill.chunks c
SET state = 'doing', attempts = c.attempts OPERATOR(pg_catalog.+) 1, worker = %(worker)s,
    started_at = pg_catalog.now(), heartbeat_at = pg_catalog.now(), lease_s = %(lease_s)s
WHERE c.run_id = %(run_id)s AND c.seq = %(seq)s
  AND (c.state = 'todo' OR (c.state = 'doing' AND """
    + _HOLDER_GONE
    + """))
RETURNING c.lo, c.hi, c.attempts, c.keys,
    EXISTS (SELECT 1 FROM embedfill.chunks o
            WHERE o.run_id = c.run_id AND o.state = 'todo' AND o.seq <> c.seq)"""
)

# the holder's heartbeat on the chunks it has in hand, every lease/3 seconds (a chunk it
# lost track of, say when the database restarted under it, is left to go silent)
HEARTBEAT_CHUNKS = """
UPDATE embedfill.chunks SET heartbeat_at = pg_catalog.now()
WHERE worker = %(worker)s AND state = 'doing'
  AND (run_id, seq) IN (SELECT * FROM unnest(%(runs)s::bigint[], %(seqs)s::int[]))"""

# chunks whose holder is gone go back to todo, to be rung again
RELEASE_LOST_CHUNKS = (
    """
UPDATE embedfill.chunks c SET state = 'todo', worker = NULL, rung_at = NULL
WHERE c.state = 'doing' AND """
    + _HOLDER_GONE
    + """
RETURNING c.run_id, c.seq"""
)

# chunks of running jobs to ring: never rung (just created, or released), or rung long
# ago and not among the queue entries still waiting (``pending``: "run_id:seq"), so a
# lost entry (used up its retries, deleted) is made again; each rung by one worker
RING_CHUNKS = """
UPDATE embedfill.chunks c SET rung_at = pg_catalog.now()
FROM embedfill.runs r
WHERE r.id = c.run_id AND (c.run_id, c.seq) IN (
    SELECT c2.run_id, c2.seq FROM embedfill.chunks c2
    JOIN embedfill.runs r2 ON r2.id = c2.run_id AND r2.status = 'running'
    WHERE c2.state = 'todo'
      AND (c2.rung_at IS NULL
           OR (%(stale_s)s::float8 IS NOT NULL
               AND c2.rung_at < pg_catalog.now() - pg_catalog.make_interval(secs => %(stale_s)s)
               AND NOT ((c2.run_id::text OPERATOR(pg_catalog.||) ':'
                         OPERATOR(pg_catalog.||) c2.seq::text) = ANY(%(pending)s::text[]))))
    ORDER BY c2.run_id, c2.seq
    LIMIT %(limit)s FOR UPDATE OF c2 SKIP LOCKED)
RETURNING c.run_id, c.seq, r.target, r.spec->>'fingerprint',
          coalesce((r.spec->>'platform_key')::boolean, false)"""

# whether any todo chunk was rung long ago (then the queue's waiting entries are read)
STALE_RUNG = """
SELECT EXISTS (
    SELECT 1 FROM embedfill.chunks c JOIN embedfill.runs r ON r.id = c.run_id
    WHERE r.status = 'running' AND c.state = 'todo'
      AND c.rung_at < pg_catalog.now() - pg_catalog.make_interval(secs => %(stale_s)s))"""

FINISH_CHUNK = """
UPDATE embedfill.chunks SET state = %(state)s, finished_at = now()
WHERE run_id = %(run_id)s AND seq = %(seq)s AND state = 'doing'
  AND worker = %(worker)s AND attempts = %(attempt)s
RETURNING seq"""

RELEASE_CHUNK = """
UPDATE embedfill.chunks SET state = 'todo', worker = NULL, rung_at = NULL
WHERE run_id = %(run_id)s AND seq = %(seq)s AND state = 'doing'
  AND worker = %(worker)s AND attempts = %(attempt)s"""

OPEN_CHUNKS = """
SELECT count(*) FILTER (WHERE state = 'todo'), count(*) FILTER (WHERE state = 'doing')
FROM embedfill.chunks WHERE run_id = %(run_id)s AND state IN ('todo', 'doing')"""

CANCEL_CHUNKS = """
UPDATE embedfill.chunks SET state = 'cancelled', finished_at = now()
WHERE run_id = %(run_id)s AND state = 'todo'"""

RUN_STATE = """
SELECT id, status, cancel_requested, parameters, target, table_oid, column_name, actor,
       missing_before, started_at, error, report, kind, spec,
       extract(epoch FROM coalesce(finished_at, now()) - started_at) AS age_s
FROM embedfill.runs WHERE id = %(id)s"""

# A job's failures that still stand: a row whose failure was recorded and that a later try
# wrote (a chunk handed back, then done by another worker) is embedded, not failed.
_STANDING_FAILURE = """NOT EXISTS (
    SELECT 1 FROM embedfill.runs r
    JOIN pg_catalog.pg_class c ON c.oid = r.table_oid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    JOIN embedfill.vector_columns v ON v.schema_name = n.nspname
         AND v.table_name = c.relname AND v.column_name = r.column_name
    JOIN embedfill.provenance p ON p.column_id = v.id AND p.row_key = f.row_id
    WHERE r.id = f.run_id AND p.embedded_at OPERATOR(pg_catalog.>=) f.created_at)"""

# Rows failing now, per tenant and error class (the latest failure of each row), not
# written since, and still there ({exists}: TargetSQL.failing; a row the app deleted
# fails no more): in the column's running jobs, its latest job that tried every row (no
# tenants, no limit: a failure before it was tried again, or is gone) and every job
# since. A later run of one tenant (or --limit) does not make another tenant's failed
# rows good (only the latest job's were counted), and history before a full job is not
# read again at every status.
FAILING = (
    """
WITH col AS (
    SELECT r.id, r.status, r.parameters FROM embedfill.runs r
    WHERE r.table_oid = %(rel)s AND r.column_name = %(column)s AND NOT r.dry_run
), whole AS (
    SELECT pg_catalog.max(c.id) AS id FROM col c
    WHERE coalesce(c.parameters -> 'tenants', '[]'::jsonb) IN ('[]'::jsonb, 'null'::jsonb)
      AND c.parameters ->> 'limit' IS NULL AND c.status <> 'cancelled'
), jobs AS (
    SELECT c.id FROM col c, whole w WHERE c.status = 'running' OR c.id >= coalesce(w.id, 0)
), f AS (
    SELECT DISTINCT ON (f.row_id) f.run_id, f.row_id, f.tenant, f.error_class, f.created_at
    FROM embedfill.failures f WHERE f.run_id IN (SELECT id FROM jobs)
    ORDER BY f.row_id, f.created_at DESC
)
SELECT f.tenant, f.error_class, pg_catalog.count(*) FROM f WHERE """
    + _STANDING_FAILURE
    + """ AND {exists}
GROUP BY 1, 2 ORDER BY 1, 2"""
)

# a worker's own report for a job, then the job's totals as the sum over its workers (a
# worker that refused the job before works on it now: its config changed meanwhile)
SAVE_WORKER = """
INSERT INTO embedfill.workers AS w (run_id, worker, host, pid, chunks, report)
VALUES (%(run_id)s, %(worker)s, %(host)s, %(pid)s, %(chunks)s, %(report)s)
ON CONFLICT (run_id, worker) DO UPDATE
SET chunks = excluded.chunks, report = excluded.report, heartbeat_at = now(),
    refused = NULL"""

# a worker that refuses a job (jobs/spec.py): listed among its workers, with the setting
REFUSE_JOB = """
INSERT INTO embedfill.workers AS w (run_id, worker, host, pid, refused)
VALUES (%(run_id)s, %(worker)s, %(host)s, %(pid)s, %(refused)s)
ON CONFLICT (run_id, worker) DO UPDATE SET refused = excluded.refused, heartbeat_at = now()"""

SUM_WORKERS = (
    """
WITH s AS (
    SELECT coalesce(sum((report->>'embedded')::bigint), 0) AS reported,
           (SELECT coalesce(pg_catalog.sum(y.embedded), 0) FROM embedfill.tallies y
            WHERE y.run_id = %(run_id)s) AS tallied,
           coalesce(sum((report->>'skipped')::bigint), 0) AS skipped,
           coalesce(sum((report->>'failed')::bigint), 0) AS failed_reported,
           (SELECT pg_catalog.count(DISTINCT f.row_id) FROM embedfill.failures f
            WHERE f.run_id = %(run_id)s AND """
    + _STANDING_FAILURE
    + """) AS failed_recorded,
           coalesce(sum((report->>'requests')::bigint), 0) AS requests,
           coalesce(sum((report->>'tokens')::bigint), 0) AS tokens
    FROM embedfill.workers WHERE run_id = %(run_id)s
), t AS (
    -- what was committed (a job from before tallies: what its workers reported)
    SELECT CASE WHEN r.parameters ? 'tenants_before' THEN s.tallied ELSE s.reported END
               AS embedded,
           CASE WHEN r.parameters ? 'tenants_before' THEN s.failed_recorded
                ELSE s.failed_reported END AS failed,
           s.skipped, s.requests, s.tokens
    FROM s, embedfill.runs r WHERE r.id = %(run_id)s
)
UPDATE embedfill.runs AS r
SET embedded = t.embedded, skipped = t.skipped, failed = t.failed, requests = t.requests,
    tokens = t.tokens,
    -- a finished job's totals stay the sum of what its workers wrote (one still in flight
    -- when it ended counts too); only a running job's heartbeat moves
    heartbeat_at = CASE WHEN r.status = 'running' THEN now() ELSE r.heartbeat_at END,
    progress = CASE WHEN r.status <> 'running' THEN r.progress
        ELSE jsonb_build_object('done', t.embedded + t.skipped + t.failed,
                                'total', r.missing_before, 'tenants', '[]'::jsonb) END
FROM t
WHERE r.id = %(run_id)s
RETURNING r.cancel_requested, r.status"""
)

CHUNKS_OF_RUN = "SELECT count(*) FROM embedfill.chunks WHERE run_id = %(run_id)s"

JOB_WORKERS = """
SELECT worker, host, pid, chunks, report, started_at, heartbeat_at, refused
FROM embedfill.workers WHERE run_id = %(run_id)s ORDER BY started_at, worker"""

# what a job committed: rows written per tenant and worker (the writes' own tallies),
# rows failed per tenant (each row once, however often it was tried)
JOB_TALLIES = """
SELECT tenant, worker, pg_catalog.sum(embedded)::bigint FROM embedfill.tallies
WHERE run_id = %(run_id)s GROUP BY tenant_key, tenant, worker"""
JOB_FAILED = (
    """
SELECT f.tenant, pg_catalog.count(DISTINCT f.row_id) FROM embedfill.failures f
WHERE f.run_id = %(run_id)s AND """
    + _STANDING_FAILURE
    + """
GROUP BY f.tenant"""
)

JOB_CHUNKS = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE state = 'todo') AS todo,
       count(*) FILTER (WHERE state = 'doing') AS doing,
       count(*) FILTER (WHERE state = 'done') AS done,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled
FROM embedfill.chunks WHERE run_id = %(run_id)s"""

FIRST_FAILURES = """
SELECT row_id, tenant, error_class, message, attempts FROM embedfill.failures
WHERE run_id = %(run_id)s ORDER BY id LIMIT %(limit)s"""

# finish a job once: only while it is still running
FINISH_JOB = """
UPDATE embedfill.runs
SET status = %(status)s, missing_before = %(missing_before)s, embedded = %(embedded)s,
    skipped = %(skipped)s, failed = %(failed)s, requests = %(requests)s, tokens = %(tokens)s,
    estimated_cost_usd = %(estimated_cost_usd)s, report = %(report)s, error = %(error)s,
    progress = %(progress)s, heartbeat_at = now(), finished_at = now()
WHERE id = %(id)s AND status = 'running'
RETURNING id"""

# a worker process holds this session lock while it lives (worker.py): a chunk shown
# doing for a worker whose lock is free lost its process, and is handed out again now,
# without waiting for the lease
# a worker's own lock (its chunks' holder is alive: _HOLDER_GONE), and the workers'
# shared one (WORKERS_ALIVE counts its holders), for the life of its control connection
WORKER_LOCK = """
SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtextextended(%(key)s, 0)),
       pg_catalog.pg_advisory_lock_shared(pg_catalog.hashtextextended('embedfill:workers', 0))"""
# the worker's control connection serves procrastinate's queries too (its own schema)
QUEUE_SEARCH_PATH = "SELECT pg_catalog.set_config('search_path', 'embedfill', false)"
# ---------------------------------------------------------------- provenance (freshness.py)

# A vector column by its names (schema, table, column) as the catalog spells them now:
# a renamed table starts afresh, a dump and restore keeps its provenance.
ENSURE_VECTOR_COLUMN = """
INSERT INTO embedfill.vector_columns (schema_name, table_name, column_name)
SELECT n.nspname, c.relname, %(column)s
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = %(oid)s
ON CONFLICT (schema_name, table_name, column_name) DO NOTHING"""
VECTOR_COLUMN_ID = """
SELECT v.id FROM embedfill.vector_columns v
JOIN pg_namespace n ON n.nspname = v.schema_name
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = v.table_name
WHERE c.oid = %(oid)s AND v.column_name = %(column)s"""
ENSURE_MODEL = """
INSERT INTO embedfill.models (provider, model, dimensions)
VALUES (%(provider)s, %(model)s, %(dimensions)s)
ON CONFLICT (provider, model, dimensions) DO NOTHING"""
MODEL_ID = """
SELECT id FROM embedfill.models
WHERE provider = %(provider)s AND model = %(model)s AND dimensions = %(dimensions)s"""
PROVENANCE_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'embedfill' AND c.relname = 'provenance')"""


# Changing the model (migration.py): embedfill.model_migrations and active_models
# what changes of model are under way, in two numbers: a worker that sees them change
# looks again at which derived targets it takes (worker.py)
OPEN_MIGRATIONS_MARK = """
SELECT pg_catalog.count(*), coalesce(pg_catalog.max(id), 0)
FROM embedfill.model_migrations WHERE phase <> 'finalized'"""
# each change of model under way: its target and the new provider section
OPEN_CHANGES_OF_MODEL = """
SELECT target, to_model ->> 'provider' FROM embedfill.model_migrations WHERE phase <> 'finalized'"""
OPEN_MIGRATION_TARGETS = """
SELECT DISTINCT target FROM embedfill.model_migrations WHERE phase <> 'finalized'"""
OPEN_MIGRATION = """
SELECT id, target, strategy, from_model, to_model, home, phase, job_id, gates,
       created_at, updated_at, cut_over_at, finalized_at
FROM embedfill.model_migrations
WHERE table_oid = %(table_oid)s AND column_name = %(column)s AND phase <> 'finalized'"""
LATEST_MIGRATION = """
SELECT id, target, strategy, from_model, to_model, home, phase, job_id, gates,
       created_at, updated_at, cut_over_at, finalized_at
FROM embedfill.model_migrations
WHERE table_oid = %(table_oid)s AND column_name = %(column)s
ORDER BY (phase <> 'finalized') DESC, id DESC LIMIT 1"""
INSERT_MIGRATION = """
INSERT INTO embedfill.model_migrations
    (target, table_oid, column_name, strategy, from_model, to_model, home, phase, actor)
VALUES (%(target)s, %(table_oid)s, %(column)s, %(strategy)s, %(from_model)s, %(to_model)s,
        %(home)s, 'planned', %(actor)s)
RETURNING id"""
SET_MIGRATION_PHASE = """
UPDATE embedfill.model_migrations SET phase = %(phase)s, updated_at = pg_catalog.now()
WHERE id = %(id)s AND (%(was)s::text IS NULL OR phase = %(was)s)
RETURNING id"""
# in the transaction that makes a change's home: its phase, the row held until the
# commit (a rollback's phase change waits for it, and a finalize after sees the home)
LOCK_MIGRATION_PHASE = """
SELECT phase FROM embedfill.model_migrations WHERE id = %(id)s FOR UPDATE"""
SET_MIGRATION_JOB = """
UPDATE embedfill.model_migrations SET job_id = %(job_id)s, updated_at = pg_catalog.now()
WHERE id = %(id)s"""
ACTIVE_MODEL = """
SELECT schema_name, relation, column_name, provider, model, dimensions, since, migration_id
FROM embedfill.active_models WHERE target = %(target)s"""
SET_MIGRATION_GATES = """
UPDATE embedfill.model_migrations SET gates = %(gates)s, updated_at = pg_catalog.now()
WHERE id = %(id)s"""
CUT_OVER = """
UPDATE embedfill.model_migrations
SET phase = 'cut_over', cut_over_at = pg_catalog.now(), updated_at = pg_catalog.now()
WHERE id = %(id)s"""
FINALIZED = """
UPDATE embedfill.model_migrations
SET phase = 'finalized', finalized_at = pg_catalog.now(), updated_at = pg_catalog.now()
WHERE id = %(id)s"""
SET_ACTIVE_MODEL = """
INSERT INTO embedfill.active_models AS a
    (target, schema_name, relation, column_name, provider, model, dimensions, since, migration_id)
VALUES (%(target)s, %(schema)s, %(relation)s, %(column)s, %(provider)s, %(model)s,
        %(dimensions)s, pg_catalog.now(), %(migration_id)s)
ON CONFLICT (target) DO UPDATE SET schema_name = excluded.schema_name,
    relation = excluded.relation, column_name = excluded.column_name,
    provider = excluded.provider, model = excluded.model, dimensions = excluded.dimensions,
    since = excluded.since, migration_id = excluded.migration_id"""
LATEST_MIGRATION_OF = """
SELECT id, target, strategy, from_model, to_model, home, phase, job_id, gates,
       created_at, updated_at, cut_over_at, finalized_at
FROM embedfill.model_migrations WHERE target = %(target)s
ORDER BY (phase <> 'finalized') DESC, id DESC LIMIT 1"""
MIGRATION_TARGET = "SELECT target FROM embedfill.model_migrations WHERE id = %(id)s"
# Whether a table (by oid) has the column; false when the table is gone.
COLUMN_EXISTS = """
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
               WHERE attrelid = %(oid)s AND attname = %(column)s AND attnum > 0
                 AND NOT attisdropped)"""
# The changes of model finalized since a moment (a job's start): their target, the
# provider section of their new vectors (whose target is derived from the two), and
# whether the app's searches use the new vectors (a cutover's finalize, which dropped the
# old ones; else a rollback's, which dropped the new ones).
FINALIZED_MIGRATIONS_SINCE = """
SELECT m.target, m.to_model ->> 'provider', EXISTS (
    SELECT 1 FROM embedfill.active_models AS a
    WHERE a.target = m.target AND a.migration_id = m.id
      AND a.relation = m.home ->> 'relation' AND a.column_name = m.home ->> 'column')
FROM embedfill.model_migrations AS m
WHERE m.phase = 'finalized' AND m.finalized_at >= %(since)s"""

# the first statement of a transaction whose reads must agree with each other (one
# snapshot), and that writes nothing
SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"

# the type a name (``public.halfvec``) resolves to, NULL when the database has none
TYPE_EXISTS = "SELECT pg_catalog.to_regtype(%s)"
