-- Runs are exclusive per physical column (the table's oid and the column), not per
-- target name: `docs` and `public.docs`, or two target names for one table, are one.
ALTER TABLE embedfill.runs
    ADD COLUMN table_oid   oid,
    ADD COLUMN column_name text;
CREATE INDEX runs_physical_active ON embedfill.runs (table_oid, column_name)
    WHERE status IN ('queued', 'running');
