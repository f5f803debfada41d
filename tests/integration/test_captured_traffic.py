"""The codec against captured real traffic: every message real clients and the server exchange
decodes, re-encodes to the same bytes, and drives the tracker to the right records."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from proxy.protocol import (
    BACKEND_TYPE_BYTES,
    FRONTEND_TYPE_BYTES,
    FrameScanner,
    SessionTracker,
    StartupReader,
    decode_backend,
    decode_frontend,
)
from proxy.protocol.startup import SSLRequest, StartupMessage
from tests.capture import Capture, RecordingRelay
from tests.fix_proxy import PG_HOST, PG_PORT, PG_USER

DATA = Path(__file__).resolve().parents[1] / "data"


def split_session(cap: Capture) -> tuple[bytes, bytes]:
    """Frontend bytes after the startup packet(s), and all backend bytes after SSL answers."""
    front = cap.stream("F")
    reader = StartupReader()
    packet = reader.receive_data(front)
    skipped_ssl = 0
    while isinstance(packet, SSLRequest):
        skipped_ssl += 1
        packet = reader.receive_data(b"")
    assert isinstance(packet, StartupMessage)
    back = cap.stream("B")[skipped_ssl:]  # the one-byte 'N' answers
    return reader.take_remaining(), back


def frames(data: bytes, valid: frozenset[int]) -> list[tuple[int, bytes | None]]:
    scanner = FrameScanner(valid, valid, direction="test")
    out = scanner.receive_data(data)
    assert scanner.at_boundary
    return out


def check_round_trip(front: bytes, back: bytes) -> tuple[int, int]:
    n_front = n_back = 0
    in_auth = True
    for t, payload in frames(front, FRONTEND_TYPE_BYTES):
        assert payload is not None
        msg = decode_frontend(t, payload)
        assert msg.encode() == bytes((t,)) + (len(payload) + 4).to_bytes(4, "big") + payload
        n_front += 1
    for t, payload in frames(back, BACKEND_TYPE_BYTES):
        assert payload is not None
        msg = decode_backend(t, payload)
        if not in_auth or t != ord("R"):
            assert msg.encode()[5:] == payload
        in_auth = in_auth and t != ord("Z")
        n_back += 1
    return n_front, n_back


def replay_tracker(front: bytes, back: bytes) -> SessionTracker:
    """Feed the whole client side, then the whole server side (responses follow requests)."""
    tracker = SessionTracker(splitter=lambda s: [p.strip() for p in s.split(";") if p.strip()])
    from proxy.protocol import CLIENT_INTERESTING, SERVER_INTERESTING

    fs = FrameScanner(CLIENT_INTERESTING, FRONTEND_TYPE_BYTES)
    bs = FrameScanner(SERVER_INTERESTING, BACKEND_TYPE_BYTES)
    tracker.client_frames(fs.receive_data(front), 1.0)
    tracker.server_frames(bs.receive_data(back), 2.0)
    return tracker


@pytest.fixture
def relay():
    r = RecordingRelay(PG_HOST, PG_PORT)
    yield r
    r.close()


def test_psql_session_captured(relay, test_db):
    psql = shutil.which("psql")
    assert psql, "psql missing"
    script = (
        "create temp table c (a int, b text);\n"
        "insert into c values (1, 'x'), (2, NULL);\n"
        "select * from c order by a;\n"
        "\\d c\n"
        "select 1/0;\n"
        "select 'après', '🐘';\n"
    )
    out = subprocess.run(
        [psql, "-h", "127.0.0.1", "-p", str(relay.port), "-U", PG_USER, "-d", test_db, "-X"],
        input=script, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "division by zero" in out.stderr
    relay.close()
    assert len(relay.captures) == 1
    front, back = split_session(relay.captures[0])
    n_front, n_back = check_round_trip(front, back)
    assert n_front >= 6 and n_back >= 20
    tracker = replay_tracker(front, back)
    # psql's Terminate ends the session; the replay feeds it before the last ReadyForQuery,
    # which must not reopen the session; every request was answered
    assert tracker.phase.value == "closed" and not tracker.pending


def test_psycopg_extended_and_binary_captured(relay, test_db):
    dsn = f"host=127.0.0.1 port={relay.port} user={PG_USER} dbname={test_db} sslmode=disable"
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        cur.execute("select %s::int8, %s::text, %s::numeric", (1, "two", 3.5))
        assert cur.fetchone() == (1, "two", 3.5)
        with conn.pipeline():
            for i in range(5):
                conn.execute("select %s", (i,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table where a = %s", (1,))
        with conn.cursor() as c2, c2.copy("copy (select generate_series(1, 100)) to stdout") as cp:
            assert sum(1 for _ in cp) == 100
    relay.close()
    front, back = split_session(relay.captures[0])
    check_round_trip(front, back)


def test_shipped_capture_decodes():
    """A psql + JDBC-style capture kept in tests/data, so the codec is checked without a server."""
    raw = (DATA / "psql_session.capture").read_bytes()
    front, back = split_session(Capture.load(raw))
    n_front, n_back = check_round_trip(front, back)
    assert n_front > 0 and n_back > 0
