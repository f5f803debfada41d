"""bench.accuracy --workload end to end, small: a fresh warehouse, a real `pgsage serve` with
log_parameters on, the workload simulator's users through it (no injected anomalies), the cost
model fitted on that log and scored beside its baselines. At 20 real seconds the scores mean
little; the run proves the path that produces the README's numbers works and reports every
split and check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from bench.accuracy import KEYS, SPLITS
from tests.fix_proxy import drop_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_accuracy_bench_runs_the_workload_simulator_and_scores_its_log(tmp_path: Path) -> None:
    db = "pgsage_cost_smoke"
    out_file = tmp_path / "accuracy.json"
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.accuracy", "--workload", "20", "--warehouse-scale",
             "0.05", "--n-iter", "2", "--database", db, "--out", str(out_file)],
            cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]

        async def logged() -> tuple[int, int, int]:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}")
            try:
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, count(query_text) AS texts, "
                    "count(*) FILTER (WHERE label IS NOT NULL) AS labelled "
                    "FROM metadata.query_logs"
                )
                assert row is not None
                return int(row["n"]), int(row["texts"]), int(row["labelled"])
            finally:
                await conn.close()

        import asyncio

        n, texts, labelled = asyncio.run(logged())
    finally:
        drop_database(db)
    result = json.loads(out_file.read_text())
    run = result["workload"]
    assert run["database"] == db and run["anomalies"] == 0 and run["errors"] == 0
    assert run["executed"] > 500
    # the log holds the run (and the texts: log_parameters was on), nothing was injected
    assert n >= run["executed"] and texts == n and labelled == 0
    assert result["data_window"]["rows"] > 500
    assert len(result["loadavg_at_start"]) == 3 and len(result["loadavg_at_end"]) == 3
    for split in ("time_split", "held_out_templates"):
        model = result[split]["cost_model"]
        assert set(model) == set(KEYS) and model["rows"] > 0
        assert model["qerror_p50"] >= 1.0 and model["qerror_p90"] >= model["qerror_p50"]
        assert {"fingerprint_median", "explain_cost_per_fingerprint"} <= set(result[split])
    assert set(SPLITS) >= {k.split(" ")[0] for k in result["checks"]}
    assert any(k.startswith("time_split r2_log") for k in result["checks"])
