"""A client asking for protocol 3.2 (libpq 18) is negotiated down to 3.0, as PostgreSQL does."""

from __future__ import annotations

import socket

from proxy.protocol import BACKEND_TYPE_BYTES, FrameScanner, decode_backend
from proxy.protocol.backend import (
    BackendKeyData,
    CommandComplete,
    NegotiateProtocolVersion,
    ReadyForQuery,
)
from proxy.protocol.frontend import Query, Terminate
from proxy.protocol.startup import PROTOCOL_3_2, StartupMessage
from tests.fix_proxy import PG_USER


def read_until_ready(sock: socket.socket, scanner: FrameScanner) -> list[object]:
    out: list[object] = []
    while not any(isinstance(m, ReadyForQuery) for m in out):
        data = sock.recv(65536)
        assert data, "connection closed before ReadyForQuery"
        for t, payload in scanner.receive_data(data):
            assert payload is not None
            out.append(decode_backend(t, payload))
    return out


def test_protocol_3_2_request_is_negotiated_down(proxy):
    startup = StartupMessage(
        PROTOCOL_3_2,
        {"user": PG_USER, "database": "postgres", "_pq_.some_option": "on"},
    )
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(startup.encode())
        scanner = FrameScanner(BACKEND_TYPE_BYTES, BACKEND_TYPE_BYTES)
        messages = read_until_ready(sock, scanner)
        negotiations = [m for m in messages if isinstance(m, NegotiateProtocolVersion)]
        assert len(negotiations) == 1
        # PostgreSQL 15 speaks 3.0 (and sends the whole version number, 3 << 16, here)
        assert negotiations[0].newest_minor & 0xFFFF == 0
        assert negotiations[0].unrecognized_options == ("_pq_.some_option",)
        keys = [m for m in messages if isinstance(m, BackendKeyData)]
        assert len(keys) == 1 and len(keys[0].secret_key) == 4
        sock.sendall(Query("select 1").encode())
        reply = read_until_ready(sock, scanner)
        assert CommandComplete("SELECT 1") in reply
        sock.sendall(Terminate().encode())
    assert [r.sql for r in proxy.records] == ["select 1"]
