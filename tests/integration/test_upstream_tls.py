"""TLS towards the upstream: a private PostgreSQL that accepts TCP only over TLS (hostssl;
hostnossl is rejected), its certificate made for 127.0.0.1 by a private CA. pgsage with
upstream_sslmode = verify-full relays clients (who speak plaintext or their own TLS to pgsage)
over TLS, and its own connections (the query log) use it too; a wrong CA or sslmode disable
fail with clear errors; client-certificate verification on the client side."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.upstream import Upstream
from tests.fix_pgcluster import PG_BIN, _free_port, _run, _stop

HBA = """\
local     all  postgres                 trust
hostssl   all  all       127.0.0.1/32   trust
hostnossl all  all       127.0.0.1/32   reject
"""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca_and_cert(d: Path, name: str, san: str) -> tuple[Path, Path, Path]:
    """A CA, and a certificate/key signed by it for `san`."""
    ca_key, ca = d / f"{name}-ca.key", d / f"{name}-ca.pem"
    key, csr, cert = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", f"/CN={name} test CA")  # fmt: skip
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="pgsage_tls_cluster_"))
    certs = base / "certs"
    certs.mkdir()
    ca, cert, key = _ca_and_cert(certs, "server", "IP:127.0.0.1")
    other_ca, _, _ = _ca_and_cert(certs, "other", "IP:127.0.0.1")
    data, sock, log = base / "data", base / "sock", base / "server.log"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    try:
        init = _run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                     "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])  # fmt: skip
        assert init.returncode == 0, init.stderr
        sock.mkdir()
        server_key = data / "server.key"
        shutil.copy(key, server_key)
        shutil.copy(cert, data / "server.crt")
        os.chmod(server_key, 0o600)
        if os.geteuid() == 0:
            for path in (sock, server_key, data / "server.crt"):
                shutil.chown(path, "postgres", "postgres")
        (data / "pg_hba.conf").write_text(HBA)
        port = _free_port()
        (data / "postgresql.auto.conf").write_text(
            f"listen_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = '{sock}'\nssl = on\n"
            "max_connections = 30\nshared_buffers = 16MB\nfsync = off\n"
        )
        start = _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start"])
        assert start.returncode == 0, log.read_text()[-2000:] if log.exists() else start.stderr
        yield {"port": port, "ca": ca, "other_ca": other_ca, "certs": certs}
    finally:
        _stop(data)
        deadline = time.monotonic() + 10
        while (data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(base, ignore_errors=True)


def test_verify_full_relays_over_tls(make_proxy: Any, tls_cluster: dict[str, Any]) -> None:
    p = make_proxy(upstream=Upstream.parse(f"127.0.0.1:{tls_cluster['port']}"),
                   upstream_sslmode="verify-full",
                   upstream_sslrootcert=tls_cluster["ca"])  # fmt: skip
    with psycopg.connect(p.dsn(), autocommit=True) as c:  # plaintext to pgsage
        row = c.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert row is not None and row[0] is True and row[1].startswith("TLSv1.")
        assert c.execute("SELECT 40 + 2").fetchone() == (42,)


def test_wrong_ca_and_disable_fail_clearly(make_proxy: Any, tls_cluster: dict[str, Any]) -> None:
    upstream = Upstream.parse(f"127.0.0.1:{tls_cluster['port']}")
    wrong = make_proxy(upstream=upstream, upstream_sslmode="verify-full",
                       upstream_sslrootcert=tls_cluster["other_ca"])  # fmt: skip
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(wrong.dsn(), connect_timeout=10)
    plain = make_proxy(upstream=upstream)  # sslmode disable: the server's hostnossl rejects it
    with pytest.raises(psycopg.OperationalError, match=r"no encryption|rejects connection"):
        psycopg.connect(plain.dsn(), connect_timeout=10)
    required = make_proxy(upstream=upstream, upstream_sslmode="require")  # encrypted, unverified
    with psycopg.connect(required.dsn(), autocommit=True) as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


def test_the_query_log_reaches_a_tls_only_server(
    make_service: Any, tls_cluster: dict[str, Any]
) -> None:
    svc = make_service(upstream=f"127.0.0.1:{tls_cluster['port']}", warehouse_database="postgres",
                       upstream_sslmode="verify-full",
                       upstream_sslrootcert=tls_cluster["ca"])  # fmt: skip
    with psycopg.connect(svc.dsn("postgres"), autocommit=True) as c:
        c.execute("SELECT 'over tls' AS marker")
    svc.flush()
    with psycopg.connect(svc.dsn("postgres"), autocommit=True) as c:
        n = c.execute(
            "SELECT count(*) FROM metadata.query_logs WHERE normalized_text LIKE '%AS marker'"
        ).fetchone()
    assert n == (1,)


def test_client_certificates_required(make_proxy: Any, tls_cluster: dict[str, Any]) -> None:
    certs: Path = tls_cluster["certs"]
    ca, cert, key = _ca_and_cert(certs, "proxy", "IP:127.0.0.1")
    client_ca, client_cert, client_key = _ca_and_cert(certs, "client", "DNS:client")
    p = make_proxy(tls_cert=cert, tls_key=key, tls_client_ca=client_ca,
                   tls_client_verify="required")  # fmt: skip
    ok = p.dsn(sslmode="verify-ca", sslrootcert=str(ca), sslcert=str(client_cert),
               sslkey=str(client_key))  # fmt: skip
    with psycopg.connect(ok, autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(p.dsn(sslmode="verify-ca", sslrootcert=str(ca)), connect_timeout=10)
