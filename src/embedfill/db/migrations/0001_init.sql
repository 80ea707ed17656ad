-- embedfill's own audit trail and key store.
CREATE TABLE embedfill.runs (
    id                 bigserial PRIMARY KEY,
    target             text        NOT NULL,
    actor              text        NOT NULL,
    parameters         jsonb       NOT NULL DEFAULT '{}',
    dry_run            boolean     NOT NULL,
    status             text        NOT NULL,
    missing_before     integer,
    embedded           integer     NOT NULL DEFAULT 0,
    skipped            integer     NOT NULL DEFAULT 0,
    failed             integer     NOT NULL DEFAULT 0,
    requests           integer     NOT NULL DEFAULT 0,
    tokens             bigint      NOT NULL DEFAULT 0,
    estimated_cost_usd numeric(14, 6),
    progress           jsonb,
    report             jsonb,
    error              text,
    started_at         timestamptz NOT NULL DEFAULT now(),
    heartbeat_at       timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);
CREATE INDEX runs_target_started ON embedfill.runs (target, started_at DESC);

CREATE TABLE embedfill.failures (
    id          bigserial PRIMARY KEY,
    run_id      bigint      NOT NULL REFERENCES embedfill.runs (id) ON DELETE CASCADE,
    row_id      text        NOT NULL,
    tenant      text,
    error_class text        NOT NULL,
    message     text        NOT NULL,
    attempts    integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX failures_run ON embedfill.failures (run_id);

CREATE TABLE embedfill.tenant_keys (
    tenant     text PRIMARY KEY,
    ciphertext bytea       NOT NULL,
    key_hint   text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
