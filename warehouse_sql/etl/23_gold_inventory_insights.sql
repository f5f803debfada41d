-- target: gold.inventory_insights
-- inputs: silver.inventory_cleaned silver.sales_cleaned silver.product_cleaned
-- refresh: full
--
-- Rebuilt whole (one row per warehouse and product, small): the latest snapshot of each pair
-- against the units sold through that warehouse in the 90 days up to the snapshot.
-- Same shape as 20_gold_sales_summary.sql.

CREATE TEMP TABLE etl_gold_inventory_insights ON COMMIT DROP AS
WITH latest AS (
    SELECT DISTINCT ON (warehouse_id, product_id)
           warehouse_id, product_id, warehouse_code, snapshot_date, quantity_on_hand,
           reorder_point, unit_cost
    FROM silver.inventory_cleaned
    ORDER BY warehouse_id, product_id, snapshot_date DESC
), bounds AS (
    SELECT min(snapshot_date) - 89 AS lo, max(snapshot_date) + 1 AS hi FROM latest
), daily AS (
    SELECT s.warehouse_id, s.product_id, s.sold_at::date AS day, sum(s.quantity) AS units
    FROM silver.sales_cleaned s, bounds b
    WHERE s.transaction_type = 'sale' AND s.sold_at >= b.lo AND s.sold_at < b.hi
    GROUP BY 1, 2, 3
), demand AS (
    SELECT l.warehouse_id, l.product_id, coalesce(sum(d.units), 0) AS units
    FROM latest l
    LEFT JOIN daily d
           ON d.warehouse_id = l.warehouse_id AND d.product_id = l.product_id
          AND d.day > l.snapshot_date - 90 AND d.day <= l.snapshot_date
    GROUP BY 1, 2
), measured AS (
    SELECT l.*, p.category, p.unit_cost AS product_cost, dm.units,
           CASE WHEN dm.units > 0
                THEN round(l.quantity_on_hand / (dm.units / 90.0), 1) END AS days_of_supply
    FROM latest l
    JOIN demand dm ON dm.warehouse_id = l.warehouse_id AND dm.product_id = l.product_id
    JOIN silver.product_cleaned p ON p.product_id = l.product_id
)
SELECT warehouse_id, product_id, warehouse_code, category, snapshot_date, quantity_on_hand,
       reorder_point,
       round(quantity_on_hand * coalesce(unit_cost, product_cost), 2) AS inventory_value,
       units AS units_sold_90d, round(units / 90.0, 4) AS avg_daily_demand, days_of_supply,
       CASE
           WHEN quantity_on_hand = 0 THEN 'stockout'
           WHEN quantity_on_hand <= reorder_point THEN 'reorder'
           WHEN days_of_supply IS NULL OR days_of_supply > 180 THEN 'overstock'
           ELSE 'healthy'
       END AS status
FROM measured;

DELETE FROM gold.inventory_insights;

INSERT INTO gold.inventory_insights
    (warehouse_id, product_id, warehouse_code, category, snapshot_date, quantity_on_hand,
     reorder_point, inventory_value, units_sold_90d, avg_daily_demand, days_of_supply, status)
SELECT warehouse_id, product_id, warehouse_code, category, snapshot_date, quantity_on_hand,
       reorder_point, inventory_value, units_sold_90d, avg_daily_demand, days_of_supply, status
FROM etl_gold_inventory_insights;
