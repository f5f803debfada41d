"""The rewrite fixtures on PostgreSQL: original and rewrite return the same multiset of rows on
small tables full of NULLs and duplicates (tests/data/rewrites/schema.sql) and on a small real
warehouse (migrations + generated data + ETL, so gold.sales_summary is what the ETL makes of
silver); the tempting unsafe rewrites the rules refuse really do differ; shadow_check finds
mismatches and errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import sql as pgsql

from bench import warehouse
from optimizer.equivalence import checksum, compare, shadow_check
from optimizer.parse import parse_statement
from optimizer.rules import apply_rule, rewrite
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, direct_dsn, drop_database
from tests.unit.test_rewrite_rules import CASES, DATA, Case, make_context

URI = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
SCALE = 0.02

POSITIVE = [c for c in CASES if c.rewritten is not None]
UNSAFE = [c for c in CASES if c.unsafe is not None]


@pytest.fixture(scope="module")
def rewrite_db() -> Iterator[str]:
    """A warehouse of its own (scale 0.02) plus the fixture tables in public; dropped after."""
    name = f"pgsage_rw_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(warehouse.init_warehouse_async(URI, SCALE, 42, name, progress=False))
        with psycopg.connect(direct_dsn(name), autocommit=True) as conn:
            conn.execute((DATA / "schema.sql").read_text())
            conn.execute("ANALYZE")
        yield name
    finally:
        drop_database(name)


@pytest.fixture(scope="module")
def conn(rewrite_db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(direct_dsn(rewrite_db), autocommit=True) as c:
        c.execute("SET default_transaction_read_only = on")
        yield c


@pytest.fixture
async def apg(rewrite_db: str) -> AsyncIterator[Any]:
    c = await asyncpg.connect(URI, database=rewrite_db)
    await c.execute("SET default_transaction_read_only = on; SET statement_timeout = '5s'")
    yield c
    await c.close()


def rows(
    conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """The statement's rows; $n parameters are bound through PREPARE/EXECUTE (psycopg itself
    speaks %s), with the values quoted as literals."""
    if not params:
        return conn.execute(sql).fetchall()
    conn.execute(pgsql.SQL("PREPARE pgsage_rw AS {}").format(pgsql.SQL(sql)))
    try:
        args = pgsql.SQL(", ").join(pgsql.Literal(p) for p in params)
        return conn.execute(pgsql.SQL("EXECUTE pgsage_rw ({})").format(args)).fetchall()
    finally:
        conn.execute("DEALLOCATE pgsage_rw")


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.id)
def test_fixture_pair_returns_the_same_rows(conn: psycopg.Connection[Any], case: Case) -> None:
    tree = parse_statement(case.original)
    assert tree is not None
    out = apply_rule(case.rule, tree, case.ctx)
    assert out is not None
    original = rows(conn, case.original, case.params)
    rewritten = rows(conn, out.sql(dialect="postgres"), case.params)
    assert original, "a fixture must return rows to prove anything"
    assert compare(original, rewritten) == ([], [])
    assert checksum(original) == checksum(rewritten)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_rule_on_every_fixture_is_equivalent(
    conn: psycopg.Connection[Any], case: Case
) -> None:
    """Whatever any rule makes of any fixture (negative ones included) returns the same rows."""
    original = rows(conn, case.original, case.params)
    for rule, sql in rewrite(case.original, case.ctx):
        assert compare(original, rows(conn, sql, case.params)) == ([], []), (rule, sql)


@pytest.mark.parametrize("case", UNSAFE, ids=lambda c: c.id)
def test_refused_rewrites_would_really_differ(conn: psycopg.Connection[Any], case: Case) -> None:
    assert case.unsafe is not None
    original = rows(conn, case.original)
    only_original, only_unsafe = compare(original, rows(conn, case.unsafe))
    assert only_original or only_unsafe
    if case.rewritten is None:
        assert rewrite(case.original, case.ctx, enabled={case.rule}) == []


def test_gold_fixtures_read_real_data(conn: psycopg.Connection[Any]) -> None:
    """The gold cases are only worth something if the warehouse has sales in their ranges."""
    (n,) = rows(
        conn,
        "SELECT count(*) FROM silver.sales_cleaned"
        " WHERE sold_at >= '2025-01-01' AND sold_at < '2025-02-01'",
    )[0]
    (days,) = rows(conn, "SELECT count(DISTINCT sale_date) FROM gold.sales_summary")[0]
    assert n > 50 and days > 300


async def test_shadow_check_equivalent_over_literal_sets(apg: Any) -> None:
    original = "SELECT * FROM items WHERE a = $1 OR c = $2"
    ((_, rewritten),) = rewrite(original, make_context(), enabled={"or_to_union"})

    async def run(sql: str, params: Any) -> list[Any]:
        return list(await apg.fetch(sql, *params))

    result = await shadow_check(run, original, rewritten, [(1, "x"), (2, None), (9, "z")])
    assert result.equivalent and result.checked == 3 and result.mismatch is None
    assert len(set(result.checksums)) == 3  # three different results, all matched


async def test_shadow_check_reports_first_mismatch(apg: Any) -> None:
    async def run(sql: str, params: Any) -> list[Any]:
        return list(await apg.fetch(sql, *params))

    original = "SELECT id FROM items WHERE a = $1"
    wrong = "SELECT id FROM items WHERE a = $1 AND qty < 5"  # loses item 5 (a = 1, qty 5)
    result = await shadow_check(run, original, wrong, [(2,), (1,), (3,)])
    assert not result.equivalent
    assert result.checked == 1  # a = 2 agreed, a = 1 did not, a = 3 never ran
    assert result.mismatch is not None
    assert result.mismatch.params == (1,)
    assert result.mismatch.only_original == [(("int", 5),)]
    assert result.mismatch.only_rewritten == []
    assert "params (1,)" in result.reason


async def test_shadow_check_on_not_in_with_nullable_column(apg: Any) -> None:
    """NOT IN over a column holding a NULL returns nothing; NOT EXISTS would not. The rule
    refuses, and the shadow check would have caught it."""
    original = "SELECT id FROM customers WHERE id NOT IN (SELECT cid FROM maybe_blocked)"
    naive = (
        "SELECT id FROM customers"
        " WHERE NOT EXISTS (SELECT 1 FROM maybe_blocked m WHERE m.cid = customers.id)"
    )
    assert rewrite(original, make_context()) == []

    async def run(sql: str, params: Any) -> list[Any]:
        return list(await apg.fetch(sql, *params))

    result = await shadow_check(run, original, naive, [()])
    assert not result.equivalent and result.mismatch is not None
    assert result.mismatch.original_rows == 0 and result.mismatch.rewritten_rows == 5
    assert sorted(result.mismatch.only_rewritten) == [(("int", i),) for i in (1, 3, 4, 5, 6)]


async def test_shadow_check_counts_errors_and_type_changes(apg: Any) -> None:
    async def run(sql: str, params: Any) -> list[Any]:
        return list(await apg.fetch(sql, *params))

    broken = await shadow_check(run, "SELECT 1", "SELECT 1 FROM no_such_table", [()])
    assert not broken.equivalent and broken.mismatch is not None
    assert broken.mismatch.error is not None and broken.mismatch.error.startswith("rewritten:")
    # same number, different type (bigint vs numeric): a client sees "3" vs "3.0"
    typed = await shadow_check(
        run,
        "SELECT count(*) FROM items WHERE a = 1",
        "SELECT sum(1.0) FROM items WHERE a = 1",
        [()],
    )
    assert not typed.equivalent
    with pytest.raises(ValueError):
        await shadow_check(run, "SELECT 1", "SELECT 1", [])
