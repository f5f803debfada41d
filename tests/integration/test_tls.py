"""Encryption negotiation at the proxy: SSLRequest, TLS termination, GSSENCRequest, direct TLS.

Without a certificate the proxy answers SSLRequest with 'N' (so `sslmode=prefer` goes on in
plaintext and `sslmode=require` fails cleanly). With `tls_cert`/`tls_key` it answers 'S' and
terminates TLS itself; the upstream leg stays plaintext. GSSENCRequest is always refused with
'N' and the client may go on on the same socket. A direct-TLS ClientHello (PostgreSQL 17's
`sslnegotiation=direct`) is closed without harm to the other sessions.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from proxy.upstream import Upstream
from tests.fix_pgcluster import (
    GSSENC_REQUEST,
    SCRAM_PASSWORD,
    SCRAM_USER,
    SSL_REQUEST,
    RawClient,
    errors_in,
    startup_packet,
    wait_until,
)


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_proxy(make_proxy, cert_pair):
    cert, key = cert_pair
    return make_proxy(tls_cert=cert, tls_key=key)


def startup_count(p, kind: str) -> float:
    value = p.server.metrics.registry.get_sample_value(
        "pgsage_startup_requests_total", {"kind": kind}
    )
    return value or 0.0


def client_hello() -> bytes:
    """A real TLS ClientHello, as a direct-TLS client opens with."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16
    return hello


def assert_proxy_serves(p) -> None:
    with psycopg.connect(p.dsn(connect_timeout=10, sslmode="disable")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# ------------------------------------------------------------------ no certificate: 'N'


def test_ssl_prefer_without_tls_goes_plaintext(proxy):
    with psycopg.connect(proxy.dsn(sslmode="prefer", connect_timeout=10)) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 'plain'").fetchone() == ("plain",)
    assert startup_count(proxy, "ssl_refused") == 1
    rec = next(r for r in proxy.records if r.sql == "select 'plain'")
    assert rec.session.tls is False


def test_ssl_require_without_tls_fails_cleanly(proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(sslmode="require", connect_timeout=10))
    assert "server does not support SSL" in str(info.value)
    assert startup_count(proxy, "ssl_refused") == 1
    wait_until(lambda: not proxy.server.clients, what="the refused client to be forgotten")
    assert not proxy.server.admitted
    assert_proxy_serves(proxy)


def test_raw_ssl_request_refused_then_startup_on_same_socket(proxy):
    with RawClient(proxy.host, proxy.port) as c:
        c.send(SSL_REQUEST)
        assert c.read_byte() == b"N"
        msgs = c.startup()
        assert msgs[-1] == (b"Z", b"I")
        rows = [p for t, p in c.query("select 'after N'") if t == b"D"]
        assert rows and rows[0].endswith(b"after N")


def test_raw_ssl_request_with_pipelined_plaintext_is_refused(proxy):
    """Bytes after an SSLRequest before the answer could be injected (CVE-2021-23222)."""
    with RawClient(proxy.host, proxy.port) as c:
        c.send(SSL_REQUEST + startup_packet())
        msgs, closed = c.read_until_closed()
    errs = errors_in(msgs)
    assert closed and len(errs) == 1
    assert errs[0]["C"] == "08P01" and "unencrypted data after SSL request" in errs[0]["M"]
    assert_proxy_serves(proxy)


# ------------------------------------------------------------------ certificate: TLS terminated


def test_tls_require_terminated_at_proxy(tls_proxy):
    with psycopg.connect(tls_proxy.dsn(sslmode="require", connect_timeout=10)) as conn:
        assert conn.pgconn.ssl_in_use  # the client's leg is TLS
        assert conn.info.parameter_status("server_version")
        assert conn.execute("select 'over tls', %s::int", (7,)).fetchone() == ("over tls", 7)
        # the upstream leg is plaintext: the server sees no SSL on its side of the session
        upstream_ssl = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert upstream_ssl.fetchone() == (False,)
    recs = [r for r in tls_proxy.records if r.sql and "over tls" in r.sql]
    assert len(recs) == 1 and recs[0].session.tls is True and recs[0].rows == 1
    assert startup_count(tls_proxy, "ssl_accepted") == 1
    assert startup_count(tls_proxy, "ssl_refused") == 0


def test_tls_verify_full_against_the_proxy_certificate(tls_proxy, cert_pair):
    cert, _ = cert_pair
    with psycopg.connect(
        tls_proxy.dsn(sslmode="verify-full", sslrootcert=str(cert), connect_timeout=10)
    ) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 2").fetchone() == (2,)


def test_tls_prefer_upgrades_and_plaintext_still_allowed(tls_proxy):
    with psycopg.connect(tls_proxy.dsn(sslmode="prefer", connect_timeout=10)) as conn:
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(tls_proxy.dsn(sslmode="disable", connect_timeout=10)) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 3").fetchone() == (3,)


async def test_tls_asyncpg(tls_proxy):
    conn = await asyncpg.connect(
        host=tls_proxy.host,
        port=tls_proxy.port,
        user="postgres",
        database="postgres",
        ssl="require",
        timeout=10,
    )
    try:
        assert await conn.fetchval("select $1::text", "asyncpg tls") == "asyncpg tls"
    finally:
        await conn.close()
    # ssl="require" fails on an 'N'; and the proxy saw this session arrive over TLS
    recs = [r for r in tls_proxy.records if r.sql == "select $1::text"]
    assert recs and all(r.session.tls for r in recs)


def test_tls_many_concurrent_sessions(tls_proxy):
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with psycopg.connect(tls_proxy.dsn(sslmode="require", connect_timeout=20)) as conn:
                for j in range(20):
                    assert conn.execute("select %s::int", (i * 100 + j,)).fetchone() == (
                        i * 100 + j,
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len([r for r in tls_proxy.records if r.session.tls]) >= 8 * 20


def test_cancel_over_tls(tls_proxy):
    """libpq sends its CancelRequest over TLS too; the proxy reads it after the handshake."""
    with psycopg.connect(
        tls_proxy.dsn(sslmode="require", connect_timeout=10), autocommit=True
    ) as conn:
        timer = threading.Timer(0.5, lambda: conn.cancel_safe(timeout=5))
        timer.start()
        started = time.monotonic()
        with pytest.raises(pg_errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        timer.join()
        assert time.monotonic() - started < 5
        assert conn.execute("select 'still usable'").fetchone() == ("still usable",)
    assert startup_count(tls_proxy, "cancel") == 1


def test_tls_with_scram_upstream(make_proxy, cert_pair, pg_auth_cluster):
    """TLS ends at the proxy, so the server offers SCRAM without channel binding."""
    cert, key = cert_pair
    p = make_proxy(upstream=Upstream.parse(pg_auth_cluster.address), tls_cert=cert, tls_key=key)
    base = (
        f"host={p.host} port={p.port} user={SCRAM_USER} password={SCRAM_PASSWORD} "
        "dbname=postgres sslmode=require connect_timeout=10"
    )
    with psycopg.connect(base) as conn:
        assert conn.pgconn.ssl_in_use and conn.pgconn.used_password
        assert conn.execute("select current_user").fetchone() == (SCRAM_USER,)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(base + " channel_binding=require")
    assert "channel binding" in str(info.value)


def test_tls_handshake_garbage_closes_only_that_client(tls_proxy):
    with psycopg.connect(tls_proxy.dsn(sslmode="require", connect_timeout=10)) as other:
        with RawClient(tls_proxy.host, tls_proxy.port) as c:
            c.send(SSL_REQUEST)
            assert c.read_byte() == b"S"
            c.send(b"this is not a TLS record\r\n" * 10)
            _, closed = c.read_until_closed()
            assert closed
        assert other.execute("select 'other'").fetchone() == ("other",)
    wait_until(lambda: not tls_proxy.server.clients, what="the failed client to be forgotten")


def test_tls_handshake_stall_times_out(make_proxy, cert_pair):
    cert, key = cert_pair
    p = make_proxy(tls_cert=cert, tls_key=key, startup_timeout=1)
    with RawClient(p.host, p.port) as c:
        c.send(SSL_REQUEST)
        assert c.read_byte() == b"S"
        started = time.monotonic()
        c.sock.settimeout(10)
        data = b""
        try:
            while chunk := c.sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
        assert data == b""  # no plaintext ErrorResponse inside what should be TLS
    wait_until(lambda: not p.server.clients, what="the stalled client to be forgotten")
    assert_proxy_serves(p)


def test_raw_gssenc_then_ssl_then_startup_inside_tls(tls_proxy):
    """libpq's order with gssencmode=prefer and sslmode=require, on one socket."""
    with RawClient(tls_proxy.host, tls_proxy.port) as c:
        c.send(GSSENC_REQUEST)
        assert c.read_byte() == b"N"
        c.send(SSL_REQUEST)
        assert c.read_byte() == b"S"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        msgs = c.startup(application_name="raw-gss-ssl")
        assert msgs[-1] == (b"Z", b"I")
        rows = [p for t, p in c.query("select 'inside tls'") if t == b"D"]
        assert rows and rows[0].endswith(b"inside tls")
    rec = next(r for r in tls_proxy.records if r.sql == "select 'inside tls'")
    assert rec.session.tls is True and rec.session.application_name == "raw-gss-ssl"


# ------------------------------------------------------------------ GSSENCRequest


def test_raw_gssenc_refused_then_startup_on_same_socket(proxy):
    with RawClient(proxy.host, proxy.port) as c:
        c.send(GSSENC_REQUEST)
        assert c.read_byte() == b"N"
        msgs = c.startup(application_name="raw-gss")
        assert msgs[0] == (b"R", struct.pack("!I", 0))  # AuthenticationOk (trust)
        assert msgs[-1] == (b"Z", b"I")
        rows = [p for t, p in c.query("select 'after gss N'") if t == b"D"]
        assert rows and rows[0].endswith(b"after gss N")
    assert startup_count(proxy, "gssenc_refused") == 1


def _fake_kerberos_ccache(path: Path) -> None:
    """A FILE ccache holding an unexpired (fake) TGT: enough for libpq to believe it has GSS
    credentials and so open with a GSSENCRequest. No KDC is involved; the proxy says 'N'."""

    def octets(b: bytes) -> bytes:
        return struct.pack("!I", len(b)) + b

    def principal(realm: bytes, *parts: bytes, name_type: int = 1) -> bytes:
        head = struct.pack("!II", name_type, len(parts)) + octets(realm)
        return head + b"".join(octets(p) for p in parts)

    realm = b"PGSAGE.TEST"
    client = principal(realm, b"tester")
    now = int(time.time())
    cred = (
        client
        + principal(realm, b"krbtgt", realm, name_type=2)
        + struct.pack("!H", 18)  # aes256-cts key
        + octets(bytes(32))
        + struct.pack("!IIII", now, now, now + 3600, 0)
        + b"\x00"  # is_skey
        + struct.pack("!I", 0x40000000)  # forwardable
        + struct.pack("!II", 0, 0)  # no addresses, no authdata
        + octets(b"\x61\x03\x02\x01\x05")  # ticket (never used)
        + octets(b"")
    )
    path.write_bytes(struct.pack("!HH", 0x0504, 0) + client + cred)


def test_psycopg_gssencmode_prefer_falls_back_after_n(proxy, tmp_path, monkeypatch):
    if not hasattr(psycopg.pq.PGconn, "used_gssapi"):
        pytest.fail("this psycopg has no used_gssapi; cannot tell whether libpq has GSS")
    ccache = tmp_path / "krb5cc"
    _fake_kerberos_ccache(ccache)
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{ccache}")
    monkeypatch.setenv("KRB5_CONFIG", "/dev/null")
    with psycopg.connect(
        proxy.dsn(gssencmode="prefer", sslmode="disable", connect_timeout=10)
    ) as conn:
        assert not conn.pgconn.used_gssapi
        assert conn.execute("select 'gss fallback'").fetchone() == ("gss fallback",)
    # libpq really asked for GSS encryption first, and the proxy refused it
    assert startup_count(proxy, "gssenc_refused") == 1


# ------------------------------------------------------------------ direct TLS


@pytest.mark.parametrize("with_cert", [False, True])
def test_raw_direct_tls_client_hello_closed(make_proxy, cert_pair, with_cert):
    cert, key = cert_pair
    p = make_proxy(tls_cert=cert, tls_key=key) if with_cert else make_proxy()
    with psycopg.connect(p.dsn(connect_timeout=10)) as other:
        with RawClient(p.host, p.port) as c:
            c.send(client_hello())
            c.sock.settimeout(10)
            data = b""
            try:
                while chunk := c.sock.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
            # no ErrorResponse can be understood by a TLS client: just the close
            assert data == b""
        assert other.execute("select 'unharmed'").fetchone() == ("unharmed",)
    assert startup_count(p, "direct_tls") == 1
    wait_until(lambda: len(p.server.clients) == 0, what="the direct-TLS client to be gone")
    assert_proxy_serves(p)


def test_psycopg_direct_tls_negotiation_fails_cleanly(tls_proxy):
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            tls_proxy.dsn(sslmode="require", sslnegotiation="direct", connect_timeout=10)
        )
    assert startup_count(tls_proxy, "direct_tls") == 1
    assert_proxy_serves(tls_proxy)


def test_plain_socket_close_during_negotiation(proxy):
    """A client that sends an SSLRequest and vanishes leaves nothing behind."""
    for _ in range(20):
        s = socket.create_connection((proxy.host, proxy.port), timeout=5)
        s.sendall(SSL_REQUEST)
        s.close()
    wait_until(lambda: not proxy.server.clients, what="all vanished clients to be forgotten")
    assert not proxy.server.admitted
    assert_proxy_serves(proxy)


def test_client_closed_by_the_proxy_mid_handshake_is_forgotten(make_proxy, cert_pair):
    """The startup sweeper (or a shutdown) can close a session while its TLS handshake is
    under way; asyncio then ends start_tls without an error and never tells the session its
    connection is lost, so the session must notice by itself."""
    cert, key = cert_pair
    p = make_proxy(tls_cert=cert, tls_key=key, startup_timeout=30)
    with RawClient(p.host, p.port) as c:
        c.send(SSL_REQUEST)
        assert c.read_byte() == b"S"
        wait_until(lambda: any(s._tls_handshake for s in p.server.clients), what="the handshake")

        async def close_all() -> None:
            for s in list(p.server.clients):
                s.fatal("08006", "canceling authentication due to timeout")

        p.call(close_all())
        _, closed = c.read_until_closed()
        assert closed
    wait_until(lambda: not p.server.clients, what="the closed client to be forgotten")
    assert_proxy_serves(p)
