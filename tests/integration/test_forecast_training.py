"""Clustering and forecasting trained from `metadata.query_logs` of a fresh, migrated database.

A week of logged statements is written straight into the query log (as the proxy's recorder
would, on a simulated clock): three kinds of templates with their own roles, latencies and
hours. The trainers read it back, register versions, store assignments and forecasts; a run on
an empty window fails and leaves the previous versions serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from typer.testing import CliRunner

from models.cli import train_app
from models.clusters import CLUSTERS, assign_unassigned, cluster_profiles, train_clusters
from models.forecast import (
    FORECAST,
    PER_DAY,
    STEPS,
    TOTAL,
    gauge_values,
    latest_forecast,
    publish_forecast,
    train_forecast,
)
from models.registry import Registry
from models.train import TrainConfig
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database
from warehouse_sql import apply_migrations

START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday, on the simulated clock
DAYS = 7
#: role -> (templates, busy hours, latency ms, statements per busy 5-minute window)
KINDS: dict[str, tuple[list[str], range, float, float]] = {
    "app": (
        [
            "SELECT * FROM silver.customers_cleaned WHERE customer_id = $1",
            "SELECT * FROM silver.products_cleaned WHERE product_id = $1",
            "SELECT qty FROM silver.inventory_cleaned WHERE product_id = $1",
            "SELECT * FROM gold.customer_360 WHERE customer_id = $1",
        ],
        range(8, 18),
        1.5,
        6.0,
    ),
    "etl": (
        [
            "INSERT INTO bronze.sales_raw (a, b, c) VALUES ($1, $2, $3)",
            "UPDATE silver.inventory_cleaned SET qty = qty - $1 WHERE product_id = $2",
            "DELETE FROM bronze.sales_raw WHERE batch_id = $1",
        ],
        range(1, 5),
        15.0,
        4.0,
    ),
    "analyst": (
        [
            "SELECT c.region, sum(s.amount) FROM silver.sales_cleaned s JOIN"
            " silver.customers_cleaned c ON c.customer_id = s.customer_id WHERE s.sold_at > $1"
            " GROUP BY c.region ORDER BY 2 DESC",
            "SELECT p.category, count(DISTINCT s.customer_id) FROM silver.sales_cleaned s JOIN"
            " silver.products_cleaned p ON p.product_id = s.product_id GROUP BY p.category"
            " HAVING count(*) > $1",
            "WITH t AS (SELECT customer_id, sum(amount) a FROM silver.sales_cleaned GROUP BY 1)"
            " SELECT c.city, avg(t.a) FROM t JOIN silver.customers_cleaned c USING"
            " (customer_id) GROUP BY c.city ORDER BY 2 DESC LIMIT 10",
        ],
        range(13, 17),
        800.0,
        1.5,
    ),
}
COLUMNS = [
    "started_at", "finished_at", "duration_ms", "fingerprint", "normalized_text", "command",
    "protocol", "status", "application_name", "app_class", "rows_returned", "database_name",
]  # fmt: skip


def logged_rows(seed: int = 0) -> list[tuple[Any, ...]]:
    """Statements of DAYS simulated days: Poisson per 5-minute window, busy hours per kind."""
    rng = np.random.default_rng(seed)
    windows = DAYS * PER_DAY
    hour = (np.arange(windows) % PER_DAY) // 12
    rows = []
    for role, (texts, busy, ms, rate) in KINDS.items():
        mu = np.where(np.isin(hour, list(busy)), rate, rate * 0.05)
        for i, text in enumerate(texts):
            fp = f"{role[:3]}{i:013x}"
            command = text.split()[0].upper() if not text.startswith("WITH") else "SELECT"
            counts = rng.poisson(mu)
            for w in np.flatnonzero(counts):
                for _ in range(int(counts[w])):
                    at = START + timedelta(seconds=float(w) * 300 + float(rng.uniform(0, 300)))
                    d = float(ms * rng.lognormal(0, 0.3))
                    rows.append((at, at + timedelta(milliseconds=d), d, fp, text, command,
                                 "extended", "ok", f"pgsage-workload-{role}", "other", 1,
                                 "warehouse"))  # fmt: skip
    return rows


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _connect(database: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)


@pytest.fixture(scope="module")
def logdb() -> Iterator[tuple[str, int]]:
    name = create_database("pgsage_forecast")

    async def setup() -> int:
        conn = await _connect(name)
        try:
            await apply_migrations(conn)
            rows = logged_rows()
            await conn.copy_records_to_table(
                "query_logs", schema_name="metadata", records=rows, columns=COLUMNS
            )
            return len(rows)
        finally:
            await conn.close()

    try:
        yield name, _run(setup())
    finally:
        drop_database(name)


@pytest.fixture(scope="module")
def trained(logdb: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    database, _ = logdb
    root = tmp_path_factory.mktemp("models")

    async def train() -> dict[str, Any]:
        conn = await _connect(database)
        try:
            reg = Registry(conn, root)
            stages: list[tuple[str, float]] = []
            clusters = await train_clusters(
                conn, None, reg, TrainConfig(), lambda s, f: stages.append((s, f))
            )
            forecast = await train_forecast(
                conn, None, reg, TrainConfig(), lambda s, f: stages.append((s, f))
            )
            rows = await latest_forecast(conn)
            profiles = await cluster_profiles(conn)
            assigned = await conn.fetch(
                "SELECT fingerprint, cluster, source FROM metadata.query_clusters"
                " WHERE model_version = $1",
                clusters.version,
            )
            return {"clusters": clusters, "forecast": forecast, "rows": rows, "stages": stages,
                    "profiles": profiles, "assigned": assigned, "root": root}  # fmt: skip
        finally:
            await conn.close()

    return _run(train())


def test_clusters_register_and_profile_the_planted_roles(logdb, trained):
    _, n_rows = logdb
    result = trained["clusters"]
    assert result.status == "active", result.reason
    m = result.card["metrics"]
    assert m["k"] == 3 and m["silhouette"] > 0.3 and m["davies_bouldin"] is not None
    assert result.entry is not None and result.entry.row_count == n_rows
    assert len(trained["assigned"]) == 10
    groups: dict[int, set[str]] = {}
    for r in trained["assigned"]:
        groups.setdefault(r["cluster"], set()).add(r["fingerprint"][:3])
    assert sorted(len(v) for v in groups.values()) == [1, 1, 1]  # one role per cluster
    profiles = trained["profiles"]
    assert [p["cluster"] for p in profiles] == [0, 1, 2]
    assert {p["dominant_role"] for p in profiles} == {"app", "etl", "analyst"}
    assert sum(p["share_executions"] for p in profiles) == pytest.approx(1.0)
    analyst = next(p for p in profiles if p["dominant_role"] == "analyst")
    assert analyst["share_time"] > 0.8 and analyst["mean_latency_ms"] > 300
    assert "silver.sales_cleaned" in analyst["tables"]
    assert all(p["model_version"] == result.version for p in profiles)
    art = Path(result.entry.artifact_path)
    assert {p.name for p in art.iterdir()} == {"model.json", "card.json", "card.md"}
    assert "## Clusters" in (art / "card.md").read_text()
    assert any(s == "fit" for s, _ in trained["stages"])


def test_forecast_registers_and_stores_forecasts_per_cluster(trained):
    result = trained["forecast"]
    assert result.status == "active", result.reason
    m = result.card["metrics"]
    keys = ("mape_1h", "mape_6h", "mape_1h_seasonal_naive", "peak_hit_rate", "model_total")
    print({k: m[k] for k in keys})
    for key in ("mape_1h", "mape_6h", "mape_1h_seasonal_naive", "peak_hit_rate", "silhouette"):
        assert m[key] is not None and np.isfinite(m[key]), key
    assert m["silhouette"] == trained["clusters"].card["metrics"]["silhouette"]
    assert m["mape_1h"] < 0.25
    assert result.card["clusters_version"] == trained["clusters"].version
    assert set(result.card["series"]) == {TOTAL, "0", "1", "2"}
    rows = trained["rows"]
    assert len(rows) == 4 * STEPS
    assert {r["model_version"] for r in rows} == {result.version}
    total = [r for r in rows if r["cluster"] == TOTAL]
    # the window holding the newest row may still be filling: the forecast starts with it
    assert total[0]["window_start"] == START + timedelta(days=DAYS, minutes=-5)
    assert all(r["lower"] <= r["predicted"] <= r["upper"] for r in rows)
    gauges = gauge_values(rows)
    assert set(gauges) == {(c, h) for c in (TOTAL, "0", "1", "2") for h in ("1h", "6h")}
    # 00:00-01:00 is quiet; 00:00-06:00 includes the ETL hours 01-05
    assert gauges[(TOTAL, "6h")] > 2 * gauges[(TOTAL, "1h")]
    assert any(s == "walk-forward" for s, _ in trained["stages"])


def test_new_templates_assigned_online_and_forecast_republished(logdb, trained):
    database, _ = logdb

    async def scenario() -> dict[str, Any]:
        conn = await _connect(database)
        try:
            at = START + timedelta(days=DAYS, minutes=2)
            text = "SELECT * FROM silver.customers_cleaned WHERE email = $1"
            await conn.execute(
                "INSERT INTO metadata.query_logs (started_at, finished_at, duration_ms,"
                " fingerprint, normalized_text, command, protocol, status, rows_returned)"
                " VALUES ($1, $1, 1.2, 'new0000000000001', $2, 'SELECT', 'extended', 'ok', 1)",
                at,
                text,
            )
            added = await assign_unassigned(conn)
            row = await conn.fetchrow(
                "SELECT cluster, source FROM metadata.query_clusters WHERE fingerprint ="
                " 'new0000000000001'"
            )
            app = await conn.fetchval(
                "SELECT cluster FROM metadata.query_clusters WHERE fingerprint LIKE 'app%' LIMIT 1"
            )
            stored = await publish_forecast(conn, Registry(conn, trained["root"]))
            return {"added": added, "row": row, "app": app, "stored": stored,
                    "rows": await latest_forecast(conn)}  # fmt: skip
        finally:
            await conn.close()

    s = _run(scenario())
    assert s["added"] == 1
    assert s["row"]["source"] == "online" and s["row"]["cluster"] == s["app"]
    assert s["stored"] == 4 * STEPS
    assert len(s["rows"]) == 4 * STEPS
    assert s["rows"][0]["made_at"] > trained["rows"][0]["made_at"]


def test_failed_runs_keep_the_previous_versions_active(logdb, trained):
    database, _ = logdb

    async def scenario() -> dict[str, Any]:
        conn = await _connect(database)
        reg = Registry(conn, trained["root"])
        try:
            empty = TrainConfig(since=START + timedelta(days=400))
            failed_c = await train_clusters(conn, None, reg, empty)
            failed_f = await train_forecast(conn, None, reg, empty)
            return {
                "failed_c": failed_c,
                "failed_f": failed_f,
                "active_c": (await reg.active(CLUSTERS)).version,
                "active_f": (await reg.active(FORECAST)).version,
                "rows": await latest_forecast(conn),
                "profiles": await cluster_profiles(conn),
                "stray": await conn.fetchval(
                    "SELECT count(*) FROM metadata.workload_forecasts WHERE model_version = $1",
                    failed_f.version,
                ),
            }
        finally:
            await conn.close()

    s = _run(scenario())
    assert s["failed_c"].status == "failed" and "fewer than" in s["failed_c"].reason
    assert s["failed_f"].status == "failed"
    assert s["active_c"] == trained["clusters"].version
    assert s["active_f"] == trained["forecast"].version
    assert s["rows"] and {r["model_version"] for r in s["rows"]} == {trained["forecast"].version}
    assert len(s["profiles"]) == 3
    assert s["stray"] == 0
    assert s["failed_f"].entry is not None and s["failed_f"].entry.artifact_path is None


def test_cli_trains_clusters_through_the_trainers_table(logdb, trained):
    database, _ = logdb
    dsn = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"
    out = CliRunner().invoke(
        train_app, ["clusters", "--json", "--dsn", dsn, "--model-dir", str(trained["root"])]
    )
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result[0]["name"] == CLUSTERS and result[0]["status"] == "active"
    assert result[0]["version"] > trained["clusters"].version


def test_service_shows_clusters_and_publishes_the_forecast(logdb, trained, make_service):
    """Inside `pgsage serve`: SHOW CLUSTERS, /api/v1/ml/forecast and /ml/clusters, and the
    pgsage_forecast_queries gauge after a re-forecast with the active model."""
    import json
    import urllib.request

    import psycopg

    database, _ = logdb
    svc = make_service(warehouse_database=database, admin_token="t0ken")
    stored = svc.call(svc.service.optimiser.refresh_forecast())
    assert stored > 0
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        cur = admin.execute("SHOW CLUSTERS")
        names = [d.name for d in cur.description or []]
        shown = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    profiles = svc.call(svc.service.optimiser.clusters())  # the active version's, from the table
    assert profiles and [int(r["cluster"]) for r in shown] == [p["cluster"] for p in profiles]
    assert [int(r["executions"]) for r in shown] == [p["executions"] for p in profiles]
    assert all(r["dominant_role"] for r in shown)

    def get(path: str) -> Any:
        req = urllib.request.Request(
            f"{svc.http_url}/api/v1{path}", headers={"Authorization": "Bearer t0ken"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    total = get("/ml/forecast?cluster=total")["forecast"]
    assert total and all(r["cluster"] == "total" and r["predicted"] >= 0 for r in total)
    assert len(get("/ml/clusters")["clusters"]) == len(shown)
    metrics = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
    assert 'pgsage_forecast_queries{cluster="total",horizon="1h"}' in metrics
