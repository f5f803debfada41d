"""Session pooling: a server connection whose client said goodbye is reset and handed to the next
client with the same startup packet, and only when that is safe.

Real clients (psycopg, asyncpg, a raw socket) through the proxy to the real PostgreSQL; what the
upstream holds is read on direct connections.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.upstream import Upstream
from tests.fix_pgcluster import (
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    RawClient,
    query_message,
    startup_packet,
    wait_until,
)
from tests.fix_proxy import direct_dsn


def _idle(p: Any) -> int:
    """Reset server connections waiting in the proxy's pool."""
    pool = p.server.pool
    return 0 if pool is None else p.call_soon(pool._idle_count)


def _event(p: Any, event: str) -> float:
    value = p.server.metrics.registry.get_sample_value("pgsage_server_pool_total", {"event": event})
    return value or 0.0


def _backends(app: str) -> list[int]:
    with psycopg.connect(direct_dsn(), autocommit=True) as c:
        rows = c.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()
    return [r[0] for r in rows]


def _session(p: Any, app: str) -> int:
    """Open a session, leave state behind it (settings, a temp table, a prepared statement,
    an advisory lock, a LISTEN), say goodbye; the backend pid it had."""
    with psycopg.connect(p.dsn(application_name=app), autocommit=True) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("SET search_path = pg_catalog")
        c.execute("SET statement_timeout = '1234ms'")
        c.execute("CREATE TEMP TABLE left_behind (x int)")
        c.execute("PREPARE left_behind_stmt AS SELECT 1")
        c.execute("SELECT pg_advisory_lock(424242)")
        c.execute("LISTEN left_behind_channel")
    return int(pid)


def test_next_client_gets_the_reset_backend(proxy: Any) -> None:
    app = f"pool-{uuid.uuid4().hex[:8]}"
    first = _session(proxy, app)
    wait_until(lambda: _idle(proxy) == 1, 10, "the backend to be reset and parked")
    assert _backends(app) == [first]  # kept, not closed

    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as c:
        assert c.info.backend_pid == first  # BackendKeyData of the same backend
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        state = c.execute(
            "SELECT current_setting('search_path'), current_setting('statement_timeout'),"
            " (SELECT count(*) FROM pg_prepared_statements),"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            "  AND pid = pg_backend_pid()),"
            " (SELECT count(*) FROM pg_listening_channels()),"
            " to_regclass('pg_temp.left_behind') IS NULL"
        ).fetchone()
        assert state == ('"$user", public', "0", 0, 0, 0, True)
        assert c.info.parameter_status("application_name") == app
    assert _event(proxy, "reused") == 1


def test_cancel_reaches_a_reused_backend(proxy: Any) -> None:
    app = f"pool-{uuid.uuid4().hex[:8]}"
    first = _session(proxy, app)
    wait_until(lambda: _idle(proxy) == 1, 10, "the backend to be parked")
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as c:
        assert c.info.backend_pid == first
        # cancel_safe: the blocking cancel() holds the GIL the in-process proxy needs
        timer = threading.Timer(0.5, lambda: c.cancel_safe(timeout=5))
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT pg_sleep(20)")
        timer.join()
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_other_startup_parameters_get_another_backend(proxy: Any) -> None:
    app = f"pool-{uuid.uuid4().hex[:8]}"
    first = _session(proxy, app)
    wait_until(lambda: _idle(proxy) == 1, 10, "the backend to be parked")
    with psycopg.connect(proxy.dsn(application_name=app + "-other"), autocommit=True) as c:
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] != first
    with psycopg.connect(proxy.dsn(application_name=app, options="'-c work_mem=7MB'"),
                         autocommit=True) as c:  # fmt: skip
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] != first
        assert c.execute("SHOW work_mem").fetchone() == ("7MB",)


def test_session_ending_in_a_transaction_is_not_kept(proxy: Any) -> None:
    app = f"pool-{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(proxy.dsn(application_name=app))
    conn.execute("CREATE TEMP TABLE in_txn (x int)")  # psycopg opened a transaction
    pid = conn.info.backend_pid
    conn.close()  # Terminate inside the transaction: the server rolls back and exits
    wait_until(lambda: pid not in _backends(app), 10, "the backend to exit")
    assert _idle(proxy) == 0 and _event(proxy, "parked") == 0


def test_client_gone_without_goodbye_is_not_kept(proxy: Any) -> None:
    app = f"pool-{uuid.uuid4().hex[:8]}"
    raw = RawClient(proxy.host, proxy.port)
    raw.startup(application_name=app)
    raw.send(query_message("SELECT 1"))
    raw.read_until(b"Z")
    raw.close()  # no Terminate message
    wait_until(lambda: not _backends(app), 10, "the backend to exit")
    assert _event(proxy, "parked") == 0


def test_password_sessions_are_never_reused(make_proxy: Any, pg_auth_cluster: Any) -> None:
    """The upstream asked for a password: the next client must prove it knows it too, so the
    server connection is closed with its client, and a wrong password still fails."""
    p = make_proxy(upstream=Upstream.parse(pg_auth_cluster.address))
    for user, password in ((SCRAM_USER, SCRAM_PASSWORD), (MD5_USER, MD5_PASSWORD)):
        dsn = p.dsn(user=user, password=password)
        with psycopg.connect(dsn, autocommit=True) as c:
            first = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(dsn, autocommit=True) as c:
            assert c.execute("SELECT pg_backend_pid()").fetchone()[0] != first
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn(user=user, password="wrong"))
    assert _event(p, "parked") == 0
    # trusted sessions of the same cluster are pooled
    with psycopg.connect(p.dsn(), autocommit=True) as c:
        first = c.execute("SELECT pg_backend_pid()").fetchone()[0]
    wait_until(lambda: _idle(p) == 1, 10, "the trusted backend to be parked")
    with psycopg.connect(p.dsn(), autocommit=True) as c:
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] == first


def test_idle_servers_time_out_and_the_pool_is_bounded(make_proxy: Any) -> None:
    p = make_proxy(server_pool_size=2, server_idle_timeout=1.0)
    app = f"pool-{uuid.uuid4().hex[:8]}"
    conns = [psycopg.connect(p.dsn(application_name=app), autocommit=True) for _ in range(3)]
    for c in conns:
        c.close()
    wait_until(lambda: _idle(p) == 2, 10, "two backends to be parked")
    assert len(_backends(app)) == 2  # the third was closed: the pool holds two
    wait_until(lambda: not _backends(app), 10, "the idle backends to time out")
    assert _idle(p) == 0 and _event(p, "closed") >= 2


def test_pool_off_closes_every_server_connection(make_proxy: Any) -> None:
    p = make_proxy(server_pool_size=0)
    app = f"pool-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(p.dsn(application_name=app), autocommit=True) as c:
        c.execute("SELECT 1")
    wait_until(lambda: not _backends(app), 10, "the backend to exit")


def test_shutdown_closes_parked_servers(make_proxy: Any) -> None:
    p = make_proxy()
    app = f"pool-{uuid.uuid4().hex[:8]}"
    _session(p, app)
    wait_until(lambda: _idle(p) == 1, 10, "the backend to be parked")
    p.stop()
    wait_until(lambda: not _backends(app), 10, "the parked backend to exit")


async def test_asyncpg_reuses_and_many_clients_share_few_backends(proxy: Any) -> None:
    """Connect-query-disconnect in a loop, eight at a time (pgbench -C's pattern): later
    clients get reset backends, and every answer is right."""
    app = f"pool-{uuid.uuid4().hex[:8]}"
    seen: set[int] = set()

    async def client(i: int) -> None:
        for j in range(10):
            conn = await asyncpg.connect(
                host=proxy.host, port=proxy.port, user="postgres", database="postgres",
                server_settings={"application_name": app},
            )  # fmt: skip
            try:
                assert await conn.fetchval("SELECT $1::int * 2", i * 100 + j) == (i * 100 + j) * 2
                seen.add(conn.get_server_pid())
            finally:
                await conn.close()

    await asyncio.gather(*(client(i) for i in range(8)))
    assert _event(proxy, "reused") > 0
    assert len(seen) < 80  # not a backend per connection


def test_startup_pipelined_with_a_query_is_answered_and_not_parked(proxy: Any) -> None:
    """A client that sends its first query in the same packet as its startup gets both
    answers; such a session's welcome is not recorded, so its backend is not kept."""
    app = f"pool-{uuid.uuid4().hex[:8]}"
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    try:
        hello = startup_packet(user="postgres", database="postgres", application_name=app)
        sock.sendall(hello + query_message("SELECT 41 + 1"))
        got = b""
        deadline = time.monotonic() + 10
        while got.count(b"Z\x00\x00\x00\x05I") < 2 and time.monotonic() < deadline:
            got += sock.recv(65536)
        assert b"42" in got and got.count(b"Z\x00\x00\x00\x05I") == 2
        sock.sendall(b"X\x00\x00\x00\x04")
    finally:
        sock.close()
    wait_until(lambda: not _backends(app), 10, "the backend to exit")
    assert _event(proxy, "parked") == 0
