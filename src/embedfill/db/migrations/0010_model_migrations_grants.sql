-- Roles already granted the audit trail (the least-privilege GRANTs of
-- docs/configuration.md, given before version 9) read the changes of model too: workers
-- and watch look for changes under way, the app reads which vectors are active
-- (embedfill.active). Copy their grants from runs, as earlier versions did.
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
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON embedfill.model_migrations,'
            ' embedfill.active_models TO %s', who);
        EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA embedfill TO %s', who);
    END LOOP;
END $$;
