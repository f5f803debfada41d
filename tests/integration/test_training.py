"""The cost model's pipeline on real logged traffic: dataset, training, gate, registry, CLI.

One pgsage service (proxy + query log) logs a varied workload over tables of very different
sizes; every test reads that log directly from PostgreSQL, as `pgsage train` does.
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

from bench.costload import create_tables, run_traffic
from models.cli import models_app, train_app
from models.cost import CostModel
from models.dataset import Explainer, build_dataset
from models.registry import Registry
from models.train import COST, TrainConfig, load_active_cost_model, train_cost
from optimizer.parse import parse_statement
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER
from tests.fix_service import RunningService

STATEMENTS = 1500
SCALE = 0.25


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _connect(database: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)


@pytest.fixture(scope="module")
def logged() -> Iterator[RunningService]:
    """A service whose query log holds STATEMENTS executions of ~30 templates."""
    svc = RunningService(log_parameters=True)
    try:

        async def traffic() -> None:
            conn = await asyncpg.connect(
                host=svc.host, port=svc.port, user=PG_USER, database=svc.database
            )
            try:
                await create_tables(conn, SCALE)
                await run_traffic(conn, STATEMENTS, seed=7, scale=SCALE)
            finally:
                await conn.close()

        _run(traffic())
        svc.flush()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def dataset(logged: RunningService) -> Any:
    async def build() -> Any:
        conn = await _connect(logged.database)
        try:
            return await build_dataset(conn)
        finally:
            await conn.close()

    return _run(build())


def test_dataset_has_every_logged_execution_with_plan_and_catalog_features(logged, dataset):
    frame = dataset.frame
    # the workload's statements plus the setup INSERTs; nothing else is modelled
    assert STATEMENTS <= len(frame) <= STATEMENTS + 10
    assert frame["started_at"].is_monotonic_increasing
    assert set(frame["command"]) == {"SELECT", "INSERT", "UPDATE", "DELETE"}
    assert frame["fingerprint"].nunique() >= 25
    selects = frame[frame["command"] == "SELECT"]
    assert selects["plan_total_cost"].notna().all()
    assert (selects["cat_rows_max"] > 0).all()
    big = frame[frame["normalized_text"].str.contains("FROM cm_large WHERE id = ")]
    assert big["cat_rows_max"].iloc[0] == pytest.approx(200_000 * SCALE, rel=0.05)
    assert (big["cat_filtered_leading_indexed"] == 1.0).all()
    assert (big["node_index_scan"] + big["node_index_only_scan"] >= 1).all()
    # a wide range and a narrow range of one template get different plans (literal classes)
    ranges = frame[
        frame["normalized_text"].str.startswith("SELECT count(*), avg(val) FROM cm_large")
    ]
    assert ranges["literal_class"].nunique() > 3
    assert ranges["plan_rows_sum"].max() > 20 * ranges["plan_rows_sum"].min()

    async def stored() -> int:
        conn = await _connect(logged.database)
        try:
            return await conn.fetchval(
                "SELECT count(*) FROM ml.feature_store WHERE feature_set = 'cost_v1'"
            )
        finally:
            await conn.close()

    assert _run(stored()) == frame.groupby(["fingerprint", "literal_class"]).ngroups


def test_history_features_use_only_executions_finished_before_the_start(dataset):
    frame = dataset.frame
    for _fp, rows in list(frame.groupby("fingerprint"))[:8]:
        for _, row in rows.iloc[:: max(len(rows) // 5, 1)].iterrows():
            past = rows[rows["finished_at"] < row["started_at"]]
            assert row["hist_count"] == len(past)
            if len(past) == 0:
                assert np.isnan(row["hist_median_ms"])
            else:
                last50 = past.sort_values("finished_at")["duration_ms"].iloc[-50:]
                assert row["hist_median_ms"] == pytest.approx(last50.median())
                assert row["hist_last_ms"] == pytest.approx(last50.iloc[-1])
    first = frame.groupby("fingerprint").head(1)
    assert (first["hist_count"] == 0).all()


def test_explainer_never_runs_dml_and_plans_generic_templates(logged):
    async def check() -> tuple[Any, Any, Any, int]:
        conn = await _connect(logged.database)
        try:
            explainer = Explainer(conn, statement_timeout_ms=2_000)
            before = await conn.fetchval("SELECT count(*) FROM cm_small")
            sql = "DELETE FROM cm_small WHERE id > 0"
            plan = await explainer.plan("fp-del", sql, sql, parse_statement(sql))
            after = await conn.fetchval("SELECT count(*) FROM cm_small")
            # only the normalised text: PostgreSQL's generic plan
            norm = "SELECT * FROM cm_medium WHERE grp = $1 AND id < $2"
            generic = await explainer.plan("fp-gen", norm, norm, parse_statement(norm))
            prepared = await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgsage%'"
            )
            return plan, generic, (before, after), prepared
        finally:
            await conn.close()

    plan, generic, (before, after), prepared = _run(check())
    assert before == after > 0
    assert json.loads(plan)[0]["Plan"]["Node Type"] == "ModifyTable"
    assert json.loads(generic)[0]["Plan"]["Total Cost"] > 0
    assert prepared == 0


@pytest.fixture(scope="module")
def trained(logged: RunningService, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("models")

    async def train() -> Any:
        conn = await _connect(logged.database)
        try:
            return await train_cost(conn, None, Registry(conn, root), TrainConfig(n_iter=4))
        finally:
            await conn.close()

    return _run(train()), root


def test_first_training_beats_the_baselines_and_becomes_active(trained):
    result, root = trained
    assert result.status == "active", result.reason
    m = result.card["metrics"]
    base = m["baselines"]
    assert set(base) == {
        "fingerprint_median",
        "explain_cost_per_fingerprint",
        "explain_cost_global",
    }
    summary = {n: (round(v["r2_log"], 3), round(v["qerror_p90"], 2)) for n, v in base.items()}
    print("cost model", round(m["r2_log"], 3), round(m["qerror_p90"], 2), summary)
    assert m["r2_log"] > 0.5, summary
    assert m["qerror_p90"] < base["explain_cost_global"]["qerror_p90"], summary
    assert m["qerror_p90"] < base["fingerprint_median"]["qerror_p90"], summary
    held = result.card["held_out_templates"]
    assert held["rows"] > 0 and held["fingerprints"]
    assert held["qerror_p90"] < held["baselines"]["fingerprint_median"]["qerror_p90"]
    art = root / COST / "v1"
    assert {p.name for p in art.iterdir()} == {"model.txt", "card.json", "card.md"}
    card = json.loads((art / "card.json").read_text())
    assert card["features"] == result.card["features"]
    assert card["data_window"]["rows"] == result.entry.row_count
    assert "## Held-out templates" in (art / "card.md").read_text()


def test_gate_registry_rollback_and_failed_runs(logged, trained):
    first, root = trained

    async def scenario() -> dict[str, Any]:
        conn = await _connect(logged.database)
        reg = Registry(conn, root)
        try:
            # a candidate that must be twice as good as the active version cannot be
            strict = TrainConfig(n_iter=1, min_improvement=0.5)
            second = await train_cost(conn, None, reg, strict)
            active_after_second = (await reg.active(COST)).version
            # no rows in the window: failed, and the active version keeps serving
            empty = TrainConfig(since=datetime.now(UTC) + timedelta(days=365))
            failed = await train_cost(conn, None, reg, empty)
            active_after_failure = (await reg.active(COST)).version
            await reg.activate(COST, second.version)
            rolled = await reg.rollback(COST)
            loaded = await load_active_cost_model(reg)
            rows = {e.version: e for e in await reg.list(COST)}
            return locals()
        finally:
            await conn.close()

    s = _run(scenario())
    assert s["second"].status == "candidate"
    assert "does not beat active v1" in s["second"].reason
    assert s["active_after_second"] == 1
    assert s["failed"].status == "failed"
    assert "fewer than" in s["failed"].reason
    assert s["active_after_failure"] == 1
    assert s["rolled"].version == 1 and s["rolled"].is_active
    rows = s["rows"]
    assert rows[3].status == "failed" and rows[3].artifact_path is None
    assert sum(e.is_active for e in rows.values()) == 1
    model, entry = s["loaded"]
    assert isinstance(model, CostModel) and entry.version == 1
    assert model.feature_names_ == first.card["features"]


def test_cli_show_json_prints_the_active_card(logged, trained):
    _, root = trained
    dsn = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{logged.database}"
    runner = CliRunner()
    out = runner.invoke(
        models_app, ["show", COST, "--json", "--dsn", dsn, "--model-dir", str(root)]
    )
    assert out.exit_code == 0, out.output
    card = json.loads(out.stdout)
    assert card["is_active"] and card["name"] == COST
    keys = {"r2_log", "mae_share", "qerror_p50", "qerror_p90", "qerror_p99"}
    assert keys <= set(card["metrics"])
    for name, metrics in card["metrics"]["baselines"].items():
        assert keys <= set(metrics), name
    listed = runner.invoke(models_app, ["list", "--json", "--dsn", dsn, "--model-dir", str(root)])
    assert listed.exit_code == 0, listed.output
    assert [r["is_active"] for r in json.loads(listed.stdout)].count(True) == 1
    bad = runner.invoke(train_app, ["nope", "--dsn", dsn, "--model-dir", str(root)])
    assert bad.exit_code == 2
    assert Path(root).is_dir()
