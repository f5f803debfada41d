"""Authentication is relayed end to end: the proxy neither answers nor alters the exchange.

The upstream is a private cluster (`pg_auth_cluster`) whose pg_hba.conf requires SCRAM-SHA-256
for `scram_user`, MD5 for `md5_user` and trusts `postgres`. Every check goes from a real client
through the proxy to that server; wrong passwords must come back as the server's own 28P01.
"""

from __future__ import annotations

import base64
import hashlib
import os

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
    errors_in,
    frame,
    startup_packet,
    wait_until,
)

PASSWORD_USERS = {
    "scram": (SCRAM_USER, SCRAM_PASSWORD, "SCRAM-SHA-256$"),
    "md5": (MD5_USER, MD5_PASSWORD, "md5"),
}

AUTH_OK, AUTH_MD5, AUTH_SASL = 0, 5, 10


@pytest.fixture
def auth_proxy(make_proxy, pg_auth_cluster):
    # RunningProxy takes an Upstream object as `upstream` (the setting of that name is a string)
    return make_proxy(upstream=Upstream.parse(pg_auth_cluster.address))


def dsn(p, user: str, password: str | None = None, **extra: object) -> str:
    parts: dict[str, object] = {"host": p.host, "port": p.port, "user": user, "dbname": "postgres"}
    if password is not None:
        parts["password"] = password
    parts.update(connect_timeout=10, **extra)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def auth_failures(p) -> float:
    value = p.server.metrics.registry.get_sample_value(
        "pgsage_client_connection_errors_total", {"reason": "auth_failed"}
    )
    return value or 0.0


def test_cluster_stores_each_password_as_its_method(pg_auth_cluster):
    """The premise of the tests below: the roles really have SCRAM and MD5 verifiers."""
    with psycopg.connect(pg_auth_cluster.dsn(), autocommit=True) as conn:
        stored = dict(
            conn.execute(
                "select rolname, rolpassword from pg_authid where rolname = any(%s)",
                ([SCRAM_USER, MD5_USER],),
            ).fetchall()
        )
    assert stored[SCRAM_USER].startswith("SCRAM-SHA-256$")
    assert stored[MD5_USER].startswith("md5")


def test_trust_psycopg(auth_proxy):
    with psycopg.connect(dsn(auth_proxy, "postgres"), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("postgres",)
        assert not conn.pgconn.used_password
        assert conn.pgconn.backend_pid > 0
    wait_until(lambda: not auth_proxy.server.admitted, what="the session to end")


@pytest.mark.parametrize("method", ["scram", "md5"])
def test_password_psycopg(auth_proxy, method):
    user, password, _ = PASSWORD_USERS[method]
    with psycopg.connect(dsn(auth_proxy, user, password), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
        assert conn.pgconn.used_password  # the server asked, the client answered
        assert conn.execute("select 40 + 2").fetchone() == (42,)
    recs = [r for r in auth_proxy.records if r.sql == "select 40 + 2"]
    assert len(recs) == 1 and recs[0].session.user == user and recs[0].status == "ok"
    assert auth_failures(auth_proxy) == 0


@pytest.mark.parametrize("method", ["scram", "md5"])
async def test_password_asyncpg(auth_proxy, method):
    user, password, _ = PASSWORD_USERS[method]
    conn = await asyncpg.connect(
        host=auth_proxy.host,
        port=auth_proxy.port,
        user=user,
        password=password,
        database="postgres",
        timeout=10,
    )
    try:
        assert await conn.fetchval("select current_user") == user
        assert await conn.fetchval("select $1::int * 2", 21) == 42
    finally:
        await conn.close()


@pytest.mark.parametrize("method", ["scram", "md5"])
def test_wrong_password_psycopg(auth_proxy, method):
    user, _, _ = PASSWORD_USERS[method]
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn(auth_proxy, user, "not-the-password"))
    # the server's own FATAL, relayed: not a reset and not a message of the proxy's
    assert f'password authentication failed for user "{user}"' in str(info.value)
    assert "server closed the connection unexpectedly" not in str(info.value)
    wait_until(lambda: auth_failures(auth_proxy) == 1, what="the auth failure metric")
    wait_until(lambda: not auth_proxy.server.clients, what="the failed session to be gone")
    # the proxy is unharmed: the right password still works
    with psycopg.connect(dsn(auth_proxy, user, PASSWORD_USERS[method][1])) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("method", ["scram", "md5"])
async def test_wrong_password_asyncpg_sqlstate(auth_proxy, method):
    user, _, _ = PASSWORD_USERS[method]
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(
            host=auth_proxy.host,
            port=auth_proxy.port,
            user=user,
            password="not-the-password",
            database="postgres",
            timeout=10,
        )
    assert info.value.sqlstate == "28P01"
    assert f'password authentication failed for user "{user}"' in str(info.value)


def test_missing_password_is_the_servers_question(auth_proxy):
    """No password at hand: libpq stops at the server's request; the proxy invented nothing."""
    env_password = os.environ.pop("PGPASSWORD", None)
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(dsn(auth_proxy, SCRAM_USER, passfile="/nonexistent"))
    finally:
        if env_password is not None:
            os.environ["PGPASSWORD"] = env_password
    assert "no password supplied" in str(info.value)


def _auth_request(messages: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    assert messages and messages[0][0] == b"R", messages
    payload = messages[0][1]
    return int.from_bytes(payload[:4], "big"), payload[4:]


def test_raw_md5_challenge_relayed_and_wrong_answer_refused(auth_proxy):
    """The server's AuthenticationMD5Password (with its salt) reaches the client unchanged."""
    with RawClient(auth_proxy.host, auth_proxy.port) as c:
        c.send(startup_packet(MD5_USER, "postgres"))
        code, salt = _auth_request(c.read_until(b"R", b"E"))
        assert code == AUTH_MD5 and len(salt) == 4
        inner = hashlib.md5(b"wrong" + MD5_USER.encode()).hexdigest().encode()
        answer = b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\x00"
        c.send(frame(b"p", answer))
        msgs, closed = c.read_until_closed()
    errs = errors_in(msgs)
    assert closed and len(errs) == 1
    assert errs[0]["C"] == "28P01" and errs[0]["S"] == "FATAL"


def test_raw_md5_right_answer(auth_proxy):
    with RawClient(auth_proxy.host, auth_proxy.port) as c:
        c.send(startup_packet(MD5_USER, "postgres"))
        code, salt = _auth_request(c.read_until(b"R", b"E"))
        assert code == AUTH_MD5
        inner = hashlib.md5(MD5_PASSWORD.encode() + MD5_USER.encode()).hexdigest().encode()
        answer = b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\x00"
        c.send(frame(b"p", answer))
        msgs = c.read_until(b"Z", b"E")
        assert _auth_request(msgs)[0] == AUTH_OK
        assert msgs[-1] == (b"Z", b"I")
        assert any(t == b"K" for t, _ in msgs)  # BackendKeyData passed through


def test_raw_scram_exchange_relayed_and_bad_proof_refused(auth_proxy):
    """AuthenticationSASL offers SCRAM-SHA-256 (no -PLUS: no TLS upstream); a bad proof is 28P01."""
    with RawClient(auth_proxy.host, auth_proxy.port) as c:
        c.send(startup_packet(SCRAM_USER, "postgres"))
        code, body = _auth_request(c.read_until(b"R", b"E"))
        assert code == AUTH_SASL
        mechanisms = [m for m in body.split(b"\x00") if m]
        assert mechanisms == [b"SCRAM-SHA-256"]
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        client_first = ("n,," + first_bare).encode()
        c.send(
            frame(
                b"p",
                b"SCRAM-SHA-256\x00" + len(client_first).to_bytes(4, "big") + client_first,
            )
        )
        code, server_first = _auth_request(c.read_until(b"R", b"E"))
        assert code == 11  # AuthenticationSASLContinue
        attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
        assert attrs["r"].startswith(nonce) and int(attrs["i"]) > 0 and attrs["s"]
        proof = base64.b64encode(os.urandom(32)).decode()
        c.send(frame(b"p", f"c=biws,r={attrs['r']},p={proof}".encode()))
        msgs, closed = c.read_until_closed()
    errs = errors_in(msgs)
    assert closed and len(errs) == 1
    assert errs[0]["C"] == "28P01"
    assert errs[0]["M"] == f'password authentication failed for user "{SCRAM_USER}"'
