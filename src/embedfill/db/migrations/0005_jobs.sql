-- Jobs: a backfill cut into chunks that workers on any machine claim (jobs.py).
-- procrastinate's own tables and functions (the queue, worker heartbeats) are created in
-- this schema just before this file runs (db/schema.py installs them); these tables are
-- embedfill's record of each chunk and of what each worker did for a job.

-- A chunk is the rows of the job's target with lo < id <= hi (lo NULL: from the first
-- id; hi NULL: to the last) that still need an embedding when a worker works on it.
-- Bounds are JSON (an integer, or the id as text) and compared by the server, in the
-- column's own type and collation.
CREATE TABLE embedfill.chunks (
    run_id      bigint      NOT NULL REFERENCES embedfill.runs (id) ON DELETE CASCADE,
    seq         integer     NOT NULL,
    lo          jsonb,
    hi          jsonb,
    state       text        NOT NULL DEFAULT 'todo',  -- todo, doing, done, cancelled
    attempts    integer     NOT NULL DEFAULT 0,
    worker      text,
    started_at  timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX chunks_open ON embedfill.chunks (run_id) WHERE state IN ('todo', 'doing');

-- One row per worker process that worked on a job: where it ran and its own report
-- (counts, per tenant), flushed every second; a job's totals are the sum of these.
CREATE TABLE embedfill.workers (
    run_id       bigint      NOT NULL REFERENCES embedfill.runs (id) ON DELETE CASCADE,
    worker       text        NOT NULL,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    chunks       integer     NOT NULL DEFAULT 0,
    report       jsonb       NOT NULL DEFAULT '{}',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, worker)
);

-- Every procrastinate function resolves its tables in this schema, whoever calls it.
DO $$
DECLARE f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS sig FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'embedfill' AND p.proname LIKE 'procrastinate%'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = embedfill, pg_catalog', f.sig);
    END LOOP;
END $$;

-- Roles already granted the audit trail (the README's least-privilege GRANTs) run
-- workers too: copy their grants from runs, and give them the queue.
DO $$
DECLARE g record;
DECLARE who text;
BEGIN
    FOR g IN
        SELECT DISTINCT grantee FROM information_schema.role_table_grants
        WHERE table_schema = 'embedfill' AND table_name = 'runs'
          AND privilege_type = 'UPDATE' AND grantee <> current_user
    LOOP
        who := CASE WHEN g.grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(g.grantee) END;
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON embedfill.chunks, embedfill.workers TO %s', who);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON embedfill.procrastinate_jobs,'
            ' embedfill.procrastinate_workers, embedfill.procrastinate_events,'
            ' embedfill.procrastinate_periodic_defers TO %s', who);
        EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA embedfill TO %s', who);
    END LOOP;
END $$;
