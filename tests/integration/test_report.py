"""`pgsage report` on a metadata schema with a logged workload, predictions, optimisation
outcomes, labels and incidents: both files are written, with the plots and the success table."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from typer.testing import CliRunner

from models.registry import Registry
from models.report import build_report
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, create_database, drop_database
from warehouse_sql import apply_migrations


async def _fill(database: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
    try:
        await apply_migrations(conn)
        rng = random.Random(1)
        t0 = datetime(2026, 3, 2, 9, tzinfo=UTC)
        rows = []
        for i in range(600):
            at = t0 + timedelta(seconds=30 * i)
            ms = rng.lognormvariate(2, 1)
            rows.append((at, at + timedelta(milliseconds=ms), ms, f"{i % 7:016x}", "SELECT 1",
                         "SELECT", "simple", "ok", ms * rng.lognormvariate(0, 0.3)))  # fmt: skip
        await conn.copy_records_to_table(
            "query_logs", schema_name="metadata", records=rows,
            columns=["started_at", "finished_at", "duration_ms", "fingerprint",
                     "normalized_text", "command", "protocol", "status", "predicted_cost_ms"],
        )  # fmt: skip
        await conn.executemany(
            "INSERT INTO metadata.optimization_history (kind, target, action, status,"
            " measured_before_ms, measured_after_ms, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
            [("index", "shop.orders", "recommend", "validated", 80.0, 2.0,
              '{"validation": {"p_value": 0.0001}}'),
             ("steering", "abc", "validate", "validated", 70.0, 1.5, '{"p_value": 0.002}'),
             ("steering", "def", "revert", "reverted", 10.0, 11.0, '{"p_value": 0.61}')],
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO metadata.workload_runs (run_id, seed, clock_start, clock_speed,"
            " duration_s, qps, users, planned) VALUES ('r1', 1, $1, 1, 1, 1, '{}', 1)",
            t0,
        )
        await conn.execute(
            "INSERT INTO metadata.workload_labels (label, run_id, kind, window_start, window_end,"
            " affected_templates, expected_executions, description)"
            " VALUES ('rate_burst:1', 'r1', 'rate_burst', $1, $2, '{}', 5, 'x10')",
            t0 + timedelta(hours=1), t0 + timedelta(hours=1, minutes=10),
        )  # fmt: skip
    finally:
        await conn.close()


async def _report(database: str, out: Path, root: Path) -> tuple[Path, Path]:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
    try:
        return await build_report(conn, Registry(conn, root), out)
    finally:
        await conn.close()


def test_report_files_plots_and_success_table(tmp_path: Path) -> None:
    db = create_database("pgsage_report")
    try:
        asyncio.run(_fill(db))
        md, page = asyncio.run(_report(db, tmp_path / "report", tmp_path / "models"))
        text = md.read_text()
        assert "| optimisation success rate | >= 90% | 0.667 | not met |" in text
        assert "| average gain of applied optimisations | > 20% | 0.977 | met |" in text
        assert (
            "| steering | abc | validate | validated | 70 | 1.5 | Mann-Whitney U (one-sided)"
            " | 0.002 |" in text
        )
        assert "| index | shop.orders | recommend | validated | 80 | 2 | Mann-Whitney" in text
        for png in ("cost_scatter", "cost_residuals", "optimisations", "anomalies", "forecast"):
            assert (md.parent / f"{png}.png").stat().st_size > 1000, png
        html = page.read_text()
        assert html.count("data:image/png;base64,") == 5  # self-contained
        assert "no data" in html  # sections without a source say so (no trained models here)
        # the command line writes the same
        from proxy.cli import app

        result = CliRunner().invoke(
            app,
            ["report", "--dsn", f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}",
             "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path / "cli")],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert (tmp_path / "cli" / "report.html").is_file()
    finally:
        drop_database(db)
