"""The admin console: `psql -d pgsage`, served by the proxy, for configured admin users only."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import psycopg
import pytest

from tests.fix_proxy import PG_USER


def admin(service, user: str = PG_USER) -> psycopg.Connection:
    return psycopg.connect(
        f"host=127.0.0.1 port={service.port} user={user} dbname=pgsage", autocommit=True
    )


def test_psql_show_commands(service):
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        for i in range(30):
            conn.execute("select %s::int * 2", (i,))
    service.flush()
    psql = shutil.which("psql")
    assert psql, "psql missing"
    out = subprocess.run(
        [psql, "-h", "127.0.0.1", "-p", str(service.port), "-U", PG_USER, "-d", "pgsage",
         "-X", "-A", "-F", "|", "-c", "SHOW VERSION", "-c", "SHOW QUERIES LIMIT 5",
         "-c", "SHOW HELP"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pgsage 0.1.0" in out.stdout
    assert "select $1::int * $2" in out.stdout
    assert "SHOW QUERIES [LIMIT n]" in out.stdout


def test_show_queries_like_pg_stat_statements(service):
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        for i in range(40):
            conn.execute("select pg_sleep(0.001), %s::int", (i,))
        conn.execute("select 1")
    service.flush()
    with admin(service) as a:
        cur = a.execute("SHOW QUERIES LIMIT 2")
        cols = [d.name for d in cur.description]
        rows = cur.fetchall()
    assert cols[:3] == ["fingerprint", "calls", "total_exec_time"]
    assert "mean_exec_time" in cols and "query" in cols
    assert len(rows) == 2
    top = dict(zip(cols, rows[0], strict=True))
    assert top["calls"] == 40 and "pg_sleep" in top["query"]
    assert top["total_exec_time"] >= rows[1][cols.index("total_exec_time")]


def test_show_stats_clients_servers(service):
    with psycopg.connect(service.dsn(application_name="admin-test-client"), autocommit=True) as c:
        c.execute("select 1")
        service.flush()
        with admin(service) as a:
            stats = {r[0]: r for r in a.execute("SHOW STATS").fetchall()}
            clients = a.execute("SHOW CLIENTS").fetchall()
            servers = a.execute("SHOW SERVERS").fetchall()
            (worker,) = a.execute("SHOW WORKERS").fetchall()
            pid = c.execute("select pg_backend_pid()").fetchone()[0]
    assert stats[service.database][1] >= 1
    assert stats[service.database][5] > 0 and stats[service.database][6] > 0  # bytes in, out
    assert "pgsage" not in stats  # the console's own connection is not a database's traffic
    mine = [r for r in clients if r[10] == "admin-test-client"]
    assert len(mine) == 1 and mine[0][0] == "C" and mine[0][8] == pid
    assert all(r[10] != "psql" or r[2] != "pgsage" for r in clients)  # the console is not listed
    assert pid in [r[9] for r in servers]
    # one process (workers = 1): SHOW WORKERS has its one row, this client in it
    assert worker[0] == 0 and worker[2] == "single" and worker[3] == 1 and worker[4] >= 1
    assert worker[5] == f"{service.host}:{service.port}"


def test_show_servers_lists_kept_server_connections(service):
    """A server connection kept for the next client (server_pool_size) is listed as idle."""
    from tests.fix_pgcluster import wait_until

    with psycopg.connect(service.dsn(application_name="pooled-one"), autocommit=True) as c:
        pid = c.execute("select pg_backend_pid()").fetchone()[0]

    def listed() -> list[tuple]:
        with admin(service) as a:
            return [r for r in a.execute("SHOW SERVERS").fetchall() if r[9] == pid]

    wait_until(lambda: any(r[3] == "idle" for r in listed()), 10, "the kept server to be listed")
    row = listed()[0]
    assert row[1] == PG_USER and row[2] == service.database and row[8] is not None


def test_set_reload_and_config(service):
    with admin(service) as a:
        a.execute("SET idle_timeout = 42")
        assert service.settings.idle_timeout == 42
        config = {r[0]: r for r in a.execute("SHOW CONFIG").fetchall()}
        assert config["idle_timeout"][1] == "42.0"
        assert config["idle_timeout"][3] == "yes" and config["listen"][3] == "no"
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="restart"):
            a.execute("SET listen = '127.0.0.1:1'")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="idle_timeout"):
            a.execute("SET idle_timeout = -5")
        with pytest.raises(psycopg.errors.SyntaxError, match="valid commands"):
            a.execute("DROP TABLE everything")
        # RELOAD re-reads file and environment; the overrides this service started with stay
        a.execute("RELOAD")
        assert service.settings.idle_timeout == 0.0  # back to the configured value
        assert service.settings.listen == "127.0.0.1:0"


def test_only_admin_users(service):
    with pytest.raises(psycopg.OperationalError, match="not an admin user"):
        admin(service, user="mallory")


def test_extended_protocol_gets_a_clear_error(service):
    with admin(service) as a, pytest.raises(psycopg.errors.FeatureNotSupported,
                                            match="simple query protocol"):  # fmt: skip
        a.execute("SHOW VERSION", prepare=True)


def test_pause_holds_new_statements_until_resume(service):
    with psycopg.connect(service.dsn(), autocommit=True) as conn, admin(service) as a:
        a.execute("PAUSE")
        done = threading.Event()
        result: list[int] = []

        def run() -> None:
            result.append(conn.execute("select 7").fetchone()[0])
            done.set()

        t = threading.Thread(target=run)
        t.start()
        assert not done.wait(0.7), "a statement ran while pgsage was paused"
        clients = a.execute("SHOW CLIENTS").fetchall()
        assert any(r[3] == "paused" for r in clients)
        a.execute("RESUME")
        assert done.wait(5)
        t.join()
    assert result == [7]


def test_shutdown_command_stops_the_service(service):
    with admin(service) as a:
        a.execute("SHUTDOWN")
    deadline = time.monotonic() + 5
    while not service.stop_event.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.stop_event.is_set()
