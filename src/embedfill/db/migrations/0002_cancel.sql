-- A cancel asked for through the admin API reaches the run's own process, wherever it is.
ALTER TABLE embedfill.runs ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
