"""Rewrites for extended-protocol clients: a Parse text with $n parameters is proven with the
values clients bind to it (asyncpg binds in binary, psycopg in text), then sent rewritten in the
Parse; every answer is the database's answer to the original, the client sees the same
descriptions, and the query log keeps the client's text and names the rule. Also: binary
parameters rendered as text read back to the very value PostgreSQL sent (its own send
functions make the bytes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.protocol.binary import Unsupported, as_text
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, direct_dsn

SETUP = """
CREATE SCHEMA shop;
CREATE TABLE shop.c (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE shop.o (id int PRIMARY KEY, cid int NOT NULL, amount numeric(10, 2));
INSERT INTO shop.c SELECT g, 'c' || g FROM generate_series(1, 300) g;
INSERT INTO shop.o SELECT g, g % 250 + 1, g / 4.0 FROM generate_series(1, 8000) g;
ANALYZE shop.c; ANALYZE shop.o;
"""
#: a correlated scalar subquery with parameters inside and outside it
SQL = (
    "SELECT c.id, (SELECT count(*) FROM shop.o WHERE o.cid = c.id AND o.amount > $1) AS n"
    " FROM shop.c WHERE c.id <= $2 ORDER BY c.id"
)
VALUES = [(100.5, 40), (10, 300), (1500.25, 120), (0, 7), (999, 250)]


def _key(rewriter: Any, sql: str) -> Any:
    keys = [k for k in rewriter.verdicts if isinstance(k, tuple) and k[0] == sql]
    return keys[0] if keys else None


def _wait_proven(rewriter: Any, sql: str) -> tuple[str, str]:
    deadline = time.monotonic() + 30
    while True:
        key = _key(rewriter, sql)
        if key is not None and isinstance(rewriter.verdicts[key], tuple):
            return rewriter.verdicts[key]  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, ("never proven", rewriter.verdicts, rewriter.pending)
        time.sleep(0.1)


def _logged_rules(svc: Any, prefix: str) -> dict[str | None, int]:
    svc.flush()
    with psycopg.connect(direct_dsn(svc.database)) as m:
        rows = m.execute(
            "SELECT rewrite_rule, count(*) FROM metadata.query_logs"
            " WHERE normalized_text LIKE %s GROUP BY 1",
            (prefix + "%",),
        ).fetchall()
    return dict(rows)


def test_asyncpg_binary_binds_prove_the_rewrite_then_parses_carry_it(make_service: Any) -> None:
    svc = make_service(rewrite_enabled=True, rewrite_holdout=0.0, rewrite_literal_sets=3)
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(SETUP)
    rewriter = svc.service.proxy.rewriter

    async def run() -> None:
        direct = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                       database=svc.database)  # fmt: skip
        expected = {v: [tuple(r) for r in await direct.fetch(SQL, *v)] for v in VALUES}
        await direct.close()
        dsn = f"postgresql://{PG_USER}@{svc.host}:{svc.port}/{svc.database}"
        # first connection: its prepared statement predates the proof; it lends its values
        first = await asyncpg.connect(dsn)
        for v in VALUES[:3]:
            assert [tuple(r) for r in await first.fetch(SQL, *v)] == expected[v]
        rule, new_sql = await asyncio.to_thread(_wait_proven, rewriter, SQL)
        assert rule == "correlated_scalar_subquery" and "LEFT JOIN" in new_sql.upper()
        assert "$1" in new_sql and "$2" in new_sql
        for v in VALUES:  # still the statement it prepared before: sent as written
            assert [tuple(r) for r in await first.fetch(SQL, *v)] == expected[v]
        await first.close()
        # a new connection prepares it after the proof: the Parse carries the rewrite
        second = await asyncpg.connect(dsn)
        stmt = await second.prepare(SQL)
        assert [(a.name, a.type.name) for a in stmt.get_attributes()] == [
            ("id", "int4"), ("n", "int8")
        ]  # fmt: skip
        assert [t.name for t in stmt.get_parameters()] == ["numeric", "int4"]
        for _ in range(4):
            for v in VALUES:
                assert [tuple(r) for r in await stmt.fetch(*v)] == expected[v]
        await second.close()

    asyncio.run(run())
    rules = _logged_rules(svc, "SELECT c.id, (SELECT count(*) FROM shop.o WHERE o.cid = c.id AND")
    assert rules.get("correlated_scalar_subquery", 0) == 20, rules  # the second connection's
    assert rules.get(None, 0) == 8, rules  # the first connection's, all as written


def test_psycopg_text_binds_and_unnamed_parses(make_service: Any) -> None:
    """psycopg sends Parse of the unnamed statement with every execution, values in text, and
    declares the types of the values it dumps (int2 or float8 here, by value): each declaration
    is its own text to prove. Each execution is decided afresh (a quarter held out)."""
    svc = make_service(rewrite_enabled=True, rewrite_holdout=0.25, steering_seed=5)
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(SETUP)
        expected = {v: c.execute(SQL.replace("$1", "%s").replace("$2", "%s"), v).fetchall()
                    for v in VALUES}  # fmt: skip
    rewriter = svc.service.proxy.rewriter
    text = SQL.replace("$1", "%s").replace("$2", "%s")
    with psycopg.connect(svc.dsn(svc.database), autocommit=True, prepare_threshold=None) as c:
        for _ in range(3):  # a declaration bound alike each time is proven at 2 x its sets
            for v in VALUES:
                assert c.execute(text, v).fetchall() == expected[v]
        _wait_proven(rewriter, SQL)
        deadline = time.monotonic() + 30
        while [type(v) for k, v in rewriter.verdicts.items() if k[0] == SQL] != [tuple] * 2:
            assert time.monotonic() < deadline, (rewriter.verdicts, rewriter.pending)
            time.sleep(0.1)
        keys = [k for k in rewriter.verdicts if k[0] == SQL]
        assert sorted(k[1] for k in keys) == [(21, 21), (701, 21)]  # int2 and float8 for $1
        for _ in range(8):
            for v in VALUES:
                assert c.execute(text, v).fetchall() == expected[v]
    rules = _logged_rules(svc, "SELECT c.id, (SELECT count(*) FROM shop.o WHERE o.cid = c.id AND")
    applied = rules.get("correlated_scalar_subquery", 0)
    held = rules.get("holdout:correlated_scalar_subquery", 0)
    assert sum(rules.values()) == 55 and applied + held >= 40, rules
    assert applied >= 20 and held >= 3, rules


def test_a_text_whose_rewrite_differs_for_some_value_is_rejected(make_service: Any) -> None:
    """A value set the original fails on (division by zero) proves nothing: an error on
    either side counts against the rewrite, which is then disabled for the template."""
    svc = make_service(rewrite_enabled=True, rewrite_holdout=0.0, rewrite_literal_sets=2,
                       steering_eval_interval=1)  # fmt: skip
    with psycopg.connect(direct_dsn(svc.database), autocommit=True) as c:
        c.execute(SETUP)
    sql = (
        "SELECT c.id, (SELECT count(*) FROM shop.o WHERE o.cid = c.id AND o.amount / $1 > 10)"
        " AS n FROM shop.c WHERE c.id <= 5 ORDER BY c.id"
    )
    rewriter = svc.service.proxy.rewriter

    async def run() -> None:
        dsn = f"postgresql://{PG_USER}@{svc.host}:{svc.port}/{svc.database}"
        conn = await asyncpg.connect(dsn)
        await conn.fetch(sql, 2)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetch(sql, 0)  # the original fails too (on the first outer row)
        await conn.fetch(sql, 5)
        await conn.close()

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while True:
        key = _key(rewriter, sql)
        if key is not None and rewriter.verdicts[key] is None:
            break
        assert time.monotonic() < deadline, (rewriter.verdicts, rewriter.pending)
        time.sleep(0.1)
    (st,) = rewriter.templates.values()
    assert st.disabled and st.rule is None
    deadline = time.monotonic() + 15
    rejected: list[Any] = []
    while not rejected and time.monotonic() < deadline:
        time.sleep(0.3)
        with psycopg.connect(direct_dsn(svc.database)) as m:
            rejected = m.execute(
                "SELECT action, status, detail->>'reason' FROM metadata.optimization_history"
                " WHERE kind = 'rewrite'"
            ).fetchall()
    assert rejected and rejected[0][:2] == ("reject", "rejected"), rejected
    assert "division by zero" in rejected[0][2]


SEND_CASES = [
    ("bool", ["true", "false"]),
    ("int2", ["-32768", "7"]),
    ("int4", ["2147483647", "-5"]),
    ("int8", ["-9223372036854775808", "42"]),
    ("oid", ["4294967295"]),
    ("float4", ["0.1", "-3.4e38", "NaN", "-Infinity"]),
    ("float8", ["0.1", "1e-320", "Infinity", "-0"]),
    ("numeric", ["0", "0.00", "1.50", "-123456789.000000001", "1e40", "NaN", "0.0001"]),
    ("text", ["", "it's \\ ü"]),
    ("varchar", ["x"]),
    ("bpchar", ["ab  "]),
    ("name", ["pg_class"]),
    ("bytea", ["\\x00ff10"]),
    ("date", ["2026-11-27", "0001-01-01", "infinity", "-infinity"]),
    ("time", ["23:59:59.999999", "00:00:00"]),
    ("timestamp", ["2026-11-27 06:30:01.5", "1999-12-31 23:59:59", "infinity"]),
    ("timestamptz", ["2026-11-27 06:30:01.123456+05:30", "-infinity"]),
    ("uuid", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ("json", ['{"a": [1, 2]}']),
    ("jsonb", ['{"a": [1, 2], "b": null}']),
]


def test_binary_values_read_back_as_the_value_sent() -> None:
    """For each type: the server's own send function makes the binary bytes; their text must
    read back (the type's input function) to a value equal to the original."""

    async def run() -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
        try:
            for typ, values in SEND_CASES:
                oid, send = await conn.fetchrow(
                    "SELECT oid, typsend::text FROM pg_type WHERE oid = $1::regtype", typ
                )
                for value in values:
                    raw = await conn.fetchval(f"SELECT {send}($1::text::{typ})", value)
                    text = as_text(oid, raw)
                    same = await conn.fetchval(
                        f"SELECT $1::text::{typ}::text = $2::text::{typ}::text",
                        text, value,
                    )  # fmt: skip
                    assert same, (typ, value, text)
        finally:
            await conn.close()

    asyncio.run(run())
    with pytest.raises(Unsupported):
        as_text(600, b"\x00" * 16)  # point: no rendering
    with pytest.raises(Unsupported):
        as_text(23, b"\x00\x01")  # an int4 of two bytes


def test_gold_rewrite_of_a_parameter_bound_is_guarded(make_service: Any) -> None:
    """`sold_at >= $1::timestamp` (the workload's monthly revenue): gold answers it exactly
    only when $1 is a midnight. The rewrite carries the guard, so a client binding 12:00 still
    gets silver's answer while midnights are answered from gold."""
    import datetime as dt

    from bench.warehouse import drop_database_async, init_warehouse_async

    name = f"pgsage_goldx_{int(time.time() * 1000) % 10**8}"
    asyncio.run(init_warehouse_async(direct_dsn(), 0.03, 5, name, progress=False))
    sql = (
        "SELECT date_trunc('month', sold_at) AS month, sum(net_amount) AS revenue"
        " FROM silver.sales_cleaned WHERE sold_at >= $1::timestamp GROUP BY 1 ORDER BY 1"
    )
    try:
        svc = make_service(warehouse_database=name, rewrite_enabled=True, rewrite_holdout=0.0)
        rewriter = svc.service.proxy.rewriter

        async def run() -> None:
            direct = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=name)
            last = await direct.fetchval("SELECT max(sale_date) FROM gold.sales_summary")
            # the first value set is not a midnight: priced alone, the guarded rewrite would
            # not pay (its silver branch runs); summed over the sets it does
            values = [dt.datetime.combine(last - dt.timedelta(days=60), dt.time(0, 0, 32))] + [
                dt.datetime.combine(last - dt.timedelta(days=d), dt.time()) for d in (200, 90)
            ]
            expected = {v: [tuple(r) for r in await direct.fetch(sql, v)] for v in values}
            await direct.close()
            dsn = f"postgresql://{PG_USER}@{svc.host}:{svc.port}/{name}"
            first = await asyncpg.connect(dsn)
            for v in values:
                assert [tuple(r) for r in await first.fetch(sql, v)] == expected[v]
            await first.close()
            rule, new_sql = await asyncio.to_thread(_wait_proven, rewriter, sql)
            assert rule == "gold_aggregate" and "UNION ALL" in new_sql
            second = await asyncpg.connect(dsn)
            for _ in range(3):
                for v in values:
                    assert [tuple(r) for r in await second.fetch(sql, v)] == expected[v]
            await second.close()

        asyncio.run(run())
        svc.flush()
        with psycopg.connect(direct_dsn(name)) as m:
            rules = dict(m.execute(
                "SELECT rewrite_rule, count(*) FROM metadata.query_logs"
                " WHERE normalized_text LIKE 'SELECT date_trunc(%' GROUP BY 1"
            ).fetchall())  # fmt: skip
        assert rules.get("gold_aggregate", 0) == 9, rules
    finally:
        asyncio.run(drop_database_async(direct_dsn(), name))
