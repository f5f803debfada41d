-- target: gold.sales_summary
-- inputs: silver.sales_cleaned silver.product_cleaned silver.customer_cleaned
--
-- Recomputes the days this run touched: days with new sales lines, and days with sales of
-- products or customers whose category or region may have changed (updated rows), and days
-- whose sales lines were written outside the ETL (silver.sales_stale_days); all days when
-- ${full} = 1 (the runner's choice when most of an input is new, e.g. a first load, or after a
-- TRUNCATE of the sales lines).
--
-- Shape of every gold refresh: the new rows are computed into a temp table first, because
-- CREATE TABLE AS may run in parallel and INSERT .. SELECT may not (PostgreSQL 15); then the
-- old rows are deleted (DELETE, not TRUNCATE, so readers keep seeing the old rows until the
-- run commits) and the new ones inserted.

-- Days written outside the ETL (silver.sales_stale_days, migration 0080) are recomputed too
-- and cleared; writers wait for this run's commit, so none is cleared unseen.
LOCK TABLE silver.sales_cleaned IN SHARE MODE;

CREATE TEMP TABLE etl_gold_sales_days ON COMMIT DROP AS
SELECT sale_date FROM etl_sales_changed
UNION
SELECT sale_date FROM silver.sales_stale_days WHERE isfinite(sale_date)
UNION
SELECT s.sold_at::date FROM silver.sales_cleaned s
WHERE EXISTS (SELECT 1 FROM etl_product_changed WHERE NOT inserted)
  AND s.product_id IN (SELECT product_id FROM etl_product_changed WHERE NOT inserted)
UNION
SELECT s.sold_at::date FROM silver.sales_cleaned s
WHERE EXISTS (SELECT 1 FROM etl_customer_changed WHERE NOT inserted)
  AND s.customer_id IN (SELECT customer_id FROM etl_customer_changed WHERE NOT inserted);
ANALYZE etl_gold_sales_days;

-- two hash aggregations (per transaction, then per group) instead of count(DISTINCT), which
-- would sort a million lines on four text keys
CREATE TEMP TABLE etl_gold_sales_summary ON COMMIT DROP AS
SELECT sale_date, category, region, channel,
       count(*) FILTER (WHERE transaction_type = 'sale') AS transactions,
       sum(lines) AS lines,
       coalesce(sum(units) FILTER (WHERE transaction_type = 'sale'), 0) AS units_sold,
       coalesce(sum(units) FILTER (WHERE transaction_type = 'return'), 0) AS units_returned,
       coalesce(sum(gross) FILTER (WHERE transaction_type = 'sale'), 0) AS gross_revenue,
       coalesce(sum(gross - net) FILTER (WHERE transaction_type = 'sale'), 0) AS discount_amount,
       coalesce(-sum(net) FILTER (WHERE transaction_type = 'return'), 0) AS returns_amount,
       sum(net) AS net_revenue
FROM (
    SELECT s.sold_at::date AS sale_date, p.category, c.region, s.channel, s.transaction_id,
           s.transaction_type, count(*) AS lines, sum(s.quantity) AS units,
           sum(s.quantity * s.unit_price) AS gross, sum(s.net_amount) AS net
    FROM silver.sales_cleaned s
    JOIN silver.product_cleaned p ON p.product_id = s.product_id
    JOIN silver.customer_cleaned c ON c.customer_id = s.customer_id
    WHERE ${full} = 1 OR s.sold_at::date IN (SELECT sale_date FROM etl_gold_sales_days)
    GROUP BY 1, 2, 3, 4, 5, 6
) per_transaction
GROUP BY 1, 2, 3, 4;

DELETE FROM gold.sales_summary
WHERE ${full} = 1 OR sale_date IN (SELECT sale_date FROM etl_gold_sales_days);

INSERT INTO gold.sales_summary
    (sale_date, category, region, channel, transactions, lines, units_sold, units_returned,
     gross_revenue, discount_amount, returns_amount, net_revenue)
SELECT sale_date, category, region, channel, transactions, lines, units_sold, units_returned,
       gross_revenue, discount_amount, returns_amount, net_revenue
FROM etl_gold_sales_summary;

DELETE FROM silver.sales_stale_days
WHERE ${full} = 1 OR sale_date IN (SELECT sale_date FROM etl_gold_sales_days);
