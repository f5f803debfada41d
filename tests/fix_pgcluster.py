"""Fixture: a private PostgreSQL 15 cluster that requires passwords (scram-sha-256 and md5).

The shared test server at 127.0.0.1:5432 uses trust auth, so authentication relay needs a
server of its own. `pg_auth_cluster` (session scope) runs initdb into a temporary directory
(as the `postgres` OS user when the tests run as root: initdb refuses root), picks a free
port and writes a pg_hba.conf with

* `scram_user` (password stored as SCRAM-SHA-256): scram-sha-256
* `md5_user` (password stored as MD5): md5
* `postgres`: trust

The cluster is stopped and its directory removed at the end of the session.

Also here, shared by the integration tests of the proxy's edges (auth, TLS, lifecycle, bad
input): `RawClient`, a minimal blocking protocol-3.0 client for bytes no driver would send, and
`wait_until`, the poll loop the tests use instead of fixed sleeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

PG_BIN = Path(os.environ.get("PGSAGE_TEST_PGBIN", "/usr/lib/postgresql/15/bin"))
SCRAM_USER, SCRAM_PASSWORD = "scram_user", "scram-Secret-1"
MD5_USER, MD5_PASSWORD = "md5_user", "md5-Secret-2"

HBA = f"""\
# TYPE  DATABASE  USER         ADDRESS        METHOD
local   all       postgres                    trust
host    all       postgres     127.0.0.1/32   trust
host    all       {SCRAM_USER}   127.0.0.1/32   scram-sha-256
host    all       {MD5_USER}     127.0.0.1/32   md5
"""


@dataclass(frozen=True)
class PgCluster:
    host: str
    port: int
    data_dir: Path
    socket_dir: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **extra: object) -> str:
        parts = {"host": self.host, "port": self.port, "user": user, "dbname": dbname, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: run them as the postgres OS user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_postgres(cmd), capture_output=True, text=True, timeout=timeout, check=False
    )


def _stop(data_dir: Path) -> None:
    if (data_dir / "postmaster.pid").exists():
        _run([str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "-t", "30", "stop"])


@pytest.fixture(scope="session")
def pg_auth_cluster() -> Iterator[PgCluster]:
    base = Path(tempfile.mkdtemp(prefix="pgsage_cluster_"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data_dir, socket_dir, log = base / "data", base / "sock", base / "server.log"
    try:
        init = _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(socket_dir, "postgres", "postgres")
        (data_dir / "pg_hba.conf").write_text(HBA)
        cluster = None
        for _attempt in range(5):  # the port may be taken between choosing and binding it
            port = _free_port()
            conf = (
                f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                f"unix_socket_directories = '{socket_dir}'\n"
                "max_connections = 40\nshared_buffers = 16MB\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\n"
            )
            with (data_dir / "postgresql.auto.conf").open("w") as f:
                f.write(conf)
            pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data_dir), "-l", str(log)]
            start = _run([*pg_ctl, "-w", "-t", "60", "start"])
            if start.returncode == 0:
                cluster = PgCluster("127.0.0.1", port, data_dir, socket_dir)
                break
            _stop(data_dir)
        if cluster is None:
            text = log.read_text() if log.exists() else ""
            raise AssertionError(f"could not start the auth test cluster:\n{text[-3000:]}")
        with psycopg.connect(cluster.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'")
            conn.execute("SET password_encryption = 'md5'")
            conn.execute(f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'")
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            _stop(data_dir)
        deadline = time.monotonic() + 10
        while (data_dir / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A minimal raw wire-protocol client for tests that must send bytes no driver would send.
# Independent of the proxy's own codec on purpose: encode by hand, decode only the framing.

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)

Message = tuple[bytes, bytes]  # (type byte, payload)


def startup_packet(user: str = "postgres", database: str = "postgres", **params: str) -> bytes:
    body = b"".join(
        k.encode() + b"\x00" + v.encode() + b"\x00"
        for k, v in {"user": user, "database": database, **params}.items()
    )
    body += b"\x00"
    return struct.pack("!II", 8 + len(body), PROTOCOL_3_0) + body


def frame(type_byte: bytes, payload: bytes = b"") -> bytes:
    return type_byte + struct.pack("!I", len(payload) + 4) + payload


def query_message(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\x00")


def error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by code letter (S, V, C, M, ...)."""
    out: dict[str, str] = {}
    for part in payload.split(b"\x00"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


class RawClient:
    """A blocking socket speaking just enough protocol 3.0 for the tests."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def _fill(self, n: int) -> bool:
        """Buffer at least n bytes; False on EOF or reset."""
        while len(self._buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return False
            if not chunk:
                return False
            self._buf += chunk
        return True

    def read_byte(self) -> bytes:
        """One byte (the answer to SSLRequest / GSSENCRequest); b'' on EOF."""
        if not self._fill(1):
            return b""
        b, self._buf = self._buf[:1], self._buf[1:]
        return b

    def read_message(self) -> Message | None:
        """The next backend message, or None once the connection is closed."""
        if not self._fill(5):
            return None
        t = self._buf[:1]
        (length,) = struct.unpack_from("!I", self._buf, 1)
        assert length >= 4, f"bad length {length} in a backend message of type {t!r}"
        if not self._fill(1 + length):
            return None
        payload = self._buf[5 : 1 + length]
        self._buf = self._buf[1 + length :]
        return t, payload

    def read_until(self, *types: bytes) -> list[Message]:
        """Messages up to and including the first of one of `types` (or up to EOF)."""
        out: list[Message] = []
        while (m := self.read_message()) is not None:
            out.append(m)
            if m[0] in types:
                break
        return out

    def read_until_closed(self) -> tuple[list[Message], bool]:
        """All messages until the peer closes; (messages, closed) - closed False on timeout."""
        out: list[Message] = []
        try:
            while (m := self.read_message()) is not None:
                out.append(m)
        except TimeoutError:
            return out, False
        return out, True

    def startup(
        self, user: str = "postgres", database: str = "postgres", **params: str
    ) -> list[Message]:
        """Send a StartupMessage (trust auth) and read through ReadyForQuery or an error."""
        self.send(startup_packet(user, database, **params))
        return self.read_until(b"Z", b"E")

    def query(self, sql: str) -> list[Message]:
        self.send(query_message(sql))
        return self.read_until(b"Z")


def errors_in(messages: list[Message]) -> list[dict[str, str]]:
    return [error_fields(p) for t, p in messages if t == b"E"]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll `predicate` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)
