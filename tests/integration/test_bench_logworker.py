"""bench.logworker end to end, small: four log workers fed the same stream, predictions made
real by a trained cost model, the CPU per statement of each and of its COPY backend. One batch
a round means little; the run proves the path that produces the README's numbers works."""

from __future__ import annotations

import uuid

from bench import logworker
from tests.fix_proxy import drop_database


def test_the_log_worker_bench_measures_every_variant_with_predictions_on() -> None:
    suffix = uuid.uuid4().hex[:8]
    meta, pgbench_db = f"pgsage_test_lw_meta_{suffix}", f"pgsage_test_lw_{suffix}"
    try:
        doc = logworker.main(["--batches", "1", "--rounds", "1", "--no-save",
                              "--meta", meta, "--dbname", pgbench_db])  # fmt: skip
    finally:
        drop_database(meta)
        drop_database(pgbench_db)
    assert doc["model_version"] == "cost:v1" and doc["rows_with_prediction"] > 0
    cpu = doc["us_cpu_per_statement"]
    assert set(cpu) == set(logworker.VARIANTS) and all(v > 0 for v in cpu.values())
    # the server runs on this host: each worker's COPY backend was measured
    assert set(doc["server_us_cpu_per_statement"]) == set(logworker.VARIANTS)
    assert doc["vs_full"]["full"] == 1.0
    assert set(doc["feature_us"]) == {"predictions", "anomalies"}
