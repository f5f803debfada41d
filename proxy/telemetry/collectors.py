"""Prometheus collectors fed in batches, so the hot path never touches a metric object.

`BatchedHistogram` keeps bucket counts per label set in plain lists and exposes them at scrape
time; the recorder adds a whole batch of observations at once. `TopFingerprints` exposes the
per-fingerprint counters for the top K by total time, everything else under "other".
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .stats import SnapshotTable, StatsTable

QUERY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
LOG_RATIO_BUCKETS = (-3.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0)
OVERHEAD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
)


class BatchedHistogram(Collector):
    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.buckets = buckets
        # label values -> [count per bucket (len(buckets)+1)..., ], sum
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        series[0][bisect_left(self.buckets, value)] += 1
        series[1][0] += value

    def observe_many(self, labels: tuple[str, ...], values: list[float]) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        counts = series[0]
        if len(values) < 16:
            for v in values:
                counts[bisect_left(self.buckets, v)] += 1
        else:
            idx = np.searchsorted(self.buckets, np.asarray(values), side="left")
            for i, c in enumerate(np.bincount(idx, minlength=len(counts)).tolist()):
                counts[i] += c
        series[1][0] += float(sum(values))

    def take_series(self) -> dict[tuple[str, ...], tuple[list[int], float]]:
        """Hand over the counts observed so far and start from zero (worker -> parent)."""
        out = {k: (v[0], v[1][0]) for k, v in self._series.items()}
        self._series = {}
        return out

    def merge(self, labels: tuple[str, ...], counts: list[int], total: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        for i, c in enumerate(counts):
            series[0][i] += c
        series[1][0] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        for labels, (counts, total) in sorted(self._series.items()):
            cumulative, acc = [], 0
            for bound, c in zip((*self.buckets, float("inf")), counts, strict=True):
                acc += c
                cumulative.append((_le(bound), acc))
            fam.add_metric(list(labels), cumulative, total[0])
        yield fam


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class TopFingerprints(Collector):
    """pgsage_fingerprint_{calls,duration_seconds,rows}_total for the top K, plus 'other'."""

    def __init__(self, stats: StatsTable | SnapshotTable, k: Callable[[], int]) -> None:
        self.stats = stats
        self.k = k

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        calls = CounterMetricFamily(
            "pgsage_fingerprint_calls",
            "Executions per fingerprint (top K by total time)",
            labels=["fingerprint"],
        )
        seconds = CounterMetricFamily(
            "pgsage_fingerprint_duration_seconds",
            "Execution time per fingerprint (top K by total time)",
            labels=["fingerprint"],
        )
        rows = CounterMetricFamily(
            "pgsage_fingerprint_rows",
            "Rows per fingerprint (top K by total time)",
            labels=["fingerprint"],
        )
        entries = list(self.stats.entries.values())
        top = sorted(entries, key=lambda s: s.total_time, reverse=True)[: self.k()]
        all_calls, all_time, all_rows = self.stats.totals()
        for s in top:
            calls.add_metric([s.fingerprint], s.calls)
            seconds.add_metric([s.fingerprint], s.total_time)
            rows.add_metric([s.fingerprint], s.rows)
        calls.add_metric(["other"], max(all_calls - sum(s.calls for s in top), 0))
        seconds.add_metric(["other"], max(all_time - sum(s.total_time for s in top), 0.0))
        rows.add_metric(["other"], max(all_rows - sum(s.rows for s in top), 0))
        yield calls
        yield seconds
        yield rows
        yield GaugeMetricFamily(
            "pgsage_fingerprints_tracked", "Fingerprints held in memory", value=self.stats.tracked
        )
        yield CounterMetricFamily(
            "pgsage_fingerprints_evicted",
            "Fingerprints evicted from memory",
            value=self.stats.evicted,
        )


class TrafficCollector(Collector):
    """Bytes relayed and Parse messages, summed over live and ended sessions at scrape time.

    The relay only adds to plain integer fields per chunk; no metric object on the hot path.
    """

    NAMES = (
        ("client_received", "pgsage_client_received_bytes", "Bytes received from clients"),
        ("client_sent", "pgsage_client_sent_bytes", "Bytes sent to clients"),
        ("server_received", "pgsage_server_received_bytes", "Bytes received from the upstream"),
        ("server_sent", "pgsage_server_sent_bytes", "Bytes sent to the upstream"),
    )

    def __init__(self, totals: Callable[[], dict[str, int]]) -> None:
        self.totals = totals

    def collect(self) -> Iterable[CounterMetricFamily]:
        t = self.totals()
        for key, name, doc in self.NAMES:
            yield CounterMetricFamily(name, doc, value=t.get(key, 0))
        parsed = CounterMetricFamily(
            "pgsage_prepared_statements_parsed",
            "Parse messages, by statement kind",
            labels=["kind"],
        )
        parsed.add_metric(["named"], t.get("parse_named", 0))
        parsed.add_metric(["unnamed"], t.get("parse_unnamed", 0))
        yield parsed
