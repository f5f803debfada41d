"""The warehouse on a real PostgreSQL: init (migrate + generate + COPY + ETL), rejects, incremental
ETL, determinism, NOTIFY. Every test builds its own database and drops it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench import warehouse
from bench.datagen import NORMALISED, TABLES, Datagen
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, direct_dsn

#: the same server, spelled two ways: as a URI and in libpq key=value form
URI = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
KV_DSN = direct_dsn()
SCALE = 0.05
GOLD = ("gold.sales_summary", "gold.customer_360", "gold.product_performance",
        "gold.inventory_insights")  # fmt: skip

#: columns that hold wall-clock times (or ids derived from a run) and so differ between runs
VOLATILE = {"_ingested_at", "_loaded_at", "refreshed_at", "rejected_at", "loaded_at"}


@pytest.fixture
def make_db() -> Iterator[Callable[[], str]]:
    """Names for throwaway databases (init creates them); all dropped at the end."""
    names: list[str] = []

    def new() -> str:
        names.append(f"pgsage_wh_{uuid.uuid4().hex[:10]}")
        return names[-1]

    yield new
    for name in names:
        asyncio.run(warehouse.drop_database_async(URI, name))


@pytest.fixture
async def db(make_db: Callable[[], str]) -> AsyncIterator[str]:
    yield make_db()


async def _connect(database: str) -> Any:
    return await asyncpg.connect(URI, database=database)


async def _count(conn: Any, table: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))


async def _checksum(conn: Any, table: str, skip: frozenset[str] = frozenset()) -> str:
    """md5 over the table's rows in a fixed order, leaving out wall-clock columns."""
    cols = [
        r["attname"]
        for r in await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            table,
        )
        if r["attname"] not in VOLATILE | skip
    ]
    row = ", ".join(f'"{c}"' for c in cols)
    if "record" in cols:  # rejected rows keep the bronze row, landing time included
        row = row.replace('"record"', "\"record\" - '_ingested_at'")
    return str(
        await conn.fetchval(
            f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text))"
            f" FROM (SELECT {row} FROM {table}) t"
        )
    )


# --------------------------------------------------------------------------- init


async def test_init_row_counts_per_scale_and_rebuild_without_duplicates(db: str) -> None:
    first = await warehouse.init_warehouse_async(URI, SCALE, 42, db, progress=False)
    assert first.created_database and first.loaded and not first.rebuilt
    conn = await _connect(db)
    try:
        for scale in (SCALE, 2 * SCALE):
            if scale != SCALE:  # a new scale on the same database rebuilds it
                again = await warehouse.init_warehouse_async(URI, scale, 42, db, progress=False)
                assert again.loaded and again.rebuilt and not again.created_database
            gen = Datagen(scale, 42)
            for t in TABLES:
                assert await _count(conn, f"bronze.{t}_raw") == gen.expected_rows(t)
                assert await _count(conn, f"silver.{t}_cleaned") == gen.clean_rows(t)
            n = round(10_000 * scale)
            assert await _count(conn, "silver.customer_cleaned") == n
            assert await _count(conn, "silver.product_cleaned") == n // 10
            assert await _count(conn, "silver.sales_cleaned") == n * 10
            assert await _count(conn, "silver.inventory_cleaned") == n // 10 * 3 * 12
            assert await _count(conn, "gold.customer_360") == n
            assert await _count(conn, "gold.product_performance") == n // 10
            assert await _count(conn, "gold.inventory_insights") == n // 10 * 3
            assert await _count(conn, "bronze.load_batches") == 1
    finally:
        await conn.close()


async def test_gold_agrees_with_silver(db: str) -> None:
    await warehouse.init_warehouse_async(URI, SCALE, 7, db, progress=False)
    conn = await _connect(db)
    try:
        lines, net = await conn.fetchrow(
            "SELECT count(*), sum(net_amount) FROM silver.sales_cleaned"
        )
        g_lines, g_net = await conn.fetchrow(
            "SELECT sum(lines), sum(net_revenue) FROM gold.sales_summary"
        )
        assert (g_lines, g_net) == (lines, net)
        sale_txns = await conn.fetchval(
            "SELECT count(DISTINCT transaction_id) FROM silver.sales_cleaned"
            " WHERE transaction_type = 'sale'"
        )
        assert await conn.fetchval("SELECT sum(transactions) FROM gold.customer_360") == sale_txns
        units = await conn.fetchval(
            "SELECT sum(quantity) FROM silver.sales_cleaned WHERE transaction_type = 'sale'"
        )
        assert await conn.fetchval("SELECT sum(units_sold) FROM gold.product_performance") == units
        assert await conn.fetchval("SELECT sum(net_spend) FROM gold.customer_360") == net
        ranks = await conn.fetch(
            "SELECT category, array_agg(revenue_rank_in_category ORDER BY net_revenue DESC,"
            " product_id) AS r FROM gold.product_performance GROUP BY category"
        )
        assert all(r["r"] == list(range(1, len(r["r"]) + 1)) for r in ranks)
        statuses = {r[0] for r in await conn.fetch("SELECT status FROM gold.inventory_insights")}
        assert {"stockout", "healthy"} <= statuses
        # normalised on the way: every spoilt case/whitespace value came out canonical
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM silver.customer_cleaned WHERE email <> lower(btrim(email))"
                " OR segment <> lower(segment) OR first_name <> initcap(first_name)"
            )
            == 0
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM silver.inventory_cleaned"
                " WHERE warehouse_code !~ '^WH-[A-Z]+$'"
            )
            == 0
        )
    finally:
        await conn.close()


async def test_rejects_equal_the_injected_dirt(db: str) -> None:
    result = await warehouse.init_warehouse_async(URI, SCALE, 42, db, progress=False)
    assert result.generation is not None and result.etl is not None
    conn = await _connect(db)
    try:
        stored_dirt = await conn.fetchval("SELECT dirt::text FROM bronze.load_batches")
        for t in TABLES:
            injected = {k: v for k, v in result.generation.dirt[t].items() if k != NORMALISED}
            assert sum(injected.values()) > 0
            q = result.etl.table(f"silver.{t}_cleaned")
            assert q.rejects_by_reason == injected
            assert q.rows_in == result.generation.rows[t]
            assert q.rows_inserted == result.generation.clean[t] and q.rows_updated == 0
            rows = await conn.fetch(
                f"SELECT reason, count(*) AS n FROM silver.{t}_rejects GROUP BY reason"
            )
            assert {r["reason"]: r["n"] for r in rows} == injected
            dq = await conn.fetchrow(
                "SELECT rows_in, rows_rejected, rejects_by_reason::text AS r"
                " FROM silver.data_quality WHERE table_name = $1",
                f"silver.{t}_cleaned",
            )
            assert dq["rows_rejected"] == sum(injected.values())
            assert t in stored_dirt
        # a rejected row keeps the bronze row as landed, for whoever fixes the source
        record = await conn.fetchval(
            "SELECT record->>'quantity' FROM silver.sales_rejects"
            " WHERE reason = 'negative_quantity' LIMIT 1"
        )
        assert record.startswith("-")
        run = await conn.fetchrow("SELECT status, summary FROM silver.etl_runs")
        assert run["status"] == "succeeded" and '"silver.sales_cleaned"' in run["summary"]
    finally:
        await conn.close()


async def test_same_seed_same_warehouse(make_db: Callable[[], str]) -> None:
    a, b, c = make_db(), make_db(), make_db()
    for name, seed in ((a, 5), (b, 5), (c, 6)):
        await warehouse.init_warehouse_async(URI, SCALE, seed, name, progress=False)
    tables = [f"bronze.{t}_raw" for t in TABLES] + [f"silver.{t}_cleaned" for t in TABLES]
    tables += [f"silver.{t}_rejects" for t in TABLES] + list(GOLD)
    sums: dict[str, dict[str, str]] = {}
    for name in (a, b, c):
        conn = await _connect(name)
        try:
            sums[name] = {t: await _checksum(conn, t) for t in tables}
        finally:
            await conn.close()
    assert sums[a] == sums[b]
    assert all(sums[a][t] != sums[c][t] for t in tables)


# --------------------------------------------------------------------------- incremental


async def test_incremental_etl_and_idempotent_reruns(db: str) -> None:
    await warehouse.init_warehouse_async(URI, SCALE, 42, db, progress=False)
    conn = await _connect(db)
    try:
        before = {t: await _count(conn, t) for t in ("silver.sales_cleaned", *GOLD)}
        idle = await warehouse.run_etl_async(URI, db)
        assert [q.rows_in for q in idle.tables] == [0, 0, 0, 0] and idle.refreshed == []

        inc = await warehouse.load_increment_async(URI, database=db)
        assert inc is not None and inc.batch == 1 and set(inc.rows) == {"sales"}
        run = await warehouse.run_etl_async(URI, db)
        sales = run.table("sales")
        assert sales.rows_in == inc.rows["sales"]  # only the new bronze rows
        assert sales.rows_inserted == inc.clean["sales"]
        assert sales.rejects_by_reason == {
            k: v for k, v in inc.dirt["sales"].items() if k != NORMALISED
        }
        assert [run.table(t).rows_in for t in ("customer", "product", "inventory")] == [0, 0, 0]
        assert set(run.refreshed) == set(GOLD)
        after = await _count(conn, "silver.sales_cleaned")
        assert after == before["silver.sales_cleaned"] + inc.clean["sales"]
        assert await conn.fetchval("SELECT sum(lines) FROM gold.sales_summary") == after
        lo, hi = run.watermarks["bronze.sales_raw"]
        assert hi - lo == inc.rows["sales"]

        # nothing is loaded or inserted twice: init and increment 1 again are no-ops
        assert await warehouse.load_increment_async(URI, batch=1, database=db) is None
        again = await warehouse.init_warehouse_async(URI, SCALE, 42, db, progress=False)
        assert not again.loaded and again.etl is not None and again.etl.refreshed == []
        assert await _count(conn, "silver.sales_cleaned") == after
        assert await _count(conn, "bronze.load_batches") == 2
        for t in GOLD:
            keys = await conn.fetchval(f"SELECT count(*) FROM {t}")
            assert keys >= before[t]
        dupes = await conn.fetchval(
            "SELECT count(*) FROM (SELECT transaction_id, line_no FROM silver.sales_cleaned"
            " GROUP BY 1, 2 HAVING count(*) > 1) d"
        )
        assert dupes == 0
    finally:
        await conn.close()


async def test_incremental_gold_equals_a_full_rebuild(make_db: Callable[[], str]) -> None:
    stepwise, at_once = make_db(), make_db()
    await warehouse.init_warehouse_async(URI, SCALE, 42, stepwise, progress=False)
    await warehouse.load_increment_async(URI, database=stepwise)
    second = await warehouse.run_etl_async(URI, stepwise)
    assert set(second.refreshed) == set(GOLD)
    assert second.full_refreshes == ["gold.inventory_insights"]  # the rest by touched keys

    await warehouse.init_warehouse_async(URI, SCALE, 42, at_once, etl=False, progress=False)
    await warehouse.load_increment_async(URI, database=at_once)
    only = await warehouse.run_etl_async(URI, at_once)
    assert set(only.full_refreshes) == set(GOLD)

    silver = [f"silver.{t}_cleaned" for t in TABLES]
    sums = []
    for name in (stepwise, at_once):
        conn = await _connect(name)
        try:
            sums.append(
                {t: await _checksum(conn, t, frozenset({"_etl_run_id"})) for t in (*silver, *GOLD)}
            )
        finally:
            await conn.close()
    assert sums[0] == sums[1]


async def test_bulk_load_path_gives_the_same_warehouse(make_db: Callable[[], str]) -> None:
    from warehouse_sql.etl import run_etl

    normal, bulk = make_db(), make_db()
    await warehouse.init_warehouse_async(URI, SCALE, 42, normal, progress=False)
    await warehouse.init_warehouse_async(URI, SCALE, 42, bulk, etl=False, progress=False)
    conn = await _connect(bulk)
    try:
        await run_etl(conn, bulk_rows=100)  # every silver table loads in bulk
    finally:
        await conn.close()
    catalog = (
        "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)"
        " FROM pg_constraint WHERE connamespace = 'silver'::regnamespace"
        " UNION ALL SELECT pg_get_indexdef(indexrelid) FROM pg_index"
        " WHERE indrelid::regclass::text LIKE 'silver.%' ORDER BY 1"
    )
    tables = [f"silver.{t}_cleaned" for t in TABLES] + list(GOLD)
    seen = []
    for name in (normal, bulk):
        conn = await _connect(name)
        try:
            keys = [r[0] for r in await conn.fetch(catalog)]
            seen.append((keys, {t: await _checksum(conn, t) for t in tables}))
        finally:
            await conn.close()
    assert seen[0] == seen[1]
    assert any("FOREIGN KEY (customer_id)" in k for k in seen[1][0])
    assert any("sales_cleaned_product_id_idx" in k for k in seen[1][0])


async def test_resent_customer_updates_silver_and_gold(db: str) -> None:
    await warehouse.init_warehouse_async(URI, SCALE, 42, db, progress=False)
    conn = await _connect(db)
    try:
        # a corrected customer (new region) and an identical re-send of another
        await conn.execute(
            "INSERT INTO bronze.customer_raw (customer_id, first_name, last_name, email,"
            " segment, region, city, signup_date, _batch_id)"
            " SELECT customer_id::text, first_name, last_name, email, segment, 'West', city,"
            " signup_date::text, 9 FROM silver.customer_cleaned WHERE customer_id = 1"
            " UNION ALL"
            " SELECT customer_id::text, first_name, last_name, email, segment, region, city,"
            " signup_date::text, 9 FROM silver.customer_cleaned WHERE customer_id = 2"
        )
        run = await warehouse.run_etl_async(URI, db)
        q = run.table("customer")
        assert (q.rows_in, q.rows_updated, q.rows_inserted) == (2, 1, 0)
        assert q.rejects_by_reason == {"duplicate": 1}
        assert (
            await conn.fetchval("SELECT region FROM gold.customer_360 WHERE customer_id = 1")
            == "west"
        )
        assert "gold.customer_360" in run.refreshed and "gold.sales_summary" in run.refreshed
        assert await conn.fetchval("SELECT sum(lines) FROM gold.sales_summary") == await _count(
            conn, "silver.sales_cleaned"
        )
    finally:
        await conn.close()


async def test_notify_per_gold_table_refreshed(db: str) -> None:
    await warehouse.ensure_database(URI, db)
    listener = await _connect(db)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgsage_refresh", lambda *args: got.put_nowait(args[3]))
    try:
        await warehouse.init_warehouse_async(KV_DSN, SCALE, 42, db, progress=False)
        payloads = [await asyncio.wait_for(got.get(), 5) for _ in GOLD]
        assert sorted(payloads) == sorted(GOLD)
        await warehouse.run_etl_async(KV_DSN, db)  # nothing new: nothing refreshed
        await asyncio.sleep(0.2)
        assert got.empty()
    finally:
        await listener.close()


# --------------------------------------------------------------------------- sync + DSNs


def test_sync_entry_points_for_the_cli(make_db: Callable[[], str]) -> None:
    name = make_db()
    result = warehouse.init_warehouse(KV_DSN, SCALE, 3, name, progress=False, show=False)
    assert result.database == name and result.etl is not None
    summary = warehouse.run_etl(f"{KV_DSN} connect_timeout=5", name, show=False)
    assert summary.run_id == result.etl.run_id + 1 and summary.refreshed == []
    table = warehouse.render_etl_summary(result.etl)
    assert table.row_count == len(TABLES)


async def test_unix_socket_dsn_as_the_embedded_server_gives(make_db: Callable[[], str]) -> None:
    conn = await asyncpg.connect(URI)
    try:
        dirs = (await conn.fetchval("SHOW unix_socket_directories")).split(",")
    finally:
        await conn.close()
    found = [d.strip() for d in dirs if Path(d.strip(), f".s.PGSQL.{PG_PORT}").exists()]
    assert found, f"no PostgreSQL socket in {dirs}"
    dsn = f"postgresql://{PG_USER}@/postgres?host={found[0]}&port={PG_PORT}"
    result = await warehouse.init_warehouse_async(dsn, 0.02, 1, make_db(), progress=False)
    assert result.etl is not None and result.etl.gold_rows["gold.customer_360"] == 200


def test_dsn_forms() -> None:
    assert warehouse.connect_kwargs(URI, "w") == {"dsn": URI, "database": "w"}
    kv = warehouse.connect_kwargs("host=/run/pg port=5433 user='o\\'k' dbname=x sslmode=disable")
    assert kv == {"host": "/run/pg", "port": 5433, "user": "o'k", "database": "x", "ssl": "disable"}
    sock = warehouse.connect_kwargs("postgresql://postgres@/postgres?host=/tmp/sock", None)
    assert sock == {"dsn": "postgresql://postgres@/postgres?host=/tmp/sock"}
    with pytest.raises(ValueError):
        warehouse.connect_kwargs("host=a 'unterminated")
