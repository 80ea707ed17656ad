-- Freshness: what embedfill wrote, from which text, with which model (freshness.py).
-- Nothing here alters a user's table: provenance lives in embedfill's schema, keyed by
-- the physical column and the row's id (as text).

-- A physical vector column (schema, table, column), numbered so provenance rows are small.
CREATE TABLE embedfill.vector_columns (
    id          serial PRIMARY KEY,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    column_name text NOT NULL,
    UNIQUE (schema_name, table_name, column_name)
);

-- A model as configured (provider kind, model name, dimensions), numbered likewise.
CREATE TABLE embedfill.models (
    id         serial PRIMARY KEY,
    provider   text    NOT NULL,
    model      text    NOT NULL,
    dimensions integer NOT NULL,
    UNIQUE (provider, model, dimensions)
);

-- One row per row embedfill wrote (or adopted): md5 of the exact text it embedded (as
-- rendered from the template, before truncation), the model, and when. Fixed-width
-- columns first (no padding): about 60 bytes plus the id's text per row, and the key index.
CREATE TABLE embedfill.provenance (
    column_id   integer     NOT NULL,
    model_id    integer     NOT NULL,
    text_md5    uuid        NOT NULL,
    embedded_at timestamptz NOT NULL,
    row_key     text        NOT NULL,
    PRIMARY KEY (column_id, row_key)
) WITH (fillfactor = 90);

-- Row ids queued by the change triggers (`embedfill triggers install`) for `watch`.
-- Append-only with no constraint or index: an application's INSERT or UPDATE adds one
-- row here and can never conflict, wait or fail on it. The watcher drains it.
-- UNLOGGED: queuing writes no WAL, so the app's writes pay less for the trigger. A crash
-- empties it, and loses nothing: a watcher that reconnects sweeps the table first.
CREATE UNLOGGED TABLE embedfill.changes (
    column_id integer     NOT NULL,
    row_key   text        NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A chunk of a watch job is a list of row ids (as text) rather than a range.
ALTER TABLE embedfill.chunks ADD COLUMN keys jsonb;

-- Roles already granted the audit trail (the README's least-privilege GRANTs) keep
-- provenance as they write: copy their grants from runs.
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
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON embedfill.vector_columns,'
            ' embedfill.models, embedfill.provenance, embedfill.changes TO %s', who);
        EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA embedfill TO %s', who);
    END LOOP;
END $$;
