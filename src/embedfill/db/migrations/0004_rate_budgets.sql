-- One rate budget per API key and model, shared by every run in every process: rpm and
-- tpm are totals across all of them, and a 429's Retry-After pauses them all.
-- key_id is a one-way hash of the provider's URL, the model and the key, never the key.
CREATE TABLE embedfill.rate_budgets (
    key_id       text             PRIMARY KEY,
    req_level    double precision NOT NULL,
    tok_level    double precision NOT NULL,
    updated_at   timestamptz      NOT NULL DEFAULT clock_timestamp(),
    paused_until timestamptz      NOT NULL DEFAULT '-infinity'
);

-- Roles already granted the audit trail (the README's least-privilege GRANTs) need the
-- budget too, or their next run would fail on it: copy their grants from runs.
DO $$
DECLARE g record;
BEGIN
    FOR g IN
        SELECT DISTINCT grantee, privilege_type FROM information_schema.role_table_grants
        WHERE table_schema = 'embedfill' AND table_name = 'runs'
          AND privilege_type IN ('SELECT', 'INSERT', 'UPDATE') AND grantee <> current_user
    LOOP
        EXECUTE format(
            'GRANT %s ON embedfill.rate_budgets TO %s', g.privilege_type,
            CASE WHEN g.grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(g.grantee) END);
    END LOOP;
END $$;
