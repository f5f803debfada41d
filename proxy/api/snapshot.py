"""A JSON snapshot of the running service for /metrics/current and the SSE stream.

Read from the service's own Prometheus collectors (statement counter, duration histogram) and
state (clients, cache, lanes). Rates and latency quantiles are over a sliding window: each
snapshot keeps the cumulative counts it saw, and compares with the oldest one still inside the
window (quantiles are interpolated inside histogram buckets, as PromQL's histogram_quantile).
"""

from __future__ import annotations

import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

WINDOW_SECONDS = 60.0


class Sample:
    __slots__ = ("at", "buckets", "errors", "queries", "seconds")

    def __init__(
        self, at: float, queries: float, errors: float, seconds: float, buckets: list[float]
    ) -> None:
        self.at, self.queries, self.errors = at, queries, errors
        self.seconds, self.buckets = seconds, buckets


def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """histogram_quantile over non-cumulative bucket counts (the last bucket is +Inf)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    acc = 0.0
    for i, c in enumerate(counts):
        if acc + c >= rank and c > 0:
            upper = bounds[i] if i < len(bounds) else bounds[-1]
            if i >= len(bounds):
                return upper  # in +Inf: the highest finite bound, as PromQL does
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (upper - lower) * (rank - acc) / c
        acc += c
    return bounds[-1] if bounds else None


class Snapshots:
    def __init__(
        self, service: Any, window: float = WINDOW_SECONDS, clock: Any = time.monotonic
    ) -> None:
        self.service = service
        self.window = window
        self.clock = clock
        self.started = clock()
        self.samples: deque[Sample] = deque()
        self.samples.append(self._sample())

    def _sample(self) -> Sample:
        m = self.service.metrics
        queries = errors = 0.0
        for fam in m.queries.collect():
            for s in fam.samples:
                if s.name.endswith("_total"):
                    queries += s.value
                    if s.labels.get("status") != "ok":
                        errors += s.value
        bounds, buckets, seconds = self._histogram()
        self.bounds = bounds
        return Sample(self.clock(), queries, errors, seconds, buckets)

    def _histogram(self) -> tuple[list[float], list[float], float]:
        """Bucket bounds, per-bucket counts summed over all label sets, total seconds."""
        cumulative: dict[float, float] = {}
        seconds = 0.0
        for fam in self.service.metrics.query_duration.collect():
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    cumulative[le] = cumulative.get(le, 0.0) + s.value
                elif s.name.endswith("_sum"):
                    seconds += s.value
        edges = sorted(cumulative)
        counts, prev = [], 0.0
        for le in edges:
            counts.append(cumulative[le] - prev)
            prev = cumulative[le]
        finite = [e for e in edges if e != float("inf")]
        if not edges:
            finite = list(getattr(self.service.metrics.query_duration, "buckets", ()))
            counts = [0.0] * (len(finite) + 1)
        return finite, counts, seconds

    def take(self) -> dict[str, Any]:
        now = self._sample()
        self.samples.append(now)
        while len(self.samples) > 2 and now.at - self.samples[1].at >= self.window:
            self.samples.popleft()
        base = self.samples[0]
        span = max(now.at - base.at, 1e-6)
        n = now.queries - base.queries
        counts = [a - b for a, b in zip(now.buckets, base.buckets, strict=False)]
        if len(counts) != len(now.buckets):
            counts = list(now.buckets)
        return {
            "at": datetime.now(UTC).isoformat(),
            "uptime_seconds": round(now.at - self.started, 3),
            "window_seconds": round(span, 3),
            "queries_total": int(now.queries),
            "errors_total": int(now.errors),
            "qps": round(n / span, 3),
            "errors_per_second": round((now.errors - base.errors) / span, 3),
            "latency_ms": _latency(self.bounds, counts, now.seconds - base.seconds, n),
            "latency_ms_since_start": _latency(self.bounds, now.buckets, now.seconds, now.queries),
            **self._state(),
        }

    def _state(self) -> dict[str, Any]:
        svc = self.service
        m = svc.metrics
        dropped: dict[str, float] = {}
        for fam in m.querylog_dropped.collect():
            for s in fam.samples:
                if s.name.endswith("_total"):
                    dropped[s.labels["reason"]] = s.value
        cache = svc.cache_stats()
        lanes = svc.admission_lanes()
        qerror = m.cost_prediction_qerror._value.get()
        return {
            "clients": len(svc.client_sessions()),
            "paused": bool(svc.proxy.paused),
            "upstream_up": m.upstream_up._value.get() == 1,
            "querylog_dropped": dropped,
            "cost_prediction_qerror": qerror if qerror > 0 else None,
            "cache": None
            if cache is None
            else {k: cache.get(k) for k in ("hit_ratio", "hits", "misses", "entries", "bytes")},
            "lanes": None if lanes is None else dict(lanes),
        }


def _latency(
    bounds: list[float], counts: list[float], seconds: float, n: float
) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 3)

    return {
        "p50": ms(quantile(0.5, bounds, counts)),
        "p95": ms(quantile(0.95, bounds, counts)),
        "mean": ms(seconds / n) if n > 0 else None,
        "count": int(n),
    }
