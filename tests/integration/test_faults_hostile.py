"""Hostile identifiers and literals through every path where pgsage builds SQL from outside text
(issue 13): the admin console's SET, the HTTP API's filters and config PUT, the query log (a
label comment with quotes, quoted names, error messages), the index advisor's DDL
(optimizer/whatif.py quote_ident / quote_literal, HypoPG and the transaction fallback) and the
warehouse database name from the configuration. A `victim` table must survive every one of
them, and every refusal must be a clean error (an ErrorResponse / a 4xx), never a 500 or a
dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
import httpx
import psycopg
import pytest
from psycopg import sql

from optimizer.whatif import (
    Candidate,
    TableInfo,
    WhatIf,
    WhatIfConfig,
    quote_ident,
    quote_literal,
)
from tests.fix_pgcluster import RawClient, errors_in
from tests.fix_proxy import PG_HOST, PG_PORT, direct_dsn

INJECT = "x'; DROP TABLE victim; --"
INJECT_IDENT = 'x"; DROP TABLE victim; --'
WEIRD = '"weird""name"'
HOSTILE = [INJECT, INJECT_IDENT, WEIRD, "$$; DROP TABLE victim; $$", "victim\\", "é\u202e"]
TOKEN = "hostile-test-token"


def make_victim(dbname: str) -> None:
    with psycopg.connect(direct_dsn(dbname), autocommit=True) as conn:
        conn.execute("create table if not exists victim(x int)")
        conn.execute("insert into victim values (1)")


def victim_alive(dbname: str) -> bool:
    with psycopg.connect(direct_dsn(dbname)) as conn:
        return conn.execute("select count(*) from victim").fetchone() == (1,)


@pytest.fixture
def hostile_service(make_service):
    svc = make_service(admin_token=TOKEN, log_parameters=True, querylog_flush_interval=0.1)
    make_victim(svc.database)
    return svc


# ------------------------------------------------------------------ admin console


def test_admin_console_set_with_hostile_text(hostile_service):
    svc = hostile_service
    before = dict((k, v) for k, v, _d, _r in svc.service.config_items())
    admin = RawClient(svc.host, svc.port)
    try:
        assert admin.startup(database="pgsage")[-1] == (b"Z", b"I")
        for text in HOSTILE:
            for stmt in (
                f"SET {text} = 1",
                f"SET log_parameters = {text}",
                f"SET steering_min_ms = '{text}'",
                f"SHOW {text}",
                f"APPLY RECOMMENDATION {text}",
            ):
                msgs = admin.query(stmt)
                assert msgs[-1] == (b"Z", b"I"), (stmt, msgs)  # the console is still there
                for e in errors_in(msgs):
                    assert e["S"] == "ERROR" and len(e["C"]) == 5, (stmt, e)
        # a value that is text all the way: taken literally, never as SQL
        msgs = admin.query(f"SET admin_users = postgres, {WEIRD}")
        assert not errors_in(msgs), msgs
        assert svc.service.settings.admin_users == ["postgres", '"weird""name']
        assert admin.query("SHOW VERSION")[-1] == (b"Z", b"I")
    finally:
        admin.close()
    assert victim_alive(svc.database)
    after = {k: v for k, v, _d, _r in svc.service.config_items()}
    changed = {k for k in after if after[k] != before[k]}
    assert changed <= {"admin_users"}, changed


# ------------------------------------------------------------------ HTTP API


def test_api_filters_and_config_with_hostile_text(hostile_service):
    svc = hostile_service
    with psycopg.connect(svc.dsn(), autocommit=True) as conn:
        conn.execute("select 1 as hostile_probe")
    svc.flush()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    seen: list[tuple[str, int]] = []
    with httpx.Client(base_url=svc.http_url, headers=headers, timeout=30) as http:
        for text in HOSTILE:
            for path, params in (
                ("/api/v1/queries", {"q": text}),
                ("/api/v1/queries", {"table": text}),
                ("/api/v1/queries", {"command": text}),
                ("/api/v1/queries", {"status": text}),
                ("/api/v1/queries", {"start": text}),
                (f"/api/v1/queries/{text}", {}),
                (f"/api/v1/ml/models/{text}", {}),
                ("/api/v1/optimization/history", {"kind": text}),
                ("/api/v1/ml/forecast", {"cluster": text}),
                ("/api/v1/metrics/history", {"granularity": text}),
            ):
                r = http.get(path, params=params)
                seen.append((path, r.status_code))
                assert r.status_code in (200, 404, 422), (path, params, r.text)
                if path == "/api/v1/queries" and "q" in params:
                    assert r.status_code == 200 and r.json()["items"] == [], r.text
            for body in ({"key": text, "value": 1}, {"key": "log_parameters", "value": text},
                         {"key": "querylog_retention_days", "value": text}):  # fmt: skip
                r = http.put("/api/v1/admin/config", json=body)
                assert r.status_code in (400, 422), (body, r.text)
            # a list setting takes the hostile text as one literal item
            value = f"postgres,{text}"
            r = http.put("/api/v1/admin/config", json={"key": "admin_users", "value": value})
            assert r.status_code == 200, r.text
            assert svc.service.settings.admin_users == ["postgres", text.strip()]
        # the filters still find what they should
        r = http.get("/api/v1/queries", params={"q": "hostile_probe"})
        assert r.status_code == 200 and len(r.json()["items"]) == 1, r.text
    assert not [s for s in seen if s[1] >= 500], seen
    assert victim_alive(svc.database)


# ------------------------------------------------------------------ the query log


def test_query_log_stores_hostile_text_verbatim(hostile_service):
    svc = hostile_service
    statements = [
        f"select /* pgsage:label={INJECT} */ 1",
        "select /* pgsage:label=ok:7 */ 2",
        f"select 1 as {quote_ident(INJECT_IDENT)}, {quote_literal(INJECT)} as {quote_ident(WEIRD)}",
        f"select * from {quote_ident(INJECT)}",  # fails: its error message quotes the name
    ]
    with psycopg.connect(svc.dsn(), autocommit=True) as conn:
        for sql in statements:
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                conn.execute(sql.encode())
    svc.flush()
    with psycopg.connect(direct_dsn(svc.database)) as conn:
        rows = conn.execute(
            "select query_text, label, status, error_message from metadata.query_logs"
            " where query_text = any(%s) order by query_id",
            (statements,),
        ).fetchall()
    assert [r[0] for r in rows] == statements
    assert [r[1] for r in rows] == [None, "ok:7", None, None]
    assert [r[2] for r in rows] == ["ok", "ok", "ok", "error"]
    assert INJECT in rows[3][3]
    assert victim_alive(svc.database)


# ------------------------------------------------------------------ the index advisor's DDL


async def _advisor_round(dbname: str, hypopg: bool) -> tuple[float, float, list[str]]:
    schema, table = WEIRD, INJECT
    key, other = INJECT_IDENT, WEIRD
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database=dbname)
    try:
        await conn.execute("create extension if not exists hypopg")
        await conn.execute(f"create schema if not exists {quote_ident(schema)}")
        await conn.execute(
            f"create table if not exists {qualified} "
            f"({quote_ident(key)} int, {quote_ident(other)} text)"
        )
        await conn.execute(
            f"insert into {qualified} select g, case when g % 10 = 0 then $1 else 'n' end"
            " from generate_series(1, 20000) g",
            INJECT,
        )
        await conn.execute(f"analyze {qualified}")
        sql = f"select {quote_ident(key)} from {qualified} where {quote_ident(key)} = 77"
        cand = Candidate(f"{schema}.{table}", (key,), (other,), (other, "=", quote_literal(INJECT)))
        probe = (
            f"select {quote_ident(key)} from {qualified} "
            f"where {quote_ident(key)} = 70 and {quote_ident(other)} = {quote_literal(INJECT)}"
        )
        whatif = await WhatIf(conn.fetchval, WhatIfConfig(hypopg=hypopg)).setup()
        assert whatif.use_hypopg is hypopg
        base, _ = await whatif.costs({"q": sql, "p": probe})
        tables = {cand.table: TableInfo(rows=20000, size_bytes=1 << 20)}
        costs, sizes = await whatif.costs({"q": sql, "p": probe}, [cand], tables)
        assert sizes[cand] > 0, sizes
        # the DDL for real, with a hostile index name too
        await conn.execute(cand.statement(f"ix {INJECT_IDENT}"))
        names = [
            r["indexname"]
            for r in await conn.fetch(
                "select indexname from pg_indexes where schemaname = $1 and tablename = $2",
                schema,
                table,
            )
        ]
        await conn.execute(f"drop table {qualified}")
        return base["p"], costs["p"], names
    finally:
        await conn.close()


@pytest.mark.parametrize("hypopg", [True, False], ids=["hypopg", "transaction"])
def test_index_advisor_ddl_with_hostile_identifiers(fresh_db, hypopg):
    make_victim(fresh_db)
    base, with_index, names = asyncio.run(_advisor_round(fresh_db, hypopg))
    assert with_index < base, (base, with_index)  # the hypothetical index was really used
    assert names == [f"ix {INJECT_IDENT}"]
    assert victim_alive(fresh_db)


# ------------------------------------------------------------------ configuration text


def test_hostile_warehouse_database_name(make_service, fresh_db):
    """The warehouse database name from the configuration: created with %I quoting, and the
    migrations and the query log run inside it."""
    make_victim(fresh_db)
    name = f"pgsage_wh_{uuid.uuid4().hex[:6]}{INJECT}{WEIRD}"

    def connect(port: int, dbname: str) -> psycopg.Connection:
        return psycopg.connect(host=PG_HOST, port=port, user="postgres", dbname=dbname,
                               autocommit=True)  # fmt: skip

    try:
        svc = make_service(warehouse_database=name)
        assert svc.service.migrations_applied, "migrations did not run"
        with connect(svc.port, name) as conn:
            assert conn.execute("select current_database()").fetchone() == (name,)
        svc.flush()
        with connect(PG_PORT, name) as conn:
            row = conn.execute("select count(*) from metadata.query_logs").fetchone()
        assert row is not None and row[0] >= 1
        svc.stop()
    finally:
        with connect(PG_PORT, "postgres") as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
    assert victim_alive(fresh_db)
    with connect(PG_PORT, "postgres") as conn:
        gone = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
    assert gone is None
