"""Faults survived, each with a real server (issue 13): PostgreSQL restarted under load, the
metadata database gone for a while, a client that stops reading a huge result, slow and silent
clients at startup, a connection flood and clients that vanish with a reset.

Restarts use a private cluster (initdb'd here, stopped at the end of the module), never the
machine's shared server. The proxy runs in this process (tests.fix_proxy / tests.fix_service),
so its memory is this process's RSS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from proxy.upstream import Upstream
from tests.fix_pgcluster import (
    PG_BIN,
    SCRAM_USER,
    RawClient,
    _free_port,
    _run,
    errors_in,
    query_message,
    startup_packet,
    wait_until,
)
from tests.fix_proxy import direct_dsn

#: SQLSTATEs a statement in flight may end with when its server goes away (PostgreSQL's own
#: fast shutdown, or pgsage's "lost the upstream", or a session starting during shutdown)
RESTART_ERRORS = {"57P01", "08006", "57P03", "08001"}


# ------------------------------------------------------------------ a private cluster


@dataclass
class Cluster:
    """A throwaway PostgreSQL 15 cluster (trust auth) that tests may stop and start."""

    base: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dsn(self, dbname: str = "postgres", **extra: object) -> str:
        parts = {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": dbname}
        parts.update({"connect_timeout": 5, **extra})
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def _ctl(self, *args: str) -> None:
        cmd = [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.base / "log")]
        out = _run([*cmd, *args], timeout=60)
        assert out.returncode == 0, f"pg_ctl {args} failed:\n{out.stdout}\n{out.stderr}"

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "-t", "30", "stop")

    def start(self) -> None:
        self._ctl("-w", "-t", "30", "start")

    def running(self) -> bool:
        with (
            contextlib.suppress(psycopg.OperationalError),
            psycopg.connect(self.dsn(connect_timeout=2)),
        ):
            return True
        return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="pgsage_faults_"))
    shutil.chown(base, "postgres", "postgres") if os.geteuid() == 0 else None
    init = _run(
        [str(PG_BIN / "initdb"), "-D", str(base / "data"), "-U", "postgres", "--auth=trust",
         "--no-sync", "-E", "UTF8", "--locale=C"]
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    (base / "sock").mkdir()
    if os.geteuid() == 0:
        shutil.chown(base / "sock", "postgres", "postgres")
    c = None
    for _ in range(5):  # the port may be taken between choosing and binding it
        c = Cluster(base, _free_port())
        (c.data_dir / "postgresql.auto.conf").write_text(
            f"listen_addresses = '127.0.0.1'\nport = {c.port}\n"
            f"unix_socket_directories = '{base / 'sock'}'\nmax_connections = 60\n"
            "shared_buffers = 16MB\nfsync = off\nsynchronous_commit = off\n"
            "full_page_writes = off\n"
        )
        try:
            c.start()
            break
        except AssertionError:
            c = None
    assert c is not None, "could not start the private cluster"
    try:
        yield c
    finally:
        if (c.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(AssertionError):
                c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cluster_up(cluster: Cluster) -> Cluster:
    """The private cluster, running (a failed test may have left it stopped)."""
    if not (cluster.data_dir / "postmaster.pid").exists():
        cluster.start()
    return cluster


def sqlstate_of(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None) or (
        "08006" if isinstance(exc, psycopg.OperationalError) else None
    )


# ================================================================== PostgreSQL restarted


class Worker:
    """A client loop through the proxy: run statements, and on an error note its SQLSTATE and
    reconnect. Records every outcome with its time."""

    def __init__(self, dsn: str, sql: str, once: bool = False) -> None:
        self.dsn, self.sql, self.once = dsn, sql, once
        self.ok: list[float] = []
        self.errors: list[tuple[float, str | None, str]] = []
        self.unexpected: list[BaseException] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                row = conn.execute(self.sql).fetchone()
                assert row is not None and row[-1] == "ok"
                self.ok.append(time.monotonic())
            except psycopg.Error as exc:
                self.errors.append((time.monotonic(), sqlstate_of(exc), str(exc)))
                if conn is not None:
                    conn.close()
                conn = None
                if self.once:
                    return
                time.sleep(0.02)
            except BaseException as exc:  # reported by the test
                self.unexpected.append(exc)
                return
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive()


def test_postgres_restart_under_load(make_proxy, cluster_up):
    c = cluster_up
    p = make_proxy(upstream=Upstream.parse(c.address), connect_timeout=2)
    workers = [Worker(p.dsn(), "select pg_sleep(0.02), 'ok'") for _ in range(4)]
    long_running = [Worker(p.dsn(), "select pg_sleep(30), 'ok'", once=True) for _ in range(2)]
    try:
        wait_until(lambda: all(len(w.ok) >= 5 for w in workers), 20, "load to run")
        wait_until(lambda: len(p.server.admitted) == 6, 10, "the long statements to be in flight")
        time.sleep(0.3)
        stopped_at = time.monotonic()
        c.stop()
        # while it is down: the proxy stays up and refuses new sessions with a clear error
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(p.dsn(connect_timeout=5))
        assert "pgsage could not connect to the upstream server" in str(info.value)
        time.sleep(0.5)
        c.start()
        back_at = time.monotonic()
        # a new session succeeds within 1 s of the server's return
        while True:
            try:
                with psycopg.connect(p.dsn(connect_timeout=2)) as conn:
                    assert conn.execute("select 'back'").fetchone() == ("back",)
                break
            except psycopg.OperationalError:
                assert time.monotonic() - back_at < 1.0, "no session 1 s after the restart"
                time.sleep(0.02)
        reconnect_s = time.monotonic() - back_at
        wait_until(
            lambda: all(any(t > back_at for t in w.ok) for w in workers),
            5,
            "every worker to run statements again",
        )
    finally:
        for w in workers + long_running:
            w.stop()
    assert reconnect_s < 1.0
    for w in workers + long_running:
        assert not w.unexpected, w.unexpected
        # every failure is a clear, classified one, and only around the restart
        for at, state, message in w.errors:
            assert state in RESTART_ERRORS, (state, message)
            assert stopped_at - 0.1 <= at, (state, message)
    # the statements in flight when the server went down failed with its FATAL or pgsage's
    in_flight = [w.errors[0] for w in long_running]
    assert all(e[1] in ("57P01", "08006") for e in in_flight), in_flight
    assert all(e[0] < back_at for e in in_flight), in_flight
    # nothing leaks: sessions that died are forgotten
    wait_until(lambda: len(p.server.clients) <= 6, 10, "dead sessions to be forgotten")
    with psycopg.connect(p.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# ================================================================== metadata database down


def metric(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def logged(c: Cluster, db: str, marker: str) -> int:
    with psycopg.connect(c.dsn(db)) as conn:
        row = conn.execute(
            "select count(*) from metadata.query_logs where normalized_text like %s",
            (f"%{marker}%",),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_metadata_database_down_for_a_while(make_service, cluster_up, test_db):
    """Metadata on the private cluster, clients on the shared server: stop the first."""
    c = cluster_up
    meta_db = f"pgsage_meta_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(c.dsn(), autocommit=True) as conn:
        conn.execute(f'create database "{meta_db}"')
    svc = make_service(
        metadata_dsn=f"postgresql://postgres@127.0.0.1:{c.port}/{meta_db}",
        querylog_flush_interval=0.1,
    )
    registry = svc.service.metrics.registry
    client = psycopg.connect(svc.dsn(test_db), autocommit=True)
    try:
        client.execute("select 1 as before_outage")
        wait_until(lambda: logged(c, meta_db, "before_outage") == 1, 15, "the log to work")

        c.stop()
        latencies: list[float] = []
        deadline = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            row = client.execute("select %s::int as during_outage", (i,)).fetchone()
            assert row == (i,)
            latencies.append(time.monotonic() - t0)
            i += 1
            time.sleep(0.005)
        # new sessions too
        with psycopg.connect(svc.dsn(test_db)) as other:
            assert other.execute("select 'new session'").fetchone() == ("new session",)

        def dropped() -> float:
            return sum(
                metric(registry, "pgsage_querylog_dropped_total", reason=r)
                for r in ("db_unavailable", "db_error")
            )

        wait_until(lambda: dropped() > 0, 10, "dropped records to be counted")
        c.start()
        # the writer comes back by itself (its backoff is at most 30 s): no flush() here
        deadline = time.monotonic() + 40
        while logged(c, meta_db, "after_outage") == 0:
            assert time.monotonic() < deadline, "the query log did not recover"
            client.execute("select 1 as after_outage")
            time.sleep(0.2)
    finally:
        client.close()
        if not c.running():
            c.start()
    latencies.sort()
    assert i > 30, f"only {i} statements ran during the outage"
    assert latencies[len(latencies) * 99 // 100] < 0.25, latencies[-5:]
    assert dropped() > 0
    status = svc.service.recorder.dropped
    assert sum(status.values()) > 0, status
    # what was dropped is not written late: no row of the outage appears after recovery
    assert logged(c, meta_db, "during_outage") == 0
    svc.stop()
    with psycopg.connect(c.dsn(), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{meta_db}" with (force)')


# ================================================================== a client that stops reading


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_client_that_stops_reading_gets_backpressure(make_proxy, test_db):
    p = make_proxy()
    app = f"hog-{uuid.uuid4().hex[:8]}"
    hog = RawClient(p.host, p.port)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    bystander = psycopg.connect(p.dsn(test_db), autocommit=True)
    try:
        assert hog.startup(database=test_db, application_name=app)[-1] == (b"Z", b"I")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS, so the peak below is this test's
        rss_before = _status_kib("VmRSS")
        # ~2 GB of rows, never read
        hog.send(query_message("select repeat('x', 1000) from generate_series(1, 2000000)"))
        session = next(iter(s for s in p.server.clients if s.info.application_name == app))

        def upstream_rx() -> int:
            return p.call_soon(lambda: session.upstream.rx)

        wait_until(lambda: upstream_rx() > 1 << 20, 20, "the result to start flowing")
        time.sleep(1.0)  # buffers fill up
        first = upstream_rx()
        # meanwhile other clients are unaffected
        for i in range(50):
            row = bystander.execute("select %s::int, repeat('y', 1000)", (i,)).fetchone()
            assert row is not None and row[0] == i and len(row[1]) == 1000
        time.sleep(1.0)
        second = upstream_rx()
        reading = p.call_soon(lambda: session.upstream.transport.is_reading())
        buffered = p.call_soon(lambda: session.transport.get_write_buffer_size())
        peak_mib = (_status_kib("VmHWM") - rss_before) / 1024
        with psycopg.connect(direct_dsn(test_db)) as direct:
            state = direct.execute(
                "select state, wait_event from pg_stat_activity where application_name = %s",
                (app,),
            ).fetchone()
    finally:
        hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        hog.close()
        bystander.close()
    assert not reading, "the proxy kept reading from the upstream"
    assert second - first < 1 << 20, f"{second - first} bytes read while the client read none"
    assert second < 64 << 20, f"{second >> 20} MiB read from the upstream"
    assert buffered < 1 << 20, f"{buffered} bytes buffered towards the client"
    assert peak_mib < 100, f"RSS grew by {peak_mib:.0f} MiB"
    # the server is blocked sending, not computing the whole result into the proxy
    assert state == ("active", "ClientWrite"), state
    # and the hog's reset ends its upstream statement
    wait_until(lambda: not p.server.clients, 10, "the hog to be forgotten")

    def backend_gone() -> bool:
        with psycopg.connect(direct_dsn(test_db)) as direct:
            return not direct.execute(
                "select 1 from pg_stat_activity where application_name = %s", (app,)
            ).fetchall()

    wait_until(backend_gone, 10, "the hog's backend to end")


# ================================================================== slow and silent clients


def test_silent_and_trickling_clients_hit_startup_timeout(make_proxy):
    p = make_proxy(startup_timeout=1)
    silent = RawClient(p.host, p.port)
    trickle = RawClient(p.host, p.port)
    packet = startup_packet(application_name="trickle")
    started = time.monotonic()
    try:
        # one byte every 0.2 s keeps the connection busy but never finishes the packet
        for i in range(5):
            trickle.send(packet[i : i + 1])
            time.sleep(0.2)
        silent_msgs, silent_closed = silent.read_until_closed()
        trickle_msgs, trickle_closed = trickle.read_until_closed()
    finally:
        silent.close()
        trickle.close()
    elapsed = time.monotonic() - started
    assert silent_closed and trickle_closed and elapsed < 3.0
    for msgs in (silent_msgs, trickle_msgs):
        errs = errors_in(msgs)
        assert [(e["S"], e["C"]) for e in errs] == [("FATAL", "08006")], msgs
        assert errs[0]["M"] == "canceling authentication due to timeout"
    wait_until(lambda: not p.server.clients, 5, "the stalled clients to be forgotten")
    assert not p.server.admitted


def test_client_that_never_answers_the_password_challenge(make_proxy, pg_auth_cluster):
    """Startup sent, AuthenticationMD5Password/SASL received, then silence: the session
    counts (it was admitted) until startup_timeout ends it and frees its slot."""
    p = make_proxy(
        upstream=Upstream.parse(pg_auth_cluster.address),
        startup_timeout=1,
        max_client_connections=1,
    )
    mute = RawClient(p.host, p.port)
    try:
        mute.send(startup_packet(user=SCRAM_USER))
        challenge = mute.read_message()
        assert challenge is not None and challenge[0] == b"R", challenge  # AuthenticationSASL
        assert len(p.server.admitted) == 1
        rest, closed = mute.read_until_closed()
    finally:
        mute.close()
    assert closed and [(e["S"], e["C"]) for e in errors_in(rest)] == [("FATAL", "08006")], rest
    wait_until(lambda: not p.server.admitted, 5, "the slot to be freed")
    with psycopg.connect(pg_auth_cluster.dsn(host=p.host, port=p.port)) as conn:
        assert conn.execute("select 'slot free'").fetchone() == ("slot free",)


def test_connection_flood_beyond_the_limit(make_proxy, test_db):
    limit, flood = 5, 60
    p = make_proxy(max_client_connections=limit)
    app = f"flood-{uuid.uuid4().hex[:8]}"
    results: list[tuple[str, list]] = []
    lock = threading.Lock()
    held: list[RawClient] = []
    gate = threading.Barrier(flood)

    def one() -> None:
        c = RawClient(p.host, p.port)
        gate.wait(10)
        try:
            msgs = c.startup(database=test_db, application_name=app)
        except OSError as exc:
            msgs = [(b"!", str(exc).encode())]
        with lock:
            if msgs and msgs[-1] == (b"Z", b"I"):
                held.append(c)
                results.append(("ok", msgs))
            else:
                rest, closed = c.read_until_closed()
                results.append(("refused" if closed else "open", msgs + rest))
                c.close()

    threads = [threading.Thread(target=one) for _ in range(flood)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        kinds = [k for k, _ in results]
        assert kinds.count("ok") == limit, kinds
        assert kinds.count("refused") == flood - limit, kinds
        for kind, msgs in results:
            if kind == "refused":
                errs = errors_in(msgs)
                assert [(e["S"], e["C"]) for e in errs] == [("FATAL", "53300")], msgs
        # the excess never reached the server
        with psycopg.connect(direct_dsn()) as direct:
            row = direct.execute(
                "select count(*) from pg_stat_activity where application_name = %s", (app,)
            ).fetchone()
        assert row == (limit,)
        for c in held:  # the admitted ones work
            assert [m for m in c.query("select 'held'") if m[0] == b"D"]
    finally:
        for c in held:
            c.close()
    wait_until(lambda: not p.server.admitted, 10, "the slots to be freed")
    with psycopg.connect(p.dsn(test_db)) as conn:
        assert conn.execute("select 'after flood'").fetchone() == ("after flood",)


def _reset(c: RawClient) -> None:
    """Close with SO_LINGER 0: an RST and no FIN, as when a client's host vanishes."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


@pytest.mark.parametrize("when", ["before_startup", "mid_startup", "idle", "in_transaction"])
def test_reset_sockets_are_cleaned_up(make_proxy, test_db, when):
    p = make_proxy(max_client_connections=3)
    app = f"rst-{uuid.uuid4().hex[:8]}"
    victims = []
    for _ in range(3):
        c = RawClient(p.host, p.port)
        if when == "mid_startup":
            c.send(startup_packet(database=test_db, application_name=app)[:11])
        elif when != "before_startup":
            assert c.startup(database=test_db, application_name=app)[-1] == (b"Z", b"I")
            if when == "in_transaction":
                msgs = c.query("begin; create temp table t(x int); insert into t values (1)")
                assert msgs[-1] == (b"Z", b"T"), msgs
        victims.append(c)
    wait_until(lambda: len(p.server.clients) == 3, 5, "the sockets to be accepted")
    for c in victims:
        _reset(c)
    wait_until(lambda: not p.server.clients, 5, "reset sessions to be forgotten")
    assert not p.server.admitted and not p.server.cancel_keys

    def no_backends() -> bool:
        with psycopg.connect(direct_dsn()) as direct:
            return not direct.execute(
                "select 1 from pg_stat_activity where application_name = %s", (app,)
            ).fetchall()

    wait_until(no_backends, 10, "the upstream sessions to end")
    # every slot is free again
    conns = [psycopg.connect(p.dsn(test_db)) for _ in range(3)]
    try:
        assert [c.execute("select 1").fetchone() for c in conns] == [(1,)] * 3
    finally:
        for c in conns:
            c.close()
