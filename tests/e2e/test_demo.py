"""`pgsage demo --quick`: warehouse, pgsage with cache/admission/steering, simulated users,
every model trained, the index advisor, and the report."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.fix_proxy import drop_database


def test_quick_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    database = f"pgsage_demo_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PGSAGE_MODEL_DIR": str(tmp_path / "models"), "COLUMNS": "200"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "demo", "--quick", "--duration", "15",
             "--no-wait", "--database", database],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )  # fmt: skip
    finally:
        drop_database(database)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    for step in ("1/7 the warehouse", "2/7 pgsage serve", "3/7 simulated users",
                 "4/7 every model", "5/7 the index advisor", "6/7 the cost model",
                 "7/7 report"):  # fmt: skip
        assert step in out
    assert "models trained from the log" in out
    page = tmp_path / "report" / "report.html"
    assert page.is_file() and "Success metrics" in page.read_text()
    logged = next(line for line in out.splitlines() if "statements logged" in line)
    assert int(logged.split("│")[2].split()[0].replace(",", "")) > 100
    assert "cost model" in out and "where everything is" in out
    assert "admin console" in out and "/metrics" in out
