"""SessionTracker: requests matched to responses, one Execution per statement, explicit clock."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.protocol import (
    BACKEND_TYPE_BYTES,
    CLIENT_INTERESTING,
    FRONTEND_TYPE_BYTES,
    SERVER_INTERESTING,
    Execution,
    FrameScanner,
    Phase,
    Protocol,
    SessionTracker,
    Status,
    rows_from_tag,
)
from proxy.protocol import backend as be
from proxy.protocol import frontend as fe


def split(sql: str) -> list[str]:
    return [p.strip() for p in sql.split(";") if p.strip()]


def client(tracker: SessionTracker, now: float, *messages: Any) -> list[Execution]:
    """Client messages through a FrameScanner, as the proxy feeds them; returns take_finished()."""
    scanner = FrameScanner(CLIENT_INTERESTING, FRONTEND_TYPE_BYTES)
    tracker.client_frames(scanner.receive_data(b"".join(m.encode() for m in messages)), now)
    return tracker.take_finished()


def server(tracker: SessionTracker, now: float, *messages: Any) -> list[Execution]:
    scanner = FrameScanner(SERVER_INTERESTING, BACKEND_TYPE_BYTES)
    frames = scanner.receive_data(b"".join(m.encode() for m in messages))
    return tracker.server_frames(frames, now)


def rows(n: int) -> list[be.DataRow]:
    return [be.DataRow((str(i).encode(),)) for i in range(n)]


def error(sqlstate: str, message: str, severity: str = "ERROR") -> be.ErrorResponse:
    return be.ErrorResponse((("S", severity), ("V", severity), ("C", sqlstate), ("M", message)))


COLUMN = be.RowDescription((be.FieldDescription("n", type_oid=23, type_size=4),))
IDLE = be.ReadyForQuery("I")
IN_TRANSACTION = be.ReadyForQuery("T")


def ready(**kwargs: Any) -> SessionTracker:
    """A tracker past startup and authentication."""
    tracker = SessionTracker(**kwargs)
    assert server(tracker, 0.0, be.Authentication(0), be.BackendKeyData(1, b"k" * 4), IDLE) == []
    assert tracker.phase is Phase.IDLE
    return tracker


def ended(ex: Execution) -> tuple[Any, ...]:
    """What matters of an execution, for comparing against a literal."""
    return (ex.protocol, ex.sql, ex.start, ex.end, ex.tag, ex.rows, ex.status)


# ------------------------------------------------------------------ startup


def test_startup_until_the_first_ready_for_query() -> None:
    tracker = SessionTracker()
    assert tracker.phase is Phase.STARTUP
    out = server(
        tracker,
        0.5,
        be.Authentication(be.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"),
        be.Authentication(be.AUTH_SASL_CONTINUE, b"r=abc"),
        be.Authentication(be.AUTH_SASL_FINAL, b"v=xyz"),
        be.Authentication(be.AUTH_OK),
        be.ParameterStatus("server_version", "16.4"),
        be.ParameterStatus("client_encoding", "UTF8"),
        be.BackendKeyData(4242, b"\x01\x02\x03\x04"),
        be.NoticeResponse((("S", "NOTICE"), ("M", "hello"))),
    )
    assert out == []
    assert tracker.phase is Phase.STARTUP
    assert tracker.backend_pid == 4242
    assert tracker.backend_secret == b"\x01\x02\x03\x04"
    assert tracker.parameters == {"server_version": "16.4", "client_encoding": "UTF8"}
    assert not tracker.in_flight
    assert server(tracker, 0.6, IDLE) == []
    assert tracker.phase is Phase.IDLE
    assert tracker.transaction_status == "I"
    assert tracker.startup_error is None


def test_backend_key_data_of_protocol_3_2() -> None:
    tracker = SessionTracker()
    server(tracker, 0.0, be.BackendKeyData(-5, bytes(range(32))), IDLE)
    assert (tracker.backend_pid, tracker.backend_secret) == (-5, bytes(range(32)))


def test_parameter_status_after_startup_is_captured() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("SET TimeZone = 'UTC'"))
    server(tracker, 1.1, be.CommandComplete("SET"), be.ParameterStatus("TimeZone", "UTC"), IDLE)
    assert tracker.parameters["TimeZone"] == "UTC"


def test_authentication_failure() -> None:
    tracker = SessionTracker()
    failure = error("28P01", 'password authentication failed for user "bob"', "FATAL")
    assert server(tracker, 0.1, be.Authentication(be.AUTH_MD5, b"salt"), failure) == []
    assert tracker.startup_error == ("28P01", 'password authentication failed for user "bob"')
    assert tracker.fatal
    assert tracker.phase is Phase.STARTUP


# ------------------------------------------------------------------ simple query


def test_simple_query_single_statement() -> None:
    tracker = ready()
    assert client(tracker, 1.0, fe.Query("SELECT 3")) == []
    assert tracker.phase is Phase.BUSY and tracker.in_flight
    out = server(tracker, 1.5, COLUMN, *rows(3), be.CommandComplete("SELECT 3"))
    assert [ended(ex) for ex in out] == [
        (Protocol.SIMPLE, "SELECT 3", 1.0, 1.5, "SELECT 3", 3, Status.OK)
    ]
    assert out[0].duration == 0.5
    assert out[0].sqlstate is None and out[0].statement is None
    assert tracker.phase is Phase.BUSY  # until ReadyForQuery
    assert server(tracker, 1.6, IDLE) == []
    assert tracker.phase is Phase.IDLE and not tracker.in_flight


def test_simple_query_several_statements_with_a_splitter() -> None:
    tracker = ready(splitter=split)
    client(tracker, 10.0, fe.Query("BEGIN; INSERT INTO t VALUES (1); COMMIT;"))
    out = server(tracker, 11.0, be.CommandComplete("BEGIN"))
    out += server(tracker, 12.0, be.CommandComplete("INSERT 0 1"))
    out += server(tracker, 13.0, be.CommandComplete("COMMIT"))
    assert server(tracker, 14.0, IDLE) == []
    # each statement starts when the previous one ended
    assert [ended(ex) for ex in out] == [
        (Protocol.SIMPLE, "BEGIN", 10.0, 11.0, "BEGIN", None, Status.OK),
        (Protocol.SIMPLE, "INSERT INTO t VALUES (1)", 11.0, 12.0, "INSERT 0 1", 1, Status.OK),
        (Protocol.SIMPLE, "COMMIT", 12.0, 13.0, "COMMIT", None, Status.OK),
    ]
    assert tracker.phase is Phase.IDLE


def test_simple_query_several_statements_without_a_splitter() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("SELECT 1; SELECT 2"))
    out = server(tracker, 2.0, be.CommandComplete("SELECT 1"), be.CommandComplete("SELECT 1"), IDLE)
    assert [(ex.sql, ex.start, ex.end) for ex in out] == [
        ("SELECT 1; SELECT 2", 1.0, 2.0),
        ("SELECT 1; SELECT 2", 2.0, 2.0),
    ]


def test_simple_query_error_mid_batch() -> None:
    tracker = ready(splitter=split)
    client(tracker, 1.0, fe.Query("SELECT 1; SELECT 1/0; SELECT 3"))
    out = server(tracker, 2.0, COLUMN, *rows(1), be.CommandComplete("SELECT 1"))
    out += server(tracker, 3.0, COLUMN, error("22012", "division by zero"))
    assert server(tracker, 4.0, IDLE) == []
    assert [ended(ex) for ex in out] == [
        (Protocol.SIMPLE, "SELECT 1", 1.0, 2.0, "SELECT 1", 1, Status.OK),
        (Protocol.SIMPLE, "SELECT 1/0", 2.0, 3.0, None, None, Status.ERROR),
    ]
    assert (out[1].sqlstate, out[1].error_message) == ("22012", "division by zero")
    assert tracker.phase is Phase.IDLE and not tracker.pending


def test_empty_query() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query(""))
    out = server(tracker, 1.25, be.EmptyQueryResponse(), IDLE)
    assert [ended(ex) for ex in out] == [(Protocol.SIMPLE, "", 1.0, 1.25, None, None, Status.OK)]


def test_pipelined_simple_queries() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("SELECT 1"), fe.Query("SELECT 2"))
    out = server(tracker, 2.0, be.CommandComplete("SELECT 1"), IDLE)
    assert tracker.phase is Phase.BUSY
    out += server(tracker, 3.0, be.CommandComplete("SELECT 1"), IDLE)
    assert [ex.sql for ex in out] == ["SELECT 1", "SELECT 2"]
    assert tracker.phase is Phase.IDLE


def test_query_too_large_to_read() -> None:
    tracker = ready()
    tracker.client_frames([(ord("Q"), None)], 1.0)
    out = server(tracker, 2.0, be.CommandComplete("INSERT 0 100000"), IDLE)
    assert [(ex.sql, ex.rows) for ex in out] == [(None, 100_000)]


def test_cancelled_query() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("SELECT pg_sleep(10)"))
    out = server(tracker, 3.0, error("57014", "canceling statement due to user request"), IDLE)
    assert len(out) == 1
    assert out[0].status is Status.CANCELLED
    assert out[0].sqlstate == "57014"
    assert out[0].end == 3.0


# ------------------------------------------------------------------ extended query


def test_extended_named_statement() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Parse("s1", "SELECT $1::int"), fe.Sync())
    assert server(tracker, 1.1, be.ParseComplete(), IDLE) == []
    assert tracker.statements == {"s1": "SELECT $1::int"}
    client(tracker, 2.0, fe.Bind("", "s1", (), (b"7",)), fe.Execute(), fe.Sync())
    assert tracker.phase is Phase.BUSY
    out = server(tracker, 3.0, be.BindComplete(), *rows(1), be.CommandComplete("SELECT 1"))
    assert [ended(ex) for ex in out] == [
        (Protocol.EXTENDED, "SELECT $1::int", 2.0, 3.0, "SELECT 1", 1, Status.OK)
    ]
    assert (out[0].statement, out[0].portal) == ("s1", "")
    assert server(tracker, 3.1, IDLE) == []
    assert tracker.phase is Phase.IDLE and not tracker.in_flight


def test_extended_unnamed_statement_with_describe() -> None:
    tracker = ready()
    client(
        tracker,
        1.0,
        fe.Parse("", "UPDATE t SET x = 1"),
        fe.Bind("", ""),
        fe.Describe("P"),
        fe.Execute(),
        fe.Sync(),
    )
    out = server(
        tracker,
        2.0,
        be.ParseComplete(),
        be.BindComplete(),
        be.NoData(),
        be.CommandComplete("UPDATE 4"),
        IDLE,
    )
    assert [ended(ex) for ex in out] == [
        (Protocol.EXTENDED, "UPDATE t SET x = 1", 1.0, 2.0, "UPDATE 4", 4, Status.OK)
    ]


def test_extended_empty_query() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Parse("", ""), fe.Bind("", ""), fe.Execute(), fe.Sync())
    out = server(tracker, 2.0, be.EmptyQueryResponse(), IDLE)
    assert [ended(ex) for ex in out] == [(Protocol.EXTENDED, "", 1.0, 2.0, None, None, Status.OK)]


def test_pipeline_of_many_statements_before_one_sync() -> None:
    tracker = ready()
    for i in range(3):
        client(tracker, 1.0 + i, fe.Parse("", f"SELECT {i}"), fe.Bind("", ""), fe.Execute())
    client(tracker, 4.0, fe.Sync())
    out: list[Execution] = []
    for i in range(3):
        out += server(tracker, 5.0 + i, COLUMN, *rows(1), be.CommandComplete("SELECT 1"))
    assert server(tracker, 8.0, IDLE) == []
    assert [(ex.sql, ex.start, ex.end, ex.status) for ex in out] == [
        ("SELECT 0", 1.0, 5.0, Status.OK),
        ("SELECT 1", 2.0, 6.0, Status.OK),
        ("SELECT 2", 3.0, 7.0, Status.OK),
    ]
    assert tracker.phase is Phase.IDLE


def test_error_mid_pipeline() -> None:
    tracker = ready()
    for i in range(3):
        client(tracker, 1.0, fe.Parse("", f"SELECT 1/{i}"), fe.Bind("", ""), fe.Execute())
    client(tracker, 1.0, fe.Sync())
    # the first Execute fails; the server skips everything up to Sync
    out = server(
        tracker, 2.0, be.ParseComplete(), be.BindComplete(), error("22012", "division by zero")
    )
    assert [(ex.sql, ex.status, ex.sqlstate) for ex in out] == [
        ("SELECT 1/0", Status.ERROR, "22012")
    ]
    assert server(tracker, 2.5, IDLE) == []  # the two skipped Executes are dropped
    assert tracker.phase is Phase.IDLE and not tracker.pending
    # the session goes on
    client(tracker, 3.0, fe.Parse("", "SELECT 1"), fe.Bind("", ""), fe.Execute(), fe.Sync())
    out = server(tracker, 4.0, be.CommandComplete("SELECT 1"), IDLE)
    assert [(ex.sql, ex.status, ex.start) for ex in out] == [("SELECT 1", Status.OK, 3.0)]


def test_error_in_a_later_parse_fails_the_next_execute() -> None:
    tracker = ready()
    client(
        tracker,
        1.0,
        fe.Parse("", "SELECT 1"),
        fe.Bind("", ""),
        fe.Execute(),
        fe.Parse("", "SELEC 2"),
        fe.Bind("", ""),
        fe.Execute(),
        fe.Sync(),
    )
    out = server(tracker, 2.0, be.CommandComplete("SELECT 1"), error("42601", "syntax error"), IDLE)
    assert [(ex.sql, ex.status) for ex in out] == [
        ("SELECT 1", Status.OK),
        ("SELEC 2", Status.ERROR),
    ]


def test_error_with_no_execute_before_sync() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Parse("bad", "SELEC"), fe.Sync(), fe.Query("SELECT 1"))
    # a Parse that fails is recorded on its own (asyncpg/psycopg prepare send no Execute)
    out = server(tracker, 2.0, error("42601", "syntax error"), IDLE)
    assert [(ex.sql, ex.statement, ex.status, ex.sqlstate) for ex in out] == [
        ("SELEC", "bad", Status.ERROR, "42601")
    ]
    # the Query after that Sync is untouched by the error
    out = server(tracker, 3.0, be.CommandComplete("SELECT 1"), IDLE)
    assert [(ex.sql, ex.status) for ex in out] == [("SELECT 1", Status.OK)]


def test_error_at_sync_is_not_charged_to_the_next_group() -> None:
    # e.g. a deferred constraint failing when Sync commits the implicit transaction
    tracker = ready()
    client(tracker, 1.0, fe.Parse("", "INSERT 1"), fe.Bind("", ""), fe.Execute(), fe.Sync())
    client(tracker, 1.0, fe.Parse("", "INSERT 2"), fe.Bind("", ""), fe.Execute(), fe.Sync())
    out = server(tracker, 2.0, be.CommandComplete("INSERT 0 1"), error("23503", "fk"), IDLE)
    out += server(tracker, 3.0, be.CommandComplete("INSERT 0 1"), IDLE)
    # the failed implicit COMMIT is its own error record; the next group is untouched
    assert [(ex.sql, ex.tag, ex.status) for ex in out] == [
        ("INSERT 1", "INSERT 0 1", Status.OK),
        ("INSERT 1", "COMMIT", Status.ERROR),
        ("INSERT 2", "INSERT 0 1", Status.OK),
    ]


def test_cancelled_extended_query() -> None:
    tracker = ready()
    client(
        tracker, 1.0, fe.Parse("", "SELECT pg_sleep(9)"), fe.Bind("", ""), fe.Execute(), fe.Sync()
    )
    out = server(tracker, 2.0, error("57014", "canceling statement due to user request"), IDLE)
    assert [(ex.status, ex.sqlstate) for ex in out] == [(Status.CANCELLED, "57014")]


def test_flush_style_prepare_then_execute() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Parse("s2", "SELECT 2"), fe.Describe("S", "s2"), fe.Flush())
    assert server(tracker, 1.1, be.ParseComplete(), be.ParameterDescription(()), COLUMN) == []
    # the client waited for those answers; the execution starts with its Bind
    client(tracker, 5.0, fe.Bind("", "s2"), fe.Execute(), fe.Sync())
    out = server(tracker, 5.5, be.BindComplete(), *rows(1), be.CommandComplete("SELECT 1"))
    assert [ended(ex) for ex in out] == [
        (Protocol.EXTENDED, "SELECT 2", 5.0, 5.5, "SELECT 1", 1, Status.OK)
    ]
    assert out[0].statement == "s2"
    assert server(tracker, 5.6, IDLE) == []
    assert tracker.phase is Phase.IDLE


def test_closed_statement_is_forgotten() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Parse("s1", "SELECT 1"), fe.Close("S", "s1"), fe.Sync())
    assert tracker.statements == {}


# ------------------------------------------------------------------ portals with max_rows


def _open_cursor(tracker: SessionTracker) -> None:
    client(tracker, 1.0, fe.Query("BEGIN"))
    server(tracker, 1.5, be.CommandComplete("BEGIN"), IN_TRANSACTION)
    client(
        tracker,
        10.0,
        fe.Parse("", "SELECT g FROM generate_series(1, 5) g"),
        fe.Bind("c1", ""),
        fe.Execute("c1", 2),
        fe.Sync(),
    )
    assert server(tracker, 11.0, *rows(2), be.PortalSuspended(), IN_TRANSACTION) == []
    assert set(tracker.suspended) == {"c1"}
    assert tracker.phase is Phase.IDLE


def test_suspended_portal_is_one_execution() -> None:
    tracker = ready()
    _open_cursor(tracker)
    client(tracker, 20.0, fe.Execute("c1", 2), fe.Sync())
    assert server(tracker, 21.0, *rows(2), be.PortalSuspended(), IN_TRANSACTION) == []
    client(tracker, 30.0, fe.Execute("c1", 2), fe.Sync())
    out = server(tracker, 31.0, *rows(1), be.CommandComplete("SELECT 1"))
    assert len(out) == 1
    ex = out[0]
    assert ended(ex) == (
        Protocol.EXTENDED,
        "SELECT g FROM generate_series(1, 5) g",
        10.0,
        31.0,
        "SELECT 1",
        5,  # 2 + 2 per suspended leg, plus the 1 of the final tag
        Status.OK,
    )
    assert (ex.suspensions, ex.portal, ex.max_rows) == (2, "c1", 2)
    assert server(tracker, 31.5, IN_TRANSACTION) == []
    assert not tracker.suspended


def test_suspended_portal_with_flush_legs() -> None:
    # cursor style without Sync between legs (node-postgres' pg-cursor)
    tracker = ready()
    client(
        tracker, 1.0, fe.Parse("", "SELECT 1"), fe.Bind("c", ""), fe.Execute("c", 10), fe.Flush()
    )
    assert server(tracker, 2.0, *rows(10), be.PortalSuspended()) == []
    client(tracker, 3.0, fe.Execute("c", 10), fe.Flush())
    assert server(tracker, 4.0, *rows(10), be.PortalSuspended()) == []
    client(tracker, 5.0, fe.Execute("c", 10), fe.Flush())
    out = server(tracker, 6.0, *rows(3), be.CommandComplete("SELECT 3"))
    assert [(ex.start, ex.end, ex.rows, ex.suspensions) for ex in out] == [(1.0, 6.0, 23, 2)]
    client(tracker, 7.0, fe.Sync())
    assert server(tracker, 7.5, IDLE) == []
    assert tracker.phase is Phase.IDLE


def test_close_finishes_a_suspended_portal() -> None:
    tracker = ready()
    _open_cursor(tracker)
    out = client(tracker, 50.0, fe.Close("P", "c1"), fe.Sync())
    assert len(out) == 1
    ex = out[0]
    # it ended with its last PortalSuspended, not when the client got round to closing it
    assert (ex.start, ex.end, ex.rows, ex.suspensions, ex.status) == (10.0, 11.0, 2, 1, Status.OK)
    assert not tracker.suspended and "c1" not in tracker.portals
    assert server(tracker, 50.5, be.CloseComplete(), IN_TRANSACTION) == []
    assert tracker.take_finished() == []


def test_rebinding_finishes_a_suspended_portal() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("BEGIN"))
    server(tracker, 1.0, be.CommandComplete("BEGIN"), IN_TRANSACTION)
    client(tracker, 2.0, fe.Parse("", "SELECT a"), fe.Bind("", ""), fe.Execute("", 1), fe.Sync())
    server(tracker, 3.0, *rows(1), be.PortalSuspended(), IN_TRANSACTION)
    out = client(tracker, 9.0, fe.Parse("", "SELECT b"), fe.Bind("", ""))
    assert [(ex.sql, ex.end, ex.suspensions) for ex in out] == [("SELECT a", 3.0, 1)]
    client(tracker, 9.0, fe.Execute(), fe.Sync())
    out = server(tracker, 10.0, be.CommandComplete("SELECT 4"), IN_TRANSACTION)
    assert [(ex.sql, ex.rows, ex.suspensions) for ex in out] == [("SELECT b", 4, 0)]


def test_end_of_transaction_finishes_a_suspended_portal() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Parse("", "SELECT a"), fe.Bind("", ""), fe.Execute("", 100), fe.Sync())
    # Sync commits the implicit transaction, which closes the portal
    out = server(tracker, 2.0, *rows(100), be.PortalSuspended(), IDLE)
    assert [(ex.sql, ex.rows, ex.suspensions, ex.end) for ex in out] == [("SELECT a", 100, 1, 2.0)]
    assert not tracker.suspended


def test_error_while_resuming_a_portal() -> None:
    tracker = ready()
    _open_cursor(tracker)
    client(tracker, 20.0, fe.Execute("c1", 2), fe.Sync())
    out = server(tracker, 21.0, error("57014", "canceling statement due to user request"))
    assert [(ex.status, ex.suspensions, ex.rows, ex.end) for ex in out] == [
        (Status.CANCELLED, 1, 2, 21.0)
    ]
    assert server(tracker, 21.5, be.ReadyForQuery("E")) == []
    assert tracker.transaction_status == "E"


# ------------------------------------------------------------------ COPY and other requests


def test_copy_in() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("COPY t FROM STDIN"))
    assert tracker.phase is Phase.BUSY
    server(tracker, 1.1, be.CopyInResponse(0, (0, 0)))
    assert tracker.phase is Phase.COPY_IN
    client(tracker, 1.2, fe.CopyData(b"1\ta\n"), fe.CopyData(b"2\tb\n3\tc\n"), fe.CopyDone())
    assert tracker.phase is Phase.COPY_IN
    out = server(tracker, 2.0, be.CommandComplete("COPY 3"))
    assert tracker.phase is Phase.BUSY
    assert [ended(ex) for ex in out] == [
        (Protocol.SIMPLE, "COPY t FROM STDIN", 1.0, 2.0, "COPY 3", 3, Status.OK)
    ]
    server(tracker, 2.1, IDLE)
    assert tracker.phase is Phase.IDLE


def test_copy_in_failed_by_the_client() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("COPY t FROM STDIN"))
    server(tracker, 1.1, be.CopyInResponse())
    client(tracker, 1.2, fe.CopyFail("no more"))
    out = server(tracker, 1.3, error("57014", "COPY from stdin failed: no more"))
    assert tracker.phase is Phase.BUSY
    assert [ex.status for ex in out] == [Status.CANCELLED]
    server(tracker, 1.4, IDLE)
    assert tracker.phase is Phase.IDLE


def test_copy_in_extended_libpq_style() -> None:
    # libpq sends Execute, Sync before it knows the statement is a COPY, then CopyDone, Sync.
    # The server ignores Sync in copy-in mode, so only the second one gets a ReadyForQuery.
    tracker = ready()
    client(
        tracker, 1.0, fe.Parse("", "COPY t FROM STDIN"), fe.Bind("", ""), fe.Execute(), fe.Sync()
    )
    server(tracker, 1.1, be.ParseComplete(), be.BindComplete(), be.CopyInResponse())
    assert tracker.phase is Phase.COPY_IN
    client(tracker, 1.2, fe.CopyData(b"1\n2\n"), fe.Sync(), fe.CopyDone(), fe.Sync())
    out = server(tracker, 2.0, be.CommandComplete("COPY 2"), IDLE)
    assert [(ex.sql, ex.rows, ex.status) for ex in out] == [("COPY t FROM STDIN", 2, Status.OK)]
    assert tracker.phase is Phase.IDLE and not tracker.pending
    # what follows is matched to its own answers
    client(tracker, 3.0, fe.Query("SELECT 'after copy'"))
    out = server(tracker, 3.5, be.CommandComplete("SELECT 1"), IDLE)
    assert [(ex.sql, ex.start, ex.end) for ex in out] == [("SELECT 'after copy'", 3.0, 3.5)]


def test_copy_in_aborted_by_a_pipelined_statement() -> None:
    # Parse during copy-in mode is a protocol error that ends the COPY; the server then skips
    # to the Sync that closes the pipeline
    tracker = ready()
    client(
        tracker, 1.0, fe.Parse("", "COPY t FROM STDIN"), fe.Bind("", ""), fe.Execute(), fe.Sync()
    )
    client(tracker, 1.0, fe.Parse("", "SELECT 2"), fe.Bind("", ""), fe.Execute(), fe.Sync())
    server(tracker, 1.1, be.CopyInResponse())
    out = server(
        tracker, 1.2, error("08P01", "unexpected message type 0x50 during COPY from stdin")
    )
    assert [(ex.sql, ex.status) for ex in out] == [("COPY t FROM STDIN", Status.ERROR)]
    assert server(tracker, 1.3, IDLE) == []
    assert tracker.phase is Phase.IDLE and not tracker.pending


def test_copy_in_extended_error_inside_copy() -> None:
    tracker = ready()
    client(
        tracker, 1.0, fe.Parse("", "COPY t FROM STDIN"), fe.Bind("", ""), fe.Execute(), fe.Flush()
    )
    server(tracker, 1.1, be.CopyInResponse())
    client(tracker, 1.2, fe.CopyData(b"1\nnot a number\n"), fe.CopyDone(), fe.Sync())
    out = server(tracker, 1.3, error("22P02", "invalid input syntax for type integer"), IDLE)
    assert [(ex.status, ex.sqlstate) for ex in out] == [(Status.ERROR, "22P02")]
    assert tracker.phase is Phase.IDLE and not tracker.pending


def test_copy_out() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Query("COPY t TO STDOUT"))
    server(tracker, 1.1, be.CopyOutResponse(0, (0,)))
    assert tracker.phase is Phase.COPY_OUT
    out = server(tracker, 1.2, be.CopyData(b"1\n"), be.CopyData(b"2\n"), be.CopyDone())
    assert out == [] and tracker.phase is Phase.COPY_OUT
    out = server(tracker, 1.3, be.CommandComplete("COPY 2"), IDLE)
    assert [(ex.rows, ex.tag) for ex in out] == [(2, "COPY 2")]
    assert tracker.phase is Phase.IDLE


def test_function_call_is_answered_like_a_sync() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.FunctionCall(1598, (), (), 0))
    assert tracker.phase is Phase.BUSY
    assert server(tracker, 1.1, be.FunctionCallResponse(b"x"), IDLE) == []
    assert tracker.phase is Phase.IDLE and not tracker.pending


def test_terminate() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Terminate())
    assert tracker.phase is Phase.CLOSED


def test_fatal_error_while_idle() -> None:
    tracker = ready()
    assert server(tracker, 1.0, error("57P01", "terminating connection", "FATAL")) == []
    assert tracker.fatal


# ------------------------------------------------------------------ bounded memory


def test_statement_names_are_bounded() -> None:
    tracker = ready(max_statements=2)
    client(tracker, 1.0, *(fe.Parse(f"s{i}", f"SELECT {i}") for i in range(5)), fe.Parse("", "x"))
    assert tracker.statements == {"s0": "SELECT 0", "s1": "SELECT 1", "": "x"}


def test_unnamed_portal_is_tracked_when_named_portals_fill_the_limit() -> None:
    tracker = ready(max_statements=2)
    client(tracker, 1.0, fe.Query("BEGIN"))
    server(tracker, 1.0, be.CommandComplete("BEGIN"), IN_TRANSACTION)
    client(
        tracker, 2.0, fe.Parse("old", "SELECT 'old'"), fe.Bind("", "old"), fe.Execute(), fe.Sync()
    )
    server(tracker, 2.0, be.CommandComplete("SELECT 1"), IN_TRANSACTION)
    client(tracker, 3.0, *(fe.Bind(f"p{i}", "old") for i in range(5)), fe.Sync())
    server(tracker, 3.0, IN_TRANSACTION)
    assert len(tracker.portals) <= 2
    client(tracker, 4.0, fe.Parse("", "SELECT 'new'"), fe.Bind("", ""), fe.Execute(), fe.Sync())
    out = server(tracker, 5.0, be.CommandComplete("SELECT 1"), IN_TRANSACTION)
    assert [ex.sql for ex in out] == ["SELECT 'new'"]


def test_named_portals_end_with_the_transaction() -> None:
    tracker = ready()
    client(tracker, 1.0, fe.Parse("", "SELECT 1"), fe.Bind("p", ""), fe.Bind("", ""), fe.Sync())
    server(tracker, 1.0, IDLE)
    assert tracker.portals == {"": ""}


# ------------------------------------------------------------------ rows_from_tag


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("INSERT 0 5", 5),
        ("BEGIN", None),
        ("SELECT 0", 0),
        ("COPY 3", 3),
        ("SELECT 42", 42),
        ("UPDATE 7", 7),
        ("DELETE 0", 0),
        ("MERGE 2", 2),
        ("FETCH 100", 100),
        ("MOVE 3", 3),
        ("CREATE TABLE", None),
        ("SET", None),
        ("SELECT", None),
        ("", None),
        ("INSERT 0 x", None),
        ("SELECT \u00b2", None),  # a digit to str.isdigit, not to int()
        ("SELECT -1", None),
    ],
)
def test_rows_from_tag(tag: str, expected: int | None) -> None:
    assert rows_from_tag(tag) == expected


# ------------------------------------------------------------------ command tags, cached


def test_command_tags_read_the_same_from_the_cache_and_fresh() -> None:
    """CommandComplete payloads are cached by their bytes: a repeated tag reads as the first."""
    from proxy.protocol import tracker as tracker_module

    tracker_module._TAGS.clear()
    tracker = ready()
    got = []
    for _ in range(3):  # fresh, then twice from the cache
        for tag in ("SELECT 5", "INSERT 0 3", "UPDATE 0", "CREATE TABLE", "FETCH 2", "SELECT ²"):
            client(tracker, 1.0, fe.Query(tag.split()[0]))
            got.append(
                [(ex.tag, ex.rows) for ex in server(tracker, 2.0, be.CommandComplete(tag), IDLE)]
            )
    first = got[:6]
    assert got == first * 3
    assert first == [
        [("SELECT 5", 5)], [("INSERT 0 3", 3)], [("UPDATE 0", 0)], [("CREATE TABLE", None)],
        [("FETCH 2", 2)], [("SELECT ²", None)],
    ]  # fmt: skip
    assert b"SELECT 5\x00" in tracker_module._TAGS


def test_the_command_tag_cache_is_bounded_and_skips_long_payloads() -> None:
    from proxy.protocol import tracker as tracker_module

    tracker_module._TAGS.clear()
    tracker = ready()
    for n in range(tracker_module._TAGS_MAX + 10):
        client(tracker, 1.0, fe.Query("SELECT"))
        (ex,) = server(tracker, 2.0, be.CommandComplete(f"SELECT {n}"), IDLE)
        assert ex.rows == n
        assert len(tracker_module._TAGS) <= tracker_module._TAGS_MAX
    long_tag = "SELECT " + "9" * 80
    client(tracker, 1.0, fe.Query("SELECT"))
    (ex,) = server(tracker, 2.0, be.CommandComplete(long_tag), IDLE)
    assert ex.rows == int("9" * 80) and ex.tag == long_tag
    assert not any(len(key) > tracker_module._TAG_KEY_MAX for key in tracker_module._TAGS)


def test_executions_compare_by_value_and_show_their_fields() -> None:
    a = Execution(Protocol.SIMPLE, "SELECT 1", 1.0, 2.0, tag="SELECT 1", rows=1)
    b = Execution(Protocol.SIMPLE, "SELECT 1", 1.0, 2.0, tag="SELECT 1", rows=1)
    assert a == b and a != Execution(Protocol.SIMPLE, "SELECT 1", 1.0, 2.0)
    assert "tag='SELECT 1'" in repr(a) and repr(a).startswith("Execution(protocol=")
    assert a.duration == 1.0


@pytest.mark.parametrize(
    ("portal", "statement", "max_rows"),
    [("", "", 0), ("", "P0_1", 0), ("c1", "", 10), ("c1", "s1", -1), ("p€", "s€", 2**31 - 1)],
)
def test_bind_and_execute_names_and_row_limits(portal: str, statement: str, max_rows: int):
    """The compiled Bind / Execute readers: names (the empty ones are not decoded) and the
    signed row limit, as the codec encodes them."""
    tracker = ready()
    client(tracker, 1.0, fe.Parse(statement, "SELECT 1"))
    client(tracker, 1.0, fe.Bind(portal, statement, (), (), ()), fe.Execute(portal, max_rows))
    (ex,) = [item for item in tracker.pending if isinstance(item, Execution)]
    assert (ex.portal, ex.statement, ex.max_rows) == (portal, statement, max_rows)
    assert ex.sql == "SELECT 1"
