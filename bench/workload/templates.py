"""The workload's parameterised query templates, and the data profile their parameters come from.

A template is SQL over bronze, silver and gold with `$n` placeholders (each cast explicitly, so
every client path sends the same types), tagged with its complexity (simple, medium, complex),
its kind (point, join, aggregate, window, cte, subquery, topn, dml, error, heavy) and, for the
shapes placed on purpose for pgsage to learn to fix, `shapes`:

- ``unindexed_filter``: a selective filter on a column without an index
- ``gold_answerable``: an aggregate over silver.sales_cleaned that a gold table already answers
- ``correlated_select``: correlated scalar subqueries in the SELECT list
- ``not_in``: ``NOT IN (subquery)``
- ``or_across_columns``: ORs across different columns
- ``sort_no_index``: ORDER BY ... LIMIT with no index to supply the order
- ``poor_join``: correlated predicates the planner misestimates into a poor join method

Parameters are drawn by a `Sampler` from a `Profile` read off the warehouse at start: customers
and products weighted by their real sales counts (hot ones are queried more), real emails, SKUs,
cities, transaction ids and inventory keys, and the data's own date range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np

COMPLEXITIES = ("simple", "medium", "complex")
KINDS = ("point", "join", "aggregate", "window", "cte", "subquery", "topn", "dml", "error", "heavy")
SHAPES = (
    "unindexed_filter",
    "gold_answerable",
    "correlated_select",
    "not_in",
    "or_across_columns",
    "sort_no_index",
    "poor_join",
)
#: marks rows the workload writes, so its DELETE only ever removes its own rows
WORKLOAD_ETL_RUN = 0
WORKLOAD_BATCH = -1


# --------------------------------------------------------------------------- the data profile


@dataclass
class Profile:
    """What parameters are drawn from: real keys of the warehouse and how hot each one is."""

    customer_ids: list[int]
    customer_weights: list[float]
    emails: list[str]  # aligned with customer_ids
    last_names: list[str]  # aligned with customer_ids
    customer_places: list[tuple[str, str]]  # (city, region), aligned with customer_ids
    product_ids: list[int]
    product_weights: list[float]
    skus: list[str]  # aligned with product_ids
    transaction_ids: list[int]
    inventory_keys: list[tuple[int, int, date]]
    categories: list[str]
    regions: list[str]
    segments: list[str]
    channels: list[str]
    warehouses: list[int]
    first_sale: datetime
    last_sale: datetime
    max_transaction_id: int

    @classmethod
    def synthetic(cls, customers: int = 300, products: int = 30) -> Profile:
        """A profile without a database (unit tests): Zipf-like weights, made-up keys."""
        cids = list(range(1, customers + 1))
        pids = list(range(1, products + 1))
        return cls(
            customer_ids=cids,
            customer_weights=[1.0 / i**1.1 for i in cids],
            emails=[f"c{i}@example.com" for i in cids],
            last_names=[f"Name{i % 40}" for i in cids],
            customer_places=[(f"City{i % 12}", f"region{i % 5}") for i in cids],
            product_ids=pids,
            product_weights=[1.0 / i for i in pids],
            skus=[f"SKU-{i:06d}" for i in pids],
            transaction_ids=list(range(1, 1001)),
            inventory_keys=[(w, p, date(2025, 12, 31)) for p in pids for w in (1, 2, 3)],
            categories=["books", "toys", "home_garden", "sports"],
            regions=[f"region{i}" for i in range(5)],
            segments=["consumer", "small_business", "corporate", "vip"],
            channels=["online", "store", "mobile"],
            warehouses=[1, 2, 3, 4, 5],
            first_sale=datetime(2024, 1, 1),
            last_sale=datetime(2025, 12, 31, 23, 0),
            max_transaction_id=100_000,
        )

    @classmethod
    async def load(cls, conn: Any, hot: int = 2000) -> Profile:
        """Read the profile from the warehouse (asyncpg connection); every query is ordered."""
        customers = await conn.fetch(
            "SELECT c.customer_id, c.email, coalesce(c.last_name, '') AS last_name,"
            " coalesce(c.city, '') AS city, c.region, count(s.customer_id) + 1 AS weight"
            " FROM silver.customer_cleaned c"
            " LEFT JOIN silver.sales_cleaned s ON s.customer_id = c.customer_id"
            " GROUP BY c.customer_id ORDER BY weight DESC, c.customer_id LIMIT $1",
            hot,
        )
        products = await conn.fetch(
            "SELECT p.product_id, p.sku, count(s.product_id) + 1 AS weight"
            " FROM silver.product_cleaned p"
            " LEFT JOIN silver.sales_cleaned s ON s.product_id = p.product_id"
            " GROUP BY p.product_id ORDER BY weight DESC, p.product_id LIMIT $1",
            hot,
        )
        if not customers or not products:
            raise RuntimeError("the warehouse has no silver customers or products: load it first")
        txns = await conn.fetch(
            "SELECT DISTINCT transaction_id FROM silver.sales_cleaned"
            " ORDER BY transaction_id LIMIT 20000"
        )
        inventory = await conn.fetch(
            "SELECT warehouse_id, product_id, snapshot_date FROM silver.inventory_cleaned"
            " ORDER BY snapshot_date DESC, warehouse_id, product_id LIMIT 2000"
        )
        span = await conn.fetchrow(
            "SELECT min(sold_at) AS lo, max(sold_at) AS hi, max(transaction_id) AS txn"
            " FROM silver.sales_cleaned WHERE _etl_run_id <> $1",
            WORKLOAD_ETL_RUN,
        )
        top = await conn.fetchval("SELECT max(transaction_id) FROM silver.sales_cleaned")

        async def distinct(sql: str) -> list[Any]:
            return [r[0] for r in await conn.fetch(sql)]

        lo = span["lo"] or datetime(2024, 1, 1)
        hi = span["hi"] or lo + timedelta(days=365)
        return cls(
            customer_ids=[r["customer_id"] for r in customers],
            customer_weights=[float(r["weight"]) for r in customers],
            emails=[r["email"] for r in customers],
            last_names=[r["last_name"] for r in customers],
            customer_places=[(r["city"], r["region"]) for r in customers],
            product_ids=[r["product_id"] for r in products],
            product_weights=[float(r["weight"]) for r in products],
            skus=[r["sku"] for r in products],
            transaction_ids=[r[0] for r in txns] or [1],
            inventory_keys=[(r[0], r[1], r[2]) for r in inventory] or [(1, 1, date(2025, 1, 1))],
            categories=await distinct(
                "SELECT DISTINCT category FROM silver.product_cleaned ORDER BY 1"
            ),
            regions=await distinct(
                "SELECT DISTINCT region FROM silver.customer_cleaned ORDER BY 1"
            ),
            segments=await distinct(
                "SELECT DISTINCT segment FROM silver.customer_cleaned ORDER BY 1"
            ),
            channels=["online", "store", "mobile"],
            warehouses=await distinct(
                "SELECT DISTINCT warehouse_id FROM silver.inventory_cleaned ORDER BY 1"
            )
            or [1],
            first_sale=lo,
            last_sale=min(hi, lo + timedelta(days=3650)),
            max_transaction_id=int(top or 0),
        )


class Sampler:
    """Draws parameters from a Profile with one seeded numpy Generator (deterministic)."""

    def __init__(self, profile: Profile, rng: np.random.Generator, stream: int = 0) -> None:
        self.p = profile
        self.rng = rng
        cw = np.asarray(profile.customer_weights, dtype=float)
        pw = np.asarray(profile.product_weights, dtype=float)
        self._cum_c = np.cumsum(cw / cw.sum())
        self._cum_p = np.cumsum(pw / pw.sum())
        self._span_days = max(1, (profile.last_sale - profile.first_sale).days)
        # new transaction ids: past the warehouse's, a disjoint block per stream
        self.next_txn = profile.max_transaction_id + 1 + stream * 10_000_000

    def _weighted(self, cum: np.ndarray) -> int:
        return min(int(np.searchsorted(cum, self.rng.random(), side="right")), len(cum) - 1)

    def customer_index(self) -> int:
        return self._weighted(self._cum_c)

    def customer(self) -> int:
        return int(self.p.customer_ids[self.customer_index()])

    def product_index(self) -> int:
        return self._weighted(self._cum_p)

    def product(self) -> int:
        return int(self.p.product_ids[self.product_index()])

    def email(self) -> str:
        return self.p.emails[self.customer_index()]

    def last_name(self) -> str:
        return self.p.last_names[self.customer_index()]

    def place(self) -> tuple[str, str]:
        return self.p.customer_places[self.customer_index()]

    def sku(self) -> str:
        return self.p.skus[self.product_index()]

    def pick(self, options: list[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def category(self) -> str:
        return str(self.pick(self.p.categories))

    def region(self) -> str:
        return str(self.pick(self.p.regions))

    def segment(self) -> str:
        return str(self.pick(self.p.segments))

    def channel(self) -> str:
        return str(self.pick(self.p.channels))

    def warehouse(self) -> int:
        return int(self.pick(self.p.warehouses))

    def transaction(self) -> int:
        return int(self.pick(self.p.transaction_ids))

    def inventory_key(self) -> tuple[int, int, date]:
        w, p, d = self.pick(self.p.inventory_keys)
        return int(w), int(p), d

    def int_between(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def moment(self) -> datetime:
        """A moment in the data's range, recent ones more likely (triangular towards the end)."""
        days = self.rng.triangular(0, self._span_days, self._span_days)
        return (self.p.first_sale + timedelta(days=float(days))).replace(microsecond=0)

    def day(self) -> date:
        return self.moment().date()

    def range(self, min_days: int, max_days: int) -> tuple[datetime, datetime]:
        """A [start, end) range of whole days of min..max length inside the data."""
        length = self.int_between(min_days, max_days)
        end = self.moment().replace(hour=0, minute=0, second=0) + timedelta(days=1)
        first = self.p.first_sale.replace(hour=0, minute=0, second=0, microsecond=0)
        start = max(end - timedelta(days=length), first)
        return start, end

    def day_range(self, min_days: int, max_days: int) -> tuple[date, date]:
        start, end = self.range(min_days, max_days)
        return start.date(), end.date()

    def new_transaction(self) -> int:
        self.next_txn += 1
        return self.next_txn


ParamFn = Callable[[Sampler], tuple[Any, ...]]


@dataclass(frozen=True)
class Template:
    name: str
    sql: str
    params: ParamFn
    complexity: str
    kind: str
    tables: tuple[str, ...]
    shapes: tuple[str, ...] = ()
    #: (params, factor) -> params over a range `factor` times as wide (the drift anomaly)
    widen: Callable[[tuple[Any, ...], float], tuple[Any, ...]] | None = None
    #: the median length in days of the range its params draw (the drift anomaly's yardstick)
    usual_days: float | None = None
    #: only the anomaly injector issues it (never part of a role's regular mix)
    anomaly_only: bool = False
    tags: tuple[str, ...] = field(default=())

    @property
    def writes(self) -> bool:
        return self.kind == "dml"


def _widen_range(params: tuple[Any, ...], factor: float) -> tuple[Any, ...]:
    """Stretch a leading (start, end) pair backwards to `factor` times its length."""
    start, end, *rest = params
    return (end - (end - start) * factor, end, *rest)


def _day_range(lo: int, hi: int) -> dict[str, Any]:
    """Template fields for params of a [start, end) range of `lo`..`hi` whole days that the
    drift anomaly widens: the params, the widening and the usual (median) length."""
    return {"params": lambda s: s.day_range(lo, hi), "widen": _widen_range,
            "usual_days": (lo + hi) / 2}  # fmt: skip


def _none(_: Sampler) -> tuple[Any, ...]:
    return ()


S, M, C = COMPLEXITIES
SALES = "silver.sales_cleaned"
CUST = "silver.customer_cleaned"
PROD = "silver.product_cleaned"
INV = "silver.inventory_cleaned"
G_SUM = "gold.sales_summary"
G_C360 = "gold.customer_360"
G_PROD = "gold.product_performance"
G_INV = "gold.inventory_insights"


def _t(
    name: str,
    complexity: str,
    kind: str,
    tables: tuple[str, ...],
    sql: str,
    params: ParamFn = _none,
    **kw: Any,
) -> Template:
    return Template(name, " ".join(sql.split()), params, complexity, kind, tables, **kw)


TEMPLATES: tuple[Template, ...] = (
    # ---------------------------------------------------------------- point lookups
    _t("customer_by_id", S, "point", (CUST,),
       "SELECT * FROM silver.customer_cleaned WHERE customer_id = $1::bigint",
       lambda s: (s.customer(),)),
    _t("product_by_id", S, "point", (PROD,),
       "SELECT * FROM silver.product_cleaned WHERE product_id = $1::bigint",
       lambda s: (s.product(),)),
    _t("customer_360_by_id", S, "point", (G_C360,),
       "SELECT * FROM gold.customer_360 WHERE customer_id = $1::bigint",
       lambda s: (s.customer(),)),
    _t("product_performance_by_id", S, "point", (G_PROD,),
       "SELECT * FROM gold.product_performance WHERE product_id = $1::bigint",
       lambda s: (s.product(),)),
    _t("order_lines", S, "point", (SALES,),
       "SELECT * FROM silver.sales_cleaned WHERE transaction_id = $1::bigint ORDER BY line_no",
       lambda s: (s.transaction(),)),
    _t("inventory_of_product", S, "point", (INV,),
       "SELECT * FROM silver.inventory_cleaned WHERE product_id = $1::bigint"
       " ORDER BY snapshot_date DESC, warehouse_id LIMIT 5",
       lambda s: (s.product(),)),
    _t("inventory_insight", S, "point", (G_INV,),
       "SELECT * FROM gold.inventory_insights WHERE warehouse_id = $1::int"
       " AND product_id = $2::bigint",
       lambda s: s.inventory_key()[:2]),
    _t("customer_by_email", S, "point", (CUST,),
       "SELECT customer_id, first_name, last_name, segment FROM silver.customer_cleaned"
       " WHERE email = $1::text",
       lambda s: (s.email(),), shapes=("unindexed_filter",)),
    _t("product_by_sku", S, "point", (PROD,),
       "SELECT product_id, name, list_price FROM silver.product_cleaned WHERE sku = $1::text",
       lambda s: (s.sku(),), shapes=("unindexed_filter",)),
    _t("bronze_customer_record", M, "point", ("bronze.customer_raw",),
       "SELECT _row_id, _batch_id, email, segment FROM bronze.customer_raw"
       " WHERE customer_id = $1::text",
       lambda s: (str(s.customer()),), shapes=("unindexed_filter",)),
    _t("recent_orders_of_customer", S, "topn", (SALES,),
       "SELECT transaction_id, line_no, product_id, sold_at, net_amount"
       " FROM silver.sales_cleaned WHERE customer_id = $1::bigint"
       " ORDER BY sold_at DESC LIMIT 20",
       lambda s: (s.customer(),)),
    # ---------------------------------------------------------------- ORDER BY ... LIMIT
    _t("top_customers_by_spend", S, "topn", (G_C360,),
       "SELECT customer_id, full_name, segment, net_spend FROM gold.customer_360"
       " ORDER BY net_spend DESC LIMIT $1::int",
       lambda s: (s.pick([10, 25, 50]),), shapes=("sort_no_index",)),
    _t("top_products_in_category", S, "topn", (G_PROD,),
       "SELECT product_id, name, net_revenue, units_sold FROM gold.product_performance"
       " WHERE category = $1::text ORDER BY net_revenue DESC LIMIT 10",
       lambda s: (s.category(),)),
    _t("largest_sales_since", M, "topn", (SALES,),
       "SELECT transaction_id, customer_id, product_id, net_amount FROM silver.sales_cleaned"
       " WHERE sold_at >= $1::timestamp ORDER BY net_amount DESC LIMIT 20",
       lambda s: (s.moment(),), shapes=("sort_no_index", "unindexed_filter")),
    _t("latest_sales", S, "topn", (SALES,),
       "SELECT transaction_id, line_no, sold_at, net_amount FROM silver.sales_cleaned"
       " WHERE channel = $1::text ORDER BY sold_at DESC LIMIT 50",
       lambda s: (s.channel(),), shapes=("sort_no_index",)),
    _t("low_stock", S, "topn", (G_INV,),
       "SELECT warehouse_code, product_id, quantity_on_hand, days_of_supply"
       " FROM gold.inventory_insights WHERE status IN ('stockout', 'reorder')"
       " AND warehouse_id = $1::int ORDER BY days_of_supply NULLS FIRST LIMIT 50",
       lambda s: (s.warehouse(),)),
    # ---------------------------------------------------------------- aggregations
    _t("daily_revenue", S, "aggregate", (G_SUM,),
       "SELECT sale_date, sum(net_revenue) AS revenue, sum(transactions) AS transactions"
       " FROM gold.sales_summary WHERE sale_date >= $1::date AND sale_date < $2::date"
       " GROUP BY sale_date ORDER BY sale_date",
       **_day_range(7, 60)),
    _t("revenue_by_region_channel", S, "aggregate", (G_SUM,),
       "SELECT region, channel, sum(net_revenue) AS revenue FROM gold.sales_summary"
       " WHERE sale_date >= $1::date AND sale_date < $2::date GROUP BY region, channel"
       " ORDER BY revenue DESC",
       **_day_range(30, 90)),
    _t("revenue_by_category_silver", C, "aggregate", (SALES, PROD),
       "SELECT p.category, sum(s.net_amount) AS revenue, count(DISTINCT s.transaction_id) AS txns"
       " FROM silver.sales_cleaned s JOIN silver.product_cleaned p ON p.product_id = s.product_id"
       " WHERE s.sold_at >= $1::timestamp AND s.sold_at < $2::timestamp"
       " GROUP BY p.category ORDER BY revenue DESC",
       lambda s: s.range(30, 120), shapes=("gold_answerable",), widen=_widen_range),
    _t("monthly_revenue_silver", M, "aggregate", (SALES,),
       "SELECT date_trunc('month', sold_at) AS month, sum(net_amount) AS revenue"
       " FROM silver.sales_cleaned WHERE sold_at >= $1::timestamp GROUP BY 1 ORDER BY 1",
       lambda s: (s.range(180, 400)[0],), shapes=("gold_answerable",)),
    _t("segment_summary", S, "aggregate", (G_C360,),
       "SELECT segment, count(*) AS customers, avg(net_spend) AS avg_spend,"
       " avg(return_rate) AS return_rate FROM gold.customer_360 WHERE region = $1::text"
       " GROUP BY segment ORDER BY segment",
       lambda s: (s.region(),)),
    _t("category_return_rates", S, "aggregate", (G_PROD,),
       "SELECT category, sum(units_returned)::float8 / nullif(sum(units_sold), 0) AS rate,"
       " sum(net_revenue) AS revenue FROM gold.product_performance GROUP BY category"
       " ORDER BY rate DESC NULLS LAST"),
    _t("channel_mix_of_customer", S, "aggregate", (SALES,),
       "SELECT channel, count(*) AS lines, sum(net_amount) AS amount FROM silver.sales_cleaned"
       " WHERE customer_id = $1::bigint GROUP BY channel",
       lambda s: (s.customer(),)),
    _t("inventory_value_by_warehouse", S, "aggregate", (G_INV,),
       "SELECT warehouse_code, status, count(*) AS products, sum(inventory_value) AS value"
       " FROM gold.inventory_insights GROUP BY warehouse_code, status ORDER BY 1, 2"),
    _t("bronze_rows_by_batch", M, "aggregate", ("bronze.sales_raw",),
       "SELECT _batch_id, count(*) AS rows, max(_ingested_at) AS last_ingested"
       " FROM bronze.sales_raw GROUP BY _batch_id ORDER BY _batch_id"),
    _t("hourly_sales_pattern", M, "aggregate", (SALES,),
       "SELECT extract(hour FROM sold_at) AS hour, count(*) AS lines, sum(net_amount) AS amount"
       " FROM silver.sales_cleaned WHERE sold_at >= $1::timestamp AND sold_at < $2::timestamp"
       " GROUP BY 1 ORDER BY 1",
       lambda s: s.range(7, 60), widen=_widen_range),
    _t("sales_in_range", M, "aggregate", (SALES,),
       "SELECT count(*) AS lines, sum(net_amount) AS amount, avg(discount_pct) AS discount"
       " FROM silver.sales_cleaned WHERE sold_at >= $1::timestamp AND sold_at < $2::timestamp"
       " AND channel = $3::text",
       lambda s: (*s.range(3, 14), s.channel()), shapes=("unindexed_filter",),
       widen=_widen_range),
    # ---------------------------------------------------------------- joins
    _t("customer_orders_with_products", M, "join", (SALES, PROD),
       "SELECT s.transaction_id, s.sold_at, p.name, p.category, s.quantity, s.net_amount"
       " FROM silver.sales_cleaned s JOIN silver.product_cleaned p ON p.product_id = s.product_id"
       " WHERE s.customer_id = $1::bigint ORDER BY s.sold_at DESC LIMIT 50",
       lambda s: (s.customer(),)),
    _t("region_category_sales", M, "join", (SALES, CUST, PROD),
       "SELECT c.segment, p.category, count(*) AS lines, sum(s.net_amount) AS amount"
       " FROM silver.sales_cleaned s"
       " JOIN silver.customer_cleaned c ON c.customer_id = s.customer_id"
       " JOIN silver.product_cleaned p ON p.product_id = s.product_id"
       " WHERE c.region = $1::text AND s.sold_at >= $2::timestamp AND s.sold_at < $3::timestamp"
       " GROUP BY c.segment, p.category",
       lambda s: (s.region(), *s.range(14, 60))),
    _t("stock_vs_demand", C, "join", (SALES, PROD, INV, G_INV),
       "SELECT p.category, i.warehouse_code, sum(i.quantity_on_hand) AS on_hand,"
       " sum(g.units_sold_90d) AS demand_90d, count(DISTINCT s.transaction_id) AS txns"
       " FROM silver.inventory_cleaned i"
       " JOIN silver.product_cleaned p ON p.product_id = i.product_id"
       " JOIN gold.inventory_insights g"
       "   ON g.warehouse_id = i.warehouse_id AND g.product_id = i.product_id"
       " LEFT JOIN silver.sales_cleaned s"
       "   ON s.product_id = i.product_id AND s.warehouse_id = i.warehouse_id"
       "  AND s.sold_at >= $2::timestamp"
       " WHERE p.category = $1::text AND i.snapshot_date = g.snapshot_date"
       " GROUP BY p.category, i.warehouse_code",
       lambda s: (s.category(), s.range(30, 30)[0])),
    _t("vip_basket_five_way", C, "join", (SALES, CUST, PROD, INV, G_PROD),
       "SELECT c.customer_id, p.category, gp.revenue_rank_in_category, i.quantity_on_hand,"
       " s.net_amount FROM silver.sales_cleaned s"
       " JOIN silver.customer_cleaned c ON c.customer_id = s.customer_id"
       " JOIN silver.product_cleaned p ON p.product_id = s.product_id"
       " JOIN gold.product_performance gp ON gp.product_id = p.product_id"
       " JOIN silver.inventory_cleaned i"
       "   ON i.product_id = s.product_id AND i.warehouse_id = s.warehouse_id"
       " WHERE c.segment = $1::text AND c.region = $2::text AND i.snapshot_date = $3::date"
       " ORDER BY s.net_amount DESC LIMIT 100",
       lambda s: (s.segment(), s.region(), s.inventory_key()[2])),
    _t("city_sales_misestimated", M, "join", (SALES, CUST),
       "SELECT s.product_id, count(*) AS lines, sum(s.net_amount) AS amount"
       " FROM silver.sales_cleaned s JOIN silver.customer_cleaned c"
       "   ON c.customer_id = s.customer_id"
       " WHERE c.city = $1::text AND c.region = $2::text GROUP BY s.product_id"
       " ORDER BY amount DESC LIMIT 20",
       lambda s: s.place(), shapes=("poor_join",)),
    _t("discounted_below_list", C, "join", (SALES, PROD),
       "SELECT p.category, count(*) AS lines, avg(p.list_price - s.unit_price) AS markdown"
       " FROM silver.sales_cleaned s JOIN silver.product_cleaned p"
       "   ON p.product_id = s.product_id AND s.unit_price < p.list_price * $1::float8"
       " WHERE s.sold_at::date = $2::date GROUP BY p.category",
       lambda s: (s.pick([0.8, 0.9, 0.95]), s.day()), shapes=("poor_join",)),
    _t("customer_360_vs_silver", M, "join", (G_C360, CUST),
       "SELECT g.customer_id, g.net_spend, c.email, c.signup_date FROM gold.customer_360 g"
       " JOIN silver.customer_cleaned c ON c.customer_id = g.customer_id"
       " WHERE g.segment = $1::text AND g.region = $2::text ORDER BY g.net_spend DESC LIMIT 25",
       lambda s: (s.segment(), s.region())),
    # ---------------------------------------------------------------- window functions
    _t("customer_running_total", M, "window", (SALES,),
       "SELECT transaction_id, sold_at, net_amount,"
       " sum(net_amount) OVER (ORDER BY sold_at, transaction_id, line_no) AS running_total"
       " FROM silver.sales_cleaned WHERE customer_id = $1::bigint ORDER BY sold_at",
       lambda s: (s.customer(),)),
    _t("product_rank_in_category", M, "window", (G_PROD,),
       "SELECT * FROM (SELECT product_id, name, category, net_revenue,"
       " rank() OVER (PARTITION BY category ORDER BY net_revenue DESC) AS rnk"
       " FROM gold.product_performance) r WHERE rnk <= $1::int ORDER BY category, rnk",
       lambda s: (s.pick([3, 5, 10]),)),
    _t("moving_avg_revenue", M, "window", (G_SUM,),
       "SELECT sale_date, revenue, avg(revenue) OVER (ORDER BY sale_date ROWS 6 PRECEDING) AS ma7"
       " FROM (SELECT sale_date, sum(net_revenue) AS revenue FROM gold.sales_summary"
       " WHERE sale_date >= $1::date AND sale_date < $2::date GROUP BY sale_date) d"
       " ORDER BY sale_date",
       lambda s: s.day_range(60, 180)),
    _t("month_over_month_silver", C, "window", (SALES,),
       "SELECT month, revenue, revenue - lag(revenue) OVER (ORDER BY month) AS change"
       " FROM (SELECT date_trunc('month', sold_at) AS month, sum(net_amount) AS revenue"
       " FROM silver.sales_cleaned GROUP BY 1) m ORDER BY month",
       shapes=("gold_answerable",)),
    _t("customer_deciles", M, "window", (G_C360,),
       "SELECT decile, count(*) AS customers, min(net_spend), max(net_spend) FROM"
       " (SELECT net_spend, ntile(10) OVER (ORDER BY net_spend) AS decile"
       " FROM gold.customer_360 WHERE region = $1::text) d GROUP BY decile ORDER BY decile",
       lambda s: (s.region(),)),
    # ---------------------------------------------------------------- CTEs
    _t("signup_cohorts", C, "cte", (SALES, CUST),
       "WITH firsts AS (SELECT customer_id, min(sold_at) AS first_at FROM silver.sales_cleaned"
       " GROUP BY customer_id)"
       " SELECT date_trunc('month', c.signup_date) AS cohort, count(*) AS customers,"
       " avg(extract(epoch FROM f.first_at - c.signup_date) / 86400) AS days_to_first"
       " FROM silver.customer_cleaned c JOIN firsts f ON f.customer_id = c.customer_id"
       " WHERE c.segment = $1::text GROUP BY 1 ORDER BY 1",
       lambda s: (s.segment(),)),
    _t("repeat_buyers", M, "cte", (SALES,),
       "WITH per_customer AS (SELECT customer_id, count(DISTINCT transaction_id) AS txns"
       " FROM silver.sales_cleaned WHERE sold_at >= $1::timestamp AND sold_at < $2::timestamp"
       " GROUP BY customer_id)"
       " SELECT txns, count(*) AS customers FROM per_customer GROUP BY txns ORDER BY txns",
       lambda s: s.range(30, 90), widen=_widen_range),
    _t("bought_together", C, "cte", (SALES, PROD),
       "WITH baskets AS (SELECT DISTINCT transaction_id FROM silver.sales_cleaned"
       " WHERE product_id = $1::bigint)"
       " SELECT p.product_id, p.name, count(*) AS together FROM baskets b"
       " JOIN silver.sales_cleaned s ON s.transaction_id = b.transaction_id"
       " JOIN silver.product_cleaned p ON p.product_id = s.product_id"
       " WHERE s.product_id <> $1::bigint GROUP BY p.product_id, p.name"
       " ORDER BY together DESC LIMIT 10",
       lambda s: (s.product(),)),
    _t("returns_by_reason_window", M, "cte", (SALES,),
       "WITH r AS (SELECT original_transaction_id, sum(-net_amount) AS refunded"
       " FROM silver.sales_cleaned WHERE transaction_type = 'return'"
       " AND sold_at >= $1::timestamp GROUP BY original_transaction_id)"
       " SELECT count(*) AS returns, sum(refunded) AS refunded, max(refunded) AS largest FROM r",
       lambda s: (s.range(30, 180)[0],)),
    # ---------------------------------------------------------------- subqueries
    _t("customers_with_totals", C, "subquery", (CUST, SALES),
       "SELECT c.customer_id, c.last_name,"
       " (SELECT sum(s.net_amount) FROM silver.sales_cleaned s"
       "   WHERE s.customer_id = c.customer_id) AS spend,"
       " (SELECT max(s.sold_at) FROM silver.sales_cleaned s"
       "   WHERE s.customer_id = c.customer_id) AS last_seen"
       " FROM silver.customer_cleaned c WHERE c.region = $1::text AND c.segment = $2::text"
       " ORDER BY c.customer_id LIMIT 200",
       lambda s: (s.region(), s.segment()), shapes=("correlated_select",)),
    _t("customers_never_in_category", C, "subquery", (CUST, SALES, PROD),
       "SELECT count(*) FROM silver.customer_cleaned c WHERE c.customer_id NOT IN"
       " (SELECT s.customer_id FROM silver.sales_cleaned s"
       "  JOIN silver.product_cleaned p ON p.product_id = s.product_id"
       "  WHERE p.category = $1::text)",
       lambda s: (s.category(),), shapes=("not_in",)),
    _t("products_above_category_avg", M, "subquery", (PROD,),
       "SELECT product_id, name, list_price FROM silver.product_cleaned"
       " WHERE category = $1::text AND list_price >"
       " (SELECT avg(list_price) FROM silver.product_cleaned WHERE category = $1::text)"
       " ORDER BY list_price DESC",
       lambda s: (s.category(),)),
    _t("customers_with_returns", M, "subquery", (CUST, SALES),
       "SELECT c.customer_id, c.email FROM silver.customer_cleaned c"
       " WHERE c.region = $1::text AND EXISTS (SELECT 1 FROM silver.sales_cleaned s"
       " WHERE s.customer_id = c.customer_id AND s.transaction_type = 'return')"
       " ORDER BY c.customer_id LIMIT 100",
       lambda s: (s.region(),)),
    _t("sales_of_customer_or_product", M, "subquery", (SALES,),
       "SELECT transaction_id, line_no, customer_id, product_id, net_amount"
       " FROM silver.sales_cleaned WHERE customer_id = $1::bigint OR product_id = $2::bigint"
       " ORDER BY sold_at DESC LIMIT 100",
       lambda s: (s.customer(), s.product()), shapes=("or_across_columns",)),
    _t("customer_search", S, "point", (CUST,),
       "SELECT customer_id, first_name, last_name, email FROM silver.customer_cleaned"
       " WHERE email = $1::text OR last_name = $2::text OR city = $3::text LIMIT 50",
       lambda s: (s.email(), s.last_name(), s.place()[0]),
       shapes=("or_across_columns", "unindexed_filter")),
    # ---------------------------------------------------------------- DML (the ETL writer)
    _t("insert_sales_line", S, "dml", (SALES,),
       "INSERT INTO silver.sales_cleaned (transaction_id, line_no, transaction_type,"
       " customer_id, product_id, warehouse_id, channel, sold_at, quantity, unit_price,"
       " discount_pct, net_amount, _bronze_row_id, _etl_run_id)"
       " VALUES ($1::bigint, 1, 'sale', $2::bigint, $3::bigint, $4::int, $5::text,"
       " $6::timestamp, $7::int, $8::numeric, 0, $7::int * $8::numeric, 0, 0)"
       " ON CONFLICT DO NOTHING",
       lambda s: (s.new_transaction(), s.customer(), s.product(), s.warehouse(), s.channel(),
                  s.moment(), s.int_between(1, 5), float(s.int_between(199, 9999)) / 100)),
    _t("insert_sales_raw", S, "dml", ("bronze.sales_raw",),
       "INSERT INTO bronze.sales_raw (_batch_id, transaction_id, line_no, transaction_type,"
       " customer_id, product_id, warehouse_id, channel, sold_at, quantity, unit_price,"
       " discount_pct) VALUES (-1, $1::text, '1', 'sale', $2::text, $3::text, $4::text, $5::text,"
       " $6::text, $7::text, $8::text, '0')",
       lambda s: (str(s.new_transaction()), str(s.customer()), str(s.product()),
                  f"WH-{s.warehouse()}", s.channel(), s.moment().isoformat(sep=" "),
                  str(s.int_between(1, 5)), f"{s.int_between(199, 9999) / 100:.2f}")),
    _t("update_inventory", S, "dml", (INV,),
       "UPDATE silver.inventory_cleaned SET quantity_on_hand ="
       " greatest(quantity_on_hand + $4::int, 0)"
       " WHERE warehouse_id = $1::int AND product_id = $2::bigint AND snapshot_date = $3::date",
       lambda s: (*s.inventory_key(), s.int_between(-5, 8))),
    _t("delete_old_workload_sales", S, "dml", (SALES,),
       "DELETE FROM silver.sales_cleaned WHERE _etl_run_id = 0 AND transaction_id < $1::bigint",
       lambda s: (s.next_txn - 500,)),
    _t("delete_old_landed_sales", S, "dml", ("bronze.sales_raw",),
       "DELETE FROM bronze.sales_raw WHERE _batch_id = -1 AND sold_at < $1::text",
       lambda s: ((s.moment() - timedelta(days=60)).isoformat(sep=" "),),
       shapes=("unindexed_filter",)),
    # ---------------------------------------------------------------- anomaly-only
    _t("bad_sql_undefined_column", S, "error", (G_C360,),
       "SELECT customer_id, net_spend FROM gold.customer_360 WHERE custmer_id = $1::bigint",
       lambda s: (s.customer(),), anomaly_only=True),
    _t("insert_sales_line_invalid", S, "error", (SALES,),
       "INSERT INTO silver.sales_cleaned (transaction_id, line_no, transaction_type,"
       " customer_id, product_id, channel, sold_at, quantity, unit_price, net_amount,"
       " _bronze_row_id, _etl_run_id) VALUES ($1::bigint, 1, 'sale', $2::bigint, $3::bigint,"
       " 'online', $4::timestamp, -$5::int, 1, 0, 0, 0)",
       lambda s: (s.new_transaction(), s.customer(), s.product(), s.moment(),
                  s.int_between(1, 5)), anomaly_only=True),
    _t("cross_customers_products", C, "heavy", (CUST, PROD),
       "SELECT c.region, p.category, count(*) AS pairs, sum(p.list_price) AS exposure"
       " FROM silver.customer_cleaned c CROSS JOIN silver.product_cleaned p"
       " WHERE c.segment <> $1::text GROUP BY c.region, p.category",
       lambda s: (s.segment(),), anomaly_only=True),
    _t("cross_sales_warehouses", C, "heavy", (SALES, INV),
       "SELECT i.warehouse_code, count(*) AS pairs, sum(s.quantity * i.quantity_on_hand) AS x"
       " FROM silver.sales_cleaned s CROSS JOIN"
       " (SELECT DISTINCT warehouse_code, quantity_on_hand FROM silver.inventory_cleaned"
       "  WHERE product_id = $1::bigint) i GROUP BY i.warehouse_code",
       lambda s: (s.product(),), anomaly_only=True),
    _t("cross_customer_pairs", C, "heavy", (CUST,),
       "SELECT a.region, b.region AS other, count(*) AS pairs"
       " FROM silver.customer_cleaned a CROSS JOIN silver.customer_cleaned b"
       " WHERE a.segment = $1::text AND b.segment = 'vip' GROUP BY 1, 2",
       lambda s: (s.segment(),), anomaly_only=True),
)  # fmt: skip

BY_NAME: dict[str, Template] = {t.name: t for t in TEMPLATES}
REGULAR: tuple[Template, ...] = tuple(t for t in TEMPLATES if not t.anomaly_only)


def template(name: str) -> Template:
    return BY_NAME[name]
