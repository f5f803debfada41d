"""The result cache's pure parts: which statements qualify, which batches and responses fit,
and the in-memory backend's generations, LRU and TTL."""

from __future__ import annotations

import pytest

from optimizer.cacheability import analyze
from proxy.cache import Entry, MemoryBackend, refresh_payload_tables
from proxy.protocol.backend import (
    BindComplete,
    CommandComplete,
    DataRow,
    FieldDescription,
    NoticeResponse,
    ParseComplete,
    PortalSuspended,
    ReadyForQuery,
    RowDescription,
    error_response,
)
from proxy.protocol.batch import read_batch, replayable
from proxy.protocol.frontend import Bind, Describe, Execute, Flush, Parse, Query, Sync


def enc(*messages: object) -> bytes:
    return b"".join(m.encode() for m in messages)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- cacheability


@pytest.mark.parametrize(
    "sql",
    [
        "select * from gold.sales_summary where region = 'EU'",
        "with t as (select * from gold.a) select count(*) from t join gold.b using (id)",
        "select date_trunc('day', d), sum(x) from gold.a group by 1 order by 1 limit 10",
        "select * from gold.a where id in (select id from gold.b)",
    ],
)
def test_cacheable_reads(sql: str) -> None:
    info = analyze(sql)
    assert info.cacheable, info.reason
    assert info.tables and all(t.startswith("gold.") for t in info.tables)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("select * from silver.a", "outside the cached schemas"),
        ("select * from a", "not schema-qualified"),
        ("select now(), * from gold.a", "now()"),
        ("select random() from gold.a", "random()"),
        ("select current_date from gold.a", "CURRENT_"),
        ("select pg_backend_pid() from gold.a", "pg_backend_pid()"),
        ("select nextval('s') from gold.a", "nextval()"),
        ("select gold.f(x) from gold.a", "user function"),
        ("select * from gold.a for update", "locks rows"),
        ("select * into gold.z from gold.a", "SELECT INTO"),
        ("with d as (delete from gold.a returning *) select * from d", "writes data"),
        ("select * from gold.a /* pgsage:no_cache */", "opted out"),
        ("select * from gold.a /* pgsage:off */", "opted out"),
        ("select 1; select 2", "not exactly one statement"),
        ("select * from generate_series(1, 3)", "function"),
        ("select 1", "reads no table"),
        ("insert into gold.a values (1)", "not a SELECT"),
        ("selec broken", "does not parse"),
    ],
)
def test_uncacheable_with_reason(sql: str, reason: str) -> None:
    info = analyze(sql)
    assert not info.cacheable
    assert reason in info.reason


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("insert into gold.a values (1)", ("a",)),
        ("update silver.x set a = 1 from gold.y where x.id = y.id", ("x", "y")),
        ("delete from a", ("a",)),
        ("truncate gold.a, gold.b", ("a", "b")),
        ("copy gold.a from stdin", ("a",)),
        ("copy gold.a to stdout", ()),
        ("select * from gold.a", ()),
        ("begin", ()),
        ("set statement_timeout = 5", ()),
        ("create index on gold.a (x)", None),
        ("drop table gold.a", None),
        ("call refresh()", None),
        ("do $$ begin end $$", None),
        ("select * into gold.z from gold.a", None),
        ("with d as (delete from gold.a returning *) select * from d", ("a",)),
    ],
)
def test_written_tables(sql: str, writes: tuple[str, ...] | None) -> None:
    assert analyze(sql).writes == writes


def test_refresh_payload() -> None:
    assert refresh_payload_tables("gold.sales_summary") == ("sales_summary",)
    assert refresh_payload_tables("gold.a, gold.b") == ("a", "b")
    assert refresh_payload_tables("") is None


# ------------------------------------------------------------------------- request batches


def test_simple_query_batch() -> None:
    b = read_batch(enc(Query("select 1")))
    assert b is not None and b.kind == "query" and b.sql == "select 1"


def test_extended_batches() -> None:
    named = read_batch(enc(Bind("", "s1", params=(b"5",)), Execute(), Sync()))
    assert named is not None and named.kind == "bind" and named.statement == "s1"
    described = read_batch(enc(Bind("", "s1"), Describe("P"), Execute(), Sync()))
    assert described is not None and described.kind == "bind"
    parse = enc(Parse("", "select $1"))
    unnamed = read_batch(parse + enc(Bind("", ""), Describe("P"), Execute(), Sync()))
    assert unnamed is not None and unnamed.kind == "parse" and unnamed.sql == "select $1"
    assert unnamed.parse == parse


@pytest.mark.parametrize(
    "data",
    [
        enc(Parse("s1", "select 1"), Bind("", "s1"), Execute(), Sync()),  # named Parse
        enc(Bind("p1", "s1"), Execute("p1"), Sync()),  # named portal
        enc(Bind("", ""), Execute(), Sync()),  # unnamed statement without its Parse
        enc(Bind("", "s1"), Execute(), Flush()),  # no Sync
        enc(Query("select 1"), Query("select 2")),  # two requests
        enc(Query("select 1"))[:-1],  # incomplete
        enc(Bind("", "s1"), Describe("S", "other"), Execute(), Sync()),
    ],
)
def test_batches_not_served(data: bytes) -> None:
    assert read_batch(data) is None


# ------------------------------------------------------------------------- responses


def _simple_response(status: str = "I") -> bytes:
    return enc(
        RowDescription((FieldDescription("n", type_oid=23),)),
        DataRow((b"1",)),
        DataRow((b"2",)),
        CommandComplete("SELECT 2"),
        ReadyForQuery(status),
    )


def test_row_limited_execute_is_replayable() -> None:
    b = read_batch(enc(Bind("", "s1"), Execute("", 1), Sync()))
    assert b is not None and b.kind == "bind"
    suspended = enc(BindComplete(), DataRow((b"1",)), PortalSuspended(), ReadyForQuery("I"))
    assert replayable(suspended) == (None, 1)


def test_replayable_responses() -> None:
    assert replayable(_simple_response()) == ("SELECT 2", 2)
    assert replayable(enc(BindComplete()) + _simple_response()) == ("SELECT 2", 2)
    assert replayable(enc(ParseComplete(), BindComplete()) + _simple_response()) == (
        "SELECT 2",
        2,
    )


@pytest.mark.parametrize(
    "response",
    [
        _simple_response(status="T"),  # a transaction left open
        error_response("ERROR", "42P01", "nope") + enc(ReadyForQuery("I")),
        enc(NoticeResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hi")))) + _simple_response(),
        enc(DataRow((b"1",)), PortalSuspended(), CommandComplete("SELECT 1"), ReadyForQuery("I")),
        enc(CommandComplete("INSERT 0 1"), ReadyForQuery("I")),
        _simple_response() + enc(ReadyForQuery("I")),  # a second batch
        _simple_response()[:-1],  # incomplete
    ],
)
def test_unreplayable_responses(response: bytes) -> None:
    assert replayable(response) is None


# ------------------------------------------------------------------------- memory backend


def _entry(tables: tuple[str, ...], size: int = 100, now: float = 0.0) -> Entry:
    return Entry(b"x" * size, tables, now, "SELECT 1", 1)


def test_generations_refuse_a_store_that_raced_a_write() -> None:
    b = MemoryBackend(1 << 20)
    ticket = b.ticket(("a",))
    b.invalidate(("a",))  # a write completed while the miss ran
    assert not b.put(b"k", _entry(("a",)), ticket)
    assert b.get(b"k", 0.0, 60) is None
    ticket = b.ticket(("a",))
    assert b.put(b"k", _entry(("a",)), ticket)
    assert b.get(b"k", 1.0, 60) is not None


def test_invalidation_by_table_and_globally() -> None:
    b = MemoryBackend(1 << 20)
    b.put(b"k1", _entry(("a",)), b.ticket(("a",)))
    b.put(b"k2", _entry(("b",)), b.ticket(("b",)))
    b.put(b"k3", _entry(("a", "b")), b.ticket(("a", "b")))
    assert b.invalidate(("a",)) == 2
    assert b.get(b"k1", 0, 60) is None and b.get(b"k3", 0, 60) is None
    assert b.get(b"k2", 0, 60) is not None
    b.invalidate(None)
    assert not b.entries and b.bytes == 0 and not b.by_table
    # a ticket taken before a global invalidation is stale too
    ticket = b.ticket(("c",))
    b.invalidate(None)
    assert not b.put(b"k4", _entry(("c",)), ticket)


def test_lru_bound_in_bytes_and_ttl() -> None:
    b = MemoryBackend(1000)
    for i in range(10):
        key = f"k{i}".encode()
        assert b.put(key, _entry(("a",), size=200), b.ticket(("a",)))
    assert b.bytes <= 1000 and len(b.entries) == 4
    assert b.evicted["lru"] == 6
    assert b.get(b"k0", 0, 60) is None and b.get(b"k9", 0, 60) is not None
    assert b.get(b"k9", 61.0, 60) is None  # older than the TTL
    assert b.evicted["ttl"] == 1
    assert not b.put(b"big", _entry(("a",), size=5000), b.ticket(("a",)))
