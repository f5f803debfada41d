"""The query log worker shows every successful execution it writes to the cost server, so
serving computes a template's history features (rolling median, p90, last, hourly rate) from
the executions themselves, as training does, not from the proxy's coarser live aggregates."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from proxy.settings import Settings
from proxy.telemetry.logrows import COLUMNS
from proxy.telemetry.logworker import Worker
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database
from warehouse_sql import apply_migrations

NORMALIZED = "SELECT * FROM t WHERE id = $1"


def _row(i: int, at: datetime, ms: float, status: str = "ok") -> tuple[Any, ...]:
    values: dict[str, Any] = dict.fromkeys(COLUMNS)
    values.update(
        started_at=at.timestamp(),  # rows carry epoch seconds (proxy/telemetry/logrows.py)
        finished_at=(at + timedelta(milliseconds=ms)).timestamp(),
        duration_ms=ms,
        fingerprint="fp-t",
        query_text=f"SELECT * FROM t WHERE id = {i}",
        normalized_text=NORMALIZED,
        command="SELECT",
        is_catalog=False,
        parsed=True,
        tables_used=["public.t"],
        protocol="simple",
        status=status,
        sqlstate=None if status == "ok" else "42P01",
        portal_suspensions=0,
        cache_hit=False,
    )
    return tuple(values[c] for c in COLUMNS)


async def _run(db: str) -> tuple[int, dict[str, float] | None, int]:
    args = {"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "database": db}
    conn = await asyncpg.connect(**args)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    worker = Worker(Settings(cost_serving=True, anomaly_enabled=False), args)
    try:
        t0 = datetime.now(UTC) - timedelta(minutes=30)
        rows = [_row(i, t0 + timedelta(seconds=10 * i), 2.0 + i % 3) for i in range(12)]
        rows.append(_row(99, t0 + timedelta(seconds=200), 500.0, status="error"))
        await worker.engine.write(rows)
        server = worker.cost
        key = server.key("fp-t", "SELECT * FROM t WHERE id = 3", NORMALIZED)
        features = server._observed(key, datetime.now(UTC).timestamp(), 1.0)
        conn = await asyncpg.connect(**args)
        try:
            written = await conn.fetchval("SELECT count(*) FROM metadata.query_logs")
        finally:
            await conn.close()
        return server._count.get("fp-t", 0), features, int(written)
    finally:
        if worker._cost_task is not None:
            worker._cost_task.cancel()
        await worker.engine.stop()


def test_written_executions_feed_the_cost_servers_history() -> None:
    db = create_database("pgsage_logworker_cost")
    try:
        observed, features, written = asyncio.run(_run(db))
    finally:
        drop_database(db)
    assert written == 13  # the rows still go to the log, the failed one included
    assert observed == 12  # only successful executions are history
    assert features is not None
    assert features["hist_count"] == 12
    assert features["hist_median_ms"] == 3.0  # durations 2, 3, 4 four times each
    assert features["hist_rate_1h"] == 12
