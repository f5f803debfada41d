"""`pgsage demo --quick`: warehouse, pgsage with cache/admission/steering, simulated users,
every model trained, the index advisor, and the report."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fix_proxy import drop_database


@pytest.mark.timeout(900)  # the whole loop: minutes on a loaded 2-core machine
def test_quick_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    """The whole loop, then pgsage keeps running until Ctrl-C, which stops everything (0)."""
    import re
    import signal

    database = f"pgsage_demo_{uuid.uuid4().hex[:8]}"
    proc, lines = _demo(database, tmp_path, "--duration", "15")
    try:
        _wait_for(lines, "Ctrl-C stops everything", proc, 600)
        out = "".join(lines)
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", out).group(1))  # type: ignore[union-attr]
        assert not _port_closed(port)  # still serving
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, out[-3000:]
        assert _port_closed(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        drop_database(database)
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


def _demo(database: str, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    """The demo in its own process group (as a terminal runs it), its stdout collected."""
    import threading

    env = {**os.environ, "PGSAGE_MODEL_DIR": str(tmp_path / "models"), "COLUMNS": "200",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "demo", "--quick", "--database", database, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen[str], timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert time.monotonic() < deadline, f"no {text!r}: " + "".join(lines)[-3000:]
        time.sleep(0.2)


def _port_closed(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(600)
def test_ctrl_c_during_the_run_stops_everything(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the simulated
    users run: the demo exits promptly with 130 and pgsage serve is gone."""
    import re
    import signal

    database = f"pgsage_demo_{uuid.uuid4().hex[:8]}"
    proc, lines = _demo(database, tmp_path, "--duration", "120", "--no-wait")
    try:
        _wait_for(lines, "pgsage is up", proc, 240)
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", "".join(lines)).group(1))  # type: ignore[union-attr]
        _wait_for(lines, "3/7 simulated users", proc, 30)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130, "".join(lines)[-3000:]
        assert _port_closed(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        drop_database(database)
