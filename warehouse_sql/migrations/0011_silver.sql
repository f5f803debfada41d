-- Silver: validated, typed, deduplicated and normalised. Keys, foreign keys and constraints;
-- indexes only on primary and foreign keys. Lineage columns say which bronze row and which ETL
-- run (silver.etl_runs) produced each row.

-- ---------------------------------------------------------------- casts that never raise
-- PostgreSQL 15 has no pg_input_is_valid(), an exception block per row is slow, and so is a
-- regular expression per value (about 1 us each). These check the text's shape with cheap
-- functions (translate() on short strings, LIKE, hashed lookups of the date parts), then cast
-- only what is certain to parse, and return NULL otherwise. They are single-expression SQL
-- functions, so the planner inlines them.

CREATE OR REPLACE FUNCTION silver.try_bigint(s text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN length(s) BETWEEN 1 AND 18 AND translate(s, '0123456789', '') = '' THEN s::bigint
        WHEN length(s) BETWEEN 2 AND 19 AND left(s, 1) IN ('-', '+')
         AND translate(substr(s, 2), '0123456789', '') = '' THEN s::bigint
    END
$$;

CREATE OR REPLACE FUNCTION silver.try_int(s text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN length(s) BETWEEN 1 AND 9 AND translate(s, '0123456789', '') = '' THEN s::integer
        WHEN length(s) BETWEEN 2 AND 10 AND left(s, 1) IN ('-', '+')
         AND translate(substr(s, 2), '0123456789', '') = '' THEN s::integer
    END
$$;

-- [+-]digits[.digits], at most 24 characters
CREATE OR REPLACE FUNCTION silver.try_numeric(s text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN length(s) BETWEEN 1 AND 24
         AND translate(CASE WHEN left(s, 1) IN ('-', '+') THEN substr(s, 2) ELSE s END,
                       '0123456789', '') IN ('', '.')
         AND right(s, 1) <> '.'
         AND left(CASE WHEN left(s, 1) IN ('-', '+') THEN substr(s, 2) ELSE s END, 1)
             NOT IN ('.', '')
        THEN s::numeric
    END
$$;

CREATE OR REPLACE FUNCTION silver.try_bool(s text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE lower(s)
        WHEN 'true' THEN true WHEN 't' THEN true WHEN 'yes' THEN true WHEN '1' THEN true
        WHEN 'false' THEN false WHEN 'f' THEN false WHEN 'no' THEN false WHEN '0' THEN false
    END
$$;

-- valid month-day pairs of a leap year: one hashed lookup instead of casting parts to numbers
CREATE OR REPLACE FUNCTION silver.valid_month_day(md text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT md = ANY ('{01-01,01-02,01-03,01-04,01-05,01-06,01-07,01-08,01-09,01-10,01-11,01-12,
                      01-13,01-14,01-15,01-16,01-17,01-18,01-19,01-20,01-21,01-22,01-23,01-24,
                      01-25,01-26,01-27,01-28,01-29,01-30,01-31,02-01,02-02,02-03,02-04,02-05,
                      02-06,02-07,02-08,02-09,02-10,02-11,02-12,02-13,02-14,02-15,02-16,02-17,
                      02-18,02-19,02-20,02-21,02-22,02-23,02-24,02-25,02-26,02-27,02-28,02-29,
                      03-01,03-02,03-03,03-04,03-05,03-06,03-07,03-08,03-09,03-10,03-11,03-12,
                      03-13,03-14,03-15,03-16,03-17,03-18,03-19,03-20,03-21,03-22,03-23,03-24,
                      03-25,03-26,03-27,03-28,03-29,03-30,03-31,04-01,04-02,04-03,04-04,04-05,
                      04-06,04-07,04-08,04-09,04-10,04-11,04-12,04-13,04-14,04-15,04-16,04-17,
                      04-18,04-19,04-20,04-21,04-22,04-23,04-24,04-25,04-26,04-27,04-28,04-29,
                      04-30,05-01,05-02,05-03,05-04,05-05,05-06,05-07,05-08,05-09,05-10,05-11,
                      05-12,05-13,05-14,05-15,05-16,05-17,05-18,05-19,05-20,05-21,05-22,05-23,
                      05-24,05-25,05-26,05-27,05-28,05-29,05-30,05-31,06-01,06-02,06-03,06-04,
                      06-05,06-06,06-07,06-08,06-09,06-10,06-11,06-12,06-13,06-14,06-15,06-16,
                      06-17,06-18,06-19,06-20,06-21,06-22,06-23,06-24,06-25,06-26,06-27,06-28,
                      06-29,06-30,07-01,07-02,07-03,07-04,07-05,07-06,07-07,07-08,07-09,07-10,
                      07-11,07-12,07-13,07-14,07-15,07-16,07-17,07-18,07-19,07-20,07-21,07-22,
                      07-23,07-24,07-25,07-26,07-27,07-28,07-29,07-30,07-31,08-01,08-02,08-03,
                      08-04,08-05,08-06,08-07,08-08,08-09,08-10,08-11,08-12,08-13,08-14,08-15,
                      08-16,08-17,08-18,08-19,08-20,08-21,08-22,08-23,08-24,08-25,08-26,08-27,
                      08-28,08-29,08-30,08-31,09-01,09-02,09-03,09-04,09-05,09-06,09-07,09-08,
                      09-09,09-10,09-11,09-12,09-13,09-14,09-15,09-16,09-17,09-18,09-19,09-20,
                      09-21,09-22,09-23,09-24,09-25,09-26,09-27,09-28,09-29,09-30,10-01,10-02,
                      10-03,10-04,10-05,10-06,10-07,10-08,10-09,10-10,10-11,10-12,10-13,10-14,
                      10-15,10-16,10-17,10-18,10-19,10-20,10-21,10-22,10-23,10-24,10-25,10-26,
                      10-27,10-28,10-29,10-30,10-31,11-01,11-02,11-03,11-04,11-05,11-06,11-07,
                      11-08,11-09,11-10,11-11,11-12,11-13,11-14,11-15,11-16,11-17,11-18,11-19,
                      11-20,11-21,11-22,11-23,11-24,11-25,11-26,11-27,11-28,11-29,11-30,12-01,
                      12-02,12-03,12-04,12-05,12-06,12-07,12-08,12-09,12-10,12-11,12-12,12-13,
                      12-14,12-15,12-16,12-17,12-18,12-19,12-20,12-21,12-22,12-23,12-24,12-25,
                      12-26,12-27,12-28,12-29,12-30,12-31}'::text[])
$$;

-- two-digit strings 00..59, and hours 00..23
CREATE OR REPLACE FUNCTION silver.valid_minute(mm text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT mm = ANY ('{00,01,02,03,04,05,06,07,08,09,10,11,12,13,14,15,16,17,18,19,
                      20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,
                      40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59}'::text[])
$$;

CREATE OR REPLACE FUNCTION silver.valid_hour(hh text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hh = ANY ('{00,01,02,03,04,05,06,07,08,09,10,11,
                      12,13,14,15,16,17,18,19,20,21,22,23}'::text[])
$$;

-- YYYY-MM-DD with a real month and day (2023-02-30 and 2023-02-29 are NULL), year 1000-9999.
-- LIKE fixes the separators, the lookups fix the digits and ranges, so the cast cannot fail.
-- STABLE, not IMMUTABLE, because the cast is (ISO dates read the same under every DateStyle).
CREATE OR REPLACE FUNCTION silver.try_date(s text) RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN s LIKE '____-__-__'
         AND ltrim(left(s, 4), '0123456789') = '' AND left(s, 1) <> '0'
         AND silver.valid_month_day(substr(s, 6, 5))
         AND (substr(s, 6, 5) <> '02-29'
              OR (left(s, 4)::int % 4 = 0
                  AND (left(s, 4)::int % 100 <> 0 OR left(s, 4)::int % 400 = 0)))
        THEN s::date
    END
$$;

-- an ISO date as above, then "T" or a space and hh:mm, hh:mm:ss or hh:mm:ss.ffffff
CREATE OR REPLACE FUNCTION silver.try_timestamp(s text) RETURNS timestamp
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN (s LIKE '____-__-__T__:__:__' OR s LIKE '____-__-__ __:__:__'
              OR s LIKE '____-__-__' OR s LIKE '____-__-__T__:__' OR s LIKE '____-__-__ __:__'
              OR ((s LIKE '____-__-__T__:__:__._%' OR s LIKE '____-__-__ __:__:__._%')
                  AND length(s) <= 26 AND ltrim(substr(s, 21), '0123456789') = ''))
         AND ltrim(left(s, 4), '0123456789') = '' AND left(s, 1) <> '0'
         AND silver.valid_month_day(substr(s, 6, 5))
         AND (substr(s, 6, 5) <> '02-29'
              OR (left(s, 4)::int % 4 = 0
                  AND (left(s, 4)::int % 100 <> 0 OR left(s, 4)::int % 400 = 0)))
         AND (length(s) = 10
              OR (silver.valid_hour(substr(s, 12, 2)) AND silver.valid_minute(substr(s, 15, 2))
                  AND (length(s) = 16 OR silver.valid_minute(substr(s, 18, 2)))))
        THEN s::timestamp
    END
$$;

-- The parse_* forms are what the ETL calls on bronze text: the value as landed is tried first
-- (it is nearly always already trimmed) and the trimmed value only when that fails, so a
-- column is read once, not once per use inside the inlined try_* body.
CREATE OR REPLACE FUNCTION silver.parse_bigint(s text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(silver.try_bigint(s), silver.try_bigint(btrim(s)))
$$;

CREATE OR REPLACE FUNCTION silver.parse_int(s text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(silver.try_int(s), silver.try_int(btrim(s)))
$$;

CREATE OR REPLACE FUNCTION silver.parse_numeric(s text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(silver.try_numeric(s), silver.try_numeric(btrim(s)))
$$;

CREATE OR REPLACE FUNCTION silver.parse_bool(s text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT silver.try_bool(btrim(s))
$$;

CREATE OR REPLACE FUNCTION silver.parse_date(s text) RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(silver.try_date(s), silver.try_date(btrim(s)))
$$;

CREATE OR REPLACE FUNCTION silver.parse_timestamp(s text) RETURNS timestamp
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(silver.try_timestamp(s), silver.try_timestamp(btrim(s)))
$$;

-- NULL, empty or only spaces: a missing value (as opposed to a malformed one)
CREATE OR REPLACE FUNCTION silver.is_blank(s text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(btrim(s) = '', true)
$$;

-- trim, collapse runs of spaces; blank becomes NULL (the regex only runs when needed)
CREATE OR REPLACE FUNCTION silver.clean_text(s text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT nullif(CASE WHEN strpos(btrim(s, E' \t\r\n'), '  ') > 0
                       THEN regexp_replace(btrim(s, E' \t\r\n'), '\s+', ' ', 'g')
                       ELSE btrim(s, E' \t\r\n') END, '')
$$;

-- ---------------------------------------------------------------- tables

CREATE TABLE IF NOT EXISTS silver.customer_cleaned (
    customer_id     bigint PRIMARY KEY CHECK (customer_id > 0),
    first_name      text,
    last_name       text,
    email           text NOT NULL CHECK (email = lower(email) AND email LIKE '%_@_%._%'),
    segment         text NOT NULL
                    CHECK (segment IN ('consumer', 'small_business', 'corporate', 'vip')),
    region          text NOT NULL CHECK (region = lower(region)),
    city            text,
    signup_date     date NOT NULL,
    _bronze_row_id  bigint NOT NULL,
    _etl_run_id     bigint NOT NULL,
    _loaded_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS silver.product_cleaned (
    product_id      bigint PRIMARY KEY CHECK (product_id > 0),
    sku             text NOT NULL,
    name            text NOT NULL,
    category        text NOT NULL CHECK (category = lower(category)),
    brand           text,
    list_price      numeric(12, 2) NOT NULL CHECK (list_price >= 0),
    unit_cost       numeric(12, 2) CHECK (unit_cost >= 0),
    launched_on     date,
    is_active       boolean NOT NULL DEFAULT true,
    _bronze_row_id  bigint NOT NULL,
    _etl_run_id     bigint NOT NULL,
    _loaded_at      timestamptz NOT NULL DEFAULT now()
);

-- one row per sales line; net_amount is signed (returns are negative)
CREATE TABLE IF NOT EXISTS silver.sales_cleaned (
    transaction_id           bigint NOT NULL,
    line_no                  integer NOT NULL CHECK (line_no > 0),
    transaction_type         text NOT NULL CHECK (transaction_type IN ('sale', 'return')),
    original_transaction_id  bigint,
    customer_id              bigint NOT NULL REFERENCES silver.customer_cleaned (customer_id),
    product_id               bigint NOT NULL REFERENCES silver.product_cleaned (product_id),
    warehouse_id             integer,
    channel                  text NOT NULL CHECK (channel IN ('online', 'store', 'mobile')),
    sold_at                  timestamp NOT NULL,
    quantity                 integer NOT NULL CHECK (quantity > 0),
    unit_price               numeric(12, 2) NOT NULL CHECK (unit_price >= 0),
    discount_pct             numeric(4, 3) NOT NULL DEFAULT 0
                             CHECK (discount_pct >= 0 AND discount_pct < 1),
    net_amount               numeric(14, 2) NOT NULL,
    _bronze_row_id           bigint NOT NULL,
    _etl_run_id              bigint NOT NULL,
    _loaded_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transaction_id, line_no)
);
CREATE INDEX IF NOT EXISTS sales_cleaned_customer_id_idx ON silver.sales_cleaned (customer_id);
CREATE INDEX IF NOT EXISTS sales_cleaned_product_id_idx ON silver.sales_cleaned (product_id);

CREATE TABLE IF NOT EXISTS silver.inventory_cleaned (
    warehouse_id      integer NOT NULL,
    product_id        bigint NOT NULL REFERENCES silver.product_cleaned (product_id),
    snapshot_date     date NOT NULL,
    warehouse_code    text NOT NULL CHECK (warehouse_code = upper(warehouse_code)),
    quantity_on_hand  integer NOT NULL CHECK (quantity_on_hand >= 0),
    reorder_point     integer NOT NULL CHECK (reorder_point >= 0),
    unit_cost         numeric(12, 2) CHECK (unit_cost >= 0),
    _bronze_row_id    bigint NOT NULL,
    _etl_run_id       bigint NOT NULL,
    _loaded_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (warehouse_id, product_id, snapshot_date)
);
CREATE INDEX IF NOT EXISTS inventory_cleaned_product_id_idx
    ON silver.inventory_cleaned (product_id);
