"""The simulator's anomaly labels mark only executions the anomaly really changed (no database)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bench.workload.anomalies import (
    DRIFT_FACTOR,
    DRIFT_LABEL_FROM,
    DRIFT_TEMPLATES,
    SEQ_SCAN_HOURS,
    UNTIMED_WAIT,
    make_schedule,
)
from bench.workload.plan import Plan, PlanConfig
from bench.workload.roles import ROLE_BY_NAME, Statement
from bench.workload.templates import BY_NAME, Profile

MONDAY = datetime(2026, 1, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def plan() -> Plan:
    config = PlanConfig(seed=23, start=MONDAY, speed=2000.0, duration=4 * 86400 / 2000, qps=60.0)
    return Plan(config, Profile.synthetic())


def _statements(plan: Plan) -> list[tuple[float, str, int, int, Statement]]:
    return [
        (a.sim, a.role, a.user, k, st) for a in plan.arrivals() for k, st in enumerate(a.statements)
    ]


def test_a_lock_labels_each_user_s_first_blocked_statement_only(plan: Plan) -> None:
    locks = [a for a in plan.schedule if a.kind == "lock_contention"]
    assert locks
    by_label = {a.label: a for a in locks}
    seen: set[tuple[str, str, int]] = set()
    untimed = 0
    for sim, role, user, _, st in _statements(plan):
        if st.sql.startswith(UNTIMED_WAIT.split("=")[0]):
            untimed += 1
            assert ROLE_BY_NAME[role].path == "extended" and st.label is None
            # a text of its own per anomaly (a text run before would be prepared already)
            assert any(st.sql.startswith(UNTIMED_WAIT.format(label=lab)) for lab in by_label)
            continue
        a = by_label.get(st.label)
        if a is None:
            continue
        # after the holder has settled, on a path that times the statement's own Parse
        assert a.start + a.detail["settle_s"] <= sim < a.end
        assert st.template in a.templates
        assert ROLE_BY_NAME[role].path != "extended"
        key = (a.label, role, user)
        assert key not in seen, "a user's later statements queue behind the blocked one"
        seen.add(key)
    assert seen and untimed


def test_labels_are_the_same_on_every_pass(plan: Plan) -> None:
    assert plan.label_counts() == plan.label_counts()


def test_drift_labels_only_executions_widened_past_the_threshold(plan: Plan) -> None:
    """A drifting execution is labelled when the part of its range holding data is at least
    DRIFT_LABEL_FROM times its template's usual width: not when only its own range tripled."""
    drifts = [a for a in plan.schedule if a.kind == "drift"]
    assert drifts and all(BY_NAME[t].widen is not None for t in DRIFT_TEMPLATES)
    first = plan.profile.first_sale.date()
    labelled = unlabelled = own_tripled_only = 0
    for sim, _, _, _, st in _statements(plan):
        a = next((a for a in drifts if a.covers(sim)), None)
        if a is None or st.template not in DRIFT_TEMPLATES:
            continue
        start, end = st.params[0], st.params[1]
        width = (end - max(start, first)).days / BY_NAME[st.template].usual_days
        factor = 1.0 + (DRIFT_FACTOR - 1.0) * (sim - a.start) / (a.end - a.start)
        if st.label == a.label:
            assert width >= DRIFT_LABEL_FROM
            labelled += 1
        else:
            assert st.label is None and width < DRIFT_LABEL_FROM
            unlabelled += 1
            own_tripled_only += factor >= DRIFT_LABEL_FROM
    # both sides occur, and the old rule (its own range x3) would have labelled some that are
    # not wider than three usual ranges
    assert labelled > 0 and unlabelled > 0 and own_tripled_only > 0


def test_seq_scan_windows_last_hours_and_switch_index_scans_off() -> None:
    start = MONDAY.timestamp()
    sched = make_schedule(5, start, start + 6 * 86400, speed=2000, qps=40, run_tag="x")
    seq = [a for a in sched if a.kind == "seq_scan"]
    assert seq
    for a in seq:
        hours = (a.end - a.start) / 3600
        assert SEQ_SCAN_HOURS[0] - 1e-6 <= hours <= SEQ_SCAN_HOURS[1] + 1e-6
