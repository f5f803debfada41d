-- Gold freshness: the days of silver sales lines written outside the ETL (inserted, updated,
-- deleted or truncated by anything but `pgsage warehouse etl`). gold.sales_summary is exact for
-- every other day; the ETL recomputes these days in its next run and clears them. The proxy's
-- gold rewrite (optimizer/rules/gold_aggregate.py) takes its watermark from here: the day
-- before the first stale day. TRUNCATE marks '-infinity': nothing is exact until a full
-- refresh. The ETL sets pgsage.etl_run for its transaction, so its own writes are not noted.

CREATE TABLE IF NOT EXISTS silver.sales_stale_days (
    sale_date  date PRIMARY KEY,
    since      timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION silver.note_stale_sales_days() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('pgsage.etl_run', true), '') <> '' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO silver.sales_stale_days (sale_date) VALUES ('-infinity')
        ON CONFLICT DO NOTHING;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO silver.sales_stale_days (sale_date)
        SELECT DISTINCT sold_at::date FROM stale_new ON CONFLICT DO NOTHING;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO silver.sales_stale_days (sale_date)
        SELECT DISTINCT sold_at::date FROM stale_old ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

-- one trigger per event: transition tables allow no more than one event per trigger
DROP TRIGGER IF EXISTS sales_stale_insert ON silver.sales_cleaned;
CREATE TRIGGER sales_stale_insert AFTER INSERT ON silver.sales_cleaned
    REFERENCING NEW TABLE AS stale_new
    FOR EACH STATEMENT EXECUTE FUNCTION silver.note_stale_sales_days();
DROP TRIGGER IF EXISTS sales_stale_update ON silver.sales_cleaned;
CREATE TRIGGER sales_stale_update AFTER UPDATE ON silver.sales_cleaned
    REFERENCING OLD TABLE AS stale_old NEW TABLE AS stale_new
    FOR EACH STATEMENT EXECUTE FUNCTION silver.note_stale_sales_days();
DROP TRIGGER IF EXISTS sales_stale_delete ON silver.sales_cleaned;
CREATE TRIGGER sales_stale_delete AFTER DELETE ON silver.sales_cleaned
    REFERENCING OLD TABLE AS stale_old
    FOR EACH STATEMENT EXECUTE FUNCTION silver.note_stale_sales_days();
DROP TRIGGER IF EXISTS sales_stale_truncate ON silver.sales_cleaned;
CREATE TRIGGER sales_stale_truncate AFTER TRUNCATE ON silver.sales_cleaned
    FOR EACH STATEMENT EXECUTE FUNCTION silver.note_stale_sales_days();
