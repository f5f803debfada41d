"""Per-fingerprint aggregates, the quantile sketch, batched histograms, app classes."""

from __future__ import annotations

import random

import pytest

from proxy.telemetry.apps import app_class
from proxy.telemetry.collectors import QUERY_BUCKETS, BatchedHistogram
from proxy.telemetry.sketch import QuantileSketch
from proxy.telemetry.stats import StatsTable


def test_sketch_quantiles_within_relative_error() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-6, 1.5) for _ in range(20_000)]
    one, bulk = QuantileSketch(), QuantileSketch()
    for v in values:
        one.add(v)
    bulk.add_many(values)
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[int(q * (len(ordered) - 1))]
        for sketch in (one, bulk):
            est = sketch.quantile(q)
            assert est is not None
            assert abs(est - exact) / exact < 0.05


def test_sketch_memory_is_bounded() -> None:
    s = QuantileSketch(max_buckets=64)
    s.add_many([10.0**e for e in range(-9, 9)] * 100 + [1.0001**i for i in range(5000)])
    assert len(s._buckets) <= 64


def test_stats_add_many_matches_add_and_evicts_cheapest() -> None:
    table = StatsTable(max_fingerprints=20)
    a = table.get("a", "select 1", "SELECT", False)
    b = table.get("b", "select 2", "SELECT", False)
    durations = [0.001, 0.002, 0.004]
    for d in durations:
        a.add(d, 1, False, 100.0)
    b.add_many(durations, 3, 0, 100.0)
    assert (a.calls, a.rows, a.min_time, a.max_time) == (b.calls, b.rows, b.min_time, b.max_time)
    assert a.stddev_time == pytest.approx(b.stddev_time)
    for i in range(40):
        table.get(f"x{i}", "q", "SELECT", False).add(0.5 + i, None, False, 1.0)
    assert len(table.entries) <= 20
    assert table.evicted > 0
    assert "a" not in table.entries  # the cheapest went first
    assert table.top(1)[0].fingerprint == "x39"


def test_batched_histogram_matches_one_by_one() -> None:
    values = [random.Random(1).random() * 3 for _ in range(1000)]
    h1 = BatchedHistogram("h1", "", ("db",), QUERY_BUCKETS)
    h2 = BatchedHistogram("h2", "", ("db",), QUERY_BUCKETS)
    for v in values:
        h1.observe(("x",), v)
    h2.observe_many(("x",), values)
    assert h1._series[("x",)][0] == h2._series[("x",)][0]
    assert h1._series[("x",)][1][0] == pytest.approx(h2._series[("x",)][1][0])
    samples = {
        s.labels.get("le"): s.value
        for fam in h2.collect()
        for s in fam.samples
        if s.name.endswith("_bucket")
    }
    assert samples["+Inf"] == 1000


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("Metabase v0.49.1 [f4b5-uuid]", "metabase"),
        ("psql", "psql"),
        ("PostgreSQL JDBC Driver", "jdbc"),
        ("Grafana", "grafana"),
        ("DBeaver 24.1 - Main", "dbeaver"),
        ("PowerBI", "powerbi"),
        ("my-cron-job-1234", "other"),
        (None, "other"),
    ],
)
def test_app_classes(name: str | None, cls: str) -> None:
    assert app_class(name) == cls
