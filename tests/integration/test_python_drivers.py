"""psycopg 3 and asyncpg through the proxy: their real message flows work and are recorded right."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import hashlib
import io
import time
import uuid
from collections.abc import Callable

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from tests.fix_proxy import PG_USER, direct_dsn

# ---------------------------------------------------------------------------------- helpers


def with_sql(proxy, text: str) -> list:
    return [r for r in proxy.records if r.sql is not None and text in r.sql]


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


async def apg(proxy, dbname: str, **kw) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=proxy.host, port=proxy.port, user=PG_USER, database=dbname, ssl=False, **kw
    )


TYPED_QUERY = (
    "select %s::int2 as i2, %s::int8 as i8, %s::numeric as num, %s::float8 as f, %s::text as t,"
    " %s::bytea as b, %s::bool as ok, %s::date as d, %s::timestamptz as ts, %s::uuid as u,"
    " %s::int[] as arr, %s::text as missing"
)
TYPED_PARAMS = (
    7,
    -(2**62),
    decimal.Decimal("12345.678901234567890"),
    0.1,
    "héllo 👋",
    b"\x00\x01\xfe",
    True,
    dt.date(2024, 2, 29),
    dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    [1, None, 3],
    None,
)


# ---------------------------------------------------------------------------------- psycopg 3


@pytest.mark.parametrize("binary", [False, True])
def test_psycopg_text_and_binary_cursors(proxy, test_db, binary):
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute(TYPED_QUERY, TYPED_PARAMS)
        row = cur.fetchone()
        assert [c.name for c in cur.description][:3] == ["i2", "i8", "num"]
        assert cur.pgresult is not None
        assert {cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)} == {int(binary)}
        cur.execute("select generate_series(1, 500) as g")
        assert [r[0] for r in cur.fetchall()] == list(range(1, 501))
    assert row == TYPED_PARAMS

    recs = proxy.records
    assert [r.protocol for r in recs] == ["extended", "extended" if binary else "simple"]
    assert recs[0].sql is not None and recs[0].sql.startswith("select $1::int2 as i2, $2::int8")
    assert [(r.rows, r.status) for r in recs] == [(1, "ok"), (500, "ok")]


def test_psycopg_pipeline_mode(proxy, test_db):
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.execute(
            "drop table if exists pipe_t; create table pipe_t (id int primary key, v text)"
        )
        proxy.sink.clear()
        with conn.pipeline() as p:
            cur = conn.cursor()
            curs = []
            for i in range(30):
                c = conn.cursor()
                c.execute("select %s::int * 2 as doubled", (i,))
                curs.append(c)
            cur.executemany("insert into pipe_t values (%s, %s)", [(i, f"v{i}") for i in range(40)])
            p.sync()
            assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(30)]
            count = conn.execute("select count(*) from pipe_t")
        assert count.fetchone() == (40,)

        # an error inside a pipeline aborts the rest of its Sync group
        with pytest.raises(pg_errors.UniqueViolation), conn.pipeline():
            conn.execute("insert into pipe_t values (%s, 'new')", (100,))
            conn.execute("insert into pipe_t values (%s, 'dup')", (1,))
            conn.execute("insert into pipe_t values (%s, 'skipped')", (101,))
        assert conn.execute("select count(*) from pipe_t where id >= 100").fetchone() == (0,)

    doubled = with_sql(proxy, "as doubled")
    assert len(doubled) == 30  # one record per Execute
    assert {r.sql for r in doubled} == {"select $1::int * 2 as doubled"}
    assert all(r.protocol == "extended" and r.rows == 1 and r.status == "ok" for r in doubled)
    inserts = with_sql(proxy, "insert into pipe_t values ($1, $2)")
    assert len(inserts) == 40 and all(r.rows == 1 and r.status == "ok" for r in inserts)

    failed = [
        (r.sql, r.status, r.sqlstate) for r in with_sql(proxy, "insert into pipe_t values ($1, '")
    ]
    assert failed == [
        ("insert into pipe_t values ($1, 'new')", "ok", None),  # ran, then rolled back
        ("insert into pipe_t values ($1, 'dup')", "error", "23505"),
    ]
    assert with_sql(proxy, "skipped") == []  # the server never ran it


def test_psycopg_server_side_cursors(proxy, test_db):
    with psycopg.connect(proxy.dsn(test_db)) as conn:
        with conn.cursor(name="ssc") as cur:
            cur.itersize = 120
            cur.execute("select g, g * 2 from generate_series(1, 1000) g where g > %s", (0,))
            got = [r[0] for r in cur]
        assert got == list(range(1, 1001))

        with conn.cursor(name="ssc_bin", binary=True, scrollable=True) as cur:
            cur.execute("select generate_series(1, 50) as g")
            assert cur.fetchmany(5) == [(1,), (2,), (3,), (4,), (5,)]
            cur.scroll(10, mode="absolute")
            assert cur.fetchone() == (11,)
        conn.commit()

        with conn.cursor(name="held", withhold=True) as cur:
            cur.execute("select generate_series(1, 20)")
            conn.commit()  # WITH HOLD: usable after the transaction
            assert len(cur.fetchall()) == 20

    declares = with_sql(proxy, 'DECLARE "ssc" CURSOR')
    assert len(declares) == 1 and declares[0].status == "ok"
    fetches = with_sql(proxy, 'FETCH FORWARD 120 FROM "ssc"')
    assert sum(r.rows for r in fetches) == 1000
    assert [r.rows for r in fetches] == [120] * 8 + [40]
    assert all(r.status == "ok" for r in proxy.records)
    scroll = [(r.protocol, r.sql.split(" FOR ")[0], r.rows) for r in with_sql(proxy, '"ssc_bin"')]
    assert scroll == [
        ("extended", 'DECLARE "ssc_bin" SCROLL CURSOR', None),
        ("extended", 'FETCH FORWARD 5 FROM "ssc_bin"', 5),
        ("simple", 'MOVE ABSOLUTE 10 FROM "ssc_bin"', 1),
        ("extended", 'FETCH FORWARD 1 FROM "ssc_bin"', 1),
        ("simple", 'CLOSE "ssc_bin"', None),
    ]
    (held,) = with_sql(proxy, 'DECLARE "held"')
    assert held.status == "ok" and "WITH HOLD" in held.sql


def test_psycopg_prepared_statements(proxy, test_db):
    sql = "select %s::int + %s::int as total"
    with psycopg.connect(proxy.dsn(test_db), autocommit=True, prepare_threshold=2) as conn:
        for i in range(3):
            assert conn.execute(sql, (i, 1), prepare=True).fetchone() == (i + 1,)
        other = "select length(%s::text) as len"
        for word in ("a", "bb", "ccc", "dddd"):  # auto-prepared after prepare_threshold uses
            assert conn.execute(other, (word,)).fetchone() == (len(word),)
        # the prepared statements live in the server session behind the proxy
        names = conn.execute(
            "select name, statement from pg_prepared_statements order by name"
        ).fetchall()
        assert {stmt for _, stmt in names} == {
            "select $1::int + $2::int as total",
            "select length($1::text) as len",
        }

    recs = with_sql(proxy, "as total")
    assert len(recs) == 3
    assert {r.sql for r in recs} == {"select $1::int + $2::int as total"}
    assert len({r.execution.statement for r in recs}) == 1
    assert recs[0].execution.statement.startswith("_pg3_")
    lens = with_sql(proxy, "as len")
    assert [r.rows for r in lens] == [1, 1, 1, 1]
    assert {r.sql for r in lens} == {"select length($1::text) as len"}
    # the first executions run unnamed, the later ones as a named prepared statement
    assert lens[0].execution.statement == "" and lens[-1].execution.statement.startswith("_pg3_")


def test_psycopg_error_at_prepare_is_recorded(proxy, test_db):
    """psycopg with prepare=True sends Parse+Sync first and Bind/Execute only if that worked: a
    statement failing at Parse (unknown column, syntax, bad literal) has no Execute at all. The
    client saw a failed statement, so the proxy's log must have it too."""
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        with pytest.raises(pg_errors.UndefinedColumn):
            conn.execute("select no_such_column from pg_class where oid = %s", (1,), prepare=True)
        with pytest.raises(pg_errors.InvalidTextRepresentation):
            conn.execute("select 'abc'::int + %s", (1,), prepare=True)
        # not prepared: P/B/D/E/S travel together, the Execute is there to fail
        with pytest.raises(pg_errors.UndefinedColumn):
            conn.execute("select no_such_column from pg_class where oid = %s", (2,), prepare=False)
        assert conn.execute("select %s::int", (7,), prepare=True).fetchone() == (7,)

    got = [(r.sql, r.status, r.sqlstate) for r in proxy.records]
    assert got == [
        ("select no_such_column from pg_class where oid = $1", "error", "42703"),
        ("select 'abc'::int + $1", "error", "22P02"),
        ("select no_such_column from pg_class where oid = $1", "error", "42703"),
        ("select $1::int", "ok", None),
    ]


# ---------------------------------------------------------------------------------- asyncpg


async def test_asyncpg_prepared_statements(proxy, test_db):
    conn = await apg(proxy, test_db)
    try:
        stmt = await conn.prepare("select $1::int + $2::int as total")
        assert proxy.records == []  # Parse/Describe/Flush runs nothing
        assert [await stmt.fetchval(i, 10) for i in range(5)] == [10, 11, 12, 13, 14]
        rows = await conn.fetch("select g, g::text as t from generate_series(1, $1::int) g", 25)
        assert [(r["g"], r["t"]) for r in rows] == [(i, str(i)) for i in range(1, 26)]
        assert await conn.fetchval("select $1::jsonb ->> 'k'", '{"k": "v"}') == "v"
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("select 1 / $1::int", 0)
        assert await conn.fetchval("select 'still ok'") == "still ok"
    finally:
        await conn.close()

    recs = with_sql(proxy, "as total")
    assert len(recs) == 5
    assert all(r.sql == "select $1::int + $2::int as total" for r in recs)
    assert all(r.execution.statement.startswith("__asyncpg_stmt_") for r in recs)
    assert all(r.protocol == "extended" and r.rows == 1 and r.status == "ok" for r in recs)
    (series,) = with_sql(proxy, "generate_series(1, $1::int)")
    assert series.rows == 25
    (div,) = with_sql(proxy, "select 1 / $1::int")
    assert (div.status, div.sqlstate, div.rows) == ("error", "22012", None)
    assert div.execution.error_message == "division by zero"


async def test_asyncpg_error_at_prepare_is_recorded(proxy, test_db):
    """asyncpg sends Parse/Describe/Flush first: an error there (unknown column, syntax) ends the
    statement before any Execute is sent. The client saw a failed statement, so must the log."""
    conn = await apg(proxy, test_db)
    try:
        with pytest.raises(asyncpg.UndefinedColumnError):
            await conn.fetch("select no_such_column from pg_class")
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await conn.execute("selec 1", timeout=5)  # no args: asyncpg uses simple Query
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await conn.fetch("selec $1::int", 1)
        assert await conn.fetchval("select 42") == 42
    finally:
        await conn.close()

    got = [(r.sql, r.status, r.sqlstate) for r in proxy.records]
    assert ("selec 1", "error", "42601") in got  # simple protocol: recorded
    assert ("select 42", "ok", None) in got
    assert ("select no_such_column from pg_class", "error", "42703") in got
    assert ("selec $1::int", "error", "42601") in got


async def test_asyncpg_cursor_in_transaction(proxy, test_db):
    conn = await apg(proxy, test_db)
    try:
        async with conn.transaction():
            got = [
                r[0]
                async for r in conn.cursor("select generate_series(1, 250) /* iter */", prefetch=50)
            ]
        assert got == list(range(1, 251))

        async with conn.transaction():
            cur = await conn.cursor("select generate_series(1, 100) /* manual */")
            assert [r[0] for r in await cur.fetch(10)] == list(range(1, 11))
            assert await cur.forward(5) == 5
            assert (await cur.fetchrow())[0] == 16
            assert [r[0] for r in await cur.fetch(3)] == [17, 18, 19]
    finally:
        await conn.close()

    (it,) = with_sql(proxy, "/* iter */")  # ONE record for the whole portal
    assert it.protocol == "extended" and it.status == "ok"
    assert it.rows == 250
    assert it.execution.suspensions == 5
    assert it.execution.portal != ""

    (manual,) = with_sql(proxy, "/* manual */")
    # rows the portal delivered through Execute: 10 + 1 + 3 (MOVE is its own statement)
    assert manual.rows == 14 and manual.execution.suspensions == 3 and manual.status == "ok"
    (move,) = [r for r in proxy.records if r.sql and r.sql.upper().startswith("MOVE")]
    assert move.rows == 5 and move.status == "ok"


async def test_asyncpg_copy(proxy, fresh_db):
    conn = await apg(proxy, fresh_db)
    try:
        await conn.execute("create table ac (id int, name text, at timestamptz, score float8)")
        base = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
        records = [(i, f"n{i} ✓", base + dt.timedelta(seconds=i), i / 3) for i in range(2000)]
        proxy.sink.clear()
        res = await conn.copy_records_to_table("ac", records=records)
        assert res == "COPY 2000"
        res = await conn.copy_to_table("ac", source=io.BytesIO(b"5000\tfrom file\t\\N\t1.5\n"))
        assert res == "COPY 1"

        buf = io.BytesIO()
        res = await conn.copy_from_query(
            "select id, name from ac where id < $1 order by id", 3, output=buf
        )
        assert res == "COPY 3"
        assert buf.getvalue() == "0\tn0 ✓\n1\tn1 ✓\n2\tn2 ✓\n".encode()

        out = io.BytesIO()
        res = await conn.copy_from_table("ac", output=out, format="csv")
        assert res == "COPY 2001"
        assert out.getvalue().count(b"\n") == 2001
        back = await conn.fetch("select id, name, at, score from ac where id < 5000 order by id")
        assert [tuple(r) for r in back] == records
    finally:
        await conn.close()

    copies = [r for r in proxy.records if r.sql and r.sql.lstrip().upper().startswith("COPY")]
    assert [(r.rows, r.status) for r in copies] == [
        (2000, "ok"),
        (1, "ok"),
        (3, "ok"),
        (2001, "ok"),
    ]
    assert "FROM STDIN" in copies[0].sql.upper() and "TO STDOUT" in copies[2].sql.upper()


async def test_asyncpg_executemany(proxy, test_db):
    conn = await apg(proxy, test_db)
    try:
        await conn.execute("drop table if exists em; create table em (id int primary key, v text)")
        proxy.sink.clear()
        await conn.executemany("insert into em values ($1, $2)", [(i, f"v{i}") for i in range(600)])
        assert await conn.fetchval("select count(*) from em") == 600

        # a failure in the middle: the whole batch is one implicit transaction, rolled back
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany(
                "insert into em values ($1, 'again')", [(1000,), (1001,), (5,), (1002,)]
            )
        assert await conn.fetchval("select count(*) from em") == 600
    finally:
        await conn.close()

    ok = with_sql(proxy, "insert into em values ($1, $2)")
    assert len(ok) == 600  # one record per Execute of the pipelined batch
    assert all(r.rows == 1 and r.status == "ok" and r.protocol == "extended" for r in ok)
    again = [(r.status, r.sqlstate) for r in with_sql(proxy, "'again'")]
    assert again == [("ok", None), ("ok", None), ("error", "23505")]


async def test_asyncpg_listen_notify(proxy, test_db):
    conn = await apg(proxy, test_db)
    sender = await asyncpg.connect(
        dsn=None, host="127.0.0.1", port=5432, user=PG_USER, database=test_db
    )
    try:
        got: asyncio.Queue = asyncio.Queue()
        await conn.add_listener(
            "apg_chan", lambda _c, pid, ch, payload: got.put_nowait((pid, ch, payload))
        )
        await sender.execute("notify apg_chan, 'one'")
        await sender.execute("select pg_notify('apg_chan', 'two ☃')")
        sender_pid = sender.get_server_pid()
        first = await asyncio.wait_for(got.get(), 5)
        second = await asyncio.wait_for(got.get(), 5)
        assert [first, second] == [
            (sender_pid, "apg_chan", "one"),
            (sender_pid, "apg_chan", "two ☃"),
        ]
        assert conn.get_server_pid() == await conn.fetchval("select pg_backend_pid()")
    finally:
        await sender.close()
        await conn.close()


async def test_asyncpg_timeout_cancels_through_proxy(proxy, test_db):
    conn = await apg(proxy, test_db)
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("select pg_sleep($1::float8)", 20, timeout=0.5)
        assert time.monotonic() - started < 10
        assert await conn.fetchval("select 'alive'") == "alive"
    finally:
        await conn.close()
    (rec,) = with_sql(proxy, "pg_sleep")
    assert (rec.status, rec.sqlstate) == ("cancelled", "57014")
    assert 0.3 < rec.duration < 10


async def test_large_parameters_and_results(proxy, test_db):
    """20 MB parameters (the proxy reads Bind up to max_read_size) and results, both drivers."""
    blob = bytes(range(256)) * (20 * 4096)  # 20 MiB
    text = "é😀" * (3 << 20)  # 18 MiB of UTF-8
    conn = await apg(proxy, test_db)
    try:
        assert await conn.fetchval("select $1::bytea", blob) == blob
        assert await conn.fetchval("select $1::text", text) == text
    finally:
        await conn.close()
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as pconn:
        for binary in (False, True):
            cur = pconn.cursor(binary=binary)
            cur.execute("select %b::bytea, md5(%b::bytea)", (blob, blob))
            got, digest = cur.fetchone()
            assert bytes(got) == blob
            assert digest == hashlib.md5(blob).hexdigest()
    recs = with_sql(proxy, "select $1::bytea")
    assert len(recs) == 1 + 2  # asyncpg once, psycopg text and binary
    assert all(r.rows == 1 and r.status == "ok" for r in recs)


def test_session_state_persists_in_session_mode(proxy, test_db):
    """Session state (SET, temp tables, advisory locks) persists in 1:1 session mode."""
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.execute("set search_path = pg_catalog, public")
        conn.execute("create temp table tmp_state (v int)")
        conn.execute("insert into tmp_state values (1), (2)")
        conn.execute("select pg_advisory_lock(424242)")
        assert conn.execute("select current_setting('search_path')").fetchone() == (
            "pg_catalog, public",
        )
        assert conn.execute("select sum(v) from tmp_state").fetchone() == (3,)
        with psycopg.connect(direct_dsn(test_db), autocommit=True) as other:
            assert other.execute("select pg_try_advisory_lock(424242)").fetchone() == (False,)
        conn.execute("discard all")
        with pytest.raises(pg_errors.UndefinedTable):
            conn.execute("select * from tmp_state")
        with psycopg.connect(direct_dsn(test_db), autocommit=True) as other:
            assert other.execute("select pg_try_advisory_lock(424242)").fetchone() == (True,)
    assert [r.status for r in proxy.records][-1] == "error"
    assert with_sql(proxy, "discard all")[0].status == "ok"
