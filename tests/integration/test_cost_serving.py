"""The cost model in the proxy: predictions attached to logged executions, accuracy online."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import psycopg
import pytest

from bench.costload import create_tables, run_traffic
from models.dataset import FEATURES
from models.registry import Registry
from models.serve import CostServer
from models.train import TrainConfig, train_cost
from tests.fix_proxy import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    create_database,
    direct_dsn,
    drop_database,
)

SCALE = 0.1


def test_predictions_are_attached_once_a_model_is_active(
    make_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PGSAGE_MODEL_DIR", str(tmp_path / "models"))
    svc = make_service(cost_refresh_interval=0.3, log_parameters=True)

    async def traffic(n: int, seed: int, setup: bool) -> None:
        conn = await asyncpg.connect(host=svc.host, port=svc.port, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            if setup:
                await create_tables(conn, SCALE)
            await run_traffic(conn, n, seed=seed, scale=SCALE)
        finally:
            await conn.close()

    async def train() -> tuple[str, list[str]]:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            result = await train_cost(
                conn, None, Registry(conn, tmp_path / "models"), TrainConfig(n_iter=2)
            )
            return result.status, result.card.get("features", [])
        finally:
            await conn.close()

    asyncio.run(traffic(800, seed=1, setup=True))
    svc.flush()
    status, features = asyncio.run(train())
    assert status == "active"
    # the model uses only features serving computes (no per-execution load)
    assert features == list(FEATURES) and "load_slowdown" not in features

    # the worker picks the active version up and fills its cache for what it sees
    deadline = time.monotonic() + 60
    predicted = 0
    while time.monotonic() < deadline and predicted < 20:
        asyncio.run(traffic(100, seed=2, setup=False))
        svc.flush()
        with psycopg.connect(direct_dsn(svc.database)) as conn:
            predicted = conn.execute(
                "select count(*) from metadata.query_logs"
                " where predicted_cost_ms > 0 and model_version = 'cost:v1'"
            ).fetchone()[0]
    assert predicted >= 20, "no logged execution got a prediction from the active model"
    with psycopg.connect(direct_dsn(svc.database)) as conn:
        unmodelled = conn.execute(
            "select count(*) from metadata.query_logs where predicted_cost_ms is not null"
            " and command not in ('SELECT', 'INSERT', 'UPDATE', 'DELETE')"
        ).fetchone()[0]
    assert unmodelled == 0
    metrics = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
    # negative buckets: Prometheus histograms then carry no _sum/_count; +Inf is the count
    count = [ln for ln in metrics.splitlines()
             if ln.startswith('pgsage_cost_prediction_log_ratio_bucket{le="+Inf"}')]  # fmt: skip
    assert count and float(count[0].split()[-1]) >= 20
    qerror = [ln for ln in metrics.splitlines() if ln.startswith("pgsage_cost_prediction_qerror ")]
    assert qerror and 1.0 <= float(qerror[0].split()[-1]) < 50

    # a client of the proxy may use another database of the server: its statements are planned
    # there (in the warehouse database their table does not exist, EXPLAIN fails)
    other = create_database("pgsage_cost_other")
    try:

        async def elsewhere(n: int, setup: bool) -> None:
            conn = await asyncpg.connect(host=svc.host, port=svc.port, user=PG_USER,
                                         database=other)  # fmt: skip
            try:
                if setup:
                    await conn.execute(
                        "CREATE TABLE other_items (id int PRIMARY KEY, v int NOT NULL);"
                        "INSERT INTO other_items SELECT g, g % 97 FROM generate_series(1, 20000) g;"
                        "ANALYZE other_items"
                    )
                for i in range(n):
                    await conn.fetch(f"SELECT v FROM other_items WHERE id = {1 + i * 37 % 20000}")
                    await conn.fetchval(f"SELECT count(*) FROM other_items WHERE v < {i % 97}")
            finally:
                await conn.close()

        asyncio.run(elsewhere(0, setup=True))
        deadline = time.monotonic() + 60
        there = 0
        while time.monotonic() < deadline and there < 20:
            asyncio.run(elsewhere(50, setup=False))
            svc.flush()
            with psycopg.connect(direct_dsn(svc.database)) as conn:
                there = conn.execute(
                    "select count(*) from metadata.query_logs where predicted_cost_ms > 0"
                    " and database_name = %s and normalized_text like %s",
                    (other, "%other_items%"),
                ).fetchone()[0]
        assert there >= 20, "statements of another database got no prediction"

        # and planned there: EXPLAIN in the warehouse database cannot plan them at all
        async def planned(other_db: bool) -> float:
            home = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                         database=svc.database)  # fmt: skip
            opened: list[asyncpg.Connection] = []

            async def conn_for(database: str) -> asyncpg.Connection:
                opened.append(await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                                    database=database))  # fmt: skip
                return opened[-1]

            try:
                server = CostServer()
                assert await server.refresh_model(home, str(tmp_path / "models"))
                sql, normalized = (
                    "SELECT v FROM other_items WHERE id < 10",
                    "SELECT v FROM other_items WHERE id < $1",
                )
                assert server.predicted("fp-other", "SELECT", sql, normalized, other) is None
                filled = await server.fill(
                    home, {}, datetime.now(UTC), conn_for=conn_for if other_db else None
                )
                assert filled == 1
                assert server.predicted("fp-other", "SELECT", sql, normalized, other) is not None
                ((_conn, static),) = server._statics.values()
                (features,) = static.computed.values()
                return features["plan_total_cost"]
            finally:
                await home.close()
                for conn in opened:
                    await conn.close()

        assert math.isfinite(asyncio.run(planned(other_db=True)))
        assert math.isnan(asyncio.run(planned(other_db=False)))
    finally:
        drop_database(other)
