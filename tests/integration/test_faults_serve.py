"""Faults of the `pgsage serve` process itself (issue 13): `kill -9` during heavy logging and a
SIGHUP reload under connected clients. pgsage runs as a subprocess here, as in production, with
a warehouse (metadata) database of its own on the shared server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import errors as pg_errors

from tests.fix_pgcluster import _free_port, wait_until
from tests.fix_proxy import PG_HOST, PG_PORT, create_database, direct_dsn, drop_database

PGSAGE = Path(sys.executable).with_name("pgsage")


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def dsn(self, dbname: str = "postgres", **extra: object) -> str:
        parts: dict[str, object] = {"host": "127.0.0.1", "port": self.port, "user": "postgres"}
        parts.update({"dbname": dbname, "connect_timeout": 10, **extra})
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def warehouse() -> Iterator[str]:
    name = create_database("pgsage_faultwh")
    yield name
    drop_database(name)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(warehouse: str, port: int | None = None, **env: str) -> Served:
        port = port or _free_port()
        log = tmp_path / f"pgsage-{port}-{len(procs)}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PGSAGE_")}
        environ.update(
            PGSAGE_WAREHOUSE_DATABASE=warehouse,
            PGSAGE_EMBEDDED_FALLBACK="false",
            PGSAGE_HTTP=f"127.0.0.1:{_free_port()}",
            PGSAGE_LOG_FORMAT="json",
            **env,
        )
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(PGSAGE), "serve", "--listen", f"127.0.0.1:{port}",
                 "--upstream", f"{PG_HOST}:{PG_PORT}"],
                cwd=tmp_path, env=environ, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        procs.append(proc)
        served = Served(proc, port, log)

        def ready() -> bool:
            assert proc.poll() is None, f"pgsage serve exited early:\n{served.output()}"
            with contextlib.suppress(psycopg.Error), psycopg.connect(served.dsn()) as conn:
                return conn.execute("select 1").fetchone() == (1,)
            return False

        wait_until(ready, 60, "pgsage serve to answer")
        return served

    yield start
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# ================================================================== kill -9 during heavy logging


class Labelled:
    """A client through pgsage running `select /* pgsage:label=PREFIX:N */ N` in a loop until
    pgsage goes away; `sent` is how many statements were answered."""

    def __init__(self, dsn: str, prefix: str, pause: float = 0.0) -> None:
        self.dsn, self.prefix, self.pause = dsn, prefix, pause
        self.sent = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while True:
                    n = self.sent
                    row = conn.execute(
                        f"select /* pgsage:label={self.prefix}:{n} */ {n}".encode()
                    ).fetchone()
                    assert row == (n,)
                    self.sent += 1
                    if self.pause:
                        time.sleep(self.pause)
        except BaseException as exc:  # pgsage was killed: the expected end
            self.error = exc


def copy_in_progress(conn: psycopg.Connection) -> bool:
    """The query log worker's COPY is running right now (polled on a direct connection)."""
    return bool(
        conn.execute(
            "select 1 from pg_stat_activity where application_name = 'pgsage-querylog'"
            " and state = 'active' and query ilike 'copy%'"
        ).fetchall()
    )


def labelled_rows(warehouse: str, prefix: str) -> list[tuple[str, int]]:
    """(label, transaction id) of the logged rows whose label starts with `prefix`."""
    with psycopg.connect(direct_dsn(warehouse)) as conn:
        return [
            (str(label), int(xid))
            for label, xid in conn.execute(
                "select label, xmin::text::bigint from metadata.query_logs where label like %s",
                (f"{prefix}%",),
            ).fetchall()
        ]


def test_kill_9_during_heavy_logging(serve, warehouse):
    lean = {  # the worker starts faster without the learned parts
        "PGSAGE_QUERYLOG_FLUSH_INTERVAL": "0.1",
        "PGSAGE_ANOMALY_ENABLED": "false",
        "PGSAGE_COST_SERVING": "false",
    }
    srv = serve(warehouse, **lean)
    clients = [Labelled(srv.dsn(application_name="k9"), f"k9c{i}", 0.001) for i in range(4)]
    wait_until(
        lambda: len({x for _, x in labelled_rows(warehouse, "k9c")}) >= 2, 30, "a few batches"
    )
    # kill the whole process group (proxy and query log worker) while a COPY runs, as a
    # power cut would: the COPY in progress must vanish entirely
    caught_mid_copy = False
    with psycopg.connect(direct_dsn(), autocommit=True) as poll:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if copy_in_progress(poll):
                os.killpg(srv.proc.pid, signal.SIGKILL)
                caught_mid_copy = True
                break
        else:
            os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        for c in clients:
            c.thread.join(10)
            assert isinstance(c.error, psycopg.OperationalError), c.error
        wait_until(lambda: not copy_in_progress(poll), 10, "the aborted COPY's backend to end")
    sent = {c.prefix: c.sent for c in clients}

    rows = labelled_rows(warehouse, "k9c")
    per_client: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for label, xid in rows:
        prefix, n = label.rsplit(":", 1)
        per_client[prefix].append((int(n), xid))
    assert set(per_client) <= set(sent), (set(per_client), sent)
    batches: dict[int, int] = defaultdict(int)
    for prefix, items in per_client.items():
        items.sort()
        seqs = [n for n, _ in items]
        # nothing lost in the middle and nothing twice: a prefix of what the client sent
        assert seqs == list(range(len(seqs))), f"{prefix}: holes or duplicates"
        assert len(seqs) <= sent[prefix]
        # batches are whole and in order: transaction ids never go back along a client's rows
        xids = [x for _, x in items]
        assert xids == sorted(xids), f"{prefix}: rows of one batch split across others"
        for x in xids:
            batches[x] += 1
    assert len(batches) >= 2, "expected several batches before the kill"
    assert caught_mid_copy, "no COPY was ever seen in progress (heavier load needed?)"

    # a restart on the same metadata resumes cleanly: new rows appear, old ones unchanged
    before = len(rows)
    srv2 = serve(warehouse, port=srv.port, **lean)
    with psycopg.connect(srv2.dsn(application_name="k9-after"), autocommit=True) as conn:
        for n in range(20):
            conn.execute(f"select /* pgsage:label=k9after:{n} */ {n}".encode())
    wait_until(lambda: len(labelled_rows(warehouse, "k9after")) == 20, 20, "rows after the restart")
    assert len(labelled_rows(warehouse, "k9c")) == before
    assert "Traceback" not in srv2.output(), srv2.output()[-3000:]


# ================================================================== SIGHUP reload


def test_sighup_reloads_without_dropping_clients(serve, warehouse, tmp_path):
    config = tmp_path / "pgsage.toml"
    config.write_text("idle_timeout = 0\nmax_client_connections = 50\n")
    srv = serve(warehouse, PGSAGE_CONFIG=str(config))
    name = f"hup-{uuid.uuid4().hex[:8]}"
    idle = [psycopg.connect(srv.dsn(application_name=name), autocommit=True) for _ in range(3)]
    txn = psycopg.connect(srv.dsn(application_name=name))
    busy = psycopg.connect(srv.dsn(application_name=name), autocommit=True)
    outcome: list[object] = []
    try:
        txn.execute("create temp table kept(x int)")
        txn.execute("insert into kept values (42)")  # an open transaction across the reload
        runner = threading.Thread(
            target=lambda: outcome.append(busy.execute("select pg_sleep(1.5), 'done'").fetchone())
        )
        runner.start()
        time.sleep(0.3)
        config.write_text("idle_timeout = 3\nmax_client_connections = 40\n")
        os.kill(srv.proc.pid, signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in srv.output(), 10, "the reload to be logged")
        # nobody was dropped: the in-flight statement finishes, the transaction is intact
        runner.join(10)
        assert outcome == [("", "done")]
        assert txn.execute("select x from kept").fetchone() == (42,)
        txn.commit()
        for conn in idle:
            assert conn.execute("select 'still here'").fetchone() == ("still here",)
        assert srv.proc.poll() is None
        with psycopg.connect(direct_dsn()) as direct:
            row = direct.execute(
                "select count(*) from pg_stat_activity where application_name = %s", (name,)
            ).fetchone()
        assert row == (5,)
        # and the new idle_timeout applies: a session idle for 3 s is closed with 57P05
        time.sleep(4.0)
        with pytest.raises(pg_errors.IdleSessionTimeout):
            idle[0].execute("select 1")
    finally:
        for conn in [*idle, txn, busy]:
            conn.close()
    assert "max_client_connections" in srv.output()
    with socket.create_connection(("127.0.0.1", srv.port), 5):
        pass  # still listening
    assert psutil.Process(srv.proc.pid).is_running()
