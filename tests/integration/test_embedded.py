"""The embedded default: with no upstream configured, `pgsage serve` starts a private PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg

from tests.fix_proxy import PG_USER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_without_upstream_starts_embedded_postgres(tmp_path: Path) -> None:
    port = _free_port()
    data_dir = tmp_path / "embedded"
    env = {
        **os.environ,
        "PGSAGE_UPSTREAM": "",
        "PGSAGE_LISTEN": f"127.0.0.1:{port}",
        "PGSAGE_HTTP": f"127.0.0.1:{_free_port()}",
        "PGSAGE_EMBEDDED_DATA_DIR": str(data_dir),
        "PGSAGE_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [str(Path(os.sys.executable).with_name("pgsage")), "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 90
        row = None
        while time.monotonic() < deadline and row is None:
            try:
                with psycopg.connect(
                    f"host=127.0.0.1 port={port} user={PG_USER} dbname=postgres", connect_timeout=2
                ) as conn:
                    row = conn.execute("select current_setting('data_directory')").fetchone()
            except psycopg.OperationalError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.5)
        assert row is not None, "embedded PostgreSQL never became reachable through pgsage"
        assert Path(row[0]).resolve() == data_dir.resolve()
        # the warehouse's metadata lives in the embedded server too (created and migrated at
        # start-up, a moment after the proxy listens: retried like the first connection)
        tables = None
        while time.monotonic() < deadline + 30 and tables is None:
            try:
                with psycopg.connect(
                    f"host=127.0.0.1 port={port} user={PG_USER} dbname=warehouse",
                    connect_timeout=5,
                ) as conn:
                    tables = conn.execute(
                        "select count(*) from pg_tables where schemaname in ('metadata', 'ml')"
                    ).fetchone()
            except psycopg.OperationalError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.5)
        assert tables is not None and tables[0] >= 5
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    output = proc.stdout.read().decode() if proc.stdout else ""
    # pgserver's build has no HypoPG: said once, as reduced capability, not as a failure
    assert output.count("reduced capability") == 1, output
    assert "hypopg" in output
    # the embedded server was stopped with pgsage
    assert not (data_dir / "postmaster.pid").exists()
