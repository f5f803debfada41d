"""The advisor's workload includes statements cancelled by a timeout (57014): they are the
heaviest of all, and the ones indexes help most (TPC-H Q17 and Q20 without indexes)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from models.advisor import AdvisorConfig, load_workload
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database
from warehouse_sql import apply_migrations


async def _run(db: str, now: datetime) -> dict[str, tuple[int, float, list[str]]]:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=db)
    try:
        await apply_migrations(conn)
        logged = [
            (600000.0, "slow", "SELECT * FROM t WHERE a = 1", "cancelled", "57014"),
            (5.0, "fast", "SELECT * FROM t WHERE b = 2", "ok", None),
            (3.0, "failed", "SELECT * FROM t WHERE c = 3", "error", "42703"),
            (7.0, "old", "SELECT * FROM t WHERE d = 4", "ok", None),  # 30 days back: outside
        ]
        rows = [
            (
                now - timedelta(minutes=i) - timedelta(days=30 if fp == "old" else 0),
                now,
                ms,
                fp,
                text,
                text[:-1] + "$1",
                "SELECT",
                "simple",
                status,
                state,
                ["public.t"],
            )
            for i, (ms, fp, text, status, state) in enumerate(logged)
        ]
        await conn.copy_records_to_table(
            "query_logs", schema_name="metadata", records=rows,
            columns=["started_at", "finished_at", "duration_ms", "fingerprint", "query_text",
                     "normalized_text", "command", "protocol", "status", "sqlstate",
                     "tables_used"],
        )  # fmt: skip
        workload = await load_workload(conn, AdvisorConfig())
        return {k: (f.calls, f.mean_ms, f.samples) for k, f in workload.fingerprints.items()}
    finally:
        await conn.close()


def test_timed_out_statements_are_workload_and_errors_are_not() -> None:
    db = create_database("pgsage_advisor_to")
    try:
        fps = asyncio.run(_run(db, datetime.now(UTC)))
    finally:
        drop_database(db)
    assert set(fps) == {"slow", "fast"}
    assert fps["slow"][1] == 600000.0 and fps["slow"][2] == ["SELECT * FROM t WHERE a = 1"]


def test_the_window_ends_at_the_newest_logged_execution() -> None:
    """Under the workload simulator's clock the log is stamped months from the wall clock:
    the default window (the last 7 days) is counted back from the newest execution."""
    db = create_database("pgsage_advisor_sim")
    try:
        fps = asyncio.run(_run(db, datetime(2026, 1, 31, 13, 0, tzinfo=UTC)))
    finally:
        drop_database(db)
    assert set(fps) == {"slow", "fast"}
