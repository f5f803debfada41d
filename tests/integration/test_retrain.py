"""Retraining inside `pgsage serve`: scheduled, on drift, and a failure that keeps the model."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pytest

from bench.costload import create_tables, run_traffic
from proxy.retrain import Retrainer
from proxy.settings import Settings
from proxy.telemetry.metrics import ProxyMetrics
from tests.fix_proxy import PG_USER, direct_dsn


def test_due_on_schedule_and_on_drift() -> None:
    metrics = ProxyMetrics()
    r = Retrainer(
        Settings(retrain_interval=100, retrain_qerror_threshold=3, retrain_min_gap=10),
        metrics,
        {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "w"},
    )
    t0 = r.last_run
    assert r.due(t0 + 5) is None
    # (past the interval by a margin: t0 + 100 - t0 can round to 99.99999999999909)
    assert r.due(t0 + 100.5) == "schedule"
    metrics.cost_prediction_qerror.set(4.0)
    assert r.due(t0 + 5) is None  # drift, but too soon after the last run
    assert r.due(t0 + 11) == "drift"
    metrics.cost_prediction_qerror.set(1.5)
    assert r.due(t0 + 11) is None
    assert r.dsn == "postgresql://postgres@127.0.0.1:5432/w"


def test_scheduled_runs_fail_without_data_then_activate_with_it(
    make_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PGSAGE_MODEL_DIR", str(tmp_path / "models"))
    svc = make_service(retrain_interval=1.0, retrain_min_gap=1.0, retrain_models=["cost"])
    retrainer = svc.service.retrainer

    def registry() -> list[tuple[int, str, str]]:
        with psycopg.connect(direct_dsn(svc.database)) as conn:
            return conn.execute(
                "select version, status, coalesce(reason, '') from ml.model_registry"
                " where model_name = 'cost' order by version"
            ).fetchall()

    # an empty log: the scheduled run fails, says why, and nothing becomes active
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not registry():
        time.sleep(0.5)
    rows = registry()
    assert rows and rows[0][1] == "failed" and rows[0][2], rows
    # the run is counted once the child's answer is read (just after the row is written)
    line = 'pgsage_model_training_runs_total{model="cost",status="failed",trigger="schedule"}'
    deadline = time.monotonic() + 30
    metrics = ""
    while time.monotonic() < deadline and line not in metrics:
        metrics = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
        time.sleep(0.2)
    assert line in metrics

    # with traffic logged, a run activates a model; the next ones must beat it
    svc.settings.retrain_interval = 0  # no more scheduled runs while we fill the log

    async def traffic() -> None:
        conn = await asyncpg.connect(host=svc.host, port=svc.port, user=PG_USER,
                                     database=svc.database)  # fmt: skip
        try:
            await create_tables(conn, 0.1)
            await run_traffic(conn, 700, seed=3, scale=0.1)
        finally:
            await conn.close()

    asyncio.run(traffic())
    svc.flush()
    result = svc.call(retrainer.run("cost", "schedule"), timeout=120)
    assert result["status"] == "active", result
    assert "active" in {status for _, status, _ in registry()}


def test_a_schedule_retrains_every_configured_model_in_order(
    make_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The schedule reclusters and re-forecasts too (here on an empty log: each run fails,
    says why in the registry, and is counted by model)."""
    monkeypatch.setenv("PGSAGE_MODEL_DIR", str(tmp_path / "models"))
    svc = make_service(retrain_interval=1.0, retrain_min_gap=1.0,
                       retrain_models=["clusters", "forecast"])  # fmt: skip

    def registry() -> list[tuple[str, str, str]]:
        with psycopg.connect(direct_dsn(svc.database)) as conn:
            return conn.execute(
                "select model_name, status, coalesce(reason, '') from ml.model_registry"
                " order by created_at"
            ).fetchall()

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and {r[0] for r in registry()} != {"clusters", "forecast"}:
        time.sleep(0.5)
    rows = registry()
    svc.settings.retrain_interval = 0
    assert [r[0] for r in rows][:2] == ["clusters", "forecast"], rows
    assert all(status == "failed" and reason for _, status, reason in rows), rows
    metrics = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
    assert 'model="clusters",status="failed",trigger="schedule"' in metrics
