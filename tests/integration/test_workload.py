"""The workload simulator through a real pgsage against a tiny warehouse: labels, paths, time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from rich.console import Console

from bench.warehouse import drop_database_async, init_warehouse_async
from bench.workload.anomalies import KINDS
from bench.workload.plan import PlanConfig
from bench.workload.runner import RunConfig, run_workload
from tests.fix_proxy import create_database, direct_dsn

START = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)  # a Monday morning
SPEED = 3600.0
DURATION = 12.0


@pytest.fixture
def tiny_warehouse():
    import asyncio

    name = create_database("pgsage_wl")
    asyncio.run(init_warehouse_async(direct_dsn(), 0.03, 5, name, progress=False))
    yield name
    asyncio.run(drop_database_async(direct_dsn(), name))


def _rows(db: str, sql: str, *args):
    with psycopg.connect(direct_dsn(db), autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def test_short_run_through_pgsage(make_service, tiny_warehouse):
    service = make_service(warehouse_database=tiny_warehouse)
    plan = PlanConfig(
        seed=3, start=START, speed=SPEED, duration=DURATION, qps=15.0,
        users={"dashboard": 2, "analyst": 2, "app": 3, "etl": 1},
    )  # fmt: skip
    result = run_workload(
        RunConfig(dsn=service.dsn(), plan=plan, progress=False), Console(quiet=True)
    )
    service.flush()
    db = tiny_warehouse

    # the whole plan ran, on time, with the proxy's clock set
    assert result.proxy_clock
    assert result.planned > 150 and result.executed >= result.planned and result.dropped == 0
    assert result.errors >= 20  # the error burst at least

    # ---- labels: one row per anomaly, every kind, matching the labelled executions
    labels = _rows(
        db,
        "SELECT w.label, w.kind, w.expected_executions, w.executed, w.window_start,"
        " w.window_end, count(q.label) FROM metadata.workload_labels w"
        " LEFT JOIN metadata.query_logs q ON q.label = w.label WHERE w.run_id = %s"
        " GROUP BY 1, 2, 3, 4, 5, 6",
        result.run_id,
    )
    assert {r[1] for r in labels} == set(KINDS)
    for label, kind, expected, executed, *_, logged in labels:
        assert expected == executed == logged, (label, kind, expected, executed, logged)
    by_kind = {}
    for r in labels:
        by_kind[r[1]] = by_kind.get(r[1], 0) + r[2]
    assert by_kind["rate_burst"] >= 30 and by_kind["error_burst"] >= 20
    assert by_kind["heavy_unseen"] >= 1
    stray = _rows(
        db,
        "SELECT DISTINCT q.label FROM metadata.query_logs q LEFT JOIN metadata.workload_labels w"
        " USING (label) WHERE q.label IS NOT NULL AND w.label IS NULL",
    )
    assert stray == []
    errors = _rows(
        db,
        "SELECT q.status, q.sqlstate, count(*) FROM metadata.query_logs q"
        " JOIN metadata.workload_labels w USING (label) WHERE w.kind = 'error_burst'"
        " GROUP BY 1, 2 ORDER BY 2",
    )
    assert {(s, code) for s, code, _ in errors} == {("error", "42703"), ("error", "23514")}

    # ---- simulated time: labelled executions fall in their windows; time runs at SPEED
    slack = timedelta(seconds=SPEED * (1.0 + result.max_lag))
    outside = _rows(
        db,
        "SELECT q.label, q.started_at, w.window_start, w.window_end FROM metadata.query_logs q"
        " JOIN metadata.workload_labels w USING (label)"
        " WHERE q.started_at < w.window_start - %s OR q.started_at > w.window_end + %s",
        slack,
        slack + timedelta(seconds=SPEED * 6),  # the lock holds what it blocks until it ends
    )
    assert outside == []
    lo, hi = _rows(
        db,
        "SELECT min(started_at), max(started_at) FROM metadata.query_logs"
        " WHERE application_name IN ('pgsage-workload-app', 'pgsage-workload-analyst',"
        " 'pgsage-workload-dashboard', 'pgsage-workload-etl')",
    )[0]
    assert START <= lo < START + timedelta(hours=2)
    span = (hi - lo).total_seconds()
    assert 0.6 * DURATION * SPEED < span < 1.1 * (DURATION + 1) * SPEED
    # the runner's own set-up statements are on the simulated clock too: nothing in the log
    # is stamped in real time, months away from the rest (it would stretch every window)
    (latest,) = _rows(db, "SELECT max(started_at) FROM metadata.query_logs")[0]
    assert latest < START + timedelta(seconds=1.1 * (DURATION + 30) * SPEED)

    # ---- the three client paths are all in the log
    paths = _rows(
        db,
        "SELECT application_name, protocol, coalesce(statement_name, ''), count(*)"
        " FROM metadata.query_logs WHERE application_name LIKE 'pgsage-workload-%%'"
        " GROUP BY 1, 2, 3",
    )

    def count(app: str, protocol: str, prefix: str | None = None) -> int:
        return sum(
            n for a, p, name, n in paths
            if a == f"pgsage-workload-{app}" and p == protocol
            and (prefix is None or (name.startswith(prefix) if prefix else name == ""))
        )  # fmt: skip

    assert count("analyst", "simple") > 10
    assert count("analyst", "extended") == 0
    assert count("app", "extended", "__asyncpg_stmt_") > 30
    assert count("dashboard", "extended", "_pg3_") > 10  # named past the threshold
    assert count("dashboard", "extended", "") > 10  # unnamed before it
    named_first = _rows(
        db,
        "SELECT fingerprint, min(started_at) FILTER (WHERE coalesce(statement_name, '') = ''),"
        " min(started_at) FILTER (WHERE statement_name LIKE '_pg3_%%')"
        " FROM metadata.query_logs WHERE application_name = 'pgsage-workload-dashboard'"
        " GROUP BY 1"
        " HAVING count(*) FILTER (WHERE statement_name LIKE '_pg3_%%') > 0",
    )
    # psycopg sends a text without parameters over the simple protocol until it prepares it
    assert named_first and all(unnamed and unnamed < named for _, unnamed, named in named_first)

    # ---- the run row
    run = _rows(
        db,
        "SELECT planned, executed, errors, finished_at IS NOT NULL FROM metadata.workload_runs"
        " WHERE run_id = %s",
        result.run_id,
    )
    assert run == [(result.planned, result.executed, result.errors, True)]
