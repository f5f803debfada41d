"""Session lifecycle through the proxy: cancel, client and server disconnects, admission limits,
graceful shutdown of `pgsage serve`, and configuration errors at start.

Every check uses real clients (psycopg, asyncpg, or a raw socket where a driver cannot misbehave
on purpose) against the real PostgreSQL; the upstream's state is read on a direct connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from proxy.upstream import Upstream
from tests.fix_pgcluster import RawClient, errors_in, query_message, startup_packet, wait_until
from tests.fix_proxy import PG_HOST, PG_PORT, create_database, direct_dsn, drop_database

PGSAGE = Path(sys.executable).with_name("pgsage")


def app_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def backends(application_name: str) -> list[tuple[int, str, str]]:
    """(pid, state, query) of the upstream backends with this application_name."""
    with psycopg.connect(direct_dsn(), autocommit=True) as conn:
        return conn.execute(
            "select pid, state, query from pg_stat_activity where application_name = %s",
            (application_name,),
        ).fetchall()


def wait_active(application_name: str, text: str, timeout: float = 10) -> int:
    """Wait until the backend of `application_name` is running `text`; its pid."""
    found: list[int] = []

    def running() -> bool:
        for pid, state, query in backends(application_name):
            if state == "active" and text in query:
                found.append(pid)
                return True
        return False

    wait_until(running, timeout, f"{application_name} to run {text!r}")
    return found[0]


class Background:
    """Run a blocking call in a thread; keep its result or exception and when it ended."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at = 0.0
        self._fn = fn
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc
        self.ended_at = time.monotonic()

    def join(self, timeout: float = 15) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background call did not finish"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(p, name: str, **labels: str) -> float:
    return p.server.metrics.registry.get_sample_value(name, labels) or 0.0


# ================================================================== 3. CancelRequest


def test_cancel_pg_sleep_from_second_connection(proxy, test_db):
    name = app_name("cancel")
    with psycopg.connect(proxy.dsn(test_db, application_name=name), autocommit=True) as conn:
        pid = conn.info.backend_pid
        run = Background(lambda: conn.execute("select pg_sleep(30)"))
        # the BackendKeyData reached the client unchanged: its pid is the real backend's
        assert wait_active(name, "pg_sleep") == pid
        asked = time.monotonic()
        conn.cancel_safe(timeout=5)  # a new connection to the proxy with a CancelRequest
        run.join()
        assert isinstance(run.error, pg_errors.QueryCanceled), run.error
        assert run.error.sqlstate == "57014"
        assert run.ended_at - asked < 1.0
        # the session goes on
        assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)
    recs = [r for r in proxy.records if r.sql == "select pg_sleep(30)"]
    assert len(recs) == 1
    assert recs[0].status == "cancelled" and recs[0].sqlstate == "57014"
    assert recs[0].duration < 5
    assert metric(proxy, "pgsage_cancel_requests_total", result="forwarded") == 1


async def test_cancel_asyncpg_timeout(proxy, test_db):
    """asyncpg cancels a statement that overruns its timeout with its own CancelRequest."""
    conn = await asyncpg.connect(
        host=proxy.host, port=proxy.port, user="postgres", database=test_db, timeout=10
    )
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("select pg_sleep(30)", timeout=0.5)
        assert time.monotonic() - started < 5
        assert await conn.fetchval("select 41 + 1") == 42
    finally:
        await conn.close()
    wait_until(
        lambda: any(
            r.sql == "select pg_sleep(30)" and r.status == "cancelled" for r in proxy.records
        ),
        what="the cancelled record",
    )


def test_cancel_with_wrong_key_is_ignored(proxy, test_db):
    name = app_name("wrongkey")
    with psycopg.connect(proxy.dsn(test_db, application_name=name), autocommit=True) as conn:
        pid = conn.info.backend_pid
        run = Background(lambda: conn.execute("select pg_sleep(1), 'finished'").fetchone())
        wait_active(name, "pg_sleep")
        with RawClient(proxy.host, proxy.port) as c:  # right pid, wrong secret
            c.send((16).to_bytes(4, "big") + (80877102).to_bytes(4, "big"))
            c.send(pid.to_bytes(4, "big", signed=True) + b"\x00\x00\x00\x00")
            assert c.read_until_closed() == ([], True)
        run.join()
        assert run.error is None and run.result == ("", "finished")
    wait_until(
        lambda: metric(proxy, "pgsage_cancel_requests_total", result="unknown_key") == 1,
        what="the unknown-key metric",
    )


# ================================================================== 4. client goes away


def test_client_disconnect_mid_query_cancels_upstream(proxy, test_db):
    name = app_name("vanish")
    conn = psycopg.connect(proxy.dsn(test_db, application_name=name), autocommit=True)
    try:
        run = Background(lambda: conn.execute("select pg_sleep(30)"))
        wait_active(name, "pg_sleep")
        gone_at = time.monotonic()
        # kill the client's socket under libpq's feet (FIN to the proxy)
        dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
        dup.shutdown(socket.SHUT_RDWR)
        dup.close()
        run.join()
        assert isinstance(run.error, psycopg.OperationalError)
        wait_until(lambda: not backends(name), 3, "the upstream backend to exit")
        assert time.monotonic() - gone_at < 3
    finally:
        conn.close()
    wait_until(lambda: not proxy.server.clients, what="the session to be forgotten")
    recs = [r for r in proxy.records if r.sql == "select pg_sleep(30)"]
    assert len(recs) == 1
    assert recs[0].status == "cancelled" and recs[0].sqlstate == "57014"
    assert recs[0].execution.error_message == "client disconnected"


def test_client_reset_mid_query_cancels_upstream(proxy, test_db):
    """Same with an abortive close (RST) from a raw client."""
    name = app_name("reset")
    c = RawClient(proxy.host, proxy.port)
    assert c.startup(database=test_db, application_name=name)[-1] == (b"Z", b"I")
    c.send(query_message("select pg_sleep(30)"))
    wait_active(name, "pg_sleep")
    gone_at = time.monotonic()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()
    wait_until(lambda: not backends(name), 3, "the upstream backend to exit")
    assert time.monotonic() - gone_at < 3
    wait_until(lambda: not proxy.server.clients, what="the session to be forgotten")
    recs = [r for r in proxy.records if r.sql == "select pg_sleep(30)"]
    assert [r.status for r in recs] == ["cancelled"]


async def test_client_abort_mid_extended_query(proxy, test_db):
    """asyncpg (extended protocol) aborts its connection mid-statement."""
    name = app_name("abort")
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user="postgres",
        database=test_db,
        server_settings={"application_name": name},
        timeout=10,
    )
    task = asyncio.ensure_future(conn.fetchval("select pg_sleep(30)::text || $1::text", "x"))
    await asyncio.to_thread(wait_active, name, "pg_sleep")
    gone_at = time.monotonic()
    conn.terminate()  # closes the socket at once
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await task
    await asyncio.to_thread(wait_until, lambda: not backends(name), 3, "the backend to exit")
    assert time.monotonic() - gone_at < 3
    recs = [r for r in proxy.records if r.sql and "pg_sleep(30)::text" in r.sql]
    assert len(recs) == 1
    assert recs[0].protocol == "extended" and recs[0].status == "cancelled"


def test_client_disconnect_mid_message_leaves_no_backend(proxy, test_db):
    """A client that dies half-way through a message: the upstream is closed, not confused."""
    name = app_name("halfmsg")
    c = RawClient(proxy.host, proxy.port)
    assert c.startup(database=test_db, application_name=name)[-1] == (b"Z", b"I")
    whole = query_message("select 'never completed'")
    c.send(whole[:12])
    time.sleep(0.05)  # let the partial message reach the server
    c.close()
    wait_until(lambda: not backends(name), 5, "the upstream backend to exit")
    wait_until(lambda: not proxy.server.clients, what="the session to be forgotten")


# ================================================================== 5. upstream goes away


def test_upstream_terminated_while_idle(proxy, test_db):
    victim_name = app_name("victim")
    with (
        psycopg.connect(proxy.dsn(test_db, application_name=victim_name), autocommit=True) as a,
        psycopg.connect(proxy.dsn(test_db), autocommit=True) as b,
    ):
        pid = a.info.backend_pid
        with psycopg.connect(direct_dsn(), autocommit=True) as admin:
            assert admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        # the server's FATAL reaches the client first; the proxy then closes the session
        assert select.select([a.pgconn.socket], [], [], 5)[0]
        with pytest.raises(psycopg.OperationalError) as info:
            a.execute("select 1")
        assert "terminating connection due to administrator command" in str(info.value)
        assert b.execute("select 'b still fine'").fetchone() == ("b still fine",)
        wait_until(lambda: len(proxy.server.clients) == 1, what="the victim to be forgotten")
    with psycopg.connect(proxy.dsn(test_db)) as c:
        assert c.execute("select 'new client fine'").fetchone() == ("new client fine",)


def test_upstream_terminated_mid_query(proxy, test_db):
    name = app_name("victim-busy")
    with (
        psycopg.connect(proxy.dsn(test_db, application_name=name), autocommit=True) as a,
        psycopg.connect(proxy.dsn(test_db), autocommit=True) as b,
    ):
        run = Background(lambda: a.execute("select pg_sleep(30)"))
        pid = wait_active(name, "pg_sleep")
        killed_at = time.monotonic()
        with psycopg.connect(direct_dsn(), autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        run.join()
        assert isinstance(run.error, pg_errors.AdminShutdown), run.error
        assert run.error.sqlstate == "57P01"
        assert run.ended_at - killed_at < 5
        assert b.execute("select 'b unaffected'").fetchone() == ("b unaffected",)
    recs = [r for r in proxy.records if r.sql == "select pg_sleep(30)"]
    assert len(recs) == 1  # from the server's FATAL; the lost upstream adds no second one
    assert recs[0].status == "error" and recs[0].sqlstate == "57P01"


@pytest.fixture
def dead_upstream_proxy(make_proxy):
    port = free_port()  # nothing listens here
    return make_proxy(upstream=Upstream(host="127.0.0.1", port=port)), port


def test_upstream_unreachable_psycopg(dead_upstream_proxy):
    p, port = dead_upstream_proxy
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(p.dsn(connect_timeout=10))
    text = str(info.value)
    assert f"FATAL:  pgsage could not connect to the upstream server at 127.0.0.1:{port}" in text
    assert "server closed the connection unexpectedly" not in text
    assert time.monotonic() - started < 5
    wait_until(lambda: not p.server.clients, what="the client to be forgotten")
    assert not p.server.admitted


async def test_upstream_unreachable_asyncpg_sqlstate(dead_upstream_proxy):
    p, _ = dead_upstream_proxy
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(host=p.host, port=p.port, user="postgres", timeout=10)
    assert info.value.sqlstate == "08006"
    assert isinstance(info.value, asyncpg.exceptions.ConnectionFailureError)


def test_upstream_unreachable_raw(dead_upstream_proxy):
    p, _ = dead_upstream_proxy
    with RawClient(p.host, p.port) as c:
        c.send(startup_packet())
        msgs, closed = c.read_until_closed()
    errs = errors_in(msgs)
    assert closed and len(msgs) == 1 and len(errs) == 1
    assert errs[0]["S"] == "FATAL" and errs[0]["C"] == "08006"


# ================================================================== 6. max_client_connections


def test_max_client_connections(make_proxy, test_db):
    p = make_proxy(max_client_connections=2)
    first = psycopg.connect(p.dsn(test_db), autocommit=True)
    second = psycopg.connect(p.dsn(test_db), autocommit=True)
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(p.dsn(test_db, connect_timeout=10))
        assert "FATAL:  sorry, too many clients already" in str(info.value)
        with RawClient(p.host, p.port) as c:  # the SQLSTATE, as sent on the wire
            msgs = c.startup(database=test_db)
            assert [e["C"] for e in errors_in(msgs)] == ["53300"]
            assert c.read_until_closed() == ([], True)
        assert first.execute("select 1").fetchone() == (1,)
        assert second.execute("select 2").fetchone() == (2,)
        first.close()
        wait_until(lambda: len(p.server.admitted) == 1, what="a slot to free up")
        with psycopg.connect(p.dsn(test_db)) as third:
            assert third.execute("select 3").fetchone() == (3,)
    finally:
        first.close()
        second.close()
    assert metric(p, "pgsage_client_connection_errors_total", reason="too_many_connections") == 2


async def test_max_client_connections_asyncpg_sqlstate(make_proxy, test_db):
    p = make_proxy(max_client_connections=1)
    holder = await asyncpg.connect(host=p.host, port=p.port, user="postgres", database=test_db)
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(
                host=p.host, port=p.port, user="postgres", database=test_db, timeout=10
            )
        assert info.value.sqlstate == "53300"
        assert await holder.fetchval("select 'holder ok'") == "holder ok"
    finally:
        await holder.close()


def test_clients_in_startup_do_not_count(make_proxy, test_db):
    """Half-open sockets that never send a startup packet take no session slot."""
    p = make_proxy(max_client_connections=1)
    idle_sockets = [socket.create_connection((p.host, p.port), timeout=5) for _ in range(5)]
    try:
        with psycopg.connect(p.dsn(test_db)) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        for s in idle_sockets:
            s.close()


def test_startup_while_shutting_down_gets_57p03(proxy):
    """A startup packet that arrives during the drain: PostgreSQL's "shutting down" answer.

    (The listener is closed by then, so only clients connected before can get here.)
    """
    with RawClient(proxy.host, proxy.port) as early:
        proxy.call_soon(lambda: setattr(proxy.server, "shutting_down", True))
        try:
            msgs = early.startup()
            assert early.read_until_closed() == ([], True)
        finally:
            proxy.call_soon(lambda: setattr(proxy.server, "shutting_down", False))
    assert [(e["S"], e["C"], e["M"]) for e in errors_in(msgs)] == [
        ("FATAL", "57P03", "the database system is shutting down")
    ]
    assert not proxy.server.admitted


# ================================================================== 7. `pgsage serve` lifecycle


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def dsn(self, **extra: object) -> str:
        parts = {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": "postgres"}
        parts.update(connect_timeout=10, **extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSAGE_")}
    env.update(extra)
    return env


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[..., Served]]:
    """`pgsage serve` as a process; its query log goes to a database of the test's own (the
    default, `warehouse`, would be created on the shared server and left there) and its HTTP
    port is a free one."""
    procs: list[subprocess.Popen[bytes]] = []
    warehouse = create_database("pgsage_lifecycle")

    def start(shutdown_timeout: float = 10) -> Served:
        port = free_port()
        log = tmp_path / f"pgsage-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(PGSAGE),
                    "serve",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--upstream",
                    f"{PG_HOST}:{PG_PORT}",
                    "--http",
                    f"127.0.0.1:{free_port()}",
                    "--log-format",
                    "json",
                ],
                cwd=tmp_path,
                env=clean_env(
                    PGSAGE_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
                    PGSAGE_WAREHOUSE_DATABASE=warehouse,
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        served = Served(proc, port, log)

        def listening() -> bool:
            assert proc.poll() is None, f"pgsage serve exited early:\n{served.output()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_until(listening, 30, "pgsage serve to listen")
        return served

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        drop_database(warehouse)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_in_flight_and_refuses_new(serve):
    srv = serve(shutdown_timeout=10)
    name = app_name("drain")
    busy = psycopg.connect(srv.dsn(application_name=name), autocommit=True)
    idle = psycopg.connect(srv.dsn(), autocommit=True)
    raw_idle = RawClient("127.0.0.1", srv.port)
    try:
        assert raw_idle.startup()[-1] == (b"Z", b"I")
        assert idle.execute("select 1").fetchone() == (1,)
        run = Background(lambda: busy.execute("select pg_sleep(2), 'finished'").fetchone())
        wait_active(name, "pg_sleep")
        srv.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # new connections are refused while the in-flight statement still runs
        wait_until(lambda: refuses_connections(srv.port), 5, "the listener to close")
        assert srv.proc.poll() is None and run.thread.is_alive()

        # idle sessions are told why they are closed: FATAL 57P01, as PostgreSQL does
        msgs, closed = raw_idle.read_until_closed()
        assert closed and [(e["S"], e["C"]) for e in errors_in(msgs)] == [("FATAL", "57P01")]
        assert select.select([idle.pgconn.socket], [], [], 5)[0]
        with pytest.raises(pg_errors.AdminShutdown) as info:
            idle.execute("select 1")
        assert info.value.sqlstate == "57P01"

        # the in-flight statement finishes successfully, then the process exits 0
        run.join()
        assert run.error is None and run.result == ("", "finished")
        assert srv.proc.wait(timeout=10) == 0
        assert time.monotonic() - signalled < 10
        wait_until(lambda: not backends(name), 5, "its upstream session to end")
    finally:
        busy.close()
        idle.close()
        raw_idle.close()


def test_sigterm_deadline_terminates_long_statement(serve):
    srv = serve(shutdown_timeout=1)
    name = app_name("deadline")
    conn = psycopg.connect(srv.dsn(application_name=name), autocommit=True)
    try:
        run = Background(lambda: conn.execute("select pg_sleep(30)"))
        wait_active(name, "pg_sleep")
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        run.join(15)
        assert isinstance(run.error, pg_errors.AdminShutdown), run.error
        assert 0.9 < run.ended_at - signalled < 5
        assert srv.proc.wait(timeout=10) == 0
        # the statement the client was told about is gone upstream too
        wait_until(lambda: not backends(name), 5, "the upstream backend to exit")
    finally:
        conn.close()


def ignored_signals(pid: int) -> set[int]:
    """The signals a running process ignores, from the SigIgn mask in /proc/PID/status."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("SigIgn:"))  # fmt: skip
    mask = int(line.split()[1], 16)
    return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux /proc")
def test_serve_ignores_sigpipe(serve):
    """A peer gone mid-write is an EPIPE error for one session, never the process's death: the
    demo once died by SIGPIPE (-13) when Ctrl-C closed the proxy under its simulated users."""
    srv = serve()
    assert signal.SIGPIPE in ignored_signals(srv.proc.pid)
    with psycopg.connect(srv.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("args", "env", "key"),
    [
        ([], {"PGSAGE_LISTEN": "nonsense"}, "listen"),
        (["--max-client-connections", "0"], {}, "max_client_connections"),
        ([], {"PGSAGE_SHUTDOWN_TIMEOUT": "-1"}, "shutdown_timeout"),
    ],
)
def test_bad_setting_exits_2_with_one_line(tmp_path, args, env, key):
    proc = subprocess.run(
        [str(PGSAGE), "serve", "--upstream", f"{PG_HOST}:{PG_PORT}", *args],
        cwd=tmp_path,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and "invalid configuration" in lines[0]
