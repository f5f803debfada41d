"""Anomalies injected on a seeded schedule, each with its ground truth.

The simulated span is cut into equal slots, one anomaly per slot (so windows never overlap and
an execution carries at most one label); every kind occurs at least once per run, the rest are
drawn by the seed. Each label marks executions whose logged run the anomaly really changed:

- ``lock_contention``: a background transaction holds a table in ACCESS EXCLUSIVE mode for the
  window. A user's first statement on that table in the window waits for the lock and is
  labelled; whatever that user issues after it queues behind it on the client and starts once
  the lock is gone, so it never waits and is not labelled. A statement that arrives while the
  holder is still connecting (`LOCK_SETTLE_REAL`) may not wait either: not labelled. On the
  asyncpg path a new text is prepared in a round trip of its own (Parse, Describe, Sync) that
  pgsage does not time as part of the execution, so the wait never reaches the log: such a
  statement gets a marker comment of its own (`UNTIMED_WAIT`), the same new-text path a label
  would take, but no label.
- ``seq_scan``: an index-friendly lookup on silver.sales_cleaned runs with index and bitmap scans
  switched off (a plan regression), so it scans the whole table: 7 to 8 ms instead of 0.2 ms
  at the anomaly bench's scale (1.0, 100,000 sales lines; at 0.2 the scan took 2 ms, within
  the noise of two shared cores). A regression lasts until someone notices (two to five
  hours, in the busy part of the slot), so the log holds a run of them, not one or two.
- ``rate_burst``: one application template arrives ten times as often for a few minutes.
- ``error_burst``: bad SQL (an undefined column) and constraint violations (a negative quantity).
- ``heavy_unseen``: cross joins that have never run before.
- ``drift``: the sales overview dashboard's date-range queries (index range scans of
  gold.sales_summary, so the work grows with the range) read a range growing steadily up to
  `DRIFT_FACTOR` times their own. An execution is labelled once the part of its range that
  holds data is `DRIFT_LABEL_FROM` times the template's usual width (`Template.usual_days`): below
  that it is not clearly slower than the template's other executions. (Its own range tripled is
  not enough: a 7-day range tripled reads less than the template's median range, and a range
  stretched back past the first sale reads nothing more there.)

An execution an anomaly affects carries ``/* pgsage:label=KIND:RUN.N */`` at the start of its
SQL: a regular execution of an affected template inside the window, or an extra execution the
anomaly adds (bursts, errors, cross joins).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
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
#: writers that wait for a locked table they do not name: their foreign key check reads it
LOCK_DEPENDENTS = {"silver.product_cleaned": ("insert_sales_line",)}
SEQ_SCAN_TEMPLATES = ("recent_orders_of_customer", "order_lines", "customer_orders_with_products")
BURST_TEMPLATES = ("customer_by_id", "product_by_id", "customer_360_by_id", "order_lines")
#: the drifting templates: the sales overview dashboard's date-range queries whose work grows
#: with the range (gold.sales_summary's primary key leads with sale_date: an index range scan,
#: then the rows in range aggregated; median server times at the anomaly bench's scale, 1.0:
#: 0.85 and 2.6 ms at their usual range, 3.2 and 7.2 ms at 3x, 22 and 18 ms at 20x). Not the
#: silver range queries: with no index on sold_at they scan the whole table over any range, so
#: widening one (sales_in_range) changed nothing the log can see, and the others grew by well
#: under the machine's noise; nor moving_avg_revenue, whose range covers the table by 5x.
DRIFT_TEMPLATES = ("daily_revenue", "revenue_by_region_channel")
HEAVY_TEMPLATES = ("cross_customers_products", "cross_customer_pairs", "cross_sales_warehouses")
ERROR_TEMPLATES = (("analyst", "bad_sql_undefined_column"), ("etl", "insert_sales_line_invalid"))
DISABLE_INDEXES = ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan")
DRIFT_FACTOR = 20.0
#: a drifting execution is labelled from this width on, in multiples of its template's usual
#: (`Template.usual_days`; only the days from the first sale count): three times the rows, about
#: twice to three times the templates' usual time (`DRIFT_TEMPLATES`); before, the slowdown is
#: within the machine's noise
DRIFT_LABEL_FROM = 3.0
#: minimum real seconds a lock is held, whatever the clock speed (or nothing would wait)
LOCK_MIN_REAL = 2.0
#: real seconds the holder takes to connect and lock (about 30 ms measured through pgsage on the
#: bench): a statement arriving before may run before the lock and not wait, so the labels start
#: after it. A race either way: arriving later unlabelled, a statement would wait unlabelled
#: (with 0.1 s, one or two per lock did, for seconds), earlier labelled, it might not wait
LOCK_SETTLE_REAL = 0.03
#: seq_scan windows in simulated hours: long enough for a run of regressed executions
SEQ_SCAN_HOURS = (2.0, 5.0)
#: the marker of a lock-blocked statement whose wait the log cannot see (module doc): a new
#: text per anomaly, as a label would be (the same text twice would be prepared already)
UNTIMED_WAIT = "/* pgsage:untimed-lock-wait={label} */ "
#: client paths whose new statement text is prepared in an untimed round trip of its own
PREPARE_APART = ("extended",)


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


#: kinds that slow executions down: nothing shows unless something runs, so they take the
#: busiest slots (a plan regression at 3 a.m. slows the one query that runs then)
TRAFFIC_KINDS = ("lock_contention", "seq_scan", "drift")


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
    """The run's anomalies in time order: every kind at least once, one per slot; the kinds of
    `TRAFFIC_KINDS` in the busiest slots, the others in the rest."""
    rng = np.random.default_rng([seed, 0xA11])
    span = end - start
    n = max(len(KINDS), round(span / 86400 * per_day))
    kinds = list(KINDS) + [KINDS[int(i)] for i in rng.integers(len(KINDS), size=n - len(KINDS))]
    rng.shuffle(kinds)
    slot = span / n
    busiest = sorted(range(n), key=lambda i: -_busy(start + i * slot, slot))
    traffic = [k for k in kinds if k in TRAFFIC_KINDS]
    slots = dict(zip(busiest, traffic, strict=False))
    rest = iter(k for k in kinds if k not in TRAFFIC_KINDS)
    ordered = [slots[i] if i in slots else next(rest) for i in range(n)]
    out = []
    seen: dict[str, int] = {}
    for i, kind in enumerate(ordered):
        label = f"{PREFIX[kind]}:{run_tag}.{i + 1}"
        slot_start = start + i * slot
        nth = seen[kind] = seen.get(kind, -1) + 1
        out.append(_make(kind, label, rng, slot_start, slot, speed=speed, qps=qps, nth=nth))
    return out


def _busy(t0: float, length: float, points: int = 8) -> float:
    """Mean activity over [t0, t0 + length) (sampled)."""
    step = length / points
    return sum(activity(datetime.fromtimestamp(t0 + (k + 0.5) * step, UTC))
               for k in range(points)) / points  # fmt: skip


def _window(
    rng: np.random.Generator, slot_start: float, slot: float, length: float
) -> tuple[float, float]:
    """A window of `length` inside the slot: the busiest (mean activity over the window) of
    eight random placements (trouble shows under load, and a window at 4 a.m. might affect no
    execution at all)."""
    length = min(length, slot * 0.8)
    room = slot - length
    offsets = rng.uniform(slot * 0.1, room, size=8) if room > slot * 0.1 else np.zeros(8)
    best = max((float(o) for o in offsets), key=lambda o: _busy(slot_start + o, length))
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
        affected += LOCK_DEPENDENTS.get(table, ())
        return Anomaly(kind, label, s, e, affected,
                       f"{table} held in ACCESS EXCLUSIVE mode by a background transaction;"
                       " executions of templates reading it wait for the lock",
                       {"table": table, "settle_s": LOCK_SETTLE_REAL * speed})  # fmt: skip
    if kind == "seq_scan":
        name = SEQ_SCAN_TEMPLATES[int(rng.integers(len(SEQ_SCAN_TEMPLATES)))]
        hours = float(rng.uniform(*SEQ_SCAN_HOURS))
        s, e = _window(rng, slot_start, slot, hours * 60 * minutes)
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
    s, e = _window(rng, slot_start, slot, slot * 0.8)
    return Anomaly(kind, label, s, e, DRIFT_TEMPLATES,
                   f"the sales overview dashboard's date range ({', '.join(DRIFT_TEMPLATES)})"
                   f" grows from 1x to {DRIFT_FACTOR:.0f}x over the window: slow drift of the"
                   f" data each refresh reads; labelled from {DRIFT_LABEL_FROM:.0f}x on",
                   {"factor": DRIFT_FACTOR, "label_from": DRIFT_LABEL_FROM})  # fmt: skip


class Injector:
    """Applies a schedule: labels (and alters) affected regular executions, adds extra ones.

    `apply` is a function of the arrival and the schedule only: a lock's "first statement of
    this user in the window" is remembered by its simulated time, so every pass over the plan
    (the runner counts the labels, then dispatches) labels the same statements.
    """

    def __init__(self, schedule: list[Anomaly], first_sale: date | None = None) -> None:
        self.schedule = schedule
        #: the data's first day: a drifting range reads nothing before it
        self.first_sale = first_sale
        self._starts = [a.start for a in schedule]
        #: (lock label, role, user) -> simulated time of that user's first blocked arrival
        self._first_wait: dict[tuple[str, str, int], float] = {}

    def active(self, t: float) -> Anomaly | None:
        i = int(np.searchsorted(self._starts, t, side="right")) - 1
        if i >= 0 and self.schedule[i].covers(t):
            return self.schedule[i]
        return None

    def apply(self, arrival: Arrival) -> Arrival:
        a = self.active(arrival.sim)
        if a is None or a.kind in ("error_burst", "heavy_unseen"):
            return arrival
        if a.kind == "lock_contention":
            return self._lock(a, arrival)
        stmts = []
        for st in arrival.statements:
            if st.template not in a.templates:
                stmts.append(st)
                continue
            params = st.params
            if a.kind == "drift":
                widen = BY_NAME[st.template].widen
                progress = (arrival.sim - a.start) / (a.end - a.start)
                factor = 1.0 + (DRIFT_FACTOR - 1.0) * progress
                if widen is None:
                    stmts.append(st)
                    continue
                params = widen(params, factor)
                if self.drift_width(st.template, params) < DRIFT_LABEL_FROM:
                    stmts.append(Statement(st.template, st.sql, params))
                    continue
            disable = DISABLE_INDEXES if a.kind == "seq_scan" else ()
            stmts.append(Statement(st.template, mark(a.label, st.sql), params, a.label, disable))
        arrival.statements = stmts
        return arrival

    def drift_width(self, template: str, params: tuple[Any, ...]) -> float:
        """A drifting range's width in multiples of its template's usual, counting only the
        days that hold data (from the first sale on)."""
        start, end = params[0], params[1]
        if self.first_sale is not None:
            start = max(start, self.first_sale)
        usual = BY_NAME[template].usual_days
        assert usual is not None, f"{template} has no usual range to drift from"
        return max((end - start).days, 0) / usual

    def _lock(self, a: Anomaly, arrival: Arrival) -> Arrival:
        """Label the statement of this arrival that waits for the lock, if one does: the user's
        first on the locked table after the holder has settled (module doc)."""
        if arrival.sim < a.start + a.detail.get("settle_s", 0.0):
            return arrival
        k = next((k for k, st in enumerate(arrival.statements) if st.template in a.templates), -1)
        if k < 0:
            return arrival
        key = (a.label, arrival.role, arrival.user)
        if self._first_wait.setdefault(key, arrival.sim) != arrival.sim:
            return arrival  # queued behind this user's blocked statement: starts after the lock
        st = arrival.statements[k]
        if ROLE_BY_NAME[arrival.role].path in PREPARE_APART:
            blocked = Statement(st.template, UNTIMED_WAIT.format(label=a.label) + st.sql, st.params)
        else:
            blocked = Statement(st.template, mark(a.label, st.sql), st.params, a.label)
        arrival.statements = [*arrival.statements[:k], blocked, *arrival.statements[k + 1 :]]
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
