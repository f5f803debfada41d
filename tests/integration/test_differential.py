"""Differential test: every statement of a corpus runs directly and through the proxy; the results
must be identical, byte for byte, in text and binary formats, errors included.

Each statement runs in three ways with psycopg 3: a text cursor (simple protocol), a binary cursor
(extended protocol, binary results) and a prepared statement (extended protocol, named statement,
text results). What is compared: the command status, the row count, every column's name, type,
modifier, size, format and table origin, every value's raw bytes as received, the values psycopg
loads from them, and for errors the exception class and every diagnostic field.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.fix_proxy import RunningProxy, direct_dsn

MODES = ("text", "binary", "prepared")

CORPUS: dict[str, str] = {
    "ints": (
        "select 0::int2 as z, (-32768)::int2 as i2min, 32767::int2 as i2max,"
        " (-2147483648)::int4 as i4min, 2147483647::int4 as i4max,"
        " (-9223372036854775808)::int8 as i8min, 9223372036854775807::int8 as i8max"
    ),
    "numeric": (
        "select 0::numeric, -1.50::numeric, 123456789012345678901234567890.123456789::numeric,"
        " 'NaN'::numeric, 'Infinity'::numeric, '-Infinity'::numeric, 1e-30::numeric,"
        " 3.14159::numeric(10, 2), 1e100::numeric"
    ),
    "float": (
        "select 0.1::float8, 1::float8 / 3, '-0'::float8, 'NaN'::float8, 'Infinity'::float8,"
        " '-Infinity'::float4, 1.17549435e-38::float4, 3.4028235e38::float4,"
        " 2.2250738585072014e-308::float8, 1e300::float8 * 10, 0.1::float4 + 0.2::float4"
    ),
    "text": (
        "select 'plain' as a, '' as empty, 'quote''s' as q, E'tab\\there\\nnew line\\\\' as esc,"
        " repeat('ab', 5000) as long, 'x'::char(3) as ch, 'y'::varchar(10) as vc, 'nm'::name as nm"
    ),
    "bytea": (
        "select '\\x00ff10'::bytea as b, ''::bytea as empty,"
        " decode(repeat('00ff7f80', 1000), 'hex') as big"
    ),
    "bool": "select true as t, false as f, null::bool as n, 'yes'::bool as y",
    "date_time": (
        "select '2024-02-29'::date, '0001-01-01'::date, '23:59:59.999999'::time,"
        " '12:34:56.5+05:30'::timetz, '2000-01-01 00:00:00'::timestamp,"
        " '2024-06-01 12:00:00.123456+02'::timestamptz,"
        " '1999-12-31 23:59:59.999999-08'::timestamptz"
    ),
    # Python's datetime cannot hold these: the raw bytes still have to match
    "date_time_special": (
        "select 'infinity'::date, '4713-01-01 BC'::date, '-infinity'::timestamptz,"
        " '294276-12-31 23:59:59.999999'::timestamp"
    ),
    "interval": (
        "select '1 year 2 mons 3 days 04:05:06.789'::interval, '-1 day'::interval,"
        " '0'::interval, '-00:00:00.000001'::interval, '178000000 years'::interval"
    ),
    "uuid": (
        "select 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid,"
        " '00000000-0000-0000-0000-000000000000'::uuid, md5('x')::uuid"
    ),
    "json": (
        'select \'{"a": [1, 2.50, null], "b": "é"}\'::json as j,'
        ' \'{"b": 1, "a": {"c": [true, 1e3]}}\'::jsonb as jb, \'[]\'::jsonb as arr,'
        " 'null'::jsonb as jnull, '\"\\u00e9 😀\"'::jsonb as jstr, jsonb_build_object('k', 1.10)"
    ),
    "arrays": (
        "select array[1, 2, null]::int[] as ints,"
        " array['a', 'b c', null, 'd\"e', '', 'NULL']::text[],"
        " '{{1,2},{3,4}}'::int[][] as m, array[]::int[] as empty, array[1.5, 2.25]::float8[],"
        " array['2024-01-01'::date], array[true, false], '[0:1]={7,8}'::int[] as lower_bound,"
        " array['{\"a\":1}'::jsonb], array[1.10::numeric, null]"
    ),
    "ranges": (
        "select int4range(1, 10), '[2024-01-01,2024-02-01)'::daterange, numrange(1.5, null),"
        " 'empty'::int4range, tstzrange('2024-01-01 00:00+00', '2024-01-02 00:00+00', '[]'),"
        " int8range(null, null), '{[1,3), [5,7)}'::int4multirange"
    ),
    "nulls": (
        "select null, null::int, null::text, null::jsonb, null::int[], null::bytea, null::uuid"
    ),
    "misc_types": (
        "select 1::oid, 'pg_class'::regclass, '192.168.1.0/24'::cidr, '10.1.2.3/32'::inet,"
        " '08:00:2b:01:02:03'::macaddr, B'101' as bits, 'a fat cat'::tsvector,"
        " point(1.5, -2), row(1, 'a', null) as rec, 12.34::money, '<a>x</a>'::xml"
    ),
    "unicode": (
        "select 'emoji 😀🎉 👨\u200d👩\u200d👧' as emoji, 'combining e\u0301 vs \u00e9' as comb,"
        " 'CJK 漢字 RTL עברית' as scripts, length('😀e\u0301') as len,"
        " octet_length('e\u0301') as octets, upper('straße') as up, 1 as \"ünïcödé 列 😀\""
    ),
    "empty_result": "select 1 as one where false",
    "values_multi_rows": "values (1, 'a'), (2, null), (3, 'c') order by 1 desc",
    "show": "show server_encoding",
    "do_block": "do $$ begin perform 1; end $$",
    "large_row_5mb": (
        "select repeat('x', 5 * 1024 * 1024) as big, length(repeat('é', 1000000)) as n"
    ),
    "large_bytea": "select decode(repeat('ab', 2 * 1024 * 1024), 'hex') as big",
    "many_rows_100k": (
        "select g, g::text as t, g * 1.5 as f, g % 7 = 0 as b, md5(g::text)"
        " from generate_series(1, 100000) g"
    ),
    # errors
    "error_division_by_zero": "select 1 / 0",
    "error_unknown_column": "select no_such_column from pg_class",
    "error_unknown_table": "select * from no_such_table_xyz",
    "error_syntax": "selec 1",
    "error_invalid_input": "select 'abc'::int",
    "error_int2_overflow": "select 32767::int2 + g::int2 from generate_series(1, 1) g",
    "error_subquery_rows": "select (select g from generate_series(1, 2) g)",
    "error_mid_rows": "select 10 / (3 - g) from generate_series(1, 5) g",
    "error_custom_with_detail": (
        "do $$ begin raise exception 'custom failure %', 42 using detail = 'the detail',"
        " hint = 'the hint', errcode = 'P0042'; end $$"
    ),
    "error_unicode_message": 'select 1 / 0 as "ünï 😀" from no_such_tablé',
}

DIAG_FIELDS = (
    "sqlstate",
    "severity",
    "severity_nonlocalized",
    "message_primary",
    "message_detail",
    "message_hint",
    "statement_position",
    "internal_position",
    "internal_query",
    "context",
    "schema_name",
    "table_name",
    "column_name",
    "datatype_name",
    "constraint_name",
    "source_function",
)


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def module_proxy() -> Iterator[RunningProxy]:
    p = RunningProxy()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def conns(module_proxy: RunningProxy, test_db: str) -> Iterator[dict[str, psycopg.Connection]]:
    direct = psycopg.connect(direct_dsn(test_db), autocommit=True)
    proxied = psycopg.connect(module_proxy.dsn(test_db), autocommit=True)
    yield {"direct": direct, "proxy": proxied}
    direct.close()
    proxied.close()


# ---------------------------------------------------------------------------------- capture


def capture(conn: psycopg.Connection, sql: str, mode: str) -> dict[str, Any]:
    """Everything the client can observe of one statement's outcome."""
    cur = conn.cursor(binary=(mode == "binary"))
    try:
        if mode == "prepared":
            cur.execute(sql, prepare=True)
        else:
            cur.execute(sql)
    except psycopg.Error as exc:
        diag = {f: getattr(exc.diag, f) for f in DIAG_FIELDS}
        return {"error": type(exc).__name__, "text": str(exc), "diag": diag}
    res = cur.pgresult
    assert res is not None
    out: dict[str, Any] = {
        "status": res.status,
        "command_status": res.command_status,
        "rowcount": cur.rowcount,
        "ntuples": res.ntuples,
        "columns": [
            (
                res.fname(i),
                res.ftype(i),
                res.fmod(i),
                res.fsize(i),
                res.fformat(i),
                res.ftable(i),
                res.ftablecol(i),
            )
            for i in range(res.nfields)
        ],
        "raw": [tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)],
    }
    if res.nfields:
        try:
            # repr: NaN compares unequal to itself, its repr does not
            out["loaded"] = repr(cur.fetchall())
        except psycopg.DataError as exc:  # values Python cannot hold (infinite dates, BC ...)
            out["loaded"] = f"{type(exc).__name__}: {exc}"
    return out


def _new_records(proxy: RunningProxy, before: int, sql: str) -> list[Any]:
    return [r for r in proxy.records[before:] if r.sql == sql]


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CORPUS))
def test_same_result_direct_and_through_proxy(name, mode, conns, module_proxy):
    sql = CORPUS[name]
    expected = capture(conns["direct"], sql, mode)
    before = len(module_proxy.records)
    got = capture(conns["proxy"], sql, mode)

    if "error" in expected:
        assert name.startswith("error_"), expected["text"]
        assert got["error"] == expected["error"]
        assert got["diag"] == expected["diag"]
        assert got["text"] == expected["text"]
    else:
        assert not name.startswith("error_")
        assert got["status"] == expected["status"]
        assert got["command_status"] == expected["command_status"]
        assert got["rowcount"] == expected["rowcount"]
        assert got["columns"] == expected["columns"]
        assert len(got["raw"]) == len(expected["raw"])
        assert got["raw"] == expected["raw"]
        assert got.get("loaded") == expected.get("loaded")
        formats = {c[4] for c in got["columns"]}
        assert formats <= {1 if mode == "binary" else 0}

    # the proxy's record of the statement
    recs = _new_records(module_proxy, before, sql)
    protocol = "simple" if mode == "text" else "extended"
    if "error" in expected:
        assert len(recs) == 1, [(r.sql, r.status) for r in module_proxy.records[before:]]
        rec = recs[0]
        assert rec.protocol == protocol
        assert rec.status == "error"
        assert rec.sqlstate == expected["diag"]["sqlstate"]
        assert rec.execution.error_message == expected["diag"]["message_primary"]
    else:
        assert len(recs) == 1, [(r.sql, r.status) for r in module_proxy.records[before:]]
        rec = recs[0]
        assert rec.protocol == protocol
        assert rec.status == "ok" and rec.sqlstate is None
        assert rec.execution.tag == expected["command_status"].decode()
        if expected["command_status"].startswith(b"SELECT"):
            assert rec.rows == expected["ntuples"]


def test_corpus_covers_what_it_claims():
    """The corpus is the checklist: keep every category in it."""
    for needed in (
        "ints",
        "numeric",
        "float",
        "text",
        "bytea",
        "bool",
        "date_time",
        "interval",
        "uuid",
        "json",
        "arrays",
        "ranges",
        "nulls",
        "unicode",
        "large_row_5mb",
        "many_rows_100k",
        "error_division_by_zero",
        "error_unknown_column",
    ):
        assert needed in CORPUS


@pytest.mark.parametrize("digits", [-15, 0, 1, 3])
@pytest.mark.parametrize("binary", [False, True])
def test_extra_float_digits(digits, binary, module_proxy, test_db):
    """extra_float_digits relayed as a startup option and as SET gives the same text as direct."""
    sql = (
        "select 0.1::float8, 1::float8 / 3, pi(), 1e-310::float8, 0.1::float4, 1::float4 / 3,"
        " 1234567.891::float4, array[0.1::float8, 1::float8 / 7]"
    )
    options = f"'-c extra_float_digits={digits}'"
    results = []
    for dsn in (direct_dsn(test_db, options=options), module_proxy.dsn(test_db, options=options)):
        with psycopg.connect(dsn, autocommit=True) as conn:
            shown = conn.execute("show extra_float_digits").fetchone()
            first = capture(conn, sql, "binary" if binary else "text")
            conn.execute("set extra_float_digits = 2")
            second = capture(conn, sql, "binary" if binary else "text")
            results.append((shown, first, second))
    direct, proxied = results
    assert direct[0] == (str(digits),)
    assert proxied == direct
    if not binary and digits <= 0:
        # the setting really took effect: with fewer digits the text differs from the SET one
        assert direct[1]["raw"] != direct[2]["raw"]
