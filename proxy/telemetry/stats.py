"""Per-fingerprint aggregates, pg_stat_statements style, bounded in memory.

Kept since the last flush as deltas (calls, time, rows ...) plus running extremes and a quantile
sketch since start; `metadata.query_stats` adds the deltas up, so restarts lose nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .sketch import QuantileSketch


@dataclass(slots=True)
class FingerprintStats:
    fingerprint: str
    normalized: str
    command: str
    is_catalog: bool
    calls: int = 0
    errors: int = 0
    rows: int = 0
    total_time: float = 0.0  # seconds, since start
    sum_sq_time: float = 0.0
    min_time: float = math.inf
    max_time: float = 0.0
    first_seen: float = 0.0
    last_seen: float = 0.0
    sketch: QuantileSketch = field(default_factory=QuantileSketch)
    # deltas since the last flush to the database
    d_calls: int = 0
    d_errors: int = 0
    d_rows: int = 0
    d_time: float = 0.0
    d_sum_sq: float = 0.0

    def add(self, seconds: float, rows: int | None, error: bool, at: float) -> None:
        self.calls += 1
        self.d_calls += 1
        self.total_time += seconds
        self.d_time += seconds
        sq = seconds * seconds
        self.sum_sq_time += sq
        self.d_sum_sq += sq
        if seconds < self.min_time:
            self.min_time = seconds
        if seconds > self.max_time:
            self.max_time = seconds
        if rows:
            self.rows += rows
            self.d_rows += rows
        if error:
            self.errors += 1
            self.d_errors += 1
        if not self.first_seen:
            self.first_seen = at
        self.last_seen = at
        self.sketch.add(seconds)

    def add_many(self, durations: list[float], rows: int, errors: int, at: float) -> None:
        n = len(durations)
        total = float(sum(durations))
        sq = float(sum(d * d for d in durations))
        self.calls += n
        self.d_calls += n
        self.total_time += total
        self.d_time += total
        self.sum_sq_time += sq
        self.d_sum_sq += sq
        self.min_time = min(self.min_time, min(durations))
        self.max_time = max(self.max_time, max(durations))
        self.rows += rows
        self.d_rows += rows
        self.errors += errors
        self.d_errors += errors
        if not self.first_seen:
            self.first_seen = at
        self.last_seen = at
        self.sketch.add_many(durations)

    @property
    def mean_time(self) -> float:
        return self.total_time / self.calls if self.calls else 0.0

    @property
    def stddev_time(self) -> float:
        if self.calls < 2:
            return 0.0
        mean = self.mean_time
        return math.sqrt(max(self.sum_sq_time / self.calls - mean * mean, 0.0))

    @property
    def p95_time(self) -> float:
        return self.sketch.quantile(0.95) or 0.0

    def snapshot(self) -> tuple[Any, ...]:
        return (
            self.fingerprint,
            self.normalized,
            self.command,
            self.is_catalog,
            self.calls,
            self.errors,
            self.rows,
            self.total_time,
            self.min_time,
            self.max_time,
            self.mean_time,
            self.stddev_time,
            self.p95_time,
        )

    def reset_deltas(self) -> None:
        self.d_calls = self.d_errors = self.d_rows = 0
        self.d_time = self.d_sum_sq = 0.0


class StatsTable:
    """Fingerprint -> stats, at most `max_fingerprints`; the least total time is evicted first."""

    def __init__(self, max_fingerprints: int = 5000) -> None:
        self.max_fingerprints = max_fingerprints
        self.entries: dict[str, FingerprintStats] = {}
        self.evicted = 0

    @property
    def tracked(self) -> int:
        return len(self.entries)

    def get(
        self, fingerprint: str, normalized: str, command: str, is_catalog: bool
    ) -> FingerprintStats:
        st = self.entries.get(fingerprint)
        if st is None:
            if len(self.entries) >= self.max_fingerprints:
                self._evict()
            st = FingerprintStats(fingerprint, normalized, command, is_catalog)
            self.entries[fingerprint] = st
        return st

    def _evict(self) -> None:
        # drop the cheapest tenth at once so eviction is amortised
        victims = sorted(self.entries.values(), key=lambda s: s.total_time)
        for st in victims[: max(1, len(victims) // 10)]:
            del self.entries[st.fingerprint]
            self.evicted += 1

    def top(self, k: int, include_catalog: bool = True) -> list[FingerprintStats]:
        pool = (s for s in self.entries.values() if include_catalog or not s.is_catalog)
        return sorted(pool, key=lambda s: s.total_time, reverse=True)[:k]

    def dirty(self) -> list[FingerprintStats]:
        return [s for s in self.entries.values() if s.d_calls]

    def totals(self) -> tuple[float, float, float]:
        """Calls, seconds and rows over every fingerprint held."""
        calls = time_ = rows = 0.0
        for s in self.entries.values():
            calls += s.calls
            time_ += s.total_time
            rows += s.rows
        return calls, time_, rows


@dataclass(slots=True)
class StatSnapshot:
    """A fingerprint's aggregates as the query log worker reported them."""

    fingerprint: str
    normalized: str
    command: str
    is_catalog: bool
    calls: int
    errors: int
    rows: int
    total_time: float
    min_time: float
    max_time: float
    mean_time: float
    stddev_time: float
    p95_time: float


class SnapshotTable:
    """The top fingerprints and totals, refreshed from the worker after every batch."""

    def __init__(self) -> None:
        self.entries: dict[str, StatSnapshot] = {}
        self.evicted = 0
        self.tracked = 0
        self._totals: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def update(self, top: list[tuple[Any, ...]], totals: tuple[float, float, float],
               tracked: int, evicted: int) -> None:  # fmt: skip
        self.entries = {t[0]: StatSnapshot(*t) for t in top}
        self._totals = totals
        self.tracked = tracked
        self.evicted = evicted

    def top(self, k: int, include_catalog: bool = True) -> list[StatSnapshot]:
        pool = (s for s in self.entries.values() if include_catalog or not s.is_catalog)
        return sorted(pool, key=lambda s: s.total_time, reverse=True)[:k]

    def totals(self) -> tuple[float, float, float]:
        return self._totals
