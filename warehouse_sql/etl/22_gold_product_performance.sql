-- target: gold.product_performance
-- inputs: silver.product_cleaned silver.sales_cleaned
--
-- Recomputes the products this run touched (all when ${full} = 1): new or changed products,
-- products of new sales lines; then re-ranks revenue within each category (only ranks that
-- moved are written). Same shape as 20_gold_sales_summary.sql.

CREATE TEMP TABLE etl_gold_products ON COMMIT DROP AS
SELECT product_id FROM etl_product_changed
UNION
SELECT product_id FROM etl_sales_changed;
ANALYZE etl_gold_products;

-- distinct transactions and customers per product by hashing (product, key) pairs rather
-- than count(DISTINCT), which sorts
CREATE TEMP TABLE etl_gold_product_performance ON COMMIT DROP AS
WITH lines AS (
    SELECT s.* FROM silver.sales_cleaned s
    WHERE ${full} = 1 OR s.product_id IN (SELECT product_id FROM etl_gold_products)
), agg AS (
    SELECT product_id,
           coalesce(sum(quantity) FILTER (WHERE transaction_type = 'sale'), 0) AS units_sold,
           coalesce(sum(quantity) FILTER (WHERE transaction_type = 'return'), 0)
               AS units_returned,
           coalesce(sum(quantity * unit_price) FILTER (WHERE transaction_type = 'sale'), 0)
               AS gross_revenue,
           sum(net_amount) AS net_revenue,
           avg(discount_pct) FILTER (WHERE transaction_type = 'sale') AS avg_discount_pct,
           min(sold_at) FILTER (WHERE transaction_type = 'sale') AS first_sold_at,
           max(sold_at) FILTER (WHERE transaction_type = 'sale') AS last_sold_at
    FROM lines
    GROUP BY product_id
), txns AS (
    SELECT product_id, count(*) AS transactions
    FROM (SELECT DISTINCT product_id, transaction_id FROM lines
          WHERE transaction_type = 'sale') x
    GROUP BY product_id
), buyers AS (
    SELECT product_id, count(*) AS customers
    FROM (SELECT DISTINCT product_id, customer_id FROM lines
          WHERE transaction_type = 'sale') x
    GROUP BY product_id
)
SELECT p.product_id, p.sku, p.name, p.category, p.brand, p.list_price,
       coalesce(a.units_sold, 0) AS units_sold,
       coalesce(a.units_returned, 0) AS units_returned,
       coalesce(t.transactions, 0) AS transactions,
       coalesce(b.customers, 0) AS customers,
       coalesce(a.gross_revenue, 0) AS gross_revenue,
       coalesce(a.net_revenue, 0) AS net_revenue,
       coalesce(a.net_revenue, 0)
           - p.unit_cost * (coalesce(a.units_sold, 0) - coalesce(a.units_returned, 0))
           AS gross_margin,
       round(a.units_returned::numeric / nullif(a.units_sold, 0), 4) AS return_rate,
       round(a.avg_discount_pct, 4) AS avg_discount_pct, a.first_sold_at, a.last_sold_at
FROM silver.product_cleaned p
LEFT JOIN agg a ON a.product_id = p.product_id
LEFT JOIN txns t ON t.product_id = p.product_id
LEFT JOIN buyers b ON b.product_id = p.product_id
WHERE ${full} = 1 OR p.product_id IN (SELECT product_id FROM etl_gold_products);

DELETE FROM gold.product_performance
WHERE ${full} = 1 OR product_id IN (SELECT product_id FROM etl_gold_products);

INSERT INTO gold.product_performance
    (product_id, sku, name, category, brand, list_price, units_sold, units_returned,
     transactions, customers, gross_revenue, net_revenue, gross_margin, return_rate,
     avg_discount_pct, first_sold_at, last_sold_at)
SELECT product_id, sku, name, category, brand, list_price, units_sold, units_returned,
       transactions, customers, gross_revenue, net_revenue, gross_margin, return_rate,
       avg_discount_pct, first_sold_at, last_sold_at
FROM etl_gold_product_performance;

UPDATE gold.product_performance g SET revenue_rank_in_category = r.rank
FROM (SELECT product_id,
             row_number() OVER (PARTITION BY category ORDER BY net_revenue DESC, product_id)::int
                 AS rank
      FROM gold.product_performance) r
WHERE g.product_id = r.product_id AND g.revenue_rank_in_category IS DISTINCT FROM r.rank;
