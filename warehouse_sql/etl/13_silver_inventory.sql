-- target: silver.inventory_cleaned
-- source: bronze.inventory_raw
--
-- Inventory snapshots (a corrected re-send of a snapshot updates it): validate, cast and
-- normalise the bronze rows (${lo}, ${hi}]; products must exist in silver.
-- Leaves etl_inventory_changed (warehouse_id, product_id, snapshot_date, inserted).
-- The batch query has the shape explained in 10_silver_customer.sql.

CREATE TEMP TABLE etl_inventory_batch ON COMMIT DROP AS
WITH typed AS MATERIALIZED (
    SELECT r._row_id,
           r._ingested_at,
           silver.is_blank(r.warehouse_id) AS warehouse_id_missing,
           upper(silver.clean_text(r.warehouse_code)) AS warehouse_code,
           silver.is_blank(r.product_id) AS product_id_missing,
           silver.is_blank(r.snapshot_date) AS snapshot_date_missing,
           silver.is_blank(r.quantity_on_hand) AS quantity_missing,
           silver.is_blank(r.unit_cost) AS unit_cost_missing,
           silver.parse_int(r.warehouse_id) AS warehouse_id,
           silver.parse_bigint(r.product_id) AS product_id,
           silver.parse_date(r.snapshot_date) AS snapshot_date,
           silver.parse_int(r.quantity_on_hand) AS quantity_on_hand,
           silver.parse_int(r.reorder_point) AS reorder_point,
           round(silver.parse_numeric(r.unit_cost), 2) AS unit_cost
    FROM bronze.inventory_raw r
    WHERE r._row_id > ${lo} AND r._row_id <= ${hi}
), checked AS MATERIALIZED (
    SELECT t.*,
           CASE
               WHEN t.warehouse_id_missing THEN 'missing_warehouse_id'
               WHEN t.warehouse_id IS NULL THEN 'malformed_warehouse_id'
               WHEN t.warehouse_code IS NULL THEN 'missing_warehouse_code'
               WHEN t.product_id_missing THEN 'missing_product_id'
               WHEN t.product_id IS NULL THEN 'malformed_product_id'
               WHEN t.snapshot_date_missing THEN 'missing_snapshot_date'
               WHEN t.snapshot_date IS NULL THEN 'malformed_snapshot_date'
               WHEN t.snapshot_date > (t._ingested_at AT TIME ZONE 'UTC')::date + 1
                   THEN 'future_snapshot_date'
               WHEN t.quantity_missing THEN 'missing_quantity'
               WHEN t.quantity_on_hand IS NULL THEN 'malformed_quantity'
               WHEN t.quantity_on_hand < 0 THEN 'negative_quantity'
               WHEN t.reorder_point IS NULL OR t.reorder_point < 0 THEN 'invalid_reorder_point'
               WHEN NOT t.unit_cost_missing AND t.unit_cost IS NULL THEN 'malformed_cost'
               WHEN t.unit_cost < 0 THEN 'negative_cost'
               WHEN p.product_id IS NULL THEN 'unknown_product'
           END AS invalid
    FROM typed t
    LEFT JOIN silver.product_cleaned p ON p.product_id = t.product_id
), last_valid AS (
    SELECT warehouse_id, product_id, snapshot_date, max(_row_id) AS keep
    FROM checked
    WHERE invalid IS NULL
    GROUP BY warehouse_id, product_id, snapshot_date
    HAVING count(*) > 1
)
SELECT c._row_id, c.warehouse_id, c.warehouse_code, c.product_id, c.snapshot_date,
       c.quantity_on_hand, c.reorder_point, c.unit_cost,
       CASE
           WHEN c.invalid IS NOT NULL THEN c.invalid
           WHEN l.keep <> c._row_id THEN 'duplicate'
       END AS reason
FROM checked c
LEFT JOIN last_valid l
       ON l.warehouse_id = c.warehouse_id AND l.product_id = c.product_id
      AND l.snapshot_date = c.snapshot_date;
ANALYZE etl_inventory_batch;

-- an upsert as an UPDATE of the keys silver has plus an INSERT of the others: on a first
-- load (all inserts) this is twice as fast as INSERT .. ON CONFLICT, and the two see the same
-- snapshot, so no row is both updated and inserted
CREATE TEMP TABLE etl_inventory_changed ON COMMIT DROP AS
WITH updated AS (
    UPDATE silver.inventory_cleaned t
    SET warehouse_code = b.warehouse_code, quantity_on_hand = b.quantity_on_hand,
        reorder_point = b.reorder_point, unit_cost = b.unit_cost, _bronze_row_id = b._row_id,
        _etl_run_id = ${run_id}, _loaded_at = now()
    FROM etl_inventory_batch b
    WHERE b.reason IS NULL AND t.warehouse_id = b.warehouse_id AND t.product_id = b.product_id
      AND t.snapshot_date = b.snapshot_date
    AND (t.warehouse_code, t.quantity_on_hand, t.reorder_point, t.unit_cost)
        IS DISTINCT FROM (b.warehouse_code, b.quantity_on_hand, b.reorder_point, b.unit_cost)
    RETURNING t.warehouse_id, t.product_id, t.snapshot_date, b._row_id AS _bronze_row_id,
              false AS inserted
), inserted AS (
    INSERT INTO silver.inventory_cleaned
        (warehouse_id, product_id, snapshot_date, warehouse_code, quantity_on_hand, reorder_point,
         unit_cost, _bronze_row_id, _etl_run_id)
    SELECT warehouse_id, product_id, snapshot_date, warehouse_code, quantity_on_hand,
           reorder_point, unit_cost, _row_id, ${run_id}
    FROM etl_inventory_batch b
    WHERE b.reason IS NULL
      AND NOT EXISTS (SELECT 1 FROM silver.inventory_cleaned t
                      WHERE t.warehouse_id = b.warehouse_id AND t.product_id = b.product_id
                        AND t.snapshot_date = b.snapshot_date)
    RETURNING warehouse_id, product_id, snapshot_date, _bronze_row_id, true AS inserted
)
SELECT * FROM updated
UNION ALL
SELECT * FROM inserted;
ANALYZE etl_inventory_changed;

UPDATE etl_inventory_batch b SET reason = 'duplicate'
WHERE b.reason IS NULL
  AND NOT EXISTS (SELECT 1 FROM etl_inventory_changed c WHERE c._bronze_row_id = b._row_id);

INSERT INTO silver.inventory_rejects (run_id, bronze_row_id, reason, record)
SELECT ${run_id}, b._row_id, b.reason, to_jsonb(r) - '_row_id'
FROM etl_inventory_batch b JOIN bronze.inventory_raw r ON r._row_id = b._row_id
WHERE b.reason IS NOT NULL
  AND r._row_id = ANY (ARRAY(SELECT _row_id FROM etl_inventory_batch WHERE reason IS NOT NULL));

INSERT INTO silver.data_quality
    (run_id, table_name, source_table, rows_in, rows_inserted, rows_updated, rows_rejected,
     rejects_by_reason)
SELECT ${run_id}, 'silver.inventory_cleaned', 'bronze.inventory_raw', b.rows_in,
       (SELECT count(*) FROM etl_inventory_changed WHERE inserted),
       (SELECT count(*) FROM etl_inventory_changed WHERE NOT inserted),
       b.rows_rejected, b.reasons
FROM (SELECT coalesce(sum(n), 0) AS rows_in,
             coalesce(sum(n) FILTER (WHERE reason IS NOT NULL), 0) AS rows_rejected,
             coalesce(jsonb_object_agg(reason, n ORDER BY reason)
                      FILTER (WHERE reason IS NOT NULL), '{}') AS reasons
      FROM (SELECT reason, count(*) AS n FROM etl_inventory_batch GROUP BY reason) x) b;
