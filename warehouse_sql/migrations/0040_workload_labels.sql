-- The workload simulator's ground truth (bench/workload): one row per run, and one row per
-- injected anomaly. Every execution an anomaly affects carries its label in the SQL text as
-- /* pgsage:label=KIND:ID */, which the proxy copies into metadata.query_logs.label, so
--   SELECT ... FROM metadata.query_logs q JOIN metadata.workload_labels w USING (label)
-- gives the labelled executions. Windows are in simulated time, like query_logs.started_at.

CREATE TABLE IF NOT EXISTS metadata.workload_runs (
    run_id          text PRIMARY KEY,
    seed            bigint NOT NULL,
    clock_start     timestamptz NOT NULL,   -- simulated time at the run's first moment
    clock_speed     double precision NOT NULL,
    duration_s      double precision NOT NULL,   -- real seconds
    qps             double precision NOT NULL,
    users           jsonb NOT NULL,              -- users per role
    planned         bigint NOT NULL,             -- statements in the plan
    executed        bigint,                      -- statements sent (filled at the end)
    errors          bigint,
    started_at      timestamptz NOT NULL DEFAULT now(),   -- real time
    finished_at     timestamptz
);

CREATE TABLE IF NOT EXISTS metadata.workload_labels (
    label                text PRIMARY KEY,     -- KIND:ID, as in query_logs.label
    run_id               text NOT NULL REFERENCES metadata.workload_runs (run_id) ON DELETE CASCADE,
    kind                 text NOT NULL CHECK (kind IN ('lock_contention', 'seq_scan', 'rate_burst',
                                                       'error_burst', 'heavy_unseen', 'drift')),
    window_start         timestamptz NOT NULL,   -- simulated time
    window_end           timestamptz NOT NULL,
    affected_templates   text[] NOT NULL,
    expected_executions  integer NOT NULL,       -- labelled statements in the plan
    executed             integer,                -- labelled statements sent (filled at the end)
    description          text NOT NULL,
    detail               jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (window_end >= window_start)
);
CREATE INDEX IF NOT EXISTS workload_labels_run ON metadata.workload_labels (run_id);
CREATE INDEX IF NOT EXISTS workload_labels_window
    ON metadata.workload_labels (window_start, window_end);
