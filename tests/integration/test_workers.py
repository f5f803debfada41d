"""Multi-worker mode (issue 15): `pgsage serve --workers 2` as in production, a subprocess in
front of the shared server. Connections spread over both workers on one port; a cancel reaches
the worker that owns the session whichever worker it lands on; /metrics and the admin console
show every worker; an admin SET reaches them all; a killed worker is started again; SIGTERM
stops everything."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fix_pgcluster import _free_port, wait_until
from tests.fix_proxy import PG_HOST, PG_PORT, create_database, drop_database

PGSAGE = Path(sys.executable).with_name("pgsage")
PROMTOOL = "/usr/bin/promtool"


class Workers:
    config: Path

    def __init__(self, proc: subprocess.Popen[bytes], port: int, http: int, log: Path) -> None:
        self.proc, self.port, self.http, self.log = proc, port, http, log

    def configs(self, key: str, tries: int = 12) -> set[str]:
        """`key` as SHOW CONFIG gives it on the workers admin connections land on."""
        seen = set()
        for _ in range(tries):
            with psycopg.connect(self.dsn("pgsage"), autocommit=True) as c:
                seen.add({r[0]: r[1] for r in c.execute("SHOW CONFIG").fetchall()}[key])
        return seen

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=10"

    def admin(self, sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.dsn("pgsage"), autocommit=True) as c:
            cur = c.execute(sql)
            return cur.fetchall() if cur.description else []

    def workers(self) -> list[tuple[object, ...]]:
        return self.admin("SHOW WORKERS")

    def metrics(self) -> str:
        return (
            urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10)
            .read()
            .decode()
        )


def _start(tmp: Path, warehouse: str, **env: str) -> Workers:
    """`pgsage serve --workers 2` in `tmp`, with `env` on top of the tests' environment."""
    port, http = _free_port(), _free_port()
    log = tmp / "pgsage.log"
    (tmp / "config").mkdir()
    (tmp / "config" / "pgsage.toml").write_text("max_client_connections = 50\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGSAGE_")}
    environ.update(PGSAGE_WAREHOUSE_DATABASE=warehouse, PGSAGE_EMBEDDED_FALLBACK="false",
                   PGSAGE_HTTP=f"127.0.0.1:{http}", PGSAGE_LOG_FORMAT="json", **env)  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(PGSAGE), "serve", "--workers", "2", "--listen", f"127.0.0.1:{port}",
             "--upstream", f"{PG_HOST}:{PG_PORT}"],
            cwd=tmp, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    w = Workers(proc, port, http, log)
    w.config = tmp / "config" / "pgsage.toml"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(psycopg.Error, OSError):
            return len(w.workers()) == 2 and "pgsage_" in w.metrics()
        return False

    wait_until(ready, 60, "both workers to answer")
    return w


def _stop(w: Workers) -> None:
    if w.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.proc.pid, signal.SIGKILL)
    w.proc.wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    warehouse = create_database("pgsage_workers")
    # steering watches every SELECT, and no template is slow enough to steer
    w = _start(tmp_path_factory.mktemp("workers"), warehouse,
               PGSAGE_STEERING_ENABLED="true", PGSAGE_STEERING_MIN_MS="100000")  # fmt: skip
    yield w
    _stop(w)
    drop_database(warehouse)


def test_connections_spread_over_the_workers_and_the_console_sees_them_all(
    served: Workers,
) -> None:
    rows = served.workers()
    assert sorted(r[0] for r in rows) == [0, 1]
    assert {r[2] for r in rows} == {"primary", "worker"}
    pids = {int(r[1]) for r in rows}  # type: ignore[call-overload]
    assert len(pids) == 2 and psutil.Process(served.proc.pid).children() != []
    conns = [psycopg.connect(served.dsn(), autocommit=True, application_name="spread")
             for _ in range(16)]  # fmt: skip
    try:
        backends = {c.execute("select pg_backend_pid()").fetchone()[0] for c in conns}  # type: ignore[index]
        assert len(backends) == 16
        per_worker = {int(r[0]): int(r[3]) for r in served.workers()}  # type: ignore[call-overload]
        # the kernel hashes each connection to a worker: both get some (2 ** -15 that not)
        assert sum(per_worker.values()) == 16 and min(per_worker.values()) > 0, per_worker
        clients = [r for r in served.admin("SHOW CLIENTS") if r[10] == "spread"]
        assert {r[8] for r in clients} == backends  # every worker's sessions, once each
        servers = {r[9] for r in served.admin("SHOW SERVERS")}
        assert backends <= servers
    finally:
        for c in conns:
            c.close()


def test_a_cancel_reaches_the_session_whichever_worker_it_lands_on(served: Workers) -> None:
    def relayed() -> float:
        fams = {f.name: f for f in text_string_to_metric_families(served.metrics())}
        return sum(s.value for s in fams["pgsage_cancel_requests"].samples
                   if s.labels["result"] == "relayed")  # fmt: skip

    before = relayed()
    for _ in range(12):  # a cancel is a new connection: about half land on the other worker
        with psycopg.connect(served.dsn(), autocommit=True) as c:
            t0 = time.monotonic()
            threading.Timer(0.2, c.cancel).start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                c.execute("select pg_sleep(30)")
            assert time.monotonic() - t0 < 1.5
    assert relayed() - before >= 1  # (2 ** -12 that none crossed)


def test_show_queries_adds_up_every_workers_statements(served: Workers) -> None:
    conns = [psycopg.connect(served.dsn(), autocommit=True) for _ in range(8)]
    try:
        for i in range(24):
            conns[i % 8].execute("select %s::int AS workers_marker", (i,), prepare=False)
    finally:
        for c in conns:
            c.close()

    def ours() -> list[tuple[object, ...]]:
        return [r for r in served.admin("SHOW QUERIES LIMIT 100") if "workers_marker" in str(r[11])]

    wait_until(lambda: [r[1] for r in ours()] == [24], 30, "the statements in SHOW QUERIES")
    (row,) = ours()
    total, mean = float(row[2]), float(row[3])  # type: ignore[arg-type]
    assert abs(total / 24 - mean) < 0.01 and float(row[4]) <= mean <= float(row[5])  # type: ignore[arg-type]


def test_show_steering_has_each_workers_templates(served: Workers) -> None:
    """Each worker steers (here: watches) the sessions it holds: a template run through
    connections on both workers has a row from each."""
    conns = [psycopg.connect(served.dsn(), autocommit=True) for _ in range(16)]
    try:  # three runs on each connection: a worker holding one sees enough to watch
        for i in range(48):
            conns[i % 16].execute("select %s::int AS steer_marker", (i,), prepare=False)
    finally:
        for c in conns:
            c.close()
    rows = [r for r in served.admin("SHOW STEERING") if "steer_marker" in str(r[5])]
    assert len(rows) == 2 and {r[1] for r in rows} == {"watching"}, rows
    assert len({r[0] for r in rows}) == 1  # one fingerprint, a row per worker
    assert len(served.admin("SHOW STEERING LIMIT 1")) == 1


def test_metrics_carry_every_worker_and_pass_promtool(served: Workers) -> None:
    with psycopg.connect(served.dsn(), autocommit=True, application_name="counted") as c:
        for _ in range(5):
            c.execute("select 1")
    text = served.metrics()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    workers = {s.labels.get("worker") for s in fams["process_cpu_seconds"].samples}
    assert workers == {"0", "1"}
    queries = [s for s in fams["pgsage_queries"].samples if s.name == "pgsage_queries_total"]
    assert queries and all(s.labels.get("worker") in ("0", "1") for s in queries)
    # summed over workers: every statement of this test is there
    assert sum(s.value for s in queries if s.labels["database"] == "postgres") >= 5
    # promtool comes with Debian's prometheus, which .ci/run installs
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=30)  # fmt: skip
    said = (check.stdout + check.stderr).decode().splitlines()
    problems = [ln for ln in said if "error" in ln.lower()]
    assert not problems, problems


def test_an_admin_set_reaches_every_worker(served: Workers) -> None:
    served.admin("SET steering_min_ms = 123")
    assert served.configs("steering_min_ms") == {"123.0"}  # (2 ** -11 that one was missed)
    served.admin("SET steering_min_ms = 20")


def test_a_reload_keeps_each_workers_share_and_role(served: Workers) -> None:
    """max_client_connections is shared out (50 in the file: 25 each) and stays shared after
    SIGHUP re-reads the file (30: 15 each); a worker's port, its lack of HTTP and of migrations
    are its own, not changes that would want a restart."""
    assert served.configs("max_client_connections") == {"25"}
    served.config.write_text("max_client_connections = 30\n")
    served.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served.configs("max_client_connections", 4) == {"15"}, 20,
               "both workers to reload")  # fmt: skip
    assert served.configs("max_client_connections") == {"15"}
    with psycopg.connect(served.dsn("pgsage"), autocommit=True) as c:
        notices: list[str] = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("RELOAD")
    assert not [n for n in notices if "restart" in n], notices


def test_a_killed_worker_is_started_again_and_sigterm_stops_all(served: Workers) -> None:
    rows = {int(r[0]): int(r[1]) for r in served.workers()}  # type: ignore[call-overload]
    os.kill(rows[1], signal.SIGKILL)

    def replaced() -> bool:
        with contextlib.suppress(psycopg.Error):
            now = {int(r[0]): int(r[1]) for r in served.workers()}  # type: ignore[call-overload]
            return len(now) == 2 and now[1] != rows[1] and now[0] == rows[0]
        return False

    wait_until(replaced, 30, "the supervisor to start worker 1 again")
    children = psutil.Process(served.proc.pid).children(recursive=True)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(served.dsn(), connect_timeout=2)


def _serve_workers(tmp: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGSAGE_")}
    environ.update(PGSAGE_EMBEDDED_FALLBACK="false", PGSAGE_HTTP="", PGSAGE_AUTO_MIGRATE="false",
                   PGSAGE_LOG_FORMAT="json")  # fmt: skip
    return subprocess.run(
        [str(PGSAGE), "serve", "--workers", "2", "--upstream", f"{PG_HOST}:{PG_PORT}", *args],
        cwd=tmp, env=environ, capture_output=True, timeout=60,
    )  # fmt: skip


def test_workers_that_cannot_start_stop_the_supervisor(tmp_path: Path) -> None:
    """A TLS key the workers cannot load makes each exit at start: after three such exits the
    supervisor stops with status 1 instead of restarting them forever. A port another program
    holds is refused before any worker starts."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    t0 = time.monotonic()
    done = _serve_workers(tmp_path, "--listen", f"127.0.0.1:{_free_port()}",
                          "--tls-cert", str(cert), "--tls-key", str(key))  # fmt: skip
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 1, out
    assert "workers keep exiting at start" in out and time.monotonic() - t0 < 45

    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _serve_workers(tmp_path, "--listen", f"127.0.0.1:{port}")
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out, out


def test_show_cache_and_lanes_have_a_row_set_per_worker(tmp_path: Path) -> None:
    """The result cache and the admission lanes are each worker's own: in multi-worker mode
    SHOW CACHE and SHOW LANES give every worker's keys under its number."""
    warehouse = create_database("pgsage_workers_lanes")
    w = _start(tmp_path, warehouse, PGSAGE_CACHE_ENABLED="true",
               PGSAGE_ADMISSION_ENABLED="true")  # fmt: skip
    try:
        for what, key in (("SHOW CACHE", "entries"), ("SHOW LANES", "short_threshold_ms")):
            rows = w.admin(what)
            assert rows and all(len(r) == 3 for r in rows), rows
            keys = {str(n): {r[1] for r in rows if str(r[0]) == str(n)} for n in (0, 1)}
            assert {str(r[0]) for r in rows} == {"0", "1"}, rows
            assert keys["0"] == keys["1"] and key in keys["0"], rows  # the same keys from each
    finally:
        _stop(w)
        drop_database(warehouse)
