"""Regressions for what the fault and fuzz tests found: each of these failed before its fix."""

from __future__ import annotations

import socket
import time
from typing import Any

import psycopg

from proxy.protocol.backend import ErrorResponse, ReadyForQuery
from proxy.protocol.frontend import Query, Terminate
from tests.fix_proxy import direct_dsn
from tests.wire_client import WireClient


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def test_log_parameters_is_decided_when_the_statement_runs(make_service: Any) -> None:
    """A record queued before `SET log_parameters` keeps the setting it ran under (no literal
    leaks into the log after the fact, and none is lost)."""
    svc = make_service(log_parameters=False, querylog_flush_interval=5)
    with psycopg.connect(svc.dsn(), autocommit=True) as c:
        c.execute("SELECT 'before_secret' AS a")
        assert svc.service.set_setting("log_parameters", "true") is None
        c.execute("SELECT 'after_text' AS b")
    svc.flush()
    with psycopg.connect(direct_dsn(svc.database)) as m:
        rows = dict(
            m.execute(
                "SELECT normalized_text, query_text FROM metadata.query_logs"
                " WHERE normalized_text LIKE 'SELECT $1 AS %'"
            ).fetchall()
        )
    assert rows["SELECT $1 AS a"] is None
    assert rows["SELECT $1 AS b"] == "SELECT 'after_text' AS b"


def test_a_terminate_pipelined_behind_a_query_ends_quietly(proxy: Any) -> None:
    with WireClient(proxy.host, proxy.port) as client:
        client.send(Query("SELECT pg_sleep(0.1)"), Terminate())
        seen = []
        try:
            while True:
                seen.append(client.recv(timeout=5))
        except ConnectionError:
            pass
    assert any(isinstance(m, ReadyForQuery) for m in seen)
    assert not any(isinstance(m, ErrorResponse) for m in seen)  # no FATAL 08006


def test_admin_console_lists_and_quoted_semicolons(make_service: Any) -> None:
    svc = make_service(steering_enabled=True)
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        admin.execute("SET steering_exclude = 'abc, def'")
        admin.execute("SET steering_disabled_arms = 'no_indexscan'")
        admin.execute("SET admin_users = 'postgres,a;b'")
    s = svc.service.settings
    assert s.steering_exclude == ["abc", "def"]
    assert s.steering_disabled_arms == ["no_indexscan"]
    assert s.admin_users == ["postgres", "a;b"]  # one value, not a split command


def test_client_sockets_have_tcp_keepalive(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True):
        deadline = time.monotonic() + 5
        while not proxy.server.clients and time.monotonic() < deadline:
            time.sleep(0.05)

        def probe() -> tuple[int, int]:
            (c,) = list(proxy.server.clients)
            sock = c.transport.get_extra_info("socket")
            return (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            )

        assert proxy.call_soon(probe) == (1, 60)
