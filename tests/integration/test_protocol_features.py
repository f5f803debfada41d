"""Protocol features through the proxy, with real drivers and a raw client, against real PostgreSQL.

Each test checks two things: the client sees exactly what the server sends (the raw-client tests
run the same message script directly against the server and through the proxy and compare every
decoded message), and the proxy's per-statement records are right (SQL text, protocol, rows,
status, SQLSTATE, suspensions).
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg import errors as pg_errors

from proxy.protocol import backend
from proxy.protocol.backend import (
    BackendMessage,
    BindComplete,
    CloseComplete,
    CommandComplete,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ParseComplete,
    ReadyForQuery,
    RowDescription,
)
from proxy.protocol.frontend import (
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    Parse,
    Query,
    Sync,
)
from proxy.protocol.tracker import Phase
from tests.fix_proxy import PG_HOST, PG_PORT, direct_dsn
from tests.wire_client import WireClient, kinds

INT4, INT8, TEXT, BYTEA, FLOAT8 = 23, 20, 25, 17, 701

Script = Callable[[WireClient], list[BackendMessage]]


# ---------------------------------------------------------------------------------- helpers


def run_both(
    proxy, dbname: str, script: Script, after: Callable[[WireClient], None] | None = None
) -> list[BackendMessage]:
    """Run `script` directly against the server and through the proxy; the answers must match.

    `after` runs on the proxied client before it disconnects. Returns the proxied messages.
    """
    answers = []
    for host, port in ((PG_HOST, PG_PORT), (proxy.host, proxy.port)):
        with WireClient(host, port, database=dbname) as client:
            answers.append(script(client))
            if after is not None and port == proxy.port:
                after(client)
    direct, proxied = answers
    assert kinds(proxied) == kinds(direct)
    assert proxied == direct
    return proxied


def wire(proxy, dbname: str, **params: str) -> WireClient:
    return WireClient(proxy.host, proxy.port, database=dbname, **params)


def records_with(proxy, text: str) -> list:
    return [r for r in proxy.records if r.sql is not None and text in r.sql]


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def session_tracker(proxy):
    """The tracker of the proxy's only client session (read on the proxy's loop)."""

    def started():
        return [c for c in proxy.server.clients if c.started and not c.closed]

    wait_for(lambda: len(proxy.call_soon(started)) == 1)

    def get():
        (client,) = started()
        t = client.tracker
        return t.phase, list(t.pending), dict(t.parameters)

    return proxy.call_soon(get)


def rows_of(messages: list[BackendMessage]) -> list[tuple[bytes | None, ...]]:
    return [m.values for m in messages if isinstance(m, DataRow)]


def check_record(rec, *, sql=None, protocol=None, rows=None, status="ok", sqlstate=None) -> None:
    if sql is not None:
        assert rec.sql == sql
    if protocol is not None:
        assert rec.protocol == protocol
    assert rec.rows == rows, (rec.sql, rec.rows, rows)
    assert rec.status == status, (rec.sql, rec.status, rec.execution.error_message)
    assert rec.sqlstate == sqlstate
    assert rec.duration >= 0
    assert rec.finished_at >= rec.started_at


# ---------------------------------------------------------------------------------- simple query


def test_simple_several_statements_in_one_query(proxy, test_db):
    sql = "select 1 as a; select 'x' as b, 2 as c;\n values (1), (2), (3)"
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute(sql)
        results = [cur.fetchall()]
        while cur.nextset():
            results.append(cur.fetchall())
    assert results == [[(1,)], [("x", 2)], [(1,), (2,), (3,)]]

    recs = [r for r in proxy.records if r.protocol == "simple"]
    assert [r.sql for r in recs] == [
        "select 1 as a",
        "select 'x' as b, 2 as c",
        "values (1), (2), (3)",
    ]
    for rec, rows in zip(recs, (1, 1, 3), strict=True):
        check_record(rec, protocol="simple", rows=rows)
        assert rec.execution.tag == f"SELECT {rows}"
    # each statement starts where the previous one ended
    assert recs[1].execution.start >= recs[0].execution.end

    msgs = run_both(proxy, test_db, lambda c: c.query(sql))
    assert kinds(msgs).count("CommandComplete") == 3


def test_empty_query(proxy, test_db):
    def script(c: WireClient) -> list[BackendMessage]:
        out = c.query("")
        out += c.query(";")
        # extended protocol: an empty statement answers Execute with EmptyQueryResponse
        out += c.exchange(Parse("", ""), Bind("", ""), Execute(""), Sync())
        return out

    msgs = run_both(proxy, test_db, script)
    assert msgs == [
        EmptyQueryResponse(),
        ReadyForQuery("I"),
        EmptyQueryResponse(),
        ReadyForQuery("I"),
        ParseComplete(),
        BindComplete(),
        EmptyQueryResponse(),
        ReadyForQuery("I"),
    ]
    recs = proxy.records
    assert [(r.protocol, r.sql) for r in recs] == [
        ("simple", ""),
        ("simple", ";"),
        ("extended", ""),
    ]
    for r in recs:
        check_record(r, rows=None)
        assert r.execution.tag is None


def test_notices_from_do_block(proxy, test_db):
    do = "do $$ begin raise notice 'first %', 1; raise notice 'second;%', 2; end $$"
    notices: list[tuple[str | None, str | None]] = []
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.add_notice_handler(
            lambda d: notices.append((d.severity_nonlocalized, d.message_primary))
        )
        conn.execute(f"select 10; {do}; select 20")
        # the connection is still in sync: a later query gets its own answer
        assert conn.execute("select 30").fetchone() == (30,)
    assert notices == [("NOTICE", "first 1"), ("NOTICE", "second;2")]

    recs = [r for r in proxy.records if r.protocol == "simple"]
    assert [r.sql for r in recs] == ["select 10", do, "select 20", "select 30"]
    assert [r.execution.tag for r in recs] == ["SELECT 1", "DO", "SELECT 1", "SELECT 1"]
    assert all(r.status == "ok" for r in recs)

    msgs = run_both(proxy, test_db, lambda c: c.query(do))
    assert kinds(msgs) == ["NoticeResponse", "NoticeResponse", "CommandComplete", "ReadyForQuery"]
    assert isinstance(msgs[0], NoticeResponse) and msgs[0].message == "first 1"


def test_error_in_the_middle_of_a_batch(proxy, test_db):
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.execute("drop table if exists batch_t; create table batch_t (v int)")
        proxy.sink.clear()
        batch = (
            "insert into batch_t values (1); insert into batch_t select 1 / 0; "
            "insert into batch_t values (3)"
        )
        with pytest.raises(pg_errors.DivisionByZero) as info:
            conn.execute(batch)
        assert info.value.diag.sqlstate == "22012"
        # one implicit transaction: the first insert is rolled back with the failed one
        assert conn.execute("select count(*) from batch_t").fetchone() == (0,)

    recs = proxy.records
    assert [r.sql for r in recs] == [
        "insert into batch_t values (1)",
        "insert into batch_t select 1 / 0",
        "select count(*) from batch_t",
    ]
    check_record(recs[0], protocol="simple", rows=1)
    check_record(recs[1], protocol="simple", rows=None, status="error", sqlstate="22012")
    assert recs[1].execution.error_message == "division by zero"
    check_record(recs[2], protocol="simple", rows=1)

    msgs = run_both(proxy, test_db, lambda c: c.query("select 1; select 1/0; select 3"))
    assert kinds(msgs) == [
        "RowDescription",
        "DataRow",
        "CommandComplete",
        "ErrorResponse",
        "ReadyForQuery",
    ]


# ---------------------------------------------------------------------------------- extended


def test_named_and_unnamed_statements_portals_describe_close(proxy, test_db):
    def script(c: WireClient) -> list[BackendMessage]:
        out = c.exchange(
            Parse("s_named", "select $1::int + 1 as n", (INT4,)),
            Describe("S", "s_named"),
            Bind("p_named", "s_named", (), (b"41",)),
            Describe("P", "p_named"),
            Execute("p_named"),
            Parse("", "select $1::text || '!' as t"),
            Describe("S", ""),
            Bind("", "", (), (b"hi",)),
            Describe("P", ""),
            Execute(""),
            Close("P", "p_named"),
            Close("S", "s_named"),
            Sync(),
        )
        # the closed statement is gone on the server
        out += c.exchange(Bind("", "s_named", (), (b"1",)), Execute(""), Sync())
        # and the unnamed one can be bound again without a new Parse
        out += c.exchange(Bind("", "", (), (b"again",)), Execute(""), Sync())
        return out

    msgs = run_both(proxy, test_db, script)
    assert kinds(msgs) == [
        "ParseComplete",
        "ParameterDescription",
        "RowDescription",
        "BindComplete",
        "RowDescription",
        "DataRow",
        "CommandComplete",
        "ParseComplete",
        "ParameterDescription",
        "RowDescription",
        "BindComplete",
        "RowDescription",
        "DataRow",
        "CommandComplete",
        "CloseComplete",
        "CloseComplete",
        "ReadyForQuery",
        "ErrorResponse",
        "ReadyForQuery",
        "BindComplete",
        "DataRow",
        "CommandComplete",
        "ReadyForQuery",
    ]
    assert msgs[1] == ParameterDescription((INT4,))
    assert rows_of(msgs) == [(b"42",), (b"hi!",), (b"again!",)]
    err = msgs[17]
    assert isinstance(err, ErrorResponse) and err.sqlstate == "26000"

    recs = proxy.records
    assert len(recs) == 4
    check_record(recs[0], sql="select $1::int + 1 as n", protocol="extended", rows=1)
    assert (recs[0].execution.statement, recs[0].execution.portal) == ("s_named", "p_named")
    check_record(recs[1], sql="select $1::text || '!' as t", protocol="extended", rows=1)
    assert (recs[1].execution.statement, recs[1].execution.portal) == ("", "")
    # Bind of the closed statement failed: the Execute after it is the failed statement
    check_record(recs[2], protocol="extended", rows=None, status="error", sqlstate="26000")
    assert recs[2].sql is None  # the proxy forgot the closed statement's text, as the server did
    check_record(recs[3], sql="select $1::text || '!' as t", rows=1)


def test_unnamed_statement_replaced_inside_one_pipeline(proxy, test_db):
    """A Parse of the unnamed statement replaces the previous one (readyset #752, pgcat #875)."""

    def script(c: WireClient) -> list[BackendMessage]:
        return c.exchange(
            Parse("", "select 1 as one"),
            Bind("", ""),
            Execute(""),
            Parse("", "select $1::int * 2 as two"),
            Bind("", "", (), (b"21",)),
            Execute(""),
            Parse("", "select generate_series(1, 3)"),
            Bind("", ""),
            Execute(""),
            Sync(),
        )

    msgs = run_both(proxy, test_db, script)
    assert rows_of(msgs) == [(b"1",), (b"42",), (b"1",), (b"2",), (b"3",)]
    assert [(r.sql, r.rows) for r in proxy.records] == [
        ("select 1 as one", 1),
        ("select $1::int * 2 as two", 1),
        ("select generate_series(1, 3)", 3),
    ]


def test_flush_without_sync_is_answered_immediately(proxy, test_db):
    """asyncpg style: Parse/Describe/Flush must be answered before any Sync is sent."""
    with wire(proxy, test_db) as c:
        c.send(
            Parse("stmt_f", "select $1::int8 * 10 as x", (INT8,)), Describe("S", "stmt_f"), Flush()
        )
        first = c.recv_n(3, timeout=3)
        assert kinds(first) == ["ParseComplete", "ParameterDescription", "RowDescription"]
        assert c.nothing_pending(0.2)  # no ReadyForQuery: there was no Sync

        c.send(Bind("", "stmt_f", (0,), (b"7",)), Execute(""), Flush())
        second = c.recv_n(3, timeout=3)
        assert second == [BindComplete(), DataRow((b"70",)), CommandComplete("SELECT 1")]
        # the statement is recorded as soon as it completed, before the Sync
        recs = proxy.records
        assert len(recs) == 1
        check_record(recs[0], sql="select $1::int8 * 10 as x", protocol="extended", rows=1)
        # the time waiting for the Flush's answer before the Bind is not part of the statement
        assert recs[0].duration < 1.0

        assert c.sync() == [ReadyForQuery("I")]
        assert session_tracker(proxy)[0] is Phase.IDLE
    assert len(proxy.records) == 1


def test_pipeline_many_executes_before_one_sync(proxy, test_db):
    """pgjdbc after prepareThreshold: statements prepared once, then only Bind/Execute."""
    n = 25
    with wire(proxy, test_db) as c:
        parses = [Parse(f"S_{i}", f"select $1::int * {i} as v{i}", (INT4,)) for i in range(n)]
        assert kinds(c.exchange(*parses, Sync())) == ["ParseComplete"] * n + ["ReadyForQuery"]
        assert proxy.records == []  # preparing runs nothing

        batch = []
        for i in range(n):
            batch += [Bind("", f"S_{i}", (), (str(i + 1).encode(),)), Execute("")]
        msgs = c.exchange(*batch, Sync())
    assert rows_of(msgs) == [(str(i * (i + 1)).encode(),) for i in range(n)]
    assert kinds(msgs).count("CommandComplete") == n

    recs = proxy.records
    assert len(recs) == n  # one record per Execute
    for i, rec in enumerate(recs):
        check_record(rec, sql=f"select $1::int * {i} as v{i}", protocol="extended", rows=1)
        assert rec.execution.statement == f"S_{i}"
    starts = [r.execution.start for r in recs]
    assert starts == sorted(starts)


def test_error_mid_pipeline_and_recovery_at_sync(proxy, test_db):
    def group(sql: str) -> list:
        return [Parse("", sql), Bind("", ""), Execute("")]

    def script(c: WireClient) -> list[BackendMessage]:
        out = c.exchange(
            *group("select 'g1'"),
            *group("select 'g2'"),
            *group("select 1 / 0"),
            *group("select 'g4 skipped'"),
            Sync(),
        )
        # a syntax error at Parse: its own Execute is the failed statement
        out += c.exchange(
            *group("select 'g5'"), *group("selec broken"), *group("select 'g7'"), Sync()
        )
        # recovered: the next Sync group runs normally
        out += c.exchange(*group("select 'g8'"), Sync())
        # inside a transaction block the error leaves the transaction failed until ROLLBACK
        out += c.query("begin")
        out += c.exchange(*group("select 'g9'"), *group("select 1 / 0"), Sync())
        out += c.exchange(*group("select 'g10 rejected'"), Sync())
        out += c.query("rollback")
        return out

    msgs = run_both(proxy, test_db, script)
    errors = [m for m in msgs if isinstance(m, ErrorResponse)]
    assert [e.sqlstate for e in errors] == ["22012", "42601", "22012", "25P02"]
    assert [m.status for m in msgs if isinstance(m, ReadyForQuery)] == [
        "I", "I", "I", "T", "E", "E", "I",
    ]  # fmt: skip
    assert (b"g4 skipped",) not in rows_of(msgs) and (b"g8",) in rows_of(msgs)

    got = [(r.sql, r.status, r.sqlstate, r.rows) for r in proxy.records if r.protocol == "extended"]
    assert got == [
        ("select 'g1'", "ok", None, 1),
        ("select 'g2'", "ok", None, 1),
        ("select 1 / 0", "error", "22012", None),
        ("select 'g5'", "ok", None, 1),
        ("selec broken", "error", "42601", None),
        ("select 'g8'", "ok", None, 1),
        ("select 'g9'", "ok", None, 1),
        ("select 1 / 0", "error", "22012", None),
        ("select 'g10 rejected'", "error", "25P02", None),
    ]


def test_error_at_implicit_commit_on_sync(proxy, test_db):
    """A deferred constraint fails when the implicit transaction commits at Sync, after the
    statement's CommandComplete: the client gets an error and nothing was written, so the
    proxy's records of that exchange must not show only a success."""
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.execute(
            "drop table if exists defer_c, defer_p;"
            " create table defer_p (id int primary key);"
            " create table defer_c (p int references defer_p deferrable initially deferred)"
        )
        outcomes = {}
        for protocol, sql, params in (
            ("extended", "insert into defer_c values (%s)", (1,)),
            ("simple", "insert into defer_c values (2)", None),
        ):
            before = len(proxy.records)
            with pytest.raises(pg_errors.ForeignKeyViolation):
                conn.execute(sql, params)
            outcomes[protocol] = [(r.status, r.sqlstate) for r in proxy.records[before:]]
        assert conn.execute("select count(*) from defer_c").fetchone() == (0,)

    before = len(proxy.records)
    msgs = run_both(
        proxy,
        test_db,
        lambda c: c.exchange(
            Parse("", "insert into defer_c values (3)"), Bind("", ""), Execute(""), Sync()
        ),
    )
    assert kinds(msgs) == [
        "ParseComplete",
        "BindComplete",
        "CommandComplete",
        "ErrorResponse",
        "ReadyForQuery",
    ]
    outcomes["raw extended"] = [(r.status, r.sqlstate) for r in proxy.records[before:]]

    assert outcomes["simple"] == [("error", "23503")]  # the commit runs before CommandComplete
    for name in ("extended", "raw extended"):
        assert ("error", "23503") in outcomes[name], (name, outcomes[name])


def test_interleaved_suspended_portals(proxy, test_db):
    """Two open result sets (pgjdbc with two fetch-size cursors): each portal is one record."""

    def script(c: WireClient) -> list[BackendMessage]:
        out = c.query("begin")
        out += c.exchange(
            Parse("", "select 'a' || g from generate_series(1, 7) g"),
            Bind("C_a", ""),
            Execute("C_a", 3),
            Parse("", "select 'b' || g from generate_series(1, 4) g"),
            Bind("C_b", ""),
            Execute("C_b", 3),
            Sync(),
        )
        out += c.exchange(Execute("C_a", 3), Execute("C_b", 3), Sync())
        out += c.exchange(Execute("C_a", 3), Sync())
        out += c.query("commit")
        return out

    msgs = run_both(proxy, test_db, script)
    assert [r[0] for r in rows_of(msgs)] == [
        b"a1", b"a2", b"a3", b"b1", b"b2", b"b3", b"a4", b"a5", b"a6", b"b4", b"a7",
    ]  # fmt: skip
    got = {r.execution.portal: r for r in proxy.records if r.protocol == "extended"}
    assert len([r for r in proxy.records if r.protocol == "extended"]) == 2
    check_record(got["C_a"], sql="select 'a' || g from generate_series(1, 7) g", rows=7)
    check_record(got["C_b"], sql="select 'b' || g from generate_series(1, 4) g", rows=4)
    assert (got["C_a"].execution.suspensions, got["C_b"].execution.suspensions) == (2, 1)


def test_portal_keeps_its_sql_when_statement_is_replaced_or_closed(proxy, test_db):
    """A portal is independent of its statement once bound: re-parsing the unnamed statement or
    closing a named one between Bind and Execute changes nothing on the server, so the record of
    the portal's Execute must carry the text the portal was bound from."""

    def script(c: WireClient) -> list[BackendMessage]:
        out = c.query("begin")
        out += c.exchange(
            Parse("", "select 'first' as v"),
            Bind("P_1", ""),
            Parse("", "select 'second' as v"),
            Bind("P_2", ""),
            Parse("named", "select 'third' as v"),
            Bind("P_3", "named"),
            Close("S", "named"),
            Execute("P_1"),
            Execute("P_2"),
            Execute("P_3"),
            Sync(),
        )
        out += c.query("commit")
        return out

    msgs = run_both(proxy, test_db, script)
    assert rows_of(msgs) == [(b"first",), (b"second",), (b"third",)]
    got = [(r.execution.portal, r.sql) for r in proxy.records if r.protocol == "extended"]
    assert got == [
        ("P_1", "select 'first' as v"),
        ("P_2", "select 'second' as v"),
        ("P_3", "select 'third' as v"),
    ]


def test_oversized_bind_is_relayed_and_not_misattributed(make_proxy, test_db):
    """A Bind larger than max_read_size passes unread. It must still reach the server intact, and
    the proxy must not file its Execute under the previously bound statement's text."""
    proxy = make_proxy(max_read_size=1 << 20)
    big = bytes(range(256)) * (3 << 12)  # 3 MiB
    with wire(proxy, test_db) as c:
        msgs = c.exchange(
            Parse("S_a", "select 'a'"),
            Bind("", "S_a"),
            Execute(""),
            Parse("S_big", "select length($1::bytea), md5($1::bytea)"),
            Bind("", "S_big", (1,), (big,)),
            Execute(""),
            Sync(),
        )
    assert rows_of(msgs)[1] == (str(len(big)).encode(), hashlib.md5(big).hexdigest().encode())
    recs = proxy.records
    assert len(recs) == 2
    assert recs[0].sql == "select 'a'"
    # the text is either known or honestly unknown, never another statement's
    assert recs[1].sql in ("select length($1::bytea), md5($1::bytea)", None)
    assert recs[1].execution.statement in ("S_big", None)
    assert recs[1].rows == 1 and recs[1].status == "ok"


def test_large_copy_stream_both_ways(proxy, test_db):
    line = b"%d\t" + b"z" * 90 + b"\n"
    payload = b"".join(line % i for i in range(150_000))  # ~14 MB
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.execute("drop table if exists big_copy; create table big_copy (id int, pad text)")
        proxy.sink.clear()
        cur = conn.cursor()
        with cur.copy("copy big_copy from stdin") as copy:
            for i in range(0, len(payload), 1 << 16):
                copy.write(payload[i : i + (1 << 16)])
        out = bytearray()
        with cur.copy("copy big_copy to stdout") as copy:
            for chunk in copy:
                out += chunk
    assert bytes(out) == payload
    assert [(r.sql, r.rows) for r in proxy.records] == [
        ("copy big_copy from stdin", 150_000),
        ("copy big_copy to stdout", 150_000),
    ]


def test_binary_parameter_and_result_formats(proxy, test_db):
    sql = (
        "select $1::int4 + 1 as i, $2::text as t, $3::bytea as b, $4::float8 * 2 as f,"
        " $5::int8 as n"
    )
    params = (
        struct.pack("!i", 41),
        "héllo".encode(),
        b"\x00\xff\x01",
        struct.pack("!d", 1.25),
        None,
    )

    def script(c: WireClient) -> list[BackendMessage]:
        out = c.exchange(
            Parse("bin", sql, (INT4, TEXT, BYTEA, FLOAT8, INT8)),
            Bind("", "bin", (1, 0, 1, 1, 1), params, (1, 0, 1, 1, 1)),
            Describe("P", ""),
            Execute(""),
            Sync(),
        )
        # one format code for all columns
        out += c.exchange(Bind("", "bin", (1, 0, 1, 1, 1), params, (1,)), Execute(""), Sync())
        return out

    msgs = run_both(proxy, test_db, script)
    desc = next(m for m in msgs if isinstance(m, RowDescription))
    assert [f.format for f in desc.fields] == [1, 0, 1, 1, 1]
    assert rows_of(msgs) == [
        (struct.pack("!i", 42), "héllo".encode(), b"\x00\xff\x01", struct.pack("!d", 2.5), None),
        (struct.pack("!i", 42), "héllo".encode(), b"\x00\xff\x01", struct.pack("!d", 2.5), None),
    ]
    recs = proxy.records
    assert [(r.sql, r.rows, r.status) for r in recs] == [(sql, 1, "ok"), (sql, 1, "ok")]


def _portal_script(max_rows: int, total: int) -> Script:
    def script(c: WireClient) -> list[BackendMessage]:
        out = c.query("begin")
        out += c.exchange(
            Parse("cur_s", f"select g, repeat('x', g) from generate_series(1, {total}) g"),
            Bind("C_2", "cur_s"),
            Execute("C_2", max_rows),
            Sync(),
        )
        while not isinstance(out[-2], CommandComplete):
            out += c.exchange(Execute("C_2", max_rows), Sync())
        out += c.exchange(Close("P", "C_2"), Sync())
        out += c.query("commit")
        return out

    return script


def test_portal_suspended_relayed_untouched_one_record(proxy, test_db):
    """pgjdbc setFetchSize(5): Execute(C_2, 5) -> PortalSuspended ... -> CommandComplete."""
    msgs = run_both(proxy, test_db, _portal_script(5, 12))
    assert kinds(msgs) == [
        "CommandComplete",  # BEGIN
        "ReadyForQuery",
        "ParseComplete",
        "BindComplete",
        *["DataRow"] * 5,  # max_rows reached the server unchanged
        "PortalSuspended",
        "ReadyForQuery",
        *["DataRow"] * 5,
        "PortalSuspended",
        "ReadyForQuery",
        *["DataRow"] * 2,
        "CommandComplete",
        "ReadyForQuery",
        "CloseComplete",
        "ReadyForQuery",
        "CommandComplete",  # COMMIT
        "ReadyForQuery",
    ]
    assert [int(r[0]) for r in rows_of(msgs)] == list(range(1, 13))

    portal = [r for r in proxy.records if r.protocol == "extended"]
    assert len(portal) == 1  # ONE record for all legs of the portal
    rec = portal[0]
    check_record(rec, sql="select g, repeat('x', g) from generate_series(1, 12) g", rows=12)
    assert rec.execution.suspensions == 2
    assert rec.execution.portal == "C_2" and rec.execution.statement == "cur_s"
    assert [r.sql for r in proxy.records if r.protocol == "simple"] == ["begin", "commit"]


def test_portal_suspended_on_exact_boundary(proxy, test_db):
    msgs = run_both(proxy, test_db, _portal_script(4, 8))
    assert kinds(msgs).count("PortalSuspended") == 2
    assert len(rows_of(msgs)) == 8
    (rec,) = [r for r in proxy.records if r.protocol == "extended"]
    assert rec.rows == 8 and rec.execution.suspensions == 2 and rec.status == "ok"
    assert rec.execution.tag == "SELECT 0"


def test_portal_suspended_closed_early_or_ended_by_commit(proxy, test_db):
    with wire(proxy, test_db) as c:
        c.query("begin")
        c.exchange(
            Parse("", "select generate_series(1, 100)"),
            Bind("early", ""),
            Execute("early", 3),
            Sync(),
        )
        c.exchange(Execute("early", 3), Sync())
        assert proxy.records[-1].sql == "begin"  # still open: not recorded yet
        assert c.exchange(Close("P", "early"), Sync()) == [CloseComplete(), ReadyForQuery("T")]
        closed = proxy.records[-1]

        c.exchange(
            Parse("", "select generate_series(1, 100)"),
            Bind("left", ""),
            Execute("left", 7),
            Sync(),
        )
        c.query("commit")
        at_commit = [r for r in proxy.records if r.execution.portal == "left"]

        # a suspended portal whose next leg fails is one failed record
        c.query("begin")
        c.exchange(
            Parse("", "select 10 / (3 - g) from generate_series(1, 10) g"),
            Bind("bad", ""),
            Execute("bad", 2),
            Sync(),
        )
        failed_leg = c.exchange(Execute("bad", 4), Sync())
        assert kinds(failed_leg) == ["ErrorResponse", "ReadyForQuery"]
        c.query("rollback")

    assert closed.execution.portal == "early"
    check_record(closed, sql="select generate_series(1, 100)", rows=6)
    assert closed.execution.suspensions == 2

    assert len(at_commit) == 1
    check_record(at_commit[0], rows=7)
    assert at_commit[0].execution.suspensions == 1

    bad = [r for r in proxy.records if r.execution.portal == "bad"]
    assert len(bad) == 1
    check_record(bad[0], rows=2, status="error", sqlstate="22012")
    assert bad[0].execution.suspensions == 1


@pytest.mark.parametrize("how", ["terminate", "vanish"])
def test_portal_suspended_when_session_ends(proxy, test_db, how):
    """A client that leaves with a portal suspended (an app exiting mid-fetch): the statement ran
    and sent rows, so it must be recorded, once, ending at its last PortalSuspended."""
    sql = f"select generate_series(1, 100) /* {how} */"
    c = wire(proxy, test_db)
    c.query("begin")
    msgs = c.exchange(Parse("", sql), Bind("P_end", ""), Execute("P_end", 3), Sync())
    assert kinds(msgs)[-2:] == ["PortalSuspended", "ReadyForQuery"]
    if how == "terminate":
        c.close()
    else:
        c.abort()
    wait_for(lambda: proxy.call_soon(lambda: not proxy.server.clients))
    recs = records_with(proxy, sql)
    assert len(recs) == 1, [r.sql for r in proxy.records]
    check_record(recs[0], sql=sql, protocol="extended", rows=3)
    assert recs[0].execution.suspensions == 1


def test_copy_simple_protocol_psycopg(proxy, test_db):
    rows = [(i, f"name {i}", None if i % 7 == 0 else i * 1.5) for i in range(1000)]
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.execute(
            "drop table if exists copy_t; create table copy_t (id int, name text, v float8)"
        )
        proxy.sink.clear()
        cur = conn.cursor()
        with cur.copy("copy copy_t (id, name, v) from stdin") as copy:
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == 1000

        with cur.copy("copy (select * from copy_t order by id) to stdout") as copy:
            back = [tuple(r) for r in copy.rows()]
        assert [(int(i), n, None if v is None else float(v)) for i, n, v in back] == rows

        with cur.copy("copy copy_t (id, name, v) from stdin (format binary)") as copy:
            copy.set_types(["int4", "text", "float8"])
            copy.write_row((5000, "bin", 2.5))

        # a client that gives up sends CopyFail (psycopg re-raises the client's own error)
        with (
            pytest.raises(RuntimeError, match="client gave up"),
            cur.copy("copy copy_t from stdin") as copy,
        ):
            copy.write_row((9999, "never", 0.0))
            raise RuntimeError("client gave up")
        assert conn.execute("select count(*) from copy_t").fetchone() == (1001,)

    recs = proxy.records
    assert [r.protocol for r in recs] == ["simple"] * 5
    check_record(recs[0], sql="copy copy_t (id, name, v) from stdin", rows=1000)
    check_record(recs[1], sql="copy (select * from copy_t order by id) to stdout", rows=1000)
    check_record(recs[2], rows=1)
    assert recs[3].sql == "copy copy_t from stdin"
    assert recs[3].sqlstate == "57014" and recs[3].status == "cancelled"
    assert "client gave up" in (recs[3].execution.error_message or "")
    check_record(recs[4], sql="select count(*) from copy_t", rows=1)


def test_copy_extended_protocol_flush_style(proxy, test_db):
    """COPY via Parse/Bind/Execute/Flush; the Sync comes after CopyDone (one Sync only)."""

    def script(c: WireClient) -> list[BackendMessage]:
        out = c.query("create temp table cx (a int, b text)")
        c.send(Parse("", "copy cx from stdin"), Bind("", ""), Execute(""), Flush())
        out += c.until(CopyInResponse)
        c.send(CopyData(b"1\tone\n2\ttwo\n"), CopyData(b"3\tthree\n"), CopyDone(), Sync())
        out += c.until_ready()
        out += c.exchange(
            Parse("", "copy (select a, b from cx order by a) to stdout"),
            Bind("", ""),
            Execute(""),
            Sync(),
        )
        out += c.query("select count(*) from cx")
        return out

    msgs = run_both(proxy, test_db, script)
    assert [m.tag for m in msgs if isinstance(m, CommandComplete)] == [
        "CREATE TABLE", "COPY 3", "COPY 3", "SELECT 1",
    ]  # fmt: skip
    out_data = [m.data for m in msgs if isinstance(m, backend.CopyData)]
    assert out_data == [b"1\tone\n", b"2\ttwo\n", b"3\tthree\n"]
    assert any(isinstance(m, CopyOutResponse) for m in msgs)
    assert any(isinstance(m, backend.CopyDone) for m in msgs)

    got = [(r.protocol, r.sql, r.rows, r.status) for r in proxy.records]
    assert got == [
        ("simple", "create temp table cx (a int, b text)", None, "ok"),
        ("extended", "copy cx from stdin", 3, "ok"),
        ("extended", "copy (select a, b from cx order by a) to stdout", 3, "ok"),
        ("simple", "select count(*) from cx", 1, "ok"),
    ]


def test_copy_extended_protocol_libpq_style(proxy, test_db):
    """libpq (PQexecParams of COPY FROM STDIN) sends P/B/E/Sync, then CopyData, CopyDone, Sync.

    The server reads the first Sync as part of the COPY stream and ignores it (CopyGetData skips
    Sync and Flush), so there is ONE ReadyForQuery for the two Syncs. The proxy must not wait for
    a second one: the statements after the COPY must be recorded as themselves.
    """

    def script(c: WireClient) -> list[BackendMessage]:
        out = c.query("create temp table cl (a int)")
        c.send(Parse("", "copy cl from stdin"), Bind("", ""), Execute(""), Sync())
        out += c.until(CopyInResponse)
        c.send(CopyData(b"1\n2\n"), CopyDone(), Sync())
        out += c.until_ready()
        assert c.nothing_pending(0.3)  # the first Sync is never answered
        out += c.query("select 'after copy'")
        out += c.query("select 1 / 0")
        out += c.query("select 'last'")
        return out

    tracked = []
    msgs = run_both(proxy, test_db, script, after=lambda c: tracked.append(session_tracker(proxy)))
    assert kinds(msgs).count("ReadyForQuery") == 5
    got = [(r.sql, r.rows, r.status, r.sqlstate) for r in proxy.records]
    assert got == [
        ("create temp table cl (a int)", None, "ok", None),
        ("copy cl from stdin", 2, "ok", None),
        ("select 'after copy'", 1, "ok", None),
        ("select 1 / 0", None, "error", "22012"),
        ("select 'last'", 1, "ok", None),
    ]
    phase, pending, _ = tracked[0]
    assert (phase, pending) == (Phase.IDLE, [])  # nothing is outstanding on the server


def test_copy_extended_error_inside_copy(proxy, test_db):
    def script(c: WireClient) -> list[BackendMessage]:
        out = c.query("create temp table ce (a int)")
        c.send(Parse("", "copy ce from stdin"), Bind("", ""), Execute(""), Flush())
        out += c.until(CopyInResponse)
        c.send(CopyData(b"1\nnot a number\n"), CopyDone(), Sync())
        out += c.until_ready()
        c.send(Parse("", "copy ce from stdin"), Bind("", ""), Execute(""), Flush())
        out += c.until(CopyInResponse)
        c.send(CopyData(b"5\n"), CopyFail("abandoned by client"), Sync())
        out += c.until_ready()
        out += c.query("select count(*) from ce")
        return out

    msgs = run_both(proxy, test_db, script)
    errors = [m for m in msgs if isinstance(m, ErrorResponse)]
    assert [e.sqlstate for e in errors] == ["22P02", "57014"]
    assert rows_of(msgs)[-1] == (b"0",)
    got = [
        (r.sql, r.status, r.sqlstate)
        for r in proxy.records
        if r.sql != "create temp table ce (a int)"
    ]
    assert got == [
        ("copy ce from stdin", "error", "22P02"),
        ("copy ce from stdin", "cancelled", "57014"),
        ("select count(*) from ce", "ok", None),
    ]


def test_declare_cursor_with_hold_and_fetch(proxy, test_db):
    with psycopg.connect(proxy.dsn(test_db)) as conn:  # not autocommit: psycopg sends BEGIN
        conn.execute("declare held cursor with hold for select generate_series(1, 10) as g")
        conn.commit()  # WITH HOLD: the cursor survives the commit
        conn.autocommit = True
        assert conn.execute("fetch 3 from held").fetchall() == [(1,), (2,), (3,)]
        assert conn.execute("move forward 2 in held").rowcount == 2
        assert conn.execute("fetch forward 4 from held").fetchall() == [(6,), (7,), (8,), (9,)]
        assert conn.execute("fetch all from held").fetchall() == [(10,)]
        assert conn.execute("fetch all from held").fetchall() == []
        conn.execute("close held")
        with pytest.raises(pg_errors.InvalidCursorName):
            conn.execute("fetch 1 from held")

    got = [(r.sql, r.rows, r.status, r.sqlstate) for r in proxy.records]
    assert got == [
        ("BEGIN", None, "ok", None),
        ("declare held cursor with hold for select generate_series(1, 10) as g", None, "ok", None),
        ("COMMIT", None, "ok", None),
        ("fetch 3 from held", 3, "ok", None),
        ("move forward 2 in held", 2, "ok", None),
        ("fetch forward 4 from held", 4, "ok", None),
        ("fetch all from held", 1, "ok", None),
        ("fetch all from held", 0, "ok", None),
        ("close held", None, "ok", None),
        ("fetch 1 from held", None, "error", "34000"),
    ]


def test_listen_notify_delivered_while_idle(proxy, test_db):
    with (
        psycopg.connect(proxy.dsn(test_db), autocommit=True) as listener,
        psycopg.connect(direct_dsn(test_db), autocommit=True) as sender,
    ):
        listener.execute("listen pgsage_chan")
        sender_pid = sender.info.backend_pid

        def notify() -> None:
            time.sleep(0.3)  # the listener is idle, blocked in notifies()
            sender.execute("notify pgsage_chan, 'hello'")
            sender.execute("select pg_notify('pgsage_chan', 'wörld 🎉')")

        t = threading.Thread(target=notify)
        t.start()
        got = list(listener.notifies(timeout=5, stop_after=2))
        t.join()
        assert [(n.channel, n.payload, n.pid) for n in got] == [
            ("pgsage_chan", "hello", sender_pid),
            ("pgsage_chan", "wörld 🎉", sender_pid),
        ]
        # and the session goes on normally
        assert listener.execute("select 'still fine'").fetchone() == ("still fine",)

    # raw client: the NotificationResponse arrives with no request outstanding
    with (
        wire(proxy, test_db) as c,
        psycopg.connect(direct_dsn(test_db), autocommit=True) as sender,
    ):
        c.query("listen raw_chan")
        assert c.nothing_pending(0.1)
        sender.execute("notify raw_chan, 'ping'")
        msg = c.recv(timeout=5)
        assert msg == NotificationResponse(sender.info.backend_pid, "raw_chan", "ping")
        assert session_tracker(proxy)[0] is Phase.IDLE
    assert [r.sql for r in records_with(proxy, "listen")] == [
        "listen pgsage_chan",
        "listen raw_chan",
    ]


def test_parameter_status_after_set(proxy, test_db):
    with psycopg.connect(
        proxy.dsn(test_db, application_name="pgsage-start"), autocommit=True
    ) as conn:
        assert conn.info.parameter_status("application_name") == "pgsage-start"
        conn.execute("set application_name = 'pgsage-after-set'")
        assert conn.info.parameter_status("application_name") == "pgsage-after-set"
        conn.execute("set timezone = 'Asia/Kolkata'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Kolkata"
        conn.execute("set datestyle = 'German, DMY'")
        assert conn.info.parameter_status("DateStyle") == "German, DMY"
        # the server-side effect is real too
        assert conn.execute("select current_setting('application_name')").fetchone() == (
            "pgsage-after-set",
        )
        _, _, params = session_tracker(proxy)
        assert params["application_name"] == "pgsage-after-set"
        assert params["TimeZone"] == "Asia/Kolkata"
        # extended protocol: the ParameterStatus arrives between the statement's messages
        conn.execute("select set_config('application_name', %s, false)", ("via-extended",))
        assert conn.info.parameter_status("application_name") == "via-extended"

    def script(c: WireClient) -> list[BackendMessage]:
        return c.query("set application_name = 'raw'") + c.query("reset application_name")

    msgs = run_both(proxy, test_db, script)
    # PostgreSQL (14+) reports changed GUC_REPORT settings just before ReadyForQuery
    assert msgs == [
        CommandComplete("SET"),
        ParameterStatus("application_name", "raw"),
        ReadyForQuery("I"),
        CommandComplete("RESET"),
        ParameterStatus("application_name", ""),
        ReadyForQuery("I"),
    ]
    assert (
        records_with(proxy, "set application_name = 'pgsage-after-set'")[0].execution.tag == "SET"
    )


def _cancel_when_running(conn: psycopg.Connection, dbname: str) -> threading.Thread:
    """Cancel `conn`'s statement (through the proxy) once the server shows it running."""
    pid = conn.info.backend_pid

    def run() -> None:
        with psycopg.connect(direct_dsn(dbname), autocommit=True) as watcher:
            wait_for(
                lambda: watcher.execute(
                    "select 1 from pg_stat_activity where pid = %s and state = 'active'"
                    " and query like '%%pg_sleep%%'",
                    (pid,),
                ).fetchone()
            )
        conn.cancel_safe()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_cancel_request_routed_and_recorded(proxy, test_db):
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        # the proxy relays BackendKeyData: the client sees the real backend's pid
        assert conn.info.backend_pid == conn.execute("select pg_backend_pid()").fetchone()[0]

        t = _cancel_when_running(conn, test_db)
        started = time.monotonic()
        with pytest.raises(pg_errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        t.join()
        assert time.monotonic() - started < 10

        t = _cancel_when_running(conn, test_db)
        with pytest.raises(pg_errors.QueryCanceled):
            conn.execute("select pg_sleep(%s)", (20,))  # extended protocol
        t.join()
        assert conn.execute("select 'usable'").fetchone() == ("usable",)

    recs = records_with(proxy, "pg_sleep")
    assert [(r.protocol, r.status, r.sqlstate) for r in recs] == [
        ("simple", "cancelled", "57014"),
        ("extended", "cancelled", "57014"),
    ]
    for r in recs:
        assert 0 < r.duration < 10
        assert r.execution.error_message == "canceling statement due to user request"


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_client_disconnect_mid_query_cancels_upstream(proxy, test_db, protocol):
    """A client that vanishes mid-statement: the upstream statement is cancelled and recorded."""
    sql = f"select pg_sleep(30) /* vanishing {protocol} */"
    c = wire(proxy, test_db)
    assert c.backend_key is not None
    pid = c.backend_key.process_id
    if protocol == "simple":
        c.send(Query(sql))
    else:
        c.send(Parse("", sql), Bind("", ""), Execute(""), Sync())
    with psycopg.connect(direct_dsn(test_db), autocommit=True) as watcher:

        def state() -> str | None:
            row = watcher.execute(
                "select state from pg_stat_activity where pid = %s", (pid,)
            ).fetchone()
            return row[0] if row else None

        wait_for(lambda: state() == "active")
        c.abort()
        # the proxy cancels the statement and closes the upstream session
        wait_for(lambda: state() is None, timeout=10)

    wait_for(lambda: proxy.call_soon(lambda: not proxy.server.clients))
    recs = records_with(proxy, "vanishing")
    assert [(r.sql, r.protocol, r.status, r.sqlstate) for r in recs] == [
        (sql, protocol, "cancelled", "57014")
    ]
    assert recs[0].execution.error_message == "client disconnected"
    assert 0.0 < recs[0].duration < 10
