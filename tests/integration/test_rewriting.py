"""Rewrites inside `pgsage serve`: a correlated scalar subquery that PostgreSQL runs once per
outer row is proven equivalent on pgsage's own connection, then sent as a LEFT JOIN to a grouped
derived table; every answer equals the database's answer to the original; the query log keeps
the client's text and names the rule; the A/B test against the holdout validates it."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from proxy.protocol.backend import DataRow
from tests.fix_proxy import direct_dsn
from tests.wire_client import WireClient

SQL = "SELECT c.id, (SELECT count(*) FROM shop.o WHERE o.cid = c.id) AS n FROM shop.c ORDER BY c.id"
SETUP = """
CREATE SCHEMA shop;
CREATE TABLE shop.c (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE shop.o (id int PRIMARY KEY, cid int NOT NULL, amount int);
INSERT INTO shop.c SELECT g, 'c' || g FROM generate_series(1, 300) g;
INSERT INTO shop.o SELECT g, g % 250 + 1, g FROM generate_series(1, 8000) g;
ANALYZE shop.c; ANALYZE shop.o;
"""


def _rows(client: WireClient, sql: str) -> list[tuple[Any, ...]]:
    return [m.values for m in client.query(sql) if isinstance(m, DataRow)]


def test_a_proven_rewrite_is_sent_and_validated(make_service: Any) -> None:
    svc = make_service(
        rewrite_enabled=True, rewrite_holdout=0.25, steering_eval_interval=1,
        steering_ab_min_samples=8, steering_seed=3,
    )  # fmt: skip
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(SETUP)
    with WireClient("127.0.0.1", 5432, database=svc.database) as direct:
        expected = _rows(direct, SQL)
    rewriter = svc.service.proxy.rewriter
    with WireClient(svc.host, svc.port, database=svc.database) as client:
        assert _rows(client, SQL) == expected  # first sight: sent as written, queued for proof
        deadline = time.monotonic() + 20
        while not isinstance(rewriter.verdicts.get(SQL), tuple):
            assert time.monotonic() < deadline, "the rewrite was never proven"
            time.sleep(0.1)
        rule, new_sql = rewriter.verdicts[SQL]
        assert rule == "correlated_scalar_subquery" and "LEFT JOIN" in new_sql.upper()
        timings = []
        for _ in range(40):
            t0 = time.perf_counter()
            assert _rows(client, SQL) == expected  # the same answer, every time
            timings.append(time.perf_counter() - t0)
        client.query("SELECT 1")
    svc.flush()
    with psycopg.connect(direct_dsn(svc.database)) as m:
        logged = m.execute(
            "SELECT rewrite_rule, count(*) FROM metadata.query_logs"
            " WHERE normalized_text LIKE 'SELECT c.id, (SELECT count(*)%' GROUP BY 1"
        ).fetchall()
    by_rule = dict(logged)
    assert by_rule.get("correlated_scalar_subquery", 0) >= 20
    assert by_rule.get("holdout:correlated_scalar_subquery", 0) >= 3
    deadline = time.monotonic() + 15
    decided: list[Any] = []
    while time.monotonic() < deadline and not decided:
        time.sleep(0.5)
        with psycopg.connect(direct_dsn(svc.database)) as m:
            decided = m.execute(
                "SELECT action, status, measured_before_ms, measured_after_ms"
                " FROM metadata.optimization_history WHERE kind = 'rewrite'"
            ).fetchall()
    assert decided and decided[0][:2] == ("validate", "validated"), decided
    assert decided[0][3] < decided[0][2]
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        shown = admin.execute("SHOW REWRITES").fetchall()
    assert shown[0][1] == "correlated_scalar_subquery" and shown[0][2] == "validated"


def test_writes_transactions_and_opt_out_are_left_alone(make_service: Any) -> None:
    svc = make_service(rewrite_enabled=True)
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(SETUP)
    rewriter = svc.service.proxy.rewriter
    opted = SQL + " /* pgsage:off */"
    with WireClient(svc.host, svc.port, database=svc.database) as client:
        client.query(opted)
        client.query("BEGIN")
        client.query(SQL)
        client.query("COMMIT")
        client.query("UPDATE shop.o SET amount = amount WHERE id = 1")
    assert rewriter.verdicts.get(opted, "absent") is None  # looked at once, never rewritten
    assert SQL not in rewriter.verdicts  # inside a transaction: not even considered
    update = "UPDATE shop.o SET amount = amount WHERE id = 1"
    assert rewriter.verdicts.get(update, "absent") is None  # not a SELECT: never a candidate
    assert not rewriter.templates  # nothing was analysed


def test_the_gold_rewrite_follows_the_gold_watermark(make_service: Any) -> None:
    """An aggregate over silver sales that gold answers is sent to gold while gold covers its
    days; a sales line written into silver outside the ETL makes its day stale (a trigger notes
    it), and from the next context refresh the query runs on silver again; the next ETL run
    recomputes the day and gold answers again — every answer the database's own."""
    import asyncio
    import datetime as dt

    from bench.warehouse import drop_database_async, init_warehouse_async

    name = f"pgsage_gold_{int(time.time() * 1000) % 10**8}"
    asyncio.run(init_warehouse_async(direct_dsn(), 0.03, 5, name, progress=False))
    try:
        with psycopg.connect(direct_dsn(name), autocommit=True) as c:
            last = c.execute("SELECT max(sale_date) FROM gold.sales_summary").fetchone()[0]
        start, end = last - dt.timedelta(days=30), last - dt.timedelta(days=1)
        sql = (
            "SELECT s.channel, sum(s.net_amount) AS revenue FROM silver.sales_cleaned s"
            f" WHERE s.sold_at >= '{start}' AND s.sold_at < '{end}'"
            " GROUP BY s.channel ORDER BY s.channel"
        )
        svc = make_service(warehouse_database=name, rewrite_enabled=True, rewrite_holdout=0.0,
                           rewrite_context_interval=1)  # fmt: skip
        rewriter = svc.service.proxy.rewriter

        def direct() -> list[tuple[Any, ...]]:
            with WireClient("127.0.0.1", 5432, database=name) as d:
                return _rows(d, sql)

        def verdict(kind: type) -> Any:
            deadline = time.monotonic() + 20
            while not isinstance(rewriter.verdicts.get(sql, False), kind):
                assert time.monotonic() < deadline, rewriter.verdicts.get(sql, "unseen")
                with WireClient(svc.host, svc.port, database=name) as client:
                    _rows(client, sql)  # (re)queues the text for analysis when unknown
                time.sleep(0.2)
            return rewriter.verdicts[sql]

        expected = direct()
        assert rewriter is not None
        rule, new_sql = verdict(tuple)
        assert rule == "gold_aggregate" and "gold.sales_summary" in new_sql
        assert rewriter.ctx.gold_watermarks == {"gold.sales_summary": last}
        with WireClient(svc.host, svc.port, database=name) as client:
            assert _rows(client, sql) == expected

        # a line for a day inside the range, written straight into silver: gold is stale there
        stale_day = end - dt.timedelta(days=3)
        with psycopg.connect(direct_dsn(name), autocommit=True) as c:
            c.execute(
                "INSERT INTO silver.sales_cleaned (transaction_id, line_no, transaction_type,"
                " customer_id, product_id, channel, sold_at, quantity, unit_price, net_amount,"
                " _bronze_row_id, _etl_run_id)"
                " SELECT max(transaction_id) + 1, 1, 'sale', min(customer_id), min(product_id),"
                " 'online', %s::date + time '12:00', 1, 1000, 1000, 0, 0"
                " FROM silver.sales_cleaned",
                (stale_day,),
            )
        changed = direct()
        assert changed != expected
        deadline = time.monotonic() + 20
        while rewriter.ctx.gold_watermarks != {
            "gold.sales_summary": stale_day - dt.timedelta(days=1)
        }:
            assert time.monotonic() < deadline, rewriter.ctx.gold_watermarks
            time.sleep(0.2)
        assert verdict(type(None)) is None  # re-analysed: the rule declines stale days
        assert rewriter.ctx.gold_complete == frozenset()
        with WireClient(svc.host, svc.port, database=name) as client:
            for _ in range(3):
                assert _rows(client, sql) == changed

        # the ETL recomputes the stale day: gold is exact (and complete) again
        from warehouse_sql.etl import run_etl

        async def etl() -> None:
            import asyncpg

            from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER

            conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=name)
            try:
                await run_etl(conn)
                assert await conn.fetchval("SELECT count(*) FROM silver.sales_stale_days") == 0
            finally:
                await conn.close()

        asyncio.run(etl())
        deadline = time.monotonic() + 20
        while rewriter.ctx.gold_complete != frozenset({"gold.sales_summary"}):
            assert time.monotonic() < deadline, rewriter.ctx.gold_watermarks
            time.sleep(0.2)
        assert verdict(tuple)[0] == "gold_aggregate"
        with WireClient(svc.host, svc.port, database=name) as client:
            assert _rows(client, sql) == changed  # from gold, with the line the ETL took in
        # complete: a query with no upper bound on the day is answered from gold too
        monthly = (
            "SELECT month, revenue, revenue - lag(revenue) OVER (ORDER BY month) AS change"
            " FROM (SELECT date_trunc('month', sold_at) AS month, sum(net_amount) AS revenue"
            " FROM silver.sales_cleaned GROUP BY 1) m ORDER BY month"
        )
        with WireClient("127.0.0.1", 5432, database=name) as d:
            expected_monthly = _rows(d, monthly)
        with WireClient(svc.host, svc.port, database=name) as client:
            _rows(client, monthly)
            deadline = time.monotonic() + 20
            while not isinstance(rewriter.verdicts.get(monthly), tuple):
                assert time.monotonic() < deadline, "the monthly rewrite was never proven"
                time.sleep(0.2)
            assert "gold.sales_summary" in rewriter.verdicts[monthly][1]
            assert _rows(client, monthly) == expected_monthly
        svc.flush()
        with psycopg.connect(direct_dsn(name)) as m:
            rules = m.execute(
                "SELECT rewrite_rule, count(*) FROM metadata.query_logs"
                " WHERE normalized_text LIKE 'SELECT s.channel, sum(s.net_amount)%' GROUP BY 1"
            ).fetchall()
        assert dict(rules).get("gold_aggregate", 0) >= 1, rules
    finally:
        asyncio.run(drop_database_async(direct_dsn(), name))
