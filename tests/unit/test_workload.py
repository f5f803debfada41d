"""The workload simulator without a database: clock, activity curve, plan, templates."""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from bench.workload.anomalies import KINDS, Injector, make_schedule
from bench.workload.clock import MEAN_ACTIVITY, PEAK_HOURS, SimClock, activity
from bench.workload.plan import Plan, PlanConfig
from bench.workload.roles import DASHBOARDS, ROLES
from bench.workload.runner import _to_psycopg
from bench.workload.templates import COMPLEXITIES, REGULAR, SHAPES, TEMPLATES, Profile
from bench.workload.templates import KINDS as TEMPLATE_KINDS

MONDAY = datetime(2026, 1, 5, tzinfo=UTC)


def _plan(seed: int = 7, **kw) -> Plan:
    cfg = dict(seed=seed, start=MONDAY, speed=2000.0, duration=60.0, qps=40.0, run_tag="t")
    cfg.update(kw)
    return Plan(PlanConfig(**cfg), Profile.synthetic())


# ---------------------------------------------------------------- clock


def test_clock_maps_real_to_simulated_time_at_its_speed():
    clock = SimClock(MONDAY, speed=2000, anchor=100.0)
    assert clock.sim_at(100.0) == MONDAY
    assert clock.sim_at(101.5) == MONDAY + timedelta(seconds=3000)
    assert clock.sim_at(100.0 + 7 * 86400 / 2000) == MONDAY + timedelta(days=7)
    # real_at is the inverse
    later = (MONDAY + timedelta(hours=5)).timestamp()
    assert clock.real_at(later) == pytest.approx(100.0 + 5 * 3600 / 2000)
    assert clock.sim_epoch(clock.real_at(later)) == pytest.approx(later)


def test_clock_reanchors_and_rejects_bad_speeds():
    naive = SimClock(datetime(2026, 1, 5), speed=10, anchor=0.0)
    assert naive.start == MONDAY
    before = time.monotonic()
    naive.reanchor()
    assert naive.anchor >= before
    assert abs((naive.now() - MONDAY).total_seconds()) < 10 * 5
    with pytest.raises(ValueError):
        SimClock(MONDAY, speed=0)


# ---------------------------------------------------------------- the activity curve


def test_activity_curve_has_business_hours_lunch_dip_lull_and_weekends():
    tuesday = MONDAY + timedelta(days=1)

    def at(day: datetime, hour: float) -> float:
        return activity(day + timedelta(hours=hour))

    assert at(tuesday, 10.5) == pytest.approx(1.0)  # weekday peak
    assert at(tuesday, 3.5) < 0.05  # night
    assert at(tuesday, 12.5) < 0.75 * at(tuesday, 10.5)  # lunch dip
    assert at(tuesday, 12.5) < at(tuesday, 14.5)
    assert at(tuesday, 21) < 0.25 * at(tuesday, 15)  # evening lull
    saturday = MONDAY + timedelta(days=5)
    assert at(saturday, 10.5) < 0.3 * at(tuesday, 10.5)
    month_end = datetime(2026, 1, 30, tzinfo=UTC)  # a Friday, second-to-last day
    ordinary_friday = datetime(2026, 1, 23, tzinfo=UTC)
    assert at(month_end, 10.5) == pytest.approx(1.8 * at(ordinary_friday, 10.5))
    assert 0.2 < MEAN_ACTIVITY < 0.6


def test_busiest_simulated_hours_carry_most_arrivals():
    """A simulated week: arrivals per hour of day follow the curve."""
    plan = _plan(duration=7 * 86400 / 2000, qps=60.0, anomalies=False)
    per_hour: Counter[int] = Counter()
    per_day: Counter[int] = Counter()
    for a in plan.arrivals():
        t = datetime.fromtimestamp(a.sim, UTC)
        per_hour[t.hour] += len(a.statements)
        per_day[t.weekday()] += len(a.statements)
    top = {h for h, _ in per_hour.most_common(6)}
    assert top <= set(range(8, 18)), per_hour
    assert set(range(PEAK_HOURS[0], PEAK_HOURS[1] + 1)) & top
    night = sum(per_hour[h] for h in range(0, 5))
    assert night * 10 < per_hour[10] * 5
    assert per_hour[12] < per_hour[10] and per_hour[12] < per_hour[15]  # lunch dip
    weekday = min(per_day[d] for d in range(5))
    assert per_day[5] < 0.5 * weekday and per_day[6] < 0.5 * weekday
    # the configured rate is the long-run average: a week is within a few percent of qps
    total = sum(per_hour.values())
    assert total == pytest.approx(60.0 * 7 * 86400 / 2000, rel=0.15)


def test_month_end_carries_more_arrivals_than_ordinary_days():
    start = datetime(2026, 1, 26, tzinfo=UTC)  # Mon; Fri 30th is a month-end day
    plan = _plan(start=start, duration=5 * 86400 / 2000, qps=60.0, anomalies=False)
    per_day: Counter[int] = Counter()
    for a in plan.arrivals():
        per_day[datetime.fromtimestamp(a.sim, UTC).day] += len(a.statements)
    ordinary = max(per_day[d] for d in (26, 27, 28))
    assert per_day[30] > 1.4 * ordinary


# ---------------------------------------------------------------- determinism


def _sequence(plan: Plan, n: int = 600) -> list[tuple]:
    out = []
    for a in plan.arrivals():
        for st in a.statements:
            out.append((round(a.sim, 6), a.role, a.user, st.template, st.params, st.label))
        if len(out) >= n:
            break
    return out


def test_template_and_parameter_sequence_is_deterministic_per_seed():
    first, again = _sequence(_plan(seed=11)), _sequence(_plan(seed=11))
    assert len(first) >= 600
    assert first == again
    other = _sequence(_plan(seed=12))
    assert [s[3:5] for s in other] != [s[3:5] for s in first]
    # every role contributes, with several templates each
    roles = Counter(s[1] for s in first)
    assert set(roles) >= {"app", "analyst", "dashboard", "etl"}
    assert len({s[3] for s in first}) >= 30


def test_dashboards_repeat_fixed_queries_and_hot_keys_dominate():
    plan = _plan(duration=600, qps=60.0, anomalies=False)
    dash: dict[int, set] = {}
    customers: Counter[int] = Counter()
    for a in plan.arrivals():
        if a.role == "dashboard":
            dash.setdefault(a.user, set()).add(tuple((s.template, s.params) for s in a.statements))
        for st in a.statements:
            if st.template == "customer_by_id":
                customers[st.params[0]] += 1
    # each user refreshes one dashboard with the same parameters every time
    assert dash and all(len(v) == 1 for v in dash.values())
    boards = {tuple(t for t, _ in next(iter(v))) for v in dash.values()}
    assert boards <= set(DASHBOARDS.values())
    # Zipf-weighted customers: the 10 hottest of 300 take a large share of lookups
    total = sum(customers.values())
    assert sum(customers[c] for c in range(1, 11)) > 0.25 * total


# ---------------------------------------------------------------- templates


def test_at_least_forty_tagged_templates_with_the_deliberate_bad_shapes():
    assert len(REGULAR) >= 40
    names = [t.name for t in TEMPLATES]
    assert len(names) == len(set(names))
    sampler = _sampler()
    for t in TEMPLATES:
        assert t.complexity in COMPLEXITIES and t.kind in TEMPLATE_KINDS, t.name
        assert set(t.shapes) <= set(SHAPES), t.name
        # every placeholder gets a parameter, and parameters are plain Python values
        params = t.params(sampler)
        highest = max((int(n) for n in re.findall(r"\$(\d+)", t.sql)), default=0)
        assert highest == len(params), t.name
        assert not any(type(p).__module__ == "numpy" for p in params), t.name
    kinds = Counter(t.kind for t in REGULAR)
    for kind in ("point", "join", "aggregate", "window", "cte", "subquery", "topn", "dml"):
        assert kinds[kind] >= 3, kind
    assert {c for t in REGULAR for c in [t.complexity]} == set(COMPLEXITIES)
    assert {s for t in REGULAR for s in t.shapes} == set(SHAPES)
    dml = " ".join(t.sql for t in REGULAR if t.kind == "dml")
    assert "INSERT INTO silver.sales_cleaned" in dml
    assert "UPDATE silver.inventory_cleaned" in dml and "DELETE FROM" in dml
    joins = [t.sql.count(" JOIN ") + 1 for t in REGULAR if t.kind == "join"]
    assert min(joins) == 2 and max(joins) >= 5
    schemas = {tab.split(".")[0] for t in REGULAR for tab in t.tables}
    assert schemas == {"bronze", "silver", "gold"}


def test_every_regular_template_is_run_by_some_role():
    used = {n for r in ROLES for n, _ in r.mix} | {n for b in DASHBOARDS.values() for n in b}
    assert {t.name for t in REGULAR} <= used


def _sampler():
    import numpy as np

    from bench.workload.templates import Sampler

    return Sampler(Profile.synthetic(), np.random.default_rng(0))


def test_placeholders_translate_for_psycopg():
    text, order = _to_psycopg("SELECT $2::int, '%' || $1::text, $2::int")
    assert text == "SELECT %s::int, '%%' || %s::text, %s::int"
    assert order == [1, 0, 1]


# ---------------------------------------------------------------- anomalies


def test_schedule_has_every_kind_in_disjoint_windows_and_is_seeded():
    start = MONDAY.timestamp()
    end = start + 3 * 86400
    sched = make_schedule(3, start, end, speed=2000, qps=80, run_tag="x")
    assert {a.kind for a in sched} == set(KINDS)
    assert len(sched) == 12  # 4 per simulated day
    for a, b in itertools.pairwise(sched):
        assert a.start < a.end <= b.start
    assert all(start <= a.start and a.end <= end for a in sched)
    assert len({a.label for a in sched}) == len(sched)
    again = make_schedule(3, start, end, speed=2000, qps=80, run_tag="x")
    assert [(a.kind, a.start, a.templates) for a in again] == [
        (a.kind, a.start, a.templates) for a in sched
    ]


def test_injector_labels_affected_executions_only_inside_windows():
    plan = _plan(duration=4 * 86400 / 2000, qps=60.0)
    inj = Injector(plan.schedule)
    counts = plan.label_counts()
    by_label = {a.label: a for a in plan.schedule}
    for a in plan.arrivals():
        for st in a.statements:
            active = inj.active(a.sim)
            if st.label:
                anomaly = by_label[st.label]
                assert anomaly.covers(a.sim) and st.template in anomaly.templates
                assert st.sql.startswith(f"/* pgsage:label={st.label} */ ")
                assert bool(st.disable) == (anomaly.kind == "seq_scan")
            elif active is not None and active.kind in ("seq_scan", "rate_burst"):
                # (lock and drift label only the executions they changed: test_anomaly_labels)
                assert st.template not in active.templates
    for a in plan.schedule:
        if a.kind in ("rate_burst", "error_burst", "heavy_unseen"):
            assert counts[a.label] >= a.extra > 0
    drift = [a for a in plan.schedule if a.kind == "drift"]
    assert drift and all(counts[a.label] > 0 for a in drift)
