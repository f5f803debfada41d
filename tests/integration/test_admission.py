"""Admission control with real clients: long statements queue for slots, short ones pass, a
wait that runs out fails with 57014 naming the limit, transactions are never queued."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

ADMISSION = {
    "admission_enabled": True,
    "admission_short_ms": 100,  # fixed threshold: the test's sleeps are clearly long or short
    "admission_min_observations": 1,
    "admission_initial_limit": 1,
    "admission_max_limit": 1,
    "admission_queue_timeout": 5,
}
LONG = "SELECT pg_sleep(0.6)"


def _timed(dsn: str, sql: str, out: dict[str, Any], name: str) -> None:
    t0 = time.monotonic()
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(sql).fetchall()
        out[name] = time.monotonic() - t0
    except psycopg.Error as exc:
        out[name] = exc


def _learn(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_sleep(0.15)")  # the template is now known to be long
        c.execute("SELECT pg_sleep(%s)", (0.15,))  # and its parameterised form


def test_long_statements_queue_and_short_ones_pass(make_proxy: Any) -> None:
    p = make_proxy(**ADMISSION)
    _learn(p.dsn())
    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=_timed, args=(p.dsn(), LONG, out, f"long{i}")) for i in range(3)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.2)
    lanes = dict(p.call_soon(p.server.admission.lanes))
    _timed(p.dsn(), "SELECT count(*) FROM pg_class", out, "short")
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - t0
    assert all(isinstance(out[f"long{i}"], float) for i in range(3)), out
    # one slot: the three long statements ran one after another
    assert elapsed >= 3 * 0.6 - 0.05
    assert sorted(out[f"long{i}"] for i in range(3))[-1] >= 1.7
    # the short one did not wait behind them
    assert out["short"] < 0.5
    assert lanes["running"] == 1 and lanes["queued"] == 2
    final = dict(p.call_soon(p.server.admission.lanes))
    assert final["long_queued"] == 2 and final["long_direct"] == 1 and final["running"] == 0


def test_a_wait_that_runs_out_fails_with_57014(make_proxy: Any) -> None:
    p = make_proxy(**{**ADMISSION, "admission_queue_timeout": 0.5})
    _learn(p.dsn())
    out: dict[str, Any] = {}
    holder = threading.Thread(target=_timed, args=(p.dsn(), "SELECT pg_sleep(2.0)", out, "holder"))
    holder.start()
    time.sleep(0.2)
    with psycopg.connect(p.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            c.execute(LONG)
        assert "admission control" in str(info.value) and "limit 1" in str(info.value)
        assert c.execute("SELECT 42").fetchone() == (42,)  # the session goes on
    holder.join(10)
    assert isinstance(out["holder"], float)
    assert dict(p.call_soon(p.server.admission.lanes))["long_timed_out"] == 1
    refused = [r for r in p.records if r.execution.sqlstate == "57014"]
    assert len(refused) == 1 and refused[0].execution.sql == LONG


def test_transactions_and_extended_protocol(make_proxy: Any) -> None:
    p = make_proxy(**ADMISSION)
    _learn(p.dsn())
    out: dict[str, Any] = {}
    holder = threading.Thread(target=_timed, args=(p.dsn(), "SELECT pg_sleep(1.5)", out, "h"))
    holder.start()
    time.sleep(0.2)
    with psycopg.connect(p.dsn()) as c:  # a transaction: never queued
        t0 = time.monotonic()
        c.execute(LONG)
        assert time.monotonic() - t0 < 1.0
        c.rollback()
    with psycopg.connect(p.dsn(), autocommit=True) as c:  # extended protocol: queued
        t0 = time.monotonic()
        c.execute("SELECT pg_sleep(%s)", (0.6,))
        assert time.monotonic() - t0 >= 1.0  # waited for the holder's slot
    holder.join(10)


def test_show_lanes_and_gauges(make_service: Any) -> None:
    import urllib.request

    svc = make_service(**ADMISSION)
    _learn(svc.dsn())
    with psycopg.connect(svc.dsn(), autocommit=True) as c:
        c.execute(LONG)
        c.execute("SELECT 1")
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        lanes = dict(admin.execute("SHOW LANES").fetchall())
    assert lanes["limit"] == "1" and lanes["short_threshold_ms"] == "100.0"
    assert int(lanes["long_direct"]) >= 1 and int(lanes["short_passed"]) >= 1
    text = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
    assert "pgsage_admission_limit 1.0" in text
    assert 'pgsage_admission_decisions_total{lane="long",outcome="direct"}' in text


def test_the_limit_follows_the_upstreams_load(make_service: Any) -> None:
    """The load probe samples pg_stat_activity: long statements keeping more backends active
    than the (configured) cores shrink the limit, and SHOW LANES and the gauges say why."""
    import urllib.request

    svc = make_service(
        **(ADMISSION | {"admission_initial_limit": 3, "admission_max_limit": 3}),
        admission_upstream_cores=1,
        admission_saturation=1.0,
        admission_probe_interval=0.1,
        admission_adjust_interval=0.5,
    )
    _learn(svc.dsn())
    out: dict[str, Any] = {}
    threads = [
        threading.Thread(target=_timed, args=(svc.dsn(), "SELECT pg_sleep(2.5)", out, f"l{i}"))
        for i in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(1.8)  # three active backends on one core: above saturation for 3 intervals
    with psycopg.connect(svc.dsn("pgsage"), autocommit=True) as admin:
        lanes = dict(admin.execute("SHOW LANES").fetchall())
    for t in threads:
        t.join(10)
    assert all(isinstance(out[f"l{i}"], float) for i in range(3)), out
    assert int(lanes["limit"]) < 3, lanes
    assert lanes["upstream_cores"] == "1" and float(lanes["upstream_active"]) >= 2, lanes
    assert "active backends on 1 cores" in lanes["last_adjustment"], lanes
    text = urllib.request.urlopen(f"{svc.http_url}/metrics").read().decode()
    assert "pgsage_admission_upstream_load" in text
