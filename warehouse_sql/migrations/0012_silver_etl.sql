-- The ETL's own books: runs, watermarks, the data-quality summary and the rejected rows.

-- One row per `pgsage warehouse etl` run. A run is one transaction: it commits whole
-- ('succeeded') or leaves nothing but a 'failed' row with the error.
CREATE TABLE IF NOT EXISTS silver.etl_runs (
    run_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    status       text NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'succeeded', 'failed')),
    error        text,
    summary      jsonb
);

-- Highest bronze _row_id already taken to silver, per bronze table: the next run starts above.
CREATE TABLE IF NOT EXISTS silver.etl_watermarks (
    source_table  text PRIMARY KEY,
    last_row_id   bigint NOT NULL DEFAULT 0,
    last_run_id   bigint REFERENCES silver.etl_runs (run_id) ON DELETE SET NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS etl_watermarks_last_run_id_idx ON silver.etl_watermarks (last_run_id);
INSERT INTO silver.etl_watermarks (source_table) VALUES
    ('bronze.customer_raw'), ('bronze.product_raw'), ('bronze.sales_raw'), ('bronze.inventory_raw')
ON CONFLICT (source_table) DO NOTHING;

-- Rows in, out and rejected (by reason) per silver table per run.
-- rows_in = rows_inserted + rows_updated + rows_rejected.
CREATE TABLE IF NOT EXISTS silver.data_quality (
    run_id             bigint NOT NULL REFERENCES silver.etl_runs (run_id) ON DELETE CASCADE,
    table_name         text NOT NULL,
    source_table       text NOT NULL,
    rows_in            bigint NOT NULL,
    rows_inserted      bigint NOT NULL,
    rows_updated       bigint NOT NULL,
    rows_rejected      bigint NOT NULL,
    rejects_by_reason  jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, table_name)
);

-- Rejected bronze rows, each with its reason and the row as landed (as jsonb).
CREATE TABLE IF NOT EXISTS silver.customer_rejects (
    reject_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         bigint NOT NULL REFERENCES silver.etl_runs (run_id) ON DELETE CASCADE,
    bronze_row_id  bigint NOT NULL,
    reason         text NOT NULL,
    record         jsonb NOT NULL,
    rejected_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS customer_rejects_run_id_idx ON silver.customer_rejects (run_id);

CREATE TABLE IF NOT EXISTS silver.product_rejects (
    reject_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         bigint NOT NULL REFERENCES silver.etl_runs (run_id) ON DELETE CASCADE,
    bronze_row_id  bigint NOT NULL,
    reason         text NOT NULL,
    record         jsonb NOT NULL,
    rejected_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS product_rejects_run_id_idx ON silver.product_rejects (run_id);

CREATE TABLE IF NOT EXISTS silver.sales_rejects (
    reject_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         bigint NOT NULL REFERENCES silver.etl_runs (run_id) ON DELETE CASCADE,
    bronze_row_id  bigint NOT NULL,
    reason         text NOT NULL,
    record         jsonb NOT NULL,
    rejected_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sales_rejects_run_id_idx ON silver.sales_rejects (run_id);

CREATE TABLE IF NOT EXISTS silver.inventory_rejects (
    reject_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         bigint NOT NULL REFERENCES silver.etl_runs (run_id) ON DELETE CASCADE,
    bronze_row_id  bigint NOT NULL,
    reason         text NOT NULL,
    record         jsonb NOT NULL,
    rejected_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS inventory_rejects_run_id_idx ON silver.inventory_rejects (run_id);
