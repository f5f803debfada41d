-- target: silver.product_cleaned
-- source: bronze.product_raw
--
-- Products (SCD type 1), as for customers: validate, cast, normalise the bronze rows
-- (${lo}, ${hi}]; last valid row of a key wins; identical re-sends are duplicates.
-- Leaves etl_product_changed (product_id, inserted) for the gold refreshes.
-- The batch query has the shape explained in 10_silver_customer.sql.

CREATE TEMP TABLE etl_product_batch ON COMMIT DROP AS
WITH typed AS MATERIALIZED (
    SELECT r._row_id,
           silver.is_blank(r.product_id) AS product_id_missing,
           upper(silver.clean_text(r.sku)) AS sku,
           silver.clean_text(r.name) AS name,
           lower(silver.clean_text(r.category)) AS category,
           initcap(silver.clean_text(r.brand)) AS brand,
           silver.is_blank(r.list_price) AS list_price_missing,
           silver.is_blank(r.unit_cost) AS unit_cost_missing,
           silver.parse_bigint(r.product_id) AS product_id,
           round(silver.parse_numeric(r.list_price), 2) AS list_price,
           round(silver.parse_numeric(r.unit_cost), 2) AS unit_cost,
           silver.parse_date(r.launched_on) AS launched_on,
           coalesce(silver.parse_bool(r.is_active), true) AS is_active
    FROM bronze.product_raw r
    WHERE r._row_id > ${lo} AND r._row_id <= ${hi}
), checked AS MATERIALIZED (
    SELECT t.*,
           CASE
               WHEN t.product_id_missing THEN 'missing_product_id'
               WHEN t.product_id IS NULL OR t.product_id <= 0 THEN 'malformed_product_id'
               WHEN t.name IS NULL THEN 'missing_name'
               WHEN t.sku IS NULL THEN 'missing_sku'
               WHEN t.category IS NULL THEN 'missing_category'
               WHEN t.list_price_missing THEN 'missing_price'
               WHEN t.list_price IS NULL THEN 'malformed_price'
               WHEN t.list_price < 0 THEN 'negative_price'
               WHEN NOT t.unit_cost_missing AND t.unit_cost IS NULL THEN 'malformed_cost'
               WHEN t.unit_cost < 0 THEN 'negative_cost'
           END AS invalid
    FROM typed t
), last_valid AS (
    SELECT product_id, max(_row_id) AS keep
    FROM checked
    WHERE invalid IS NULL
    GROUP BY product_id
    HAVING count(*) > 1
)
SELECT c._row_id, c.product_id, c.sku, c.name, c.category, c.brand, c.list_price, c.unit_cost,
       c.launched_on, c.is_active,
       CASE
           WHEN c.invalid IS NOT NULL THEN c.invalid
           WHEN l.keep <> c._row_id THEN 'duplicate'
       END AS reason
FROM checked c
LEFT JOIN last_valid l ON l.product_id = c.product_id;
ANALYZE etl_product_batch;

-- an upsert as an UPDATE of the keys silver has plus an INSERT of the others: on a first
-- load (all inserts) this is twice as fast as INSERT .. ON CONFLICT, and the two see the same
-- snapshot, so no row is both updated and inserted
CREATE TEMP TABLE etl_product_changed ON COMMIT DROP AS
WITH updated AS (
    UPDATE silver.product_cleaned t
    SET sku = b.sku, name = b.name, category = b.category, brand = b.brand,
        list_price = b.list_price, unit_cost = b.unit_cost, launched_on = b.launched_on,
        is_active = b.is_active, _bronze_row_id = b._row_id, _etl_run_id = ${run_id},
        _loaded_at = now()
    FROM etl_product_batch b
    WHERE b.reason IS NULL AND t.product_id = b.product_id
    AND (t.sku, t.name, t.category, t.brand, t.list_price, t.unit_cost, t.launched_on, t.is_active)
        IS DISTINCT FROM (b.sku, b.name, b.category, b.brand, b.list_price, b.unit_cost,
           b.launched_on, b.is_active)
    RETURNING t.product_id, b._row_id AS _bronze_row_id, false AS inserted
), inserted AS (
    INSERT INTO silver.product_cleaned
        (product_id, sku, name, category, brand, list_price, unit_cost, launched_on, is_active,
         _bronze_row_id, _etl_run_id)
    SELECT product_id, sku, name, category, brand, list_price, unit_cost, launched_on, is_active,
           _row_id, ${run_id}
    FROM etl_product_batch b
    WHERE b.reason IS NULL
      AND NOT EXISTS (SELECT 1 FROM silver.product_cleaned t WHERE t.product_id = b.product_id)
    RETURNING product_id, _bronze_row_id, true AS inserted
)
SELECT * FROM updated
UNION ALL
SELECT * FROM inserted;
ANALYZE etl_product_changed;

UPDATE etl_product_batch b SET reason = 'duplicate'
WHERE b.reason IS NULL
  AND NOT EXISTS (SELECT 1 FROM etl_product_changed c WHERE c._bronze_row_id = b._row_id);

INSERT INTO silver.product_rejects (run_id, bronze_row_id, reason, record)
SELECT ${run_id}, b._row_id, b.reason, to_jsonb(r) - '_row_id'
FROM etl_product_batch b JOIN bronze.product_raw r ON r._row_id = b._row_id
WHERE b.reason IS NOT NULL
  AND r._row_id = ANY (ARRAY(SELECT _row_id FROM etl_product_batch WHERE reason IS NOT NULL));

INSERT INTO silver.data_quality
    (run_id, table_name, source_table, rows_in, rows_inserted, rows_updated, rows_rejected,
     rejects_by_reason)
SELECT ${run_id}, 'silver.product_cleaned', 'bronze.product_raw', b.rows_in,
       (SELECT count(*) FROM etl_product_changed WHERE inserted),
       (SELECT count(*) FROM etl_product_changed WHERE NOT inserted),
       b.rows_rejected, b.reasons
FROM (SELECT coalesce(sum(n), 0) AS rows_in,
             coalesce(sum(n) FILTER (WHERE reason IS NOT NULL), 0) AS rows_rejected,
             coalesce(jsonb_object_agg(reason, n ORDER BY reason)
                      FILTER (WHERE reason IS NOT NULL), '{}') AS reasons
      FROM (SELECT reason, count(*) AS n FROM etl_product_batch GROUP BY reason) x) b;
