"""The serving cache is keyed by fingerprint *and* literal class: one template's 1-day and
90-day date ranges get their own EXPLAIN and their own prediction (issue 6, serving)."""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import numpy as np
import pandas as pd

from models.cost import CostModel
from models.serve import CostServer
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER

TEMPLATE = "SELECT count(*), sum(v) FROM events WHERE day BETWEEN {lo} AND {hi}"
NORMALIZED = "SELECT count(*), sum(v) FROM events WHERE day BETWEEN $1 AND $2"


def _model() -> CostModel:
    """A real model: latency grows with the rows the plan estimates to scan (1 ms per 1000)."""
    rng = np.random.default_rng(0)
    rows = np.exp(rng.uniform(0, 12, 600))
    X = pd.DataFrame({"plan_scan_rows_max": rows, "hist_count": 0.0})
    return CostModel(n_estimators=60, min_child_samples=5, cold_start=False).fit(X, rows / 1e3)


def _range(lo: str, days: int) -> str:
    return TEMPLATE.format(lo=f"date '{lo}'", hi=f"date '{lo}' + {days}")


def test_one_fingerprint_gets_a_prediction_per_literal_class(fresh_db: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=fresh_db)
        try:
            await conn.execute(
                "CREATE TABLE events (day date NOT NULL, v int NOT NULL);"
                " INSERT INTO events SELECT date '2024-01-01' + (g % 365), g"
                " FROM generate_series(1, 200000) g;"
                " CREATE INDEX ON events (day); ANALYZE events"
            )
            server = CostServer()
            server.model, server.version = _model(), "test:v1"
            one_day, ninety = _range("2024-03-01", 1), _range("2024-03-01", 90)
            other_day = _range("2024-07-15", 1)  # other literals, the same class as one_day
            assert server.key("fp", one_day, NORMALIZED) == server.key("fp", other_day, NORMALIZED)
            assert server.key("fp", one_day, NORMALIZED) != server.key("fp", ninety, NORMALIZED)
            for sql in (one_day, ninety):  # misses: queued, nothing known yet
                assert server.predicted("fp", "SELECT", sql, NORMALIZED) is None
            assert await server.fill(conn, {}, datetime(2024, 1, 1)) == 2
            narrow = server.predicted("fp", "SELECT", one_day, NORMALIZED)
            wide = server.predicted("fp", "SELECT", ninety, NORMALIZED)
            assert narrow is not None and wide is not None
            assert wide > 10 * narrow  # 90 days estimate ~90x the rows of one day
            assert server.predicted("fp", "SELECT", other_day, NORMALIZED) == narrow
            assert server.hits == 3 and server.misses == 2
            # a third class of the known fingerprint: the latest prediction stands in until filled
            year = _range("2024-01-01", 360)
            assert server.predicted("fp", "SELECT", year, NORMALIZED) is not None
            assert await server.fill(conn, {}, datetime(2024, 1, 1)) == 1
            assert server.predicted("fp", "SELECT", year, NORMALIZED) > wide
        finally:
            await conn.close()

    asyncio.run(run())
