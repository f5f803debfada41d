"""The soak's pure parts (bench/soak.py): placeholders, the client split, digests, summaries."""

from __future__ import annotations

import argparse
from datetime import date

from bench import soak
from bench.workload.templates import REGULAR


def test_to_psycopg_reorders_and_repeats_parameters() -> None:
    sql, order = soak.to_psycopg(
        "SELECT 1 FROM t WHERE a = $2::int AND b LIKE 'x%' AND c = $1::text OR d = $2::int"
    )
    assert (
        sql == "SELECT 1 FROM t WHERE a = %s::int AND b LIKE 'x%%' AND c = %s::text OR d = %s::int"
    )
    assert order == [1, 0, 1]


def test_every_read_template_converts() -> None:
    for t in REGULAR:
        if t.writes:
            continue
        sql, order = soak.to_psycopg(t.sql)
        assert "$" not in sql.replace("$$", "")
        assert sql.count("%s") == len(order)


def test_split_clients() -> None:
    def split(clients: int, share: float, scale: float = 0.05) -> tuple[int, int]:
        ns = argparse.Namespace(clients=clients, warehouse_clients=share, warehouse_scale=scale)
        return soak.split_clients(ns)

    assert split(100, 0.3) == (70, 30)
    assert split(100, 12) == (88, 12)
    assert split(10, 500) == (0, 10)
    assert split(100, 0.3, scale=0) == (100, 0)


def test_sorted_digest_ignores_row_order_only() -> None:
    rows = [(1, "a", date(2025, 1, 2)), (2, None, date(2025, 1, 3))]
    assert soak.sorted_digest(rows) == soak.sorted_digest(list(reversed(rows)))
    assert soak.sorted_digest(rows) != soak.sorted_digest(rows[:1])
    assert soak.digest(rows) != soak.digest(list(reversed(rows)))


def test_warmup_defaults_to_a_tenth_of_the_run_within_bounds() -> None:
    def warmup(seconds: float, given: float | None = None) -> float:
        return soak.warmup_seconds(argparse.Namespace(seconds=seconds, warmup=given))

    assert warmup(60) == 10
    assert warmup(300) == 30
    assert warmup(600) == 60
    assert warmup(3600) == 60
    assert warmup(600, 5) == 5


def test_querylog_summary() -> None:
    key = "pgsage_querylog_queue_records"
    samples = [(float(t), {key: float(t * 10)}) for t in range(0, 130, 5)]
    samples[-1][1]["pgsage_querylog_written_total"] = 99.0
    doc = soak.querylog_summary(samples, warm=60.0)
    assert doc["queue_after_warmup"] == 600 and doc["queue_end"] == doc["queue_max"] == 1250
    assert doc["queue_per_minute"] == [0.0, 600.0, 1200.0]
    assert doc["written"] == 99.0 and doc["dropped_queue_full"] is None
