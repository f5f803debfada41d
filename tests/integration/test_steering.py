"""Plan steering with a real planner mistake: `ORDER BY id LIMIT 20` over rows that all sit at
the end of the primary key makes the stock planner walk the PK index through almost the whole
table; with index scans off it takes a bitmap scan of the filter's index and a top-N sort, tens
of times faster. The steering finds that arm, the client sees exactly the rows it would have
seen, its own settings survive, and the A/B test against the holdout keeps the arm."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.fix_proxy import create_database, direct_dsn, drop_database

QUERY = "SELECT id, pad FROM t4 WHERE cat = 7 ORDER BY id LIMIT 20"
STEER = {"steering_enabled": True, "steering_min_ms": 5, "steering_seed": 1}
#: two tables whose join the planner switches change (a one-table scan they do not)
JOIN_TABLES = (
    "CREATE TABLE one (id int PRIMARY KEY, v text);"
    " INSERT INTO one SELECT i, md5(i::text) FROM generate_series(1, 20000) i;"
    " CREATE TABLE two (id int, one_id int);"
    " INSERT INTO two SELECT i, i % 20000 + 1 FROM generate_series(1, 20000) i;"
    " ANALYZE one; ANALYZE two;"
)


@pytest.fixture(scope="module")
def misled_db() -> Iterator[str]:
    name = create_database("pgsage_steer")
    with psycopg.connect(direct_dsn(name), autocommit=True) as c:
        c.execute(
            """
            CREATE TABLE t4 (id int PRIMARY KEY, cat int, pad text);
            INSERT INTO t4 SELECT i, CASE WHEN i > 396000 THEN 7 ELSE i % 99 + 8 END,
                                  md5(i::text)
            FROM generate_series(1, 400000) i;
            CREATE INDEX t4_cat ON t4 (cat);
            ANALYZE t4;
            """
        )
    yield name
    drop_database(name)


def _times(c: psycopg.Connection, sql: str, n: int, expect: list[Any]) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        rows = c.execute(sql, prepare=False).fetchall()
        out.append(time.perf_counter() - t0)
        assert rows == expect  # steering never changes a result
    return out


def test_steering_finds_the_arm_and_keeps_results_and_settings(
    make_proxy: Any, misled_db: str
) -> None:
    with psycopg.connect(direct_dsn(misled_db)) as direct:
        expect = direct.execute(QUERY).fetchall()
    p = make_proxy(**STEER)
    with psycopg.connect(p.dsn(misled_db), autocommit=True) as c:
        c.execute("SET work_mem = '8MB'")  # a setting of the client's own
        times = _times(c, QUERY, 60, expect)
        # every injected SET was reset: the session is as the client left it
        assert c.execute("SHOW enable_indexscan").fetchone() == ("on",)
        assert c.execute("SHOW plan_cache_mode").fetchone() == ("auto",)
        assert c.execute("SHOW work_mem").fetchone() == ("8MB",)
    rows = p.call_soon(p.server.steering.rows)
    assert rows and rows[0][1] == "converged:no_indexscan", rows
    # converged, the arm is on trial (no A/B evaluation runs in a bare proxy): half the
    # executions run it, half the stock plan beside it as the test's control
    first, fast = statistics.median(times[:3]), sorted(times[-20:])[:5]
    assert max(fast) < first / 5, (first, fast)
    hints = [r.execution.hint_set for r in p.records if r.execution.sql == QUERY]
    assert hints[:3] == [None, None, None]  # the stock history that made it eligible
    assert hints[-20:].count("no_indexscan") >= 5 and hints[-20:].count("holdout") >= 4


def test_a_session_that_sets_planner_switches_is_never_steered(
    make_proxy: Any, misled_db: str
) -> None:
    p = make_proxy(**STEER)
    with psycopg.connect(p.dsn(misled_db), autocommit=True) as c:
        _times(c, QUERY, 5, c.execute(QUERY).fetchall())
        assert any(r.execution.hint_set for r in p.records)  # eligible, and steered
        c.execute("SET enable_hashjoin = off")
        mark = len(p.records)
        expect = c.execute(QUERY).fetchall()
        _times(c, QUERY, 10, expect)
        assert c.execute("SHOW enable_hashjoin").fetchone() == ("off",)
    assert [r.execution.hint_set for r in p.records[mark:]] == [None] * 12


def test_opt_out_dry_run_and_kill_switch(make_proxy: Any, misled_db: str) -> None:
    opted = QUERY + " /* pgsage:off */"
    p = make_proxy(**STEER, steering_dry_run=True)
    with psycopg.connect(p.dsn(misled_db), autocommit=True) as c:
        expect = c.execute(QUERY).fetchall()
        dry = _times(c, QUERY, 20, expect)
        _times(c, opted, 8, expect)
    hints = [r.execution.hint_set for r in p.records if r.execution.sql == QUERY]
    assert any(h and h.startswith("dry_run:") for h in hints)
    assert min(dry) > 0.005  # nothing was applied: every run took the stock plan
    assert all(r.execution.hint_set is None for r in p.records if r.execution.sql == opted)
    p.server.settings.steering_dry_run = False
    p.server.settings.steering_active = False  # the global kill switch
    before = len(p.records)
    with psycopg.connect(p.dsn(misled_db), autocommit=True) as c:
        _times(c, QUERY, 5, expect)
    assert all(r.execution.hint_set is None for r in p.records[before:])


def test_ab_decision_goes_to_the_optimisation_history(make_service: Any, misled_db: str) -> None:
    svc = make_service(
        **STEER, steering_eval_interval=1, steering_ab_min_samples=10, steering_ab_min_holdout=3,
        steering_holdout=0.25,
    )  # fmt: skip
    with psycopg.connect(direct_dsn(misled_db)) as direct:
        expect = direct.execute(QUERY).fetchall()
    with psycopg.connect(svc.dsn(misled_db), autocommit=True) as c:
        _times(c, QUERY, 50, expect)
    deadline = time.monotonic() + 10
    rows: list[Any] = []
    while time.monotonic() < deadline and not rows:
        time.sleep(0.5)
        with psycopg.connect(direct_dsn(svc.database)) as m:
            rows = m.execute(
                "SELECT action, status, detail->>'arm', (detail->>'p_value')::float8,"
                " measured_before_ms, measured_after_ms FROM metadata.optimization_history"
                " WHERE kind = 'steering'"
            ).fetchall()
    assert rows, "no steering decision recorded"
    action, status, arm, p_value, before, after = rows[0]
    assert (action, status, arm) == ("validate", "validated", "no_indexscan")
    assert p_value < 0.05 and after < before / 5
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        shown = admin.execute("SHOW STEERING").fetchall()
    assert shown[0][1] == "validated"
    # bench.gain_steering finds the status of its $n template whatever literals were sent
    # (SHOW STEERING's text has a ? for each, the LIMIT's count included): by fingerprint
    from bench.gain_steering import _steering_status

    template = "SELECT id, pad FROM t4 WHERE cat = $1 ORDER BY id LIMIT 20"
    assert asyncio.run(_steering_status(svc.port, [("q", template, (7,))])) == {"q": "validated"}


def test_arms_whose_plan_is_stocks_are_retired_before_they_are_tried(make_service: Any) -> None:
    """`pgsage serve` EXPLAINs a newly eligible template under every arm on its own connection:
    a one-table aggregate plans the same with any join switch off, so those arms are retired
    untried; the join's arms that change its plan stay in play."""
    from models.steering import plan_shape
    from proxy.steering import explain_arms

    svc = make_service(steering_enabled=True, steering_min_ms=0.1, steering_seed=2)
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(JOIN_TABLES)
    ctl = svc.service.proxy.steering
    scan = "SELECT count(*) FROM one WHERE v LIKE 'a%'"
    with psycopg.connect(svc.dsn(svc.database), autocommit=True) as c:
        for _ in range(4):  # three stock runs make it eligible; the fourth queues the EXPLAINs
            c.execute(scan, prepare=False)
        deadline = time.monotonic() + 20
        while ctl.same_plan_retired < 5:
            assert time.monotonic() < deadline, (ctl.rows(), ctl.same_plan_retired)
            time.sleep(0.05)
        (state,) = [st for k, st in ctl.states.items() if k.startswith("SELECT count(*)")]
        # a sequential scan and an aggregate: no switch changes them
        assert state.converged == "stock" and state.live() == ["stock"]
        tried = {a: v.n for a, v in state.arms.items() if a != "stock"}
        for _ in range(20):
            c.execute(scan, prepare=False)
        assert {a: v.n for a, v in state.arms.items() if a != "stock"} == tried  # none again

    # the same through asyncpg: $1 bound in binary to a named statement; the plans are
    # compared with the values of its first eligible execution
    async def bound() -> None:
        import asyncpg

        from tests.fix_proxy import PG_USER

        conn = await asyncpg.connect(host=svc.host, port=svc.port, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            for _ in range(4):
                await conn.fetch("SELECT count(*) FROM one WHERE v LIKE $1 AND id > $2", "b%", 7)
        finally:
            await conn.close()

    asyncio.run(bound())
    deadline = time.monotonic() + 20
    while ctl.same_plan_retired < 10:
        assert time.monotonic() < deadline, (ctl.rows(), ctl.same_plan_retired, ctl.awaiting)
        time.sleep(0.05)
    (state,) = [st for k, st in ctl.states.items() if "LIKE $1" in k]
    assert state.converged == "stock" and not ctl.awaiting

    async def plans() -> dict[str, Any]:
        import asyncpg

        from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER

        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            plans = await explain_arms(conn, "SELECT * FROM one JOIN two ON two.one_id = one.id")
            return {arm: plan_shape(p) for arm, p in plans.items()}
        finally:
            await conn.close()

    shapes = asyncio.run(plans())
    assert len(set(shapes.values())) >= 2  # the join's switches change its plan
    assert shapes["no_hashjoin"] != shapes["stock"]
