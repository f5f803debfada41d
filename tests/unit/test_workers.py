"""Multi-worker mode's pure parts: how many workers, what each one's settings are, and how
SHOW QUERIES adds the workers' rows up."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from proxy.admin.commands import merge_query_rows
from proxy.settings import Settings
from proxy.workers import WorkerInfo, worker_count, worker_settings


def test_zero_workers_means_one_per_core() -> None:
    assert worker_count(0) == max(1, os.cpu_count() or 1)
    assert worker_count(1) == 1 and worker_count(5) == 5


def test_each_worker_gets_its_share_and_only_the_primary_serves_http() -> None:
    base = Settings(max_client_connections=101, http="127.0.0.1:9930", auto_migrate=True)
    primary = worker_settings(base, WorkerInfo(0, 4, Path("/tmp/x")), "127.0.0.1:7000")
    other = worker_settings(base, WorkerInfo(3, 4, Path("/tmp/x")), "127.0.0.1:7000")
    assert primary.max_client_connections == other.max_client_connections == 26  # ceil
    assert primary.http == "127.0.0.1:9930" and primary.auto_migrate
    assert other.http == "" and not other.auto_migrate
    assert primary.listen == other.listen == "127.0.0.1:7000"
    assert base.max_client_connections == 101 and base.http == "127.0.0.1:9930"  # a copy
    assert WorkerInfo(1, 3, Path("/r")).siblings() == [0, 2]
    assert WorkerInfo(1, 3, Path("/r")).socket_path(2) == Path("/r/worker-2.sock")


def test_show_queries_rows_of_several_workers_add_up() -> None:
    a, b = [1.0, 2.0, 3.0], [10.0, 12.0]

    def row(fp: str, v: list[float]) -> tuple[object, ...]:
        return (fp, len(v), sum(v), statistics.fmean(v), min(v), max(v), statistics.pstdev(v),
                max(v), 7, 1, "SELECT", "select $1")  # fmt: skip

    merged = merge_query_rows([row("x", a), row("y", [50.0]), row("x", b)])
    assert [r[0] for r in merged] == ["y", "x"]  # by total time
    x = merged[1]
    both = a + b
    assert x[1] == 5 and x[2] == sum(both) and x[3] == pytest.approx(statistics.fmean(both))
    assert (x[4], x[5], x[7], x[8], x[9]) == (1.0, 12.0, 12.0, 14, 2)
    assert x[6] == pytest.approx(statistics.pstdev(both), abs=1e-3)
    assert merged[0] == row("y", [50.0])
