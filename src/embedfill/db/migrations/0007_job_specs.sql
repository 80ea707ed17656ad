-- Every job knows what it is (jobs/spec.py): its kind, and the spec it was created with
-- (the physical column and the fingerprint of the settings that decide its vectors). A
-- worker whose own settings differ refuses the job's chunks; its row of workers says why.
ALTER TABLE embedfill.runs
    ADD COLUMN kind text,
    ADD COLUMN spec jsonb;
UPDATE embedfill.runs SET kind = CASE
    WHEN parameters->>'watch' = 'true' THEN 'watch'
    WHEN parameters->>'refresh' = 'true' THEN 'refresh'
    ELSE 'backfill' END
WHERE NOT dry_run;

ALTER TABLE embedfill.workers ADD COLUMN refused text;

-- A chunk runs on one worker at a time. The claim takes a chunk that is `todo`, or
-- `doing` for a worker that is gone (its session lock is free) or silent (its heartbeat,
-- moved by the worker every lease/3 seconds, older than that worker's own lease,
-- `lease_s`, whatever the lease of the worker that looks); nothing else. The
-- queue (procrastinate) only rings workers: `rung_at` is when a chunk was last rung, so a
-- chunk whose queue entry was lost (or never made) is rung again.
ALTER TABLE embedfill.chunks
    ADD COLUMN heartbeat_at timestamptz,
    ADD COLUMN lease_s real,
    ADD COLUMN rung_at timestamptz;
UPDATE embedfill.chunks SET heartbeat_at = started_at, rung_at = started_at
WHERE state IN ('todo', 'doing');
CREATE INDEX chunks_doing_worker ON embedfill.chunks (worker) WHERE state = 'doing';

-- A job's counts are committed with the rows they count: each guarded write adds the
-- rows it wrote, per tenant, to its writer's own row here in the same statement (no two
-- writers share a row, so no write waits for another's). A job's `embedded` is their
-- sum: exact after kill -9, a lost connection or a restart of the server. (A job created
-- before this version, without `tenants_before` in its parameters, keeps counting what its
-- workers reported: its rows written before have no tally.)
CREATE TABLE embedfill.tallies (
    run_id     bigint NOT NULL REFERENCES embedfill.runs (id) ON DELETE CASCADE,
    worker     text   NOT NULL,
    writer     integer NOT NULL,  -- the writing server process
    tenant_key text   NOT NULL,  -- 't' || tenant, or 'n' for rows without one
    tenant     text,
    embedded   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, worker, writer, tenant_key)
);

-- Roles that run workers (granted the audit trail, as the README says) write it too.
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
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON embedfill.tallies TO %s', who);
    END LOOP;
    -- and roles that read jobs (the job routes read the tallies)
    FOR g IN
        SELECT DISTINCT grantee FROM information_schema.role_table_grants
        WHERE table_schema = 'embedfill' AND table_name = 'runs'
          AND privilege_type = 'SELECT' AND grantee <> current_user
    LOOP
        who := CASE WHEN g.grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(g.grantee) END;
        EXECUTE format('GRANT SELECT ON embedfill.tallies TO %s', who);
    END LOOP;
END $$;
