"""The simulated users: who runs which templates, over which client path, and when.

Four roles, each with its own behaviour and client path:

- ``dashboard`` (BI tool, JDBC-style): each user refreshes one dashboard, a fixed set of queries
  with fixed parameters, on a schedule that runs faster in busy hours; psycopg with
  ``prepare_threshold=5``, so from the fifth execution of a text on it is a named server-side
  statement, as pgjdbc does by default.
- ``analyst`` (psql-like, ad hoc): medium and complex parameterised queries, Poisson arrivals;
  psycopg client-side binding over the simple query protocol.
- ``app`` (the application): point lookups of hot customers and products, Poisson arrivals;
  asyncpg, the extended protocol with prepared statements.
- ``etl`` (the writer): small batches of INSERT/UPDATE/DELETE, Poisson arrivals; asyncpg.

Arrival times are simulated epoch seconds. A role's statement rate is its share of the
configured qps (real seconds) times `activity(t) / MEAN_ACTIVITY`; Poisson arrivals are drawn by
thinning a homogeneous process at the curve's maximum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from .clock import MAX_ACTIVITY, MEAN_ACTIVITY, activity
from .templates import BY_NAME, Sampler

PATHS = ("simple", "extended", "named")


@dataclass(frozen=True)
class Role:
    name: str
    path: str
    share: float  # of the configured statements per second
    users: int  # default number of concurrent users (connections)
    mix: tuple[tuple[str, float], ...] = ()
    batch: tuple[int, int] = (1, 1)  # statements per arrival, inclusive range
    description: str = ""

    @property
    def statements_per_arrival(self) -> float:
        return (self.batch[0] + self.batch[1]) / 2

    @property
    def application_name(self) -> str:
        return f"pgsage-workload-{self.name}"


@dataclass(frozen=True)
class Statement:
    template: str
    sql: str
    params: tuple[Any, ...]
    label: str | None = None
    #: planner settings to switch off around this statement (the forced seq scan anomaly)
    disable: tuple[str, ...] = ()


@dataclass
class Arrival:
    """What one user does at one simulated moment: statements run in order on its connection."""

    sim: float
    role: str
    user: int
    statements: list[Statement]
    #: a background transaction holding (table, simulated end) — the lock anomaly
    hold: tuple[str, float] | None = None
    label: str | None = None
    order: int = field(default=0)

    def key(self) -> tuple[float, int]:
        return (self.sim, self.order)


DASHBOARDS: dict[str, tuple[str, ...]] = {
    "sales_overview": (
        "daily_revenue",
        "revenue_by_region_channel",
        "monthly_revenue_silver",
        "moving_avg_revenue",
        "month_over_month_silver",
    ),
    "customers": (
        "segment_summary",
        "top_customers_by_spend",
        "customer_deciles",
        "signup_cohorts",
    ),
    "products": (
        "top_products_in_category",
        "category_return_rates",
        "product_rank_in_category",
        "revenue_by_category_silver",
    ),
    "operations": ("inventory_value_by_warehouse", "low_stock", "stock_vs_demand", "latest_sales"),
}

ROLES: tuple[Role, ...] = (
    Role("dashboard", "named", 0.25, 4, batch=(4, 5),
         description="BI dashboards refreshing a fixed set of queries on a schedule"),
    Role("analyst", "simple", 0.20, 4, mix=(
        ("revenue_by_category_silver", 4), ("monthly_revenue_silver", 2),
        ("hourly_sales_pattern", 3), ("sales_in_range", 4), ("region_category_sales", 3),
        ("stock_vs_demand", 1), ("vip_basket_five_way", 1), ("city_sales_misestimated", 2),
        ("discounted_below_list", 2), ("customer_360_vs_silver", 2),
        ("customer_running_total", 2), ("product_rank_in_category", 1),
        ("month_over_month_silver", 1), ("customer_deciles", 1), ("signup_cohorts", 1),
        ("repeat_buyers", 3), ("bought_together", 2), ("returns_by_reason_window", 1),
        ("customers_with_totals", 2), ("customers_never_in_category", 1),
        ("products_above_category_avg", 1), ("customers_with_returns", 1),
        ("largest_sales_since", 2), ("latest_sales", 1), ("bronze_customer_record", 1),
        ("top_products_in_category", 1), ("segment_summary", 1),
    ), description="analysts running ad-hoc parameterised queries"),
    Role("app", "extended", 0.45, 8, mix=(
        ("customer_by_id", 10), ("product_by_id", 8), ("customer_360_by_id", 8),
        ("product_performance_by_id", 6), ("order_lines", 6), ("inventory_of_product", 5),
        ("inventory_insight", 4), ("customer_by_email", 4), ("product_by_sku", 3),
        ("recent_orders_of_customer", 6), ("channel_mix_of_customer", 2),
        ("customer_search", 2), ("sales_of_customer_or_product", 2),
        ("customer_orders_with_products", 3),
    ), description="the application doing point lookups of hot customers and products"),
    Role("etl", "extended", 0.10, 2, batch=(1, 4), mix=(
        ("insert_sales_line", 5), ("insert_sales_raw", 3), ("update_inventory", 5),
        ("delete_old_workload_sales", 1), ("delete_old_landed_sales", 1),
        ("bronze_rows_by_batch", 1),
    ), description="the ETL writer: inserts, inventory updates, clean-up deletes"),
)  # fmt: skip
ROLE_BY_NAME = {r.name: r for r in ROLES}


def role_rate(role: Role, qps: float, speed: float) -> float:
    """Average arrivals per simulated second of `role` at `qps` statements per real second."""
    return qps * role.share / role.statements_per_arrival / speed


def _statement(sampler: Sampler, name: str) -> Statement:
    t = BY_NAME[name]
    return Statement(name, t.sql, t.params(sampler))


def poisson_times(
    rng: np.random.Generator, rate: float, start: float, end: float
) -> Iterator[float]:
    """Arrival times (simulated epoch seconds) of a Poisson process of mean rate `rate`,
    modulated by the activity curve (Lewis-Shedler thinning)."""
    if rate <= 0:
        return
    peak = rate * MAX_ACTIVITY / MEAN_ACTIVITY
    t = start
    while True:
        t += float(rng.exponential(1.0 / peak))
        if t >= end:
            return
        if rng.random() * MAX_ACTIVITY < activity(datetime.fromtimestamp(t, UTC)):
            yield t


def mix_arrivals(
    role: Role, users: int, sampler: Sampler, rate: float, start: float, end: float
) -> Iterator[Arrival]:
    """A Poisson role: each arrival is a user running 1..n templates drawn from the mix."""
    names = [n for n, _ in role.mix]
    weights = np.asarray([w for _, w in role.mix], dtype=float)
    cum = np.cumsum(weights / weights.sum())
    rng = sampler.rng
    for t in poisson_times(rng, rate, start, end):
        user = int(rng.integers(users))
        count = int(rng.integers(role.batch[0], role.batch[1] + 1))
        stmts = []
        for _ in range(count):
            i = min(int(np.searchsorted(cum, rng.random(), side="right")), len(names) - 1)
            stmts.append(_statement(sampler, names[i]))
        yield Arrival(t, role.name, user, stmts)


def dashboard_arrivals(
    role: Role, users: int, sampler: Sampler, rate: float, start: float, end: float
) -> Iterator[Arrival]:
    """Scheduled refreshes: user u shows dashboard u mod 4 with parameters fixed at start, and
    refreshes it every `users / rate` simulated seconds of average activity (so more often in
    busy hours, rarely at night), with 10% jitter."""
    rng = sampler.rng
    boards = list(DASHBOARDS.values())
    fixed = []
    for u in range(users):
        names = boards[u % len(boards)]
        fixed.append([_statement(sampler, n) for n in names])
    period = users / rate if rate > 0 else float("inf")
    # every user's next refresh; users start at staggered offsets
    pending = [start + float(rng.random()) * min(period, end - start) for _ in range(users)]
    while True:
        u = min(range(users), key=lambda i: (pending[i], i))
        t = pending[u]
        if t >= end:
            return
        yield Arrival(t, role.name, u, list(fixed[u]))
        pending[u] = _after_activity(t, period * float(rng.uniform(0.9, 1.1)), end)


def _after_activity(t: float, amount: float, end: float) -> float:
    """The moment after `t` by which `amount` seconds of average activity have passed (a
    schedule in activity time: dense in business hours, sparse at night, never skipping the
    morning ramp)."""
    step = min(amount, 600.0)
    while amount > 0 and t < end:
        level = activity(datetime.fromtimestamp(t + step / 2, UTC)) / MEAN_ACTIVITY
        if level * step >= amount:
            return t + amount / max(level, 1e-9)
        amount -= level * step
        t += step
    return max(t, end)
