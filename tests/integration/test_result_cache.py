"""The result cache with real clients: hits are byte-identical, writes invalidate exactly,
two pgsage instances sharing Redis never serve a stale row, and the operator can see it.

How a test knows an answer came from the cache: a row changed *directly* on the database
(bypassing pgsage, so no invalidation) still reads old through pgsage while cached.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import redis

from proxy.protocol.frontend import Bind, Describe, Execute, Parse, Query, Sync
from tests.fix_proxy import (
    RunningProxy,
    create_database,
    direct_dsn,
    drop_database,
)
from tests.wire_client import WireClient

REDIS_URL = "redis://127.0.0.1:6379/11"
CACHE = {"cache_enabled": True, "cache_admit_after": 1, "cache_min_ms": 0}


@pytest.fixture(scope="module")
def gold_db() -> Iterator[str]:
    name = create_database("pgsage_cache")
    with psycopg.connect(direct_dsn(name), autocommit=True) as c:
        c.execute(
            """
            CREATE SCHEMA gold; CREATE SCHEMA silver;
            CREATE TABLE gold.t (id int PRIMARY KEY, v text, n numeric, d timestamptz);
            INSERT INTO gold.t
                SELECT g, 'v' || g, g / 3.0, '2026-01-01'::timestamptz + g * interval '1 hour'
                FROM generate_series(1, 2000) g;
            CREATE TABLE silver.s (id int PRIMARY KEY, v text);
            INSERT INTO silver.s VALUES (1, 'one');
            """
        )
    yield name
    drop_database(name)


@pytest.fixture
def reset_row(gold_db: str) -> Iterator[Callable[[int, str], None]]:
    def set_direct(row: int, value: str) -> None:
        with psycopg.connect(direct_dsn(gold_db), autocommit=True) as c:
            c.execute("UPDATE gold.t SET v = %s WHERE id = %s", (value, row))

    yield set_direct
    with psycopg.connect(direct_dsn(gold_db), autocommit=True) as c:
        c.execute("UPDATE gold.t SET v = 'v' || id WHERE v <> 'v' || id")


def hits(p: RunningProxy) -> list[bool]:
    return [r.execution.cache_hit for r in p.records]


# ------------------------------------------------------------------------- serving


def test_hit_is_byte_identical_to_the_server(make_proxy: Any, gold_db: str) -> None:
    p = make_proxy(**CACHE)
    sql = "SELECT id, v, n, d FROM gold.t WHERE id <= 300 ORDER BY id"
    with WireClient(p.host, p.port, database=gold_db) as via:
        first = via.exchange_raw(Query(sql))
        second = via.exchange_raw(Query(sql))
    with WireClient("127.0.0.1", 5432, database=gold_db) as direct:
        expected = direct.exchange_raw(Query(sql))
    assert first == second == expected
    assert hits(p) == [False, True]
    rec = p.records[1].execution
    assert rec.rows == 300 and rec.tag == "SELECT 300" and rec.bytes_sent == len(expected)


def test_extended_protocol_hits_are_byte_identical(make_proxy: Any, gold_db: str) -> None:
    p = make_proxy(**CACHE)
    sql = "SELECT v, n FROM gold.t WHERE id = $1"
    batch = (Bind("", "", params=(b"42",)), Describe("P"), Execute(), Sync())
    with WireClient(p.host, p.port, database=gold_db) as via:
        unnamed = [via.exchange_raw(Parse("", sql), *batch) for _ in range(3)]
        via.exchange_raw(Parse("s1", sql), Sync())
        named = [
            via.exchange_raw(Bind("", "s1", params=(b"42",)), Describe("P"), Execute(), Sync())
            for _ in range(3)
        ]
        # after hits that skipped the unnamed Parse, the server still has that statement
        rebound = via.exchange_raw(Bind("", "", params=(b"43",)), Execute(), Sync())
    with WireClient("127.0.0.1", 5432, database=gold_db) as direct:
        expected_unnamed = direct.exchange_raw(Parse("", sql), *batch)
        direct.exchange_raw(Parse("s1", sql), Sync())
        expected_named = direct.exchange_raw(
            Bind("", "s1", params=(b"42",)), Describe("P"), Execute(), Sync()
        )
    assert unnamed == [expected_unnamed] * 3
    assert named == [expected_named] * 3
    assert b"v43" in rebound
    assert hits(p).count(True) == 4  # two of each shape (the first of each is the miss)


def test_drivers_read_cached_results(make_proxy: Any, gold_db: str, reset_row: Any) -> None:
    p = make_proxy(**CACHE)
    sql = "SELECT v FROM gold.t WHERE id = %s"
    with psycopg.connect(p.dsn(gold_db), autocommit=True) as c:
        assert c.execute(sql, (7,)).fetchone() == ("v7",)
        reset_row(7, "changed directly")
        # unnamed (first executions) and then server-prepared (prepare=True): both cached
        assert c.execute(sql, (7,)).fetchone() == ("v7",)
        assert c.execute(sql, (7,), prepare=True).fetchone() == ("changed directly",)
        assert c.execute(sql, (7,), prepare=True).fetchone() == ("changed directly",)
        assert c.execute(sql, (8,), prepare=True).fetchone() == ("v8",)  # other parameters

    async def run() -> list[str]:
        conn = await asyncpg.connect(host=p.host, port=p.port, user="postgres", database=gold_db)
        try:
            out = [await conn.fetchval("SELECT v FROM gold.t WHERE id = $1", 9)]
            reset_row(9, "asyncpg saw this")
            out.append(await conn.fetchval("SELECT v FROM gold.t WHERE id = $1", 9))
            return out
        finally:
            await conn.close()

    assert asyncio.run(run()) == ["v9", "v9"]  # the second read came from the cache


def test_what_is_never_cached(make_proxy: Any, gold_db: str, reset_row: Any) -> None:
    p = make_proxy(**CACHE)
    with psycopg.connect(p.dsn(gold_db), autocommit=True) as c:
        queries = [
            "SELECT v FROM gold.t WHERE id = 11 /* pgsage:no_cache */",
            "SELECT v, now() > d FROM gold.t WHERE id = 11",
            "SELECT v FROM silver.s WHERE id = 1",
        ]
        for q in queries:
            c.execute(q).fetchall()
        with c.transaction():
            c.execute("SELECT v FROM gold.t WHERE id = 11").fetchall()
            c.execute("SELECT v FROM gold.t WHERE id = 11").fetchall()
        for q in queries:
            c.execute(q).fetchall()
    assert not any(hits(p))
    assert p.server.cache.stats()["stores"] == 0


def test_session_settings_are_part_of_the_key(make_proxy: Any, gold_db: str) -> None:
    p = make_proxy(**CACHE)
    sql = "SELECT n, d FROM gold.t WHERE id = 5"
    with psycopg.connect(p.dsn(gold_db), autocommit=True) as c:
        iso = c.execute(sql).fetchone()
        c.execute("SET TimeZone = 'Asia/Tokyo'")
        c.execute("SET extra_float_digits = 0")
        tokyo = c.execute(sql).fetchone()
    assert iso is not None and tokyo is not None
    assert iso[1] == tokyo[1]  # the same instant ...
    assert str(iso[1].tzinfo) != str(tokyo[1].tzinfo)  # ... rendered in the session's zone
    assert hits(p).count(True) == 0


# ------------------------------------------------------------------------- invalidation


def test_writes_through_pgsage_invalidate(make_proxy: Any, gold_db: str, reset_row: Any) -> None:
    p = make_proxy(**CACHE)
    read = "SELECT v FROM gold.t WHERE id = 21"
    with (
        psycopg.connect(p.dsn(gold_db), autocommit=True) as reader,
        psycopg.connect(p.dsn(gold_db)) as writer,
    ):
        assert reader.execute(read).fetchone() == ("v21",)
        assert reader.execute(read).fetchone() == ("v21",)  # cached
        writer.execute("UPDATE gold.t SET v = 'in txn' WHERE id = 21")  # not committed
        # the write's completion dropped the entry; this re-reads (and may re-store) the old row
        assert reader.execute(read).fetchone() == ("v21",)
        writer.commit()  # the transaction's end drops it again
        assert reader.execute(read).fetchone() == ("in txn",)
        writer.execute("TRUNCATE silver.s")  # another table: the entry stays
        writer.commit()
        assert reader.execute(read).fetchone() == ("in txn",)
        assert hits(p)[-1] is True
        writer.execute("ALTER TABLE gold.t ADD COLUMN extra int")  # DDL: everything goes
        writer.commit()
        assert reader.execute(read).fetchone() == ("in txn",)
        assert hits(p)[-1] is False
        writer.execute("ALTER TABLE gold.t DROP COLUMN extra")
        writer.commit()


def test_notify_from_the_etl_invalidates(make_service: Any, reset_row: Any, gold_db: str) -> None:
    svc = make_service(warehouse_database=gold_db, **CACHE)
    read = "SELECT v FROM gold.t WHERE id = 31"
    listener = svc.service.refresh_listener
    assert listener is not None
    _wait(lambda: listener.listening)
    with psycopg.connect(svc.dsn(gold_db), autocommit=True) as c:
        assert c.execute(read).fetchone() == ("v31",)
        reset_row(31, "refreshed by ETL")
        assert c.execute(read).fetchone() == ("v31",)  # cached: the write bypassed pgsage
        with psycopg.connect(direct_dsn(gold_db), autocommit=True) as etl:
            etl.execute("NOTIFY pgsage_refresh, 'gold.t'")
        _wait(lambda: listener.received >= 1)
        _wait(lambda: c.execute(read).fetchone() == ("refreshed by ETL",))


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


# ------------------------------------------------------------------------- Redis, shared


@pytest.fixture
def shared_redis() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


def test_two_instances_sharing_redis_never_serve_stale_rows(
    make_proxy: Any, gold_db: str, shared_redis: str, reset_row: Any
) -> None:
    a: RunningProxy = make_proxy(cache_redis_url=shared_redis, **CACHE)
    b: RunningProxy = make_proxy(cache_redis_url=shared_redis, **CACHE)
    read = "SELECT v FROM gold.t WHERE id = 41"
    stale: list[tuple[int, str]] = []
    with (
        psycopg.connect(a.dsn(gold_db), autocommit=True) as via_a,
        psycopg.connect(b.dsn(gold_db), autocommit=True) as via_b,
        psycopg.connect(b.dsn(gold_db), autocommit=True) as writer_b,
    ):
        assert via_a.execute(read).fetchone() == ("v41",)
        # A stores into Redis after it has answered (off the relay): wait for the store
        _wait(lambda: a.server.cache is not None and a.server.cache.stores >= 1)
        assert via_b.execute(read).fetchone() == ("v41",)  # stored by A, served to B
        assert b.records[-1].execution.cache_hit
        for i in range(60):
            value = f"w{i}"
            writer = via_a if i % 2 else writer_b  # writes through either instance
            writer.execute("UPDATE gold.t SET v = %s WHERE id = 41", (value,))
            for reader in (via_b, via_a, via_b):
                got = reader.execute(read).fetchone()
                if got != (value,):
                    stale.append((i, str(got)))
    assert stale == []
    assert sum(hits(a)) + sum(hits(b)) > 60  # the repeated reads between writes were hits


def test_redis_down_means_no_cache_not_errors(make_proxy: Any, gold_db: str) -> None:
    p = make_proxy(cache_redis_url="redis://127.0.0.1:1/0", **CACHE)
    with psycopg.connect(p.dsn(gold_db), autocommit=True) as c:
        for _ in range(3):
            assert c.execute("SELECT v FROM gold.t WHERE id = 3").fetchone() == ("v3",)
    assert not any(hits(p))


# ------------------------------------------------------------------------- operators


def test_show_cache_api_and_metrics(make_service: Any, gold_db: str) -> None:
    svc = make_service(warehouse_database=gold_db, admin_token="s3cret", **CACHE)
    with psycopg.connect(svc.dsn(gold_db), autocommit=True) as c:
        for _ in range(4):
            c.execute("SELECT count(*) FROM gold.t WHERE id < 100").fetchone()
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        rows = dict(admin.execute("SHOW CACHE").fetchall())
    assert rows["backend"] == "memory" and rows["hits"] == "3" and rows["misses"] == "1"
    assert float(rows["hit_ratio"]) == 0.75 and int(rows["entries"]) == 1
    metrics = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
    assert "pgsage_cache_hits_total 3.0" in metrics
    assert "pgsage_cache_hit_ratio 0.75" in metrics
    req = urllib.request.Request(
        f"{svc.http_url}/api/v1/admin/clear-cache",
        method="POST",
        headers={"Authorization": "Bearer s3cret"},
    )
    body = json.loads(urllib.request.urlopen(req).read())
    assert body == {"cleared": True, "entries_dropped": 1}
    svc.flush()
    logged = svc.call(_logged_hits(gold_db))
    assert logged == [False, True, True, True]


async def _logged_hits(database: str) -> list[bool]:
    conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database=database)
    try:
        rows = await conn.fetch(
            "SELECT cache_hit FROM metadata.query_logs WHERE normalized_text LIKE "
            "'SELECT count(*) FROM gold.t%' ORDER BY started_at"
        )
        return [r["cache_hit"] for r in rows]
    finally:
        await conn.close()


def test_writes_without_a_write_tag_invalidate(
    make_proxy: Any, gold_db: str, reset_row: Any
) -> None:
    """A row-limited Execute of UPDATE ... RETURNING ends in PortalSuspended (no tag), and a
    data-modifying WITH is tagged SELECT: both still drop what they changed."""
    p = make_proxy(**CACHE)
    read = "SELECT v FROM gold.t WHERE id = $1"

    async def run() -> list[str]:
        conn = await asyncpg.connect(host=p.host, port=p.port, user="postgres", database=gold_db)
        try:
            seen = [await conn.fetchval(read, 51), await conn.fetchval(read, 51)]
            # fetchval binds with a row limit of 1
            await conn.fetchval("UPDATE gold.t SET v = 'returned' WHERE id = $1 RETURNING v", 51)
            seen.append(await conn.fetchval(read, 51))
            await conn.fetchval(read, 52)
            await conn.fetch(
                "WITH u AS (UPDATE gold.t SET v = 'cte' WHERE id = $1 RETURNING id) "
                "SELECT count(*) FROM u",
                52,
            )
            seen.append(await conn.fetchval(read, 52))
            return seen
        finally:
            await conn.close()

    assert asyncio.run(run()) == ["v51", "v51", "returned", "cte"]
    assert any(r.execution.cache_hit for r in p.records)
