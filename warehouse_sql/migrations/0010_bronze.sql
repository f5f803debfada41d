-- Bronze: the data as landed. Every business column is text, exactly as the source sent it
-- (dirt included); the ETL validates, casts and normalises on the way to silver.
--
-- Metadata columns: _row_id is the load order and the ETL's watermark (an identity, so a
-- watermark read under a SHARE lock never skips a row committed later), _batch_id the load
-- batch (0 = initial load, 1.. = increments), _ingested_at the landing time.
-- Only primary keys are indexed: finding the rest is the index advisor's job.

CREATE TABLE IF NOT EXISTS bronze.customer_raw (
    _row_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    _batch_id     integer NOT NULL DEFAULT 0,
    _ingested_at  timestamptz NOT NULL DEFAULT now(),
    customer_id   text,
    first_name    text,
    last_name     text,
    email         text,
    segment       text,
    region        text,
    city          text,
    signup_date   text
);

CREATE TABLE IF NOT EXISTS bronze.product_raw (
    _row_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    _batch_id     integer NOT NULL DEFAULT 0,
    _ingested_at  timestamptz NOT NULL DEFAULT now(),
    product_id    text,
    sku           text,
    name          text,
    category      text,
    brand         text,
    list_price    text,
    unit_cost     text,
    launched_on   text,
    is_active     text
);

-- one row per sales line; a transaction is the lines sharing a transaction_id. Returns are
-- transactions of their own (transaction_type 'return') pointing at original_transaction_id.
CREATE TABLE IF NOT EXISTS bronze.sales_raw (
    _row_id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    _batch_id                integer NOT NULL DEFAULT 0,
    _ingested_at             timestamptz NOT NULL DEFAULT now(),
    transaction_id           text,
    line_no                  text,
    transaction_type         text,
    original_transaction_id  text,
    customer_id              text,
    product_id               text,
    warehouse_id             text,
    channel                  text,
    sold_at                  text,
    quantity                 text,
    unit_price               text,
    discount_pct             text
);

-- month-end stock snapshots per warehouse and product
CREATE TABLE IF NOT EXISTS bronze.inventory_raw (
    _row_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    _batch_id         integer NOT NULL DEFAULT 0,
    _ingested_at      timestamptz NOT NULL DEFAULT now(),
    warehouse_id      text,
    warehouse_code    text,
    product_id        text,
    snapshot_date     text,
    quantity_on_hand  text,
    reorder_point     text,
    unit_cost         text
);

-- What each load put into bronze: the generator's parameters, rows per table and the dirt it
-- injected on purpose (by reject reason), so re-running `warehouse init` never loads twice and
-- the ETL's rejects can be checked against what was injected.
CREATE TABLE IF NOT EXISTS bronze.load_batches (
    batch_id    integer PRIMARY KEY,
    generator   text NOT NULL DEFAULT 'bench.datagen',
    scale       double precision NOT NULL,
    seed        bigint NOT NULL,
    rows        jsonb NOT NULL,
    dirt        jsonb NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now()
);
