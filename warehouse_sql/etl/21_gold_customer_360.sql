-- target: gold.customer_360
-- inputs: silver.customer_cleaned silver.sales_cleaned silver.product_cleaned
--
-- Recomputes the customers this run touched (all of them when ${full} = 1): new or changed
-- customers, buyers of new sales lines, and buyers of products that changed (their favourite
-- category may move). Same shape as 20_gold_sales_summary.sql.

CREATE TEMP TABLE etl_gold_customers ON COMMIT DROP AS
SELECT customer_id FROM etl_customer_changed
UNION
SELECT customer_id FROM etl_sales_changed
UNION
SELECT s.customer_id FROM silver.sales_cleaned s
WHERE EXISTS (SELECT 1 FROM etl_product_changed WHERE NOT inserted)
  AND s.product_id IN (SELECT product_id FROM etl_product_changed WHERE NOT inserted);
ANALYZE etl_gold_customers;

-- hash aggregations only: per transaction first (a transaction has one customer and one
-- channel), then per customer; favourite category and channel break ties by name
CREATE TEMP TABLE etl_gold_customer_360 ON COMMIT DROP AS
WITH txn AS MATERIALIZED (
    SELECT s.customer_id, s.transaction_id, s.transaction_type, min(s.channel) AS channel,
           min(s.sold_at) AS sold_at, sum(s.quantity) AS units,
           sum(s.quantity * s.unit_price) AS gross, sum(s.net_amount) AS net
    FROM silver.sales_cleaned s
    WHERE ${full} = 1 OR s.customer_id IN (SELECT customer_id FROM etl_gold_customers)
    GROUP BY s.customer_id, s.transaction_id, s.transaction_type
), agg AS (
    SELECT customer_id,
           min(sold_at) FILTER (WHERE transaction_type = 'sale') AS first_purchase_at,
           max(sold_at) FILTER (WHERE transaction_type = 'sale') AS last_purchase_at,
           count(*) FILTER (WHERE transaction_type = 'sale') AS transactions,
           coalesce(sum(units) FILTER (WHERE transaction_type = 'sale'), 0) AS units_bought,
           coalesce(sum(units) FILTER (WHERE transaction_type = 'return'), 0) AS units_returned,
           coalesce(sum(gross) FILTER (WHERE transaction_type = 'sale'), 0) AS gross_spend,
           coalesce(sum(net) FILTER (WHERE transaction_type = 'sale'), 0) AS sales_net,
           sum(net) AS net_spend
    FROM txn
    GROUP BY customer_id
), channel AS (
    SELECT DISTINCT ON (customer_id) customer_id, channel
    FROM (SELECT customer_id, channel, count(*) AS n FROM txn
          WHERE transaction_type = 'sale' GROUP BY 1, 2) x
    ORDER BY customer_id, n DESC, channel
), favourite AS (
    SELECT DISTINCT ON (customer_id) customer_id, category
    FROM (SELECT s.customer_id, p.category, count(*) AS n
          FROM silver.sales_cleaned s
          JOIN silver.product_cleaned p ON p.product_id = s.product_id
          WHERE s.transaction_type = 'sale'
            AND (${full} = 1 OR s.customer_id IN (SELECT customer_id FROM etl_gold_customers))
          GROUP BY 1, 2) x
    ORDER BY customer_id, n DESC, category
)
SELECT c.customer_id, concat_ws(' ', c.first_name, c.last_name) AS full_name, c.email,
       c.segment, c.region, c.city, c.signup_date, a.first_purchase_at, a.last_purchase_at,
       coalesce(a.transactions, 0) AS transactions,
       coalesce(a.units_bought, 0) AS units_bought,
       coalesce(a.units_returned, 0) AS units_returned,
       coalesce(a.gross_spend, 0) AS gross_spend,
       coalesce(a.net_spend, 0) AS net_spend,
       round(a.sales_net / nullif(a.transactions, 0), 2) AS avg_order_value,
       round(a.units_returned::numeric / nullif(a.units_bought, 0), 4) AS return_rate,
       f.category AS favourite_category, ch.channel AS preferred_channel
FROM silver.customer_cleaned c
LEFT JOIN agg a ON a.customer_id = c.customer_id
LEFT JOIN favourite f ON f.customer_id = c.customer_id
LEFT JOIN channel ch ON ch.customer_id = c.customer_id
WHERE ${full} = 1 OR c.customer_id IN (SELECT customer_id FROM etl_gold_customers);

DELETE FROM gold.customer_360
WHERE ${full} = 1 OR customer_id IN (SELECT customer_id FROM etl_gold_customers);

INSERT INTO gold.customer_360
    (customer_id, full_name, email, segment, region, city, signup_date, first_purchase_at,
     last_purchase_at, transactions, units_bought, units_returned, gross_spend, net_spend,
     avg_order_value, return_rate, favourite_category, preferred_channel)
SELECT customer_id, full_name, email, segment, region, city, signup_date, first_purchase_at,
       last_purchase_at, transactions, units_bought, units_returned, gross_spend, net_spend,
       avg_order_value, return_rate, favourite_category, preferred_channel
FROM etl_gold_customer_360;
