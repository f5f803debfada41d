"""Smoke: psycopg through the proxy, with the per-statement records."""

from __future__ import annotations

import psycopg


def test_simple_and_extended_records(proxy, test_db):
    with psycopg.connect(proxy.dsn(test_db), autocommit=True) as conn:
        conn.execute("select 1; select 2")  # psycopg sends no params -> simple protocol
        cur = conn.execute("select generate_series(1, %s)", (5,))
        assert [r[0] for r in cur] == [1, 2, 3, 4, 5]
    recs = [r for r in proxy.records if r.sql and "generate_series" in r.sql]
    assert len(recs) == 1
    assert recs[0].protocol == "extended"
    assert recs[0].rows == 5
    assert recs[0].status == "ok"
    assert recs[0].duration >= 0
    simple = [r.sql for r in proxy.records if r.protocol == "simple"]
    assert "select 1" in simple and "select 2" in simple
