"""bench.relay on its own (queries, a large result read fully, flow control, a clean stop) and
bench.overhead end to end, small: all five targets through pgbench -S, the relay's ratios, and
pgsage measured with the cost model's predictions on. At 2 s per target the numbers mean
nothing; the run proves the path that produces the README's numbers works."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from bench.overhead import TARGETS, free_port
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER, drop_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def relay() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.relay", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"{PG_HOST}:{PG_PORT}"],
        cwd=ROOT, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "relay did not listen within 15 s"
            time.sleep(0.1)
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def test_relay_forwards_queries_and_a_large_result(
    relay: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = relay
    dsn = f"host=127.0.0.1 port={port} user={PG_USER} dbname=postgres"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        rows = conn.execute("SELECT generate_series(1, 200000)").fetchall()
        assert len(rows) == 200_000 and rows[0] == (1,) and rows[-1] == (200_000,)
        assert sum(r[0] for r in rows) == 200_000 * 200_001 // 2

    # flow control: a client that does not read a ~50 MB result leaves it in the kernel's
    # buffers and PostgreSQL's, not in the relay's memory
    rss = psutil.Process(proc.pid).memory_info().rss
    with socket.create_connection(("127.0.0.1", port)) as sock:
        params = f"user\0{PG_USER}\0database\0postgres\0\0".encode()
        sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        time.sleep(0.3)
        query = b"SELECT repeat('x', 1000) FROM generate_series(1, 50000)\0"
        sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
        time.sleep(1.0)
        grown = psutil.Process(proc.pid).memory_info().rss - rss
        assert grown < 16 << 20, f"relay grew by {grown / 1e6:.1f} MB for an unread result"
        received = b""
        while not received.endswith(b"Z\0\0\0\5I"):
            chunk = sock.recv(1 << 20)
            assert chunk, "relay closed the connection mid-result"
            received = received[-6:] + chunk
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


@pytest.mark.timeout(300)
def test_overhead_quick_run_has_the_relay_and_predictions() -> None:
    db = f"pgsage_overhead_{uuid.uuid4().hex[:8]}"
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.overhead", "--quick", "--seconds", "2", "--rounds", "1",
             "--no-warmup", "--no-transfers", "--no-save", "--json-only", "--dbname", db,
             "--pgsage-warehouse-db", f"{db}_meta"],
            cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
        )  # fmt: skip
    finally:
        drop_database(db)
        drop_database(f"{db}_meta")
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["parameters"]["targets"] == list(TARGETS)
    assert TARGETS == ("direct", "relay", "pgsage", "pgsage-nolog", "pgbouncer")
    assert [(c["mode"], c["clients"]) for c in doc["cells"]] == [("simple", 8), ("extended", 8)]
    for cell in doc["cells"]:
        assert set(cell["targets"]) == set(TARGETS)
        for name, target in cell["targets"].items():
            assert target["tps"] > 0 and target["failed"] == 0, (name, target)
        assert cell["targets"]["relay"]["cpu_us_per_txn"] > 0
        ratios = cell["ratios"]
        assert ratios["relay_vs_pgbouncer"] > 0 and ratios["pgsage_vs_relay"] > 0
        assert ratios["pgsage_vs_pgbouncer"] is not None  # the keys from before are all there
    assert {r["target"] for r in doc["rows"]} == set(TARGETS)
    pred = doc["predictions"]
    assert pred["enabled"] is True and pred["error"] is None, pred
    assert pred["rows_with_prediction"] > 0
    assert pred["model_version"] and pred["model_version"].startswith("cost:v"), pred
    # the table (on stderr with --json-only) says so
    assert "predictions on" in out.stderr
