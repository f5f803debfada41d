"""Admission control: short queries pass, long ones queue for an adaptive number of slots.

After Amazon Redshift's short query acceleration: a statement predicted short (below a
threshold learned from the latency distribution) goes straight to the database; a statement
predicted long takes one of `limit` slots, waiting in a bounded priority queue when all are
taken, and gives up after `admission_queue_timeout` with SQLSTATE 57014 and a message naming
the limit, rather than waiting forever.

Prediction is a dict lookup: statements are keyed by their text with literals masked
(`optimizer.fingerprint.literal_key`), and each key keeps a moving average of its observed
duration; a key seen fewer than `admission_min_observations` times counts as short. The
threshold is the `admission_short_quantile` of recent execution times, clamped to
[admission_min_short_ms, admission_max_short_ms] (or fixed by `admission_short_ms`).

The limit adapts with hysteresis (at most one step per `admission_adjust_interval`), never
outside [admission_min_limit, admission_max_limit], from two signals of upstream saturation:

- the long lane's own slowdown: statements running much slower than their own averages
  (`admission_slowdown`) shrink the limit by a quarter;
- the database's load: `LoadProbe` samples the upstream's active client backends
  (pg_stat_activity) every `admission_probe_interval`; their mean over the adjustment interval
  per upstream core (`admission_upstream_cores`, 0: this machine's), scaled up by the
  forecaster's trend for the next window (`forecast_trend`, >= 1: arrivals are about to rise),
  above `admission_saturation` shrinks the limit by one. It grows by one only while statements
  wait, the long lane runs at its usual speed, and one more long statement would still keep the
  load at or under `admission_saturation` — the gap between the two conditions is the
  hysteresis that keeps the limit from thrashing.

Only statements outside explicit transactions are queued: a statement inside one may hold
locks that queued ones need, and an error the server never saw would desynchronise the
transaction state the client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from optimizer.fingerprint import literal_key

from .settings import Settings

SHORT, LONG = "short", "long"


@dataclass(slots=True)
class KeyStats:
    mean_ms: float = 0.0
    n: int = 0

    def add(self, ms: float, alpha: float = 0.2) -> None:
        self.n += 1
        self.mean_ms = ms if self.n == 1 else (1 - alpha) * self.mean_ms + alpha * ms


@dataclass(order=True, slots=True)
class Waiter:
    priority: int
    seq: int
    enqueued: float = field(compare=False)
    admit: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry, ctl: AdmissionController) -> None:
        r = registry
        self.decisions = Counter(
            "pgsage_admission_decisions", "Statements by lane and outcome", ["lane", "outcome"],
            registry=r,
        )  # fmt: skip
        self.wait = Histogram(
            "pgsage_admission_wait_seconds", "Time long statements waited for a slot",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r,
        )  # fmt: skip
        Gauge("pgsage_admission_limit", "Concurrent long statements allowed (adaptive)",
              registry=r).set_function(lambda: ctl.limit)  # fmt: skip
        Gauge("pgsage_admission_running", "Long statements running",
              registry=r).set_function(lambda: ctl.running)  # fmt: skip
        Gauge("pgsage_admission_queued", "Long statements waiting for a slot",
              registry=r).set_function(lambda: ctl.queued)  # fmt: skip
        Gauge("pgsage_admission_upstream_load",
              "Active upstream client backends per core, mean of the last adjustment interval",
              registry=r).set_function(lambda: ctl.load or 0.0)  # fmt: skip
        Gauge("pgsage_admission_short_threshold_seconds",
              "Predicted time below which a statement takes the short lane",
              registry=r).set_function(lambda: ctl.threshold_ms / 1000.0)  # fmt: skip


class AdmissionController:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.limit = settings.admission_initial_limit or settings.admission_max_limit
        self.running = 0
        self._queue: list[Waiter] = []
        self._seq = itertools.count()
        self._keys: OrderedDict[str, str] = OrderedDict()  # exact text -> masked key
        self.stats: dict[str, KeyStats] = {}
        self._recent: deque[float] = deque(maxlen=5000)
        self._threshold = settings.admission_short_ms or settings.admission_min_short_ms
        self._threshold_at = 0.0
        self._ratios: deque[float] = deque(maxlen=200)
        self._adjusted = time.monotonic()
        self.counts = {"short": 0, "long_direct": 0, "long_queued": 0, "timeouts": 0, "full": 0}
        self.adjustments: deque[tuple[float, int, str]] = deque(maxlen=50)
        #: active client backends sampled since the last adjustment (LoadProbe)
        self._active: list[int] = []
        #: the mean of the last adjustment interval's samples (None: no probe yet)
        self.active_mean: float | None = None
        #: forecast arrivals of the next window over the current one's, clipped to [1, 2]
        self.forecast_trend = 1.0
        self.metrics = AdmissionMetrics(registry, self) if registry is not None else None

    @property
    def load(self) -> float | None:
        """Active upstream backends per core, over the last adjustment interval."""
        return None if self.active_mean is None else self.active_mean / self.cores

    @property
    def cores(self) -> int:
        """Upstream cores the load is measured against."""
        return self.settings.admission_upstream_cores or os.cpu_count() or 1

    # ---------------------------------------------------------------- prediction

    def key(self, sql: str) -> str:
        keys = self._keys
        k = keys.get(sql)
        if k is None:
            k = literal_key(sql)
            keys[sql] = k
            if len(keys) > 20_000:
                keys.popitem(last=False)
        return k

    @property
    def threshold_ms(self) -> float:
        s = self.settings
        if s.admission_short_ms:
            return s.admission_short_ms
        now = time.monotonic()
        if now - self._threshold_at > 1.0 and len(self._recent) >= 50:
            ordered = sorted(self._recent)
            q = ordered[min(len(ordered) - 1, int(len(ordered) * s.admission_short_quantile))]
            self._threshold = min(max(q, s.admission_min_short_ms), s.admission_max_short_ms)
            self._threshold_at = now
        return self._threshold

    def predicted_ms(self, sql: str) -> float | None:
        st = self.stats.get(self.key(sql))
        if st is None or st.n < self.settings.admission_min_observations:
            return None
        return st.mean_ms

    def lane(self, sql: str) -> str:
        predicted = self.predicted_ms(sql)
        return LONG if predicted is not None and predicted >= self.threshold_ms else SHORT

    def observe(self, sql: str | None, seconds: float, lane: str | None) -> None:
        """A statement finished: update its key's average and, for the long lane, the limit."""
        if sql is None:
            return
        ms = seconds * 1000.0
        self._recent.append(ms)
        st = self.stats.get(self.key(sql))
        if st is None:
            st = self.stats[self.key(sql)] = KeyStats()
            if len(self.stats) > 50_000:
                self.stats.pop(next(iter(self.stats)))
        if lane == LONG and st.n >= self.settings.admission_min_observations and st.mean_ms > 0:
            self._ratios.append(ms / st.mean_ms)
            self._adjust()
        st.add(ms)

    def observe_load(self, active: int) -> None:
        """A sample of the upstream's active client backends (LoadProbe)."""
        self._active.append(active)
        self._adjust()

    def _adjust(self) -> None:
        s = self.settings
        now = time.monotonic()
        if now - self._adjusted < s.admission_adjust_interval:
            return
        median: float | None = None
        if len(self._ratios) >= 4:
            ratios = sorted(self._ratios)
            median = ratios[len(ratios) // 2]
        pressure: float | None = None
        if self._active:
            self.active_mean = sum(self._active) / len(self._active)
            pressure = self.active_mean / self.cores * self.forecast_trend
        if median is None and pressure is None:
            return
        saturation = s.admission_saturation
        old = self.limit
        why = ""
        floor = s.admission_min_limit
        if median is not None and median > s.admission_slowdown and self.limit > floor:
            self.limit = max(s.admission_min_limit, int(self.limit * 0.75))
            why = f"long statements {median:.2f}x their usual time"
        elif (
            pressure is not None
            and saturation > 0
            and pressure > saturation
            and self.running >= self.limit
            and self.limit > s.admission_min_limit
        ):
            self.limit -= 1
            why = f"{self.active_mean:.1f} active backends on {self.cores} cores" + (
                f" (x{self.forecast_trend:.2f} forecast)" if self.forecast_trend > 1 else ""
            )
        elif (
            self._queue
            and self.limit < s.admission_max_limit
            and (median is None or median < 1.2)
            and (
                pressure is None
                or saturation <= 0
                or (self.active_mean or 0.0) + 1 <= saturation * self.cores / self.forecast_trend
            )
        ):
            self.limit += 1
            why = (
                f"{self.queued} waiting"
                + (
                    f", long statements at {median:.2f}x their usual time"
                    if median is not None
                    else ""
                )
                + (f", {self.active_mean:.1f} active backends" if pressure is not None else "")
            )
        self._ratios.clear()
        self._active.clear()
        self._adjusted = now
        if self.limit == old:
            return
        self.adjustments.append((time.time(), self.limit, why))
        if self.limit > old:
            self._grant()

    # ---------------------------------------------------------------- slots

    @property
    def queued(self) -> int:
        return sum(1 for w in self._queue if not w.cancelled)

    def priority(self, app: str) -> int:
        return self.settings.admission_priorities.get(app, 1)

    def acquire(self, app: str, admit: Callable[[], None]) -> Waiter | bool | None:
        """True: a slot is yours now. A Waiter: queued (`admit` is called with the slot).
        False: the queue is full."""
        if self.running < self.limit:
            self.running += 1
            self._count("long_direct")
            return True
        if self.queued >= self.settings.admission_queue_size:
            self._count("full")
            return False
        w = Waiter(self.priority(app), next(self._seq), time.monotonic(), admit)
        heapq.heappush(self._queue, w)
        self._count("long_queued")
        return w

    def release(self) -> None:
        self.running = max(0, self.running - 1)
        self._grant()

    def cancel(self, w: Waiter, timed_out: bool) -> None:
        w.cancelled = True
        if timed_out:
            self._count("timeouts")

    def _grant(self) -> None:
        q = self._queue
        while q and self.running < self.limit:
            w = heapq.heappop(q)
            if w.cancelled:
                continue
            self.running += 1
            if self.metrics is not None:
                self.metrics.wait.observe(time.monotonic() - w.enqueued)
            w.admit()

    def short(self) -> None:
        self._count("short")

    def _count(self, what: str) -> None:
        self.counts[what] += 1
        if self.metrics is not None:
            lane, outcome = (
                ("short", "passed") if what == "short" else ("long", what.removeprefix("long_"))
            )
            self.metrics.decisions.labels(lane, outcome).inc()

    def lanes(self) -> list[tuple[str, Any]]:
        """SHOW LANES."""
        return [
            ("short_threshold_ms", round(self.threshold_ms, 3)),
            ("limit", self.limit),
            ("running", self.running),
            ("queued", self.queued),
            ("queue_size", self.settings.admission_queue_size),
            ("queue_timeout_s", self.settings.admission_queue_timeout),
            ("short_passed", self.counts["short"]),
            ("long_direct", self.counts["long_direct"]),
            ("long_queued", self.counts["long_queued"]),
            ("long_timed_out", self.counts["timeouts"]),
            ("long_rejected_queue_full", self.counts["full"]),
            ("templates_known", len(self.stats)),
            ("upstream_cores", self.cores),
            ("upstream_active", None if self.active_mean is None else round(self.active_mean, 2)),
            ("load_per_core", None if self.load is None else round(self.load, 3)),
            ("forecast_trend", round(self.forecast_trend, 3)),
            (
                "last_adjustment",
                f"limit {self.adjustments[-1][1]}: {self.adjustments[-1][2]}"
                if self.adjustments
                else None,
            ),
        ]


PROBE_SQL = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


class LoadProbe:
    """Samples the upstream's active client backends for the controller, on one connection of
    the proxy's own (reopened when it breaks); a failed sample is skipped, never fatal."""

    def __init__(
        self, ctl: AdmissionController, connect: Callable[[], Any], log: Any = None
    ) -> None:
        self.ctl = ctl
        self.connect = connect
        self.log = log
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> int:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncio.wait_for(self.connect(), 10.0)
        active = int(await self._conn.fetchval(PROBE_SQL, timeout=5.0))
        self.ctl.observe_load(active)
        return active

    async def _loop(self) -> None:
        while True:
            try:
                if self.ctl.settings.admission_saturation > 0:
                    await self.sample()
            except Exception as exc:  # upstream down or restarting: the next sample retries
                if self.log is not None:
                    self.log.debug("admission load probe failed", error=str(exc))
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.terminate()
                    self._conn = None
            await asyncio.sleep(self.ctl.settings.admission_probe_interval)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2.0)
