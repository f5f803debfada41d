-- target: silver.customer_cleaned
-- source: bronze.customer_raw
--
-- Customers (SCD type 1): validate, cast and normalise the new bronze rows (${lo}, ${hi}];
-- the last valid row of a key in the batch wins, earlier ones are duplicates; a row identical
-- to what silver holds is a duplicate too, a changed one updates it.
-- Leaves etl_customer_changed (customer_id, inserted) for the gold refreshes.
--
-- Shape of the batch query (the same in every silver transform): `typed` trims and casts the
-- bronze text, `checked` gives each row its first failed rule, `last_valid` finds keys landed
-- more than once. `typed` is a MATERIALIZED CTE over the bronze scan alone, so the expensive
-- part (about 10 us a sales row) runs in parallel workers, and each cast is computed once.

CREATE TEMP TABLE etl_customer_batch ON COMMIT DROP AS
WITH typed AS MATERIALIZED (
    SELECT r._row_id,
           r._ingested_at,
           silver.is_blank(r.customer_id) AS customer_id_missing,
           initcap(silver.clean_text(r.first_name)) AS first_name,
           initcap(silver.clean_text(r.last_name)) AS last_name,
           lower(nullif(btrim(r.email), '')) AS email,
           lower(silver.clean_text(r.segment)) AS segment,
           lower(silver.clean_text(r.region)) AS region,
           initcap(silver.clean_text(r.city)) AS city,
           silver.is_blank(r.signup_date) AS signup_date_missing,
           silver.parse_bigint(r.customer_id) AS customer_id,
           silver.parse_date(r.signup_date) AS signup_date
    FROM bronze.customer_raw r
    WHERE r._row_id > ${lo} AND r._row_id <= ${hi}
), checked AS MATERIALIZED (
    SELECT t.*,
           CASE
               WHEN t.customer_id_missing THEN 'missing_customer_id'
               WHEN t.customer_id IS NULL OR t.customer_id <= 0 THEN 'malformed_customer_id'
               WHEN t.email IS NULL THEN 'missing_email'
               WHEN t.email !~ '^[a-z0-9._%+-]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}$'
                   THEN 'malformed_email'
               WHEN t.signup_date_missing THEN 'missing_signup_date'
               WHEN t.signup_date IS NULL THEN 'malformed_signup_date'
               WHEN t.signup_date > (t._ingested_at AT TIME ZONE 'UTC')::date + 1
                   THEN 'future_signup_date'
               WHEN t.segment IS NULL
                 OR t.segment NOT IN ('consumer', 'small_business', 'corporate', 'vip')
                   THEN 'invalid_segment'
               WHEN t.region IS NULL THEN 'missing_region'
           END AS invalid
    FROM typed t
), last_valid AS (
    -- keys seen more than once among the valid rows: the last one landed wins
    SELECT customer_id, max(_row_id) AS keep
    FROM checked
    WHERE invalid IS NULL
    GROUP BY customer_id
    HAVING count(*) > 1
)
SELECT c._row_id, c.customer_id, c.first_name, c.last_name, c.email, c.segment, c.region,
       c.city, c.signup_date,
       CASE
           WHEN c.invalid IS NOT NULL THEN c.invalid
           WHEN l.keep <> c._row_id THEN 'duplicate'
       END AS reason
FROM checked c
LEFT JOIN last_valid l ON l.customer_id = c.customer_id;
ANALYZE etl_customer_batch;

-- an upsert as an UPDATE of the keys silver has plus an INSERT of the others: on a first
-- load (all inserts) this is twice as fast as INSERT .. ON CONFLICT, and the two see the same
-- snapshot, so no row is both updated and inserted
CREATE TEMP TABLE etl_customer_changed ON COMMIT DROP AS
WITH updated AS (
    UPDATE silver.customer_cleaned t
    SET first_name = b.first_name, last_name = b.last_name, email = b.email, segment = b.segment,
        region = b.region, city = b.city, signup_date = b.signup_date, _bronze_row_id = b._row_id,
        _etl_run_id = ${run_id}, _loaded_at = now()
    FROM etl_customer_batch b
    WHERE b.reason IS NULL AND t.customer_id = b.customer_id
    AND (t.first_name, t.last_name, t.email, t.segment, t.region, t.city, t.signup_date)
        IS DISTINCT FROM (b.first_name, b.last_name, b.email, b.segment, b.region, b.city,
           b.signup_date)
    RETURNING t.customer_id, b._row_id AS _bronze_row_id, false AS inserted
), inserted AS (
    INSERT INTO silver.customer_cleaned
        (customer_id, first_name, last_name, email, segment, region, city, signup_date,
         _bronze_row_id, _etl_run_id)
    SELECT customer_id, first_name, last_name, email, segment, region, city, signup_date, _row_id,
           ${run_id}
    FROM etl_customer_batch b
    WHERE b.reason IS NULL
      AND NOT EXISTS (SELECT 1 FROM silver.customer_cleaned t WHERE t.customer_id = b.customer_id)
    RETURNING customer_id, _bronze_row_id, true AS inserted
)
SELECT * FROM updated
UNION ALL
SELECT * FROM inserted;
ANALYZE etl_customer_changed;

-- valid rows that changed nothing: identical re-sends
UPDATE etl_customer_batch b SET reason = 'duplicate'
WHERE b.reason IS NULL
  AND NOT EXISTS (SELECT 1 FROM etl_customer_changed c WHERE c._bronze_row_id = b._row_id);

INSERT INTO silver.customer_rejects (run_id, bronze_row_id, reason, record)
SELECT ${run_id}, b._row_id, b.reason, to_jsonb(r) - '_row_id'
FROM etl_customer_batch b JOIN bronze.customer_raw r ON r._row_id = b._row_id
WHERE b.reason IS NOT NULL
  AND r._row_id = ANY (ARRAY(SELECT _row_id FROM etl_customer_batch WHERE reason IS NOT NULL));

INSERT INTO silver.data_quality
    (run_id, table_name, source_table, rows_in, rows_inserted, rows_updated, rows_rejected,
     rejects_by_reason)
SELECT ${run_id}, 'silver.customer_cleaned', 'bronze.customer_raw', b.rows_in,
       (SELECT count(*) FROM etl_customer_changed WHERE inserted),
       (SELECT count(*) FROM etl_customer_changed WHERE NOT inserted),
       b.rows_rejected, b.reasons
FROM (SELECT coalesce(sum(n), 0) AS rows_in,
             coalesce(sum(n) FILTER (WHERE reason IS NOT NULL), 0) AS rows_rejected,
             coalesce(jsonb_object_agg(reason, n ORDER BY reason)
                      FILTER (WHERE reason IS NOT NULL), '{}') AS reasons
      FROM (SELECT reason, count(*) AS n FROM etl_customer_batch GROUP BY reason) x) b;
