"""Anomalies injected on a seeded schedule, each with its ground truth.

The simulated span is cut into equal slots, one anomaly per slot (so windows never overlap and
an execution carries at most one label); every kind occurs at least once per run, the rest are
drawn by the seed. Kinds:

- ``lock_contention``: a background transaction holds a table in ACCESS EXCLUSIVE mode for the
  window; every execution of a template reading that table in the window waits for it.
- ``seq_scan``: an index-friendly lookup on silver.sales_cleaned runs with index and bitmap scans
  switched off (a plan regression), so it scans the whole table.
- ``rate_burst``: one application template arrives ten times as often for a few minutes.
- ``error_burst``: bad SQL (an undefined column) and constraint violations (a negative quantity).
- ``heavy_unseen``: cross joins that have never run before.
- ``drift``: a template's date range, and so the data it reads, grows steadily up to 20x.

An execution an anomaly affects carries ``/* pgsage:label=KIND:RUN.N */`` at the start of its
SQL: a regular execution of an affected template inside the window, or an extra execution the
anomaly adds (bursts, errors, cross joins).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from .clock import activity
from .roles import ROLE_BY_NAME, Arrival, Statement, role_rate
from .templates import BY_NAME, REGULAR, Sampler

PREFIX = {
    "lock_contention": "lock",
    "seq_scan": "seqscan",
    "rate_burst": "burst",
    "error_burst": "errors",
    "heavy_unseen": "heavy",
    "drift": "drift",
}
KINDS = tuple(PREFIX)
LOCK_TABLES = ("silver.inventory_cleaned", "gold.customer_360", "silver.product_cleaned")
SEQ_SCAN_TEMPLATES = ("recent_orders_of_customer", "order_lines", "customer_orders_with_products")
BURST_TEMPLATES = ("customer_by_id", "product_by_id", "customer_360_by_id", "order_lines")
DRIFT_TEMPLATES = ("sales_in_range", "revenue_by_category_silver", "hourly_sales_pattern")
HEAVY_TEMPLATES = ("cross_customers_products", "cross_customer_pairs", "cross_sales_warehouses")
ERROR_TEMPLATES = (("analyst", "bad_sql_undefined_column"), ("etl", "insert_sales_line_invalid"))
DISABLE_INDEXES = ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan")
DRIFT_FACTOR = 20.0
#: minimum real seconds a lock is held, whatever the clock speed (or nothing would wait)
LOCK_MIN_REAL = 2.0


def mark(label: str, sql: str) -> str:
    return f"/* pgsage:label={label} */ {sql}"


@dataclass
class Anomaly:
    kind: str
    label: str
    start: float  # simulated epoch seconds
    end: float
    templates: tuple[str, ...]
    description: str
    detail: dict[str, Any] = field(default_factory=dict)
    #: extra executions this anomaly adds (bursts, errors, cross joins)
    extra: int = 0

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end

    @property
    def window(self) -> tuple[datetime, datetime]:
        return datetime.fromtimestamp(self.start, UTC), datetime.fromtimestamp(self.end, UTC)


def make_schedule(
    seed: int,
    start: float,
    end: float,
    *,
    speed: float,
    qps: float,
    run_tag: str,
    per_day: float = 4.0,
) -> list[Anomaly]:
    """The run's anomalies in time order: every kind at least once, one per slot."""
    rng = np.random.default_rng([seed, 0xA11])
    span = end - start
    n = max(len(KINDS), round(span / 86400 * per_day))
    kinds = list(KINDS) + [KINDS[int(i)] for i in rng.integers(len(KINDS), size=n - len(KINDS))]
    rng.shuffle(kinds)
    slot = span / n
    out = []
    seen: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        label = f"{PREFIX[kind]}:{run_tag}.{i + 1}"
        slot_start = start + i * slot
        nth = seen[kind] = seen.get(kind, -1) + 1
        out.append(_make(kind, label, rng, slot_start, slot, speed=speed, qps=qps, nth=nth))
    return out


def _window(
    rng: np.random.Generator, slot_start: float, slot: float, length: float
) -> tuple[float, float]:
    """A window of `length` inside the slot: the busiest of four random placements (trouble
    shows under load, and a window at 4 a.m. might affect no execution at all)."""
    length = min(length, slot * 0.8)
    room = slot - length
    offsets = rng.uniform(slot * 0.1, room, size=4) if room > slot * 0.1 else np.zeros(4)
    best = max(
        (float(o) for o in offsets),
        key=lambda o: activity(datetime.fromtimestamp(slot_start + o + length / 2, UTC)),
    )
    return slot_start + best, slot_start + best + length


def _make(
    kind: str,
    label: str,
    rng: np.random.Generator,
    slot_start: float,
    slot: float,
    *,
    speed: float,
    qps: float,
    nth: int,
) -> Anomaly:
    minutes = 60.0
    if kind == "lock_contention":
        table = LOCK_TABLES[int(rng.integers(len(LOCK_TABLES)))]
        length = max(float(rng.uniform(10, 30)) * minutes, LOCK_MIN_REAL * speed)
        s, e = _window(rng, slot_start, slot, length)
        affected = tuple(t.name for t in REGULAR if table in t.tables)
        return Anomaly(kind, label, s, e, affected,
                       f"{table} held in ACCESS EXCLUSIVE mode by a background transaction;"
                       " executions of templates reading it wait for the lock",
                       {"table": table})  # fmt: skip
    if kind == "seq_scan":
        name = SEQ_SCAN_TEMPLATES[int(rng.integers(len(SEQ_SCAN_TEMPLATES)))]
        s, e = _window(rng, slot_start, slot, float(rng.uniform(20, 60)) * minutes)
        return Anomaly(kind, label, s, e, (name,),
                       f"{name} runs with {', '.join(DISABLE_INDEXES)} off: a forced"
                       " sequential scan of silver.sales_cleaned",
                       {"settings_off": list(DISABLE_INDEXES)})  # fmt: skip
    if kind == "rate_burst":
        name = BURST_TEMPLATES[int(rng.integers(len(BURST_TEMPLATES)))]
        s, e = _window(rng, slot_start, slot, float(rng.uniform(5, 15)) * minutes)
        app = ROLE_BY_NAME["app"]
        weights = dict(app.mix)
        # nine times the template's average rate, so it runs about ten times as often
        normal = role_rate(app, qps, speed) * weights[name] / sum(weights.values()) * (e - s)
        extra = max(30, round(9 * normal))
        return Anomaly(kind, label, s, e, (name,),
                       f"{name} arrives about 10x as often as usual (rate burst)",
                       {"role": "app", "factor": 10}, extra=extra)  # fmt: skip
    if kind == "error_burst":
        s, e = _window(rng, slot_start, slot, float(rng.uniform(5, 20)) * minutes)
        extra = max(20, round(0.05 * qps * (e - s) / speed))
        return Anomaly(kind, label, s, e, tuple(n for _, n in ERROR_TEMPLATES),
                       "a burst of failing statements: an undefined column (42703) and a check"
                       " constraint violation (23514)", {"sqlstates": ["42703", "23514"]},
                       extra=extra)  # fmt: skip
    if kind == "heavy_unseen":
        # a shape not run before in this run, until all have been
        name = HEAVY_TEMPLATES[nth % len(HEAVY_TEMPLATES)]
        s, e = _window(rng, slot_start, slot, float(rng.uniform(2, 10)) * minutes)
        return Anomaly(kind, label, s, e, (name,),
                       f"never-seen heavy query: {name} (a cross join)", {},
                       extra=int(rng.integers(1, 4)))  # fmt: skip
    name = DRIFT_TEMPLATES[int(rng.integers(len(DRIFT_TEMPLATES)))]
    s, e = _window(rng, slot_start, slot, slot * 0.8)
    return Anomaly(kind, label, s, e, (name,),
                   f"{name} reads a growing date range (1x to {DRIFT_FACTOR:.0f}x over the"
                   " window): slow drift of its data volume", {"factor": DRIFT_FACTOR})  # fmt: skip


class Injector:
    """Applies a schedule: labels (and alters) affected regular executions, adds extra ones."""

    def __init__(self, schedule: list[Anomaly]) -> None:
        self.schedule = schedule
        self._starts = [a.start for a in schedule]

    def active(self, t: float) -> Anomaly | None:
        i = int(np.searchsorted(self._starts, t, side="right")) - 1
        if i >= 0 and self.schedule[i].covers(t):
            return self.schedule[i]
        return None

    def apply(self, arrival: Arrival) -> Arrival:
        a = self.active(arrival.sim)
        if a is None or a.kind in ("error_burst", "heavy_unseen"):
            return arrival
        stmts = []
        for st in arrival.statements:
            if st.template not in a.templates:
                stmts.append(st)
                continue
            params = st.params
            if a.kind == "drift":
                widen = BY_NAME[st.template].widen
                progress = (arrival.sim - a.start) / (a.end - a.start)
                if widen is not None:
                    params = widen(params, 1.0 + (DRIFT_FACTOR - 1.0) * progress)
            disable = DISABLE_INDEXES if a.kind == "seq_scan" else ()
            stmts.append(Statement(st.template, mark(a.label, st.sql), params, a.label, disable))
        arrival.statements = stmts
        return arrival

    def extras(
        self, sampler_for: Callable[[int], Sampler], users: dict[str, int]
    ) -> Iterator[Arrival]:
        """The executions anomalies add, and the lock holders, in simulated time order
        (`sampler_for(i)` gives anomaly i its own parameter stream)."""
        for i, a in enumerate(self.schedule):
            yield from _extra_arrivals(a, sampler_for(i), users)


def _extra_arrivals(a: Anomaly, sampler: Sampler, users: dict[str, int]) -> Iterator[Arrival]:
    rng = sampler.rng
    if a.kind == "lock_contention":
        yield Arrival(a.start, "anomaly", 0, [], hold=(a.detail["table"], a.end), label=a.label)
        return
    if not a.extra:
        return
    times = np.sort(rng.uniform(a.start, a.end, size=a.extra))
    for k, t in enumerate(times):
        if a.kind == "rate_burst":
            role, name = "app", a.templates[0]
        elif a.kind == "error_burst":
            role, name = ERROR_TEMPLATES[k % len(ERROR_TEMPLATES)]
        else:
            role, name = "analyst", a.templates[0]
        t_ = BY_NAME[name]
        st = Statement(name, mark(a.label, t_.sql), t_.params(sampler), a.label)
        user = int(rng.integers(max(1, users.get(role, 1))))
        yield Arrival(float(t), role, user, [st], label=a.label)
