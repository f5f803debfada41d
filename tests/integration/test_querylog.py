"""The query log: every statement persisted with its fingerprint, without slowing clients."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import psycopg
import pytest
from psycopg import sql

from optimizer.fingerprint import compute_fingerprint
from tests.fix_proxy import direct_dsn


def _logged(service, sql: str = "select count(*) from metadata.query_logs", *args):
    with psycopg.connect(direct_dsn(service.database), autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def test_every_statement_is_logged_with_its_fingerprint(service):
    n = 20_000
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        conn.execute("create table t (id int primary key, v text)")
        conn.execute("insert into t select g, 'v' || g from generate_series(1, 1000) g")
        with conn.pipeline():
            for i in range(n):
                conn.execute("select v from t where id = %s", (i % 1000 + 1,))
    service.flush()
    rows = _logged(
        service,
        "select fingerprint, normalized_text, protocol, count(*) from metadata.query_logs"
        " where normalized_text like 'select v from t where id = %%'"
        " group by 1, 2, 3",
    )
    assert len(rows) == 1
    fingerprint, _normalized, protocol, count = rows[0]
    assert count == n
    assert protocol == "extended"
    assert fingerprint == compute_fingerprint("select v from t where id = $1").id
    stats = _logged(
        service,
        "select calls, rows, mean_time_ms > 0, p95_ms >= p50_ms from metadata.query_stats"
        " where fingerprint = %s",
        fingerprint,
    )
    assert stats == [(n, n, True, True)]


def test_literals_redacted_by_default_and_kept_on_request(make_service):
    secret = "hunter2-credit-card-4111"
    redacted = make_service()
    with psycopg.connect(redacted.dsn(), autocommit=True) as conn:
        conn.execute(f"select '{secret}' as s, 42 as n")
    redacted.flush()
    rows = _logged(
        redacted,
        "select query_text, normalized_text from metadata.query_logs"
        " where normalized_text like '%%as s%%'",
    )
    assert rows == [(None, "select $1 as s, $2 as n")]
    whole = _logged(
        redacted,
        "select string_agg(coalesce(query_text, '') ||"
        " coalesce(normalized_text, ''), ' ') from metadata.query_logs",
    )
    assert secret not in whole[0][0]

    verbose = make_service(log_parameters=True)
    with psycopg.connect(verbose.dsn(), autocommit=True) as conn:
        conn.execute(f"select '{secret}' as s")
    verbose.flush()
    rows = _logged(
        verbose, "select query_text from metadata.query_logs where normalized_text like '%%as s%%'"
    )
    assert rows == [(f"select '{secret}' as s",)]


def test_same_fingerprint_across_literals_and_in_lists(service):
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        conn.execute("create table u (id int, k text)")
        for q in (
            "select * from u where id in (1, 2, 3)",
            "select * from u where id in (7)",
            "select * from u where id in (4, 5)",
        ):
            conn.execute(q)
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("selec broken syntax 1")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("selec broken syntax 2")
    service.flush()
    fps = _logged(
        service,
        "select count(distinct fingerprint), count(*) from metadata.query_logs"
        " where normalized_text like 'select * from u where id in%%'",
    )
    assert fps == [(1, 3)]
    broken = _logged(
        service,
        "select fingerprint, parsed, status, sqlstate from metadata.query_logs"
        " where normalized_text like 'selec broken%%'",
    )
    assert len(broken) == 2
    assert all(
        not parsed and status == "error" and state == "42601" for _, parsed, status, state in broken
    )
    # unparsed text: a stable hash per whitespace-normalised text
    assert broken[0][0] != broken[1][0]


def test_catalog_traffic_is_tagged(service):
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        conn.execute("select relname from pg_catalog.pg_class limit 1")
        conn.execute("select table_name from information_schema.tables limit 1")
        conn.execute("create table w (a int)")
        conn.execute("select a from w")
    service.flush()
    rows = dict(_logged(service, "select normalized_text, is_catalog from metadata.query_logs"))
    assert rows["select relname from pg_catalog.pg_class limit $1"] is True
    assert rows["select table_name from information_schema.tables limit $1"] is True
    assert rows["select a from w"] is False


def test_metadata_outage_drops_and_counts_without_hurting_traffic(service):
    rec = service.service.recorder
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        for i in range(200):
            conn.execute("select %s::int", (i,))
        service.flush()
        before = rec.written
        assert before >= 200
        # the metadata database goes away: no new connections, and the recorder's is killed
        block = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}")
        db = sql.Identifier(service.database)
        answered = 0
        with psycopg.connect(direct_dsn(), autocommit=True) as admin:
            admin.execute(block.format(db, sql.SQL("false")))
            try:
                admin.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity"
                    " where application_name = 'pgsage-querylog'"
                )
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    for i in range(50):  # clients notice nothing
                        assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
                        answered += 1
                    time.sleep(0.05)
                service.flush()
            finally:
                admin.execute(block.format(db, sql.SQL("true")))
        assert answered > 0
        dropped = sum(rec.dropped.values())
        assert dropped > 0, "no record was dropped while the metadata database was away"
        metrics = urllib.request.urlopen(f"{service.http_url}/metrics").read().decode()
        assert "pgsage_querylog_dropped_total" in metrics
        # the writer recovers: new statements are written again after the outage
        time.sleep(1.5)
        for i in range(100):
            conn.execute("select %s::int + 1", (i,))
    service.flush()
    assert rec.written > before


def test_metrics_pass_promtool_under_traffic(service):
    promtool = shutil.which("promtool")
    assert promtool, (
        "promtool missing: install Debian's prometheus package (scripts/system-deps.sh)"
    )
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        conn.execute("create table m (a int)")
        conn.execute("insert into m select generate_series(1, 10)")
        for _ in range(50):
            conn.execute("select * from m where a = %s", (3,))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        with conn.cursor() as cur, cur.copy("copy m to stdout") as copy:
            for _ in copy:
                pass
    service.flush()
    text = urllib.request.urlopen(f"{service.http_url}/metrics").read().decode()
    for name in (
        "pgsage_queries_total",
        "pgsage_query_duration_seconds_bucket",
        "pgsage_query_errors_total",
        "pgsage_rows_returned_total",
        "pgsage_fingerprint_calls_total",
        "pgsage_fingerprints_tracked",
        "pgsage_client_connections_active",
        "pgsage_event_loop_lag_seconds_bucket",
        "pgsage_upstream_up",
        "pgsage_build_info",
        "pgsage_copy_operations_total",
    ):
        assert name in text, name
    assert 'sqlstate_class="22"' in text
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stdout + check.stderr


def test_a_log_worker_whose_pipe_is_gone_is_replaced_and_the_batch_counted(service):
    """The worker's stdin closed before its exit was reaped (a kill's usual order): the batch
    is dropped and counted, a new worker takes the next one (the write used to raise
    uvloop's RuntimeError out of the flush, uncounted, and reuse the dead worker)."""
    rec = service.service.recorder
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        service.flush()
        first = rec._proc
        assert first is not None and first.stdin is not None
        service.call(_close_stdin(first))
        for i in range(50):
            conn.execute("select %s::int + 3", (i,))
        service.flush()
        assert rec.dropped["worker"] == 50
        for i in range(50):
            conn.execute("select %s::int + 4", (i,))
        service.flush()
    assert rec._proc is not None and rec._proc is not first
    logged = _plus_counts(service)
    assert logged.get("select $1::int + $2", 0) == 50


def _plus_counts(service) -> dict[str, int]:
    """Logged executions of `select $1::int + $2` (the tests' `select %s::int + N`) by text."""
    return dict(
        _logged(
            service,
            "select normalized_text, count(*) from metadata.query_logs"
            " where normalized_text like 'select $1::int + $2'"
            " group by 1",
        )
    )


async def _close_stdin(proc) -> None:
    proc.stdin.close()


def test_a_killed_log_worker_is_replaced_and_traffic_goes_on(service):
    rec = service.service.recorder
    with psycopg.connect(service.dsn(), autocommit=True) as conn:
        for i in range(50):
            conn.execute("select %s::int", (i,))
        service.flush()
        first = rec._proc
        assert first is not None and first.returncode is None
        first.kill()
        for i in range(50):
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
        service.flush()  # the first attempt finds the worker dead: that batch is dropped
        for i in range(50):
            conn.execute("select %s::int + 2", (i,))
        service.flush()
    assert rec._proc is not None and rec._proc is not first
    logged = _plus_counts(service)
    # the batch in flight when the worker died is lost and counted; nothing else is
    assert logged.get("select $1::int + $2", 0) == 100 - rec.dropped["worker"]
    assert rec.dropped["worker"] in (0, 50)
