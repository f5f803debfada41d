-- target: silver.sales_cleaned
-- source: bronze.sales_raw
--
-- Sales lines (facts, insert-only): validate, cast and normalise the bronze rows
-- (${lo}, ${hi}]; keys must exist in silver customers and products (processed earlier in the
-- same run); a line already in silver, or repeated in the batch, is a duplicate.
-- Leaves etl_sales_changed (transaction_id, line_no, customer_id, product_id, warehouse_id,
-- sale_date) for the gold refreshes.
-- The batch query has the shape explained in 10_silver_customer.sql.

CREATE TEMP TABLE etl_sales_batch ON COMMIT DROP AS
WITH typed AS MATERIALIZED (
    SELECT r._row_id,
           r._ingested_at,
           silver.is_blank(r.transaction_id) AS transaction_id_missing,
           lower(nullif(btrim(r.transaction_type), '')) AS transaction_type,
           silver.is_blank(r.customer_id) AS customer_id_missing,
           silver.is_blank(r.product_id) AS product_id_missing,
           lower(nullif(btrim(r.channel), '')) AS channel,
           silver.is_blank(r.sold_at) AS sold_at_missing,
           silver.is_blank(r.quantity) AS quantity_missing,
           silver.is_blank(r.unit_price) AS unit_price_missing,
           silver.parse_bigint(r.transaction_id) AS transaction_id,
           silver.parse_int(r.line_no) AS line_no,
           silver.parse_bigint(r.original_transaction_id) AS original_transaction_id,
           silver.parse_bigint(r.customer_id) AS customer_id,
           silver.parse_bigint(r.product_id) AS product_id,
           silver.parse_int(r.warehouse_id) AS warehouse_id,
           silver.parse_timestamp(r.sold_at) AS sold_at,
           silver.parse_int(r.quantity) AS quantity,
           round(silver.parse_numeric(r.unit_price), 2) AS unit_price,
           coalesce(round(silver.parse_numeric(r.discount_pct), 3), 0) AS discount_pct
    FROM bronze.sales_raw r
    WHERE r._row_id > ${lo} AND r._row_id <= ${hi}
), checked AS MATERIALIZED (
    SELECT t.*,
           CASE
               WHEN t.transaction_id_missing THEN 'missing_transaction_id'
               WHEN t.transaction_id IS NULL THEN 'malformed_transaction_id'
               WHEN t.line_no IS NULL OR t.line_no <= 0 THEN 'malformed_line_no'
               WHEN t.transaction_type IS NULL OR t.transaction_type NOT IN ('sale', 'return')
                   THEN 'invalid_transaction_type'
               WHEN t.customer_id_missing THEN 'missing_customer_id'
               WHEN t.customer_id IS NULL THEN 'malformed_customer_id'
               WHEN t.product_id_missing THEN 'missing_product_id'
               WHEN t.product_id IS NULL THEN 'malformed_product_id'
               WHEN t.sold_at_missing THEN 'missing_sold_at'
               WHEN t.sold_at IS NULL THEN 'malformed_sold_at'
               WHEN t.sold_at > (t._ingested_at AT TIME ZONE 'UTC') + interval '1 day'
                   THEN 'future_sold_at'
               WHEN t.quantity_missing THEN 'missing_quantity'
               WHEN t.quantity IS NULL THEN 'malformed_quantity'
               WHEN t.quantity < 0 THEN 'negative_quantity'
               WHEN t.quantity = 0 THEN 'zero_quantity'
               WHEN t.unit_price_missing THEN 'missing_unit_price'
               WHEN t.unit_price IS NULL THEN 'malformed_unit_price'
               WHEN t.unit_price < 0 THEN 'negative_unit_price'
               WHEN t.discount_pct < 0 OR t.discount_pct >= 1 THEN 'invalid_discount'
               WHEN t.channel IS NULL OR t.channel NOT IN ('online', 'store', 'mobile')
                   THEN 'invalid_channel'
               WHEN c.customer_id IS NULL THEN 'unknown_customer'
               WHEN p.product_id IS NULL THEN 'unknown_product'
               WHEN s.transaction_id IS NOT NULL THEN 'duplicate'
           END AS invalid
    FROM typed t
    LEFT JOIN silver.customer_cleaned c ON c.customer_id = t.customer_id
    LEFT JOIN silver.product_cleaned p ON p.product_id = t.product_id
    LEFT JOIN silver.sales_cleaned s
           ON s.transaction_id = t.transaction_id AND s.line_no = t.line_no
), last_valid AS (
    SELECT transaction_id, line_no, max(_row_id) AS keep
    FROM checked
    WHERE invalid IS NULL
    GROUP BY transaction_id, line_no
    HAVING count(*) > 1
)
SELECT c._row_id, c.transaction_id, c.line_no, c.transaction_type, c.original_transaction_id,
       c.customer_id, c.product_id, c.warehouse_id, c.channel, c.sold_at, c.quantity,
       c.unit_price, c.discount_pct,
       CASE
           WHEN c.invalid IS NOT NULL THEN c.invalid
           WHEN l.keep <> c._row_id THEN 'duplicate'
       END AS reason
FROM checked c
LEFT JOIN last_valid l ON l.transaction_id = c.transaction_id AND l.line_no = c.line_no;
ANALYZE etl_sales_batch;

-- facts are insert-only: every valid row of the batch is new
INSERT INTO silver.sales_cleaned
    (transaction_id, line_no, transaction_type, original_transaction_id, customer_id,
     product_id, warehouse_id, channel, sold_at, quantity, unit_price, discount_pct, net_amount,
     _bronze_row_id, _etl_run_id)
SELECT transaction_id, line_no, transaction_type, original_transaction_id, customer_id,
       product_id, warehouse_id, channel, sold_at, quantity, unit_price, discount_pct,
       round(quantity * unit_price * (1 - discount_pct)
             * CASE transaction_type WHEN 'return' THEN -1 ELSE 1 END, 2),
       _row_id, ${run_id}
FROM etl_sales_batch
WHERE reason IS NULL;

CREATE TEMP TABLE etl_sales_changed ON COMMIT DROP AS
SELECT transaction_id, line_no, customer_id, product_id, warehouse_id, sold_at::date AS sale_date
FROM etl_sales_batch
WHERE reason IS NULL;
ANALYZE etl_sales_changed;

INSERT INTO silver.sales_rejects (run_id, bronze_row_id, reason, record)
SELECT ${run_id}, b._row_id, b.reason, to_jsonb(r) - '_row_id'
FROM etl_sales_batch b JOIN bronze.sales_raw r ON r._row_id = b._row_id
WHERE b.reason IS NOT NULL
  AND r._row_id = ANY (ARRAY(SELECT _row_id FROM etl_sales_batch WHERE reason IS NOT NULL));

INSERT INTO silver.data_quality
    (run_id, table_name, source_table, rows_in, rows_inserted, rows_updated, rows_rejected,
     rejects_by_reason)
SELECT ${run_id}, 'silver.sales_cleaned', 'bronze.sales_raw', b.rows_in,
       b.rows_in - b.rows_rejected, 0, b.rows_rejected, b.reasons
FROM (SELECT coalesce(sum(n), 0) AS rows_in,
             coalesce(sum(n) FILTER (WHERE reason IS NOT NULL), 0) AS rows_rejected,
             coalesce(jsonb_object_agg(reason, n ORDER BY reason)
                      FILTER (WHERE reason IS NOT NULL), '{}') AS reasons
      FROM (SELECT reason, count(*) AS n FROM etl_sales_batch GROUP BY reason) x) b;
