"""bench.tpch end to end at scale 0.01: tpchgen-cli's data, the 22 queries through a real
`pgsage serve`, the advisor's HypoPG advice, each index built and validated by replay (plan
steering on for pins), the after pass. The numbers at this scale are milliseconds and mean
nothing; the run proves the path that produces the SF1 numbers in the README works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fix_proxy import drop_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_tpch_bench_runs_validates_and_reports() -> None:
    db = "pgsage_tpch_smoke"
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.tpch", "--scale", "0.01", "--database", db,
             "--timeout", "60", "--reload", "--no-save"],
            cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
        )  # fmt: skip
    finally:
        drop_database(db)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("\n{") + 1 :])
    queries = result["queries"]
    assert [q["query"] for q in queries] == list(range(1, 23))
    assert not any("error" in q for q in queries), [q.get("error") for q in queries]
    assert result["timed_out_before"] == [] and result["timed_out_after"] == []
    assert all(q["rows"] is not None for q in queries)
    assert result["validate"] is True
    verdicts = result["validation"]
    assert verdicts and len(verdicts) == len(result["indexes"])
    assert {v["status"] for v in verdicts} <= {"validated", "reverted"}
    # Q17's index (lineitem by part key) pays several times over even at this scale
    by_index = {v["index"]: v for v in verdicts}
    partkey = [v for name, v in by_index.items() if name.startswith("pgsage_lineitem_l_partkey")]
    assert partkey and partkey[0]["status"] == "validated", partkey
    assert partkey[0]["speedup"] > 2 and partkey[0]["p_value"] < 0.05
    # what validation reverted is gone again; what it kept is there with its real size
    for ix in result["indexes"]:
        kept = by_index[ix["index_name"]]["status"] == "validated"
        assert (ix["size_bytes"] or 0) > 0 if kept else not ix["size_bytes"], ix
