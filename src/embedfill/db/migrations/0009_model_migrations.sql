-- Changing the model (`embedfill model …`): one row per change of a target's model.
-- The new vectors live in ``home`` (a side table keyed by the row id, or a shadow column
-- on the live table); ``phase`` moves filling -> indexing -> ready -> cut_over (and back,
-- rolled_back) -> finalized. One open change per table column at a time.
CREATE TABLE IF NOT EXISTS embedfill.model_migrations (
    id bigserial PRIMARY KEY,
    target text NOT NULL,
    table_oid oid NOT NULL,
    column_name text NOT NULL,
    strategy text NOT NULL CHECK (strategy IN ('table', 'column')),
    from_model jsonb NOT NULL,
    to_model jsonb NOT NULL,
    home jsonb NOT NULL,
    phase text NOT NULL,
    job_id bigint,
    gates jsonb,
    actor text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    cut_over_at timestamptz,
    finalized_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS model_migrations_open
    ON embedfill.model_migrations (table_oid, column_name) WHERE phase <> 'finalized';

-- Which vectors the app's searches use, per target: written at cutover and rollback;
-- ``embedfill.active(target)`` reads it (no row: the target's own column).
CREATE TABLE IF NOT EXISTS embedfill.active_models (
    target text PRIMARY KEY,
    schema_name text NOT NULL,
    relation text NOT NULL,
    column_name text NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    dimensions integer NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    migration_id bigint
);
