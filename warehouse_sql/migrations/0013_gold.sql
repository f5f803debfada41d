-- Gold: aggregates for BI, refreshed by the ETL (warehouse_sql/etl/2*_gold_*.sql) for the keys
-- its run changed; each refresh sends NOTIFY pgsage_refresh, '<schema.table>'.
-- Money is in the currency of the prices; net amounts subtract discounts and returns.

-- one row per day, product category, customer region and channel
CREATE TABLE IF NOT EXISTS gold.sales_summary (
    sale_date        date NOT NULL,
    category         text NOT NULL,
    region           text NOT NULL,
    channel          text NOT NULL,
    transactions     bigint NOT NULL,   -- sale transactions (returns not counted)
    lines            bigint NOT NULL,   -- sale and return lines
    units_sold       bigint NOT NULL,
    units_returned   bigint NOT NULL,
    gross_revenue    numeric(16, 2) NOT NULL,   -- quantity x list price of sales
    discount_amount  numeric(16, 2) NOT NULL,
    returns_amount   numeric(16, 2) NOT NULL,   -- refunded, positive
    net_revenue      numeric(16, 2) NOT NULL,   -- gross - discount - returns
    refreshed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sale_date, category, region, channel)
);

-- one row per customer, buyers or not
CREATE TABLE IF NOT EXISTS gold.customer_360 (
    customer_id         bigint PRIMARY KEY,
    full_name           text,
    email               text NOT NULL,
    segment             text NOT NULL,
    region              text NOT NULL,
    city                text,
    signup_date         date NOT NULL,
    first_purchase_at   timestamp,
    last_purchase_at    timestamp,
    transactions        bigint NOT NULL,
    units_bought        bigint NOT NULL,
    units_returned      bigint NOT NULL,
    gross_spend         numeric(16, 2) NOT NULL,
    net_spend           numeric(16, 2) NOT NULL,
    avg_order_value     numeric(14, 2),
    return_rate         numeric(6, 4),   -- returned units / bought units
    favourite_category  text,            -- most lines; ties broken by name
    preferred_channel   text,
    refreshed_at        timestamptz NOT NULL DEFAULT now()
);

-- one row per product, sold or not
CREATE TABLE IF NOT EXISTS gold.product_performance (
    product_id               bigint PRIMARY KEY,
    sku                      text NOT NULL,
    name                     text NOT NULL,
    category                 text NOT NULL,
    brand                    text,
    list_price               numeric(12, 2) NOT NULL,
    units_sold               bigint NOT NULL,
    units_returned           bigint NOT NULL,
    transactions             bigint NOT NULL,
    customers                bigint NOT NULL,
    gross_revenue            numeric(16, 2) NOT NULL,
    net_revenue              numeric(16, 2) NOT NULL,
    gross_margin             numeric(16, 2),   -- net revenue - unit cost x net units
    return_rate              numeric(6, 4),
    avg_discount_pct         numeric(5, 4),
    first_sold_at            timestamp,
    last_sold_at             timestamp,
    revenue_rank_in_category integer,
    refreshed_at             timestamptz NOT NULL DEFAULT now()
);

-- one row per warehouse and product: the latest snapshot against the demand before it
CREATE TABLE IF NOT EXISTS gold.inventory_insights (
    warehouse_id      integer NOT NULL,
    product_id        bigint NOT NULL,
    warehouse_code    text NOT NULL,
    category          text NOT NULL,
    snapshot_date     date NOT NULL,
    quantity_on_hand  integer NOT NULL,
    reorder_point     integer NOT NULL,
    inventory_value   numeric(16, 2),
    units_sold_90d    bigint NOT NULL,   -- through this warehouse, 90 days up to the snapshot
    avg_daily_demand  numeric(12, 4) NOT NULL,
    days_of_supply    numeric(12, 1),    -- NULL when there is no demand
    status            text NOT NULL
                      CHECK (status IN ('stockout', 'reorder', 'healthy', 'overstock')),
    refreshed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (warehouse_id, product_id)
);
