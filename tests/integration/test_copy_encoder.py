"""The query log's own binary COPY encoder (proxy/telemetry/logrows.py) against asyncpg's.

The same rows are written to metadata.query_logs once by `CopyEncoder` + `copy_to_table` and
once by asyncpg's `copy_records_to_table` (its generic codecs, what the log used before); the
two tables must read back identical, value for value, including NULLs, unicode, empty and
multi-element arrays, extreme integers and sub-microsecond times.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.telemetry.logrows import (
    COLUMNS,
    KINDS,
    MEMO_MAX,
    NULL_DEFAULT,
    SEGMENT_MEMO_MAX,
    SMALL_INT,
    TIMESTAMPTZ,
    CopyEncoder,
    EncodeError,
)  # fmt: skip
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database
from warehouse_sql import apply_migrations

EPOCH = datetime(2026, 11, 27, 12, 0, tzinfo=UTC).timestamp()


def _row(**values: Any) -> tuple[Any, ...]:
    base: dict[str, Any] = dict.fromkeys(COLUMNS)
    base.update(
        started_at=EPOCH,
        finished_at=EPOCH + 0.0005,
        duration_ms=0.5,
        fingerprint="00ab12cd34ef5678",
        normalized_text="SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        command="SELECT",
        is_catalog=False,
        parsed=True,
        tables_used=("pgbench_accounts",),
        protocol="simple",
        status="ok",
        portal_suspensions=0,
        cache_hit=False,
    )
    base.update(values)
    return tuple(base[c] for c in COLUMNS)


ROWS = [
    _row(),
    _row(
        query_text="SELECT 'héllo wörld ✓', E'\\t\\n'",
        tables_used=(),
        database_name="bench",
        user_name="postgres",
        application_name="pgbench",
        app_class="other",
        client_addr="127.0.0.1",
        statement_name="P0_1",
        rows_returned=2**62,
        bytes_sent=0,
        session_id=-(2**63),
        transaction_status="I",
        portal_suspensions=2**31 - 1,
        proxy_instance="pgsage-1",
        label="drift:3",
        predicted_cost_ms=1e-300,
        model_version="cost:v3",
        cache_hit=True,
        hint_set="no_hashjoin",
        rewrite_rule="holdout:or_to_union",
    ),
    _row(
        status="error",
        sqlstate="42P01",
        error_message='relation "x" does not exist',
        tables_used=("public.a", "s.b", "ünï.c"),
        is_catalog=True,
        parsed=False,
        rows_returned=None,
        duration_ms=math.inf,
        started_at=EPOCH + 0.0000004,  # rounds to the microsecond below
        finished_at=EPOCH + 0.0000006,  # and above
        portal_suspensions=-7,
    ),
    _row(started_at=0.0, finished_at=-1.5, duration_ms=-0.0, bytes_sent=123456789012),
]


async def _both(db: str, rows: list[tuple[Any, ...]]) -> tuple[list[Any], list[Any]]:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
    try:
        await apply_migrations(conn)
        await conn.execute("TRUNCATE metadata.query_logs")
        payload = CopyEncoder(COLUMNS).encode(rows)
        await conn.copy_to_table(
            "query_logs", schema_name="metadata", columns=COLUMNS, source=memoryview(payload),
            format="binary",
        )  # fmt: skip
        ours = await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM metadata.query_logs"
                                " ORDER BY query_id")  # fmt: skip
        await conn.execute("TRUNCATE metadata.query_logs")
        as_asyncpg = [
            tuple(
                datetime.fromtimestamp(v, UTC) if v is not None and KINDS[c] == TIMESTAMPTZ else v
                for c, v in zip(COLUMNS, r, strict=True)
            )
            for r in rows
        ]
        await conn.copy_records_to_table(
            "query_logs", schema_name="metadata", columns=COLUMNS, records=as_asyncpg
        )
        theirs = await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM metadata.query_logs"
                                  " ORDER BY query_id")  # fmt: skip
        return [tuple(r) for r in ours], [tuple(r) for r in theirs]
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def db():
    name = create_database("pgsage_copy_encoder")
    yield name
    drop_database(name)


def test_rows_read_back_as_asyncpg_wrote_them(db: str) -> None:
    ours, theirs = asyncio.run(_both(db, ROWS))
    assert len(ours) == len(ROWS)
    assert ours == theirs
    assert ours[1][COLUMNS.index("query_text")] == "SELECT 'héllo wörld ✓', E'\\t\\n'"
    assert ours[2][COLUMNS.index("tables_used")] == ["public.a", "s.b", "ünï.c"]
    assert ours[1][COLUMNS.index("tables_used")] == []


#: text PostgreSQL stores (no NUL) and asyncpg encodes (no lone surrogates)
_chars = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
_texts = st.one_of(st.none(), st.text(_chars, max_size=40))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "started_at": st.floats(-2e9, 4e9),
                "duration_ms": st.floats(allow_nan=False),
                "query_text": _texts,
                "normalized_text": _texts,
                "tables_used": st.lists(st.text(_chars, max_size=10), max_size=3).map(tuple),
                "rows_returned": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
                "portal_suspensions": st.integers(-(2**31), 2**31 - 1),
                "cache_hit": st.booleans(),
            }
        ),
        min_size=1,
        max_size=8,
    )
)
def test_random_rows_read_back_as_asyncpg_wrote_them(db: str, values: list[dict[str, Any]]) -> None:
    rows = [_row(finished_at=v["started_at"] + 1.0, **v) for v in values]
    ours, theirs = asyncio.run(_both(db, rows))
    assert ours == theirs


def test_undecodable_bytes_are_stored_replaced_not_lost(db: str) -> None:
    """The relay decodes statement text with surrogateescape (a LATIN1 client's bytes): such a
    row is written with "?" in their place; asyncpg's encoder failed the whole batch."""
    text = b"SELECT 'caf\xe9'".decode("utf-8", "surrogateescape")
    rows = [_row(query_text=text, normalized_text="SELECT $1"), _row()]

    async def write() -> list[Any]:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
        try:
            await apply_migrations(conn)
            await conn.execute("TRUNCATE metadata.query_logs")
            payload = memoryview(CopyEncoder(COLUMNS).encode(rows))
            await conn.copy_to_table("query_logs", schema_name="metadata", columns=COLUMNS,
                                     source=payload, format="binary")  # fmt: skip
            return await conn.fetch("SELECT query_text FROM metadata.query_logs ORDER BY query_id")
        finally:
            await conn.close()

    assert [r[0] for r in asyncio.run(write())] == ["SELECT 'caf?'", None]


def test_a_value_of_the_wrong_type_names_its_column() -> None:
    enc = CopyEncoder(COLUMNS)
    with pytest.raises(EncodeError, match="rows_returned: expected an integer"):
        enc.encode([_row(rows_returned="12")])
    with pytest.raises(EncodeError, match=r"portal_suspensions: .* out of range for integer"):
        enc.encode([_row(portal_suspensions=2**31)])
    with pytest.raises(EncodeError, match="a row has 3 values for 32 columns"):
        enc.encode([(1, 2, 3)])


def test_the_side_by_side_bench_writes_the_same_tables_every_way() -> None:
    from bench import logrows as bench_logrows

    doc = bench_logrows.main(["--statements", "3000", "--rounds", "1", "--no-save"])
    assert doc["same_rows"]
    assert set(doc["us_cpu_per_statement"]) == {
        "build source", "build compiled", "write asyncpg", "write source", "write compiled",
        "server asyncpg", "server source", "server compiled",
    }  # fmt: skip
    cpu = doc["us_cpu_per_statement"]
    assert all(cpu[k] > 0 for k in cpu if not k.startswith("server"))
    # the server backend's CPU comes in 10 ms ticks: 3,000 rows may read none
    assert all(cpu[k] >= 0 for k in cpu if k.startswith("server"))


def test_the_memos_stay_bounded() -> None:
    enc = CopyEncoder(COLUMNS)
    rows = [_row(session_id=i, bytes_sent=i % 5000, portal_suspensions=i % 5000)
            for i in range(MEMO_MAX + 10)]  # fmt: skip
    enc.encode(rows)
    # runs of columns that repeat together are memoised as one: here, once each
    assert enc._segments and all(len(memo) == 1 for memo in enc._segments.values())
    assert len(enc._int8) <= MEMO_MAX and len(enc._int4) <= MEMO_MAX
    assert all(abs(k) < SMALL_INT for k in enc._int8)  # session ids past it are not kept
    long = "SELECT " + "x, " * 400 + "1"
    enc.encode([_row(normalized_text=long)])
    assert long not in enc._text and "SELECT" in enc._text  # (the command is kept)
    # ... boundedly, and not when long
    enc.encode([_row(user_name=f"u{i}") for i in range(SEGMENT_MEMO_MAX + 10)])
    assert all(len(memo) <= SEGMENT_MEMO_MAX for memo in enc._segments.values())
    assert not any(long in key for memo in enc._segments.values() for key in memo)


def test_a_batch_that_cannot_be_encoded_is_dropped_and_the_connection_kept(db: str) -> None:
    from proxy.settings import Settings
    from proxy.telemetry.logworker import DeltaMetrics
    from proxy.telemetry.querylog import QueryLogRecorder

    async def run() -> tuple[int, int, bool, int]:
        async def connect() -> Any:
            return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)

        rec = QueryLogRecorder(Settings(), DeltaMetrics(), connect)  # type: ignore[arg-type]
        try:
            conn = await connect()
            await apply_migrations(conn)
            await conn.execute("TRUNCATE metadata.query_logs")
            await rec.write([_row(), _row(rows_returned="three")])
            first = rec._conn
            await rec.write([_row(), _row()])
            kept = rec._conn is first and first is not None and not first.is_closed()
            n = await conn.fetchval("SELECT count(*) FROM metadata.query_logs")
            await conn.close()
            return rec.dropped["encode_error"], rec.written, kept, n
        finally:
            await rec.stop()

    dropped, written, kept, n = asyncio.run(run())
    assert (dropped, written, kept, n) == (2, 2, True, 2)


def test_columns_null_in_every_row_are_left_out_and_read_back_null(db: str) -> None:
    batch = [ROWS[0], ROWS[2]]

    async def run() -> tuple[tuple[str, ...], list[Any], list[Any]]:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
        try:
            await apply_migrations(conn)
            # which columns the schema lets a COPY leave out: nullable, no default
            omittable = {
                r[0]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                    " 'metadata' AND table_name = 'query_logs' AND is_nullable = 'YES'"
                    " AND column_default IS NULL"
                )
            }
            assert omittable == NULL_DEFAULT
            await conn.execute("TRUNCATE metadata.query_logs")
            columns, payload = CopyEncoder(COLUMNS).encode_present(batch)
            await conn.copy_to_table("query_logs", schema_name="metadata", columns=columns,
                                     source=memoryview(payload), format="binary")  # fmt: skip
            got = await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM metadata.query_logs"
                                   " ORDER BY query_id")  # fmt: skip
            return columns, [tuple(r) for r in got], (await _both(db, batch))[0]
        finally:
            await conn.close()

    columns, present, every = asyncio.run(run())
    assert present == every  # the same table as writing every column
    # NULL in both rows: left out; set in either: written
    written_anyway = {"normalized_text", "tables_used", "sqlstate", "error_message"}
    assert set(COLUMNS) - set(columns) == NULL_DEFAULT - written_anyway


def test_row_times_are_whole_microseconds_every_reader_agrees_on(db: str) -> None:
    """An anomaly's window is written with to_timestamp(ts) and must hold the execution's
    started_at from the COPY: the rows' times are rounded to the microsecond once, in `build`,
    so PostgreSQL's rounding and datetime's cannot disagree by one."""
    import random

    from proxy.telemetry.logrows import to_micro

    rng = random.Random(5)
    raw = [1.7642e9 + rng.random() * 1e6 for _ in range(3000)]
    times = [to_micro(t) for t in raw]
    assert all(abs(t - r) <= 5e-7 for t, r in zip(times, raw, strict=True))
    assert all(datetime.fromtimestamp(t, UTC).timestamp() == t for t in times)
    # and `build` gives the rows such times
    from types import SimpleNamespace

    from optimizer.fingerprint import Fingerprinter
    from proxy.telemetry.logrows import build

    info = SimpleNamespace(database="d", user="u", application_name="a", app="other",
                           client_addr="127.0.0.1")  # fmt: skip
    starts = [10.0 + rng.random() for _ in range(200)]
    records = [(1, "simple", "SELECT 1", None, m, m + 0.0001234567, 1, "ok", None, None, 0, 9,
                False, None, None, False) for m in starts]  # fmt: skip
    built = build({1: info}, records, Fingerprinter().fingerprint, lambda m: m,
                  (0.0, 1.7642e9 + 0.123456789, 1.0), None, None, None).rows  # fmt: skip
    for row in built:
        for t in row[:2]:
            assert datetime.fromtimestamp(t, UTC).timestamp() == t

    async def run() -> list[Any]:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
        try:
            await apply_migrations(conn)
            await conn.execute("TRUNCATE metadata.query_logs")
            rows = [_row(started_at=t, finished_at=t) for t in times]
            columns, payload = CopyEncoder(COLUMNS).encode_present(rows)
            await conn.copy_to_table("query_logs", schema_name="metadata", columns=columns,
                                     source=memoryview(payload), format="binary")  # fmt: skip
            return await conn.fetch(
                "SELECT count(*) FILTER (WHERE q.started_at = to_timestamp(t.ts)),"
                " count(*) FILTER (WHERE q.started_at <> to_timestamp(t.ts))"
                " FROM metadata.query_logs q JOIN unnest($1::float8[]) WITH ORDINALITY"
                " AS t(ts, n) ON q.query_id = (SELECT min(query_id) FROM metadata.query_logs)"
                " + t.n - 1",
                times,
            )
        finally:
            await conn.close()

    same, different = asyncio.run(run())[0]
    assert (same, different) == (len(times), 0)


def test_the_detectors_executions_are_made_of_the_right_columns() -> None:
    """logrows.executions reads query_logs rows by fixed positions: each must be its column's,
    and the Execution's fields come out in order, sorted by start."""
    from models.anomaly import Execution
    from proxy.telemetry import logrows

    names = {"EX_TS": "started_at", "EX_MS": "duration_ms", "EX_FP": "fingerprint",
             "EX_CMD": "command",
             "EX_CAT": "is_catalog", "EX_APP": "application_name", "EX_ROWS": "rows_returned",
             "EX_STATUS": "status", "EX_BYTES": "bytes_sent", "EX_LABEL": "label",
             "EX_PRED": "predicted_cost_ms"}  # fmt: skip
    for const, column in names.items():
        assert getattr(logrows, const) == logrows.COLUMNS.index(column), const
    rows = []
    for i, status in enumerate(("ok", "error", "ok")):
        row: list[Any] = [None] * len(logrows.COLUMNS)
        values = {"started_at": 100.0 - i, "duration_ms": 1.5 * i, "fingerprint": f"fp{i}",
                  "command": "SELECT", "is_catalog": i == 2, "application_name": "app",
                  "rows_returned": i, "status": status, "bytes_sent": 10 * i,
                  "label": f"l{i}", "predicted_cost_ms": 2.0}  # fmt: skip
        for column, value in values.items():
            row[logrows.COLUMNS.index(column)] = value
        rows.append(tuple(row))
    got = logrows.executions(rows, Execution)
    assert all(type(e) is Execution for e in got)
    assert got == [
        Execution(100.0 - i, f"fp{i}", "SELECT", 1.5 * i, i, i == 1, 10 * i, 2.0, i == 2,
                  f"l{i}", "app", False)
        for i in (2, 1, 0)
    ]  # fmt: skip
