-- Failed rows come back. A failure for a passing cause (the provider down or slow, a 429,
-- no key or a rejected one, a database error) is retried by `watch` from `retry_at`,
-- a backoff doubling with the row's `tries` in its job; at once when its tenant's key
-- changes (`keys set`, or another key from tenant_key_sql: `key_digest` is a digest of
-- the key tried, never the key). A provider's rejection of the input itself (retry_at
-- NULL) waits until the row's text (`text_md5`) changes.
--
-- One row per job and row: a retry that fails again updates it (a watch retrying a row
-- with no key for a month would otherwise add a row per try). Rows recorded twice by
-- earlier releases (a chunk handed back and failed again) keep their latest record.
ALTER TABLE embedfill.failures
    ADD COLUMN IF NOT EXISTS text_md5 uuid,
    ADD COLUMN IF NOT EXISTS retry_at timestamptz,
    ADD COLUMN IF NOT EXISTS key_digest text,
    ADD COLUMN IF NOT EXISTS tries integer NOT NULL DEFAULT 1;
DELETE FROM embedfill.failures f
USING embedfill.failures g
WHERE g.run_id = f.run_id AND g.row_id = f.row_id AND g.id > f.id;
CREATE UNIQUE INDEX IF NOT EXISTS failures_run_row ON embedfill.failures (run_id, row_id);
