"""The query log recorder: per-statement records -> metrics, aggregates and metadata.query_logs.

The relay calls the recorder (a RecordSink) once per finished statement; that call only appends
to a bounded deque. A background task drains it every `querylog_flush_interval` (or as soon as a
batch is full): fingerprints each statement (LRU-cached), updates the Prometheus metrics and the
per-fingerprint aggregates in batches, and writes the rows with one binary COPY over its own
connection. If the metadata database is slow or down, rows are dropped and counted
(`pgsage_querylog_dropped_total{reason}`) and the writer retries with exponential backoff;
clients never wait for any of it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from optimizer.fingerprint import Fingerprinter

from ..clock import CLOCK
from ..records import SessionInfo
from ..settings import Settings
from .logrows import CopyEncoder, EncodeError, build, flatten
from .metrics import ProxyMetrics
from .sink import BatchingSink
from .stats import StatsTable

SLICE = 1000  # records processed between yields to the event loop

#: a finished statement, flat: session id, protocol, sql, statement name, start, end (monotonic),
#: rows, status, sqlstate, error message, portal suspensions, bytes sent, answered by the cache,
#: planner hint set, rewrite rule, whether the text may be kept with its literals
Row = tuple[
    int, str, str | None, str | None, float, float, int | None, str, str | None, str | None,
    int, int | None, bool, str | None, str | None, bool,
]  # fmt: skip


Connector = Callable[[], Awaitable[Any]]


class QueryLogRecorder(BatchingSink):
    def __init__(
        self,
        settings: Settings,
        metrics: ProxyMetrics,
        connect: Connector | None = None,
        fingerprinter: Fingerprinter | None = None,
        stats: StatsTable | None = None,
    ) -> None:
        super().__init__(settings)
        self.metrics = metrics
        self.connect = connect if settings.querylog_enabled else None
        self.fingerprinter = fingerprinter or Fingerprinter()
        self.encoder = CopyEncoder()
        self.stats = stats or StatsTable(settings.max_fingerprints)
        self.written = 0
        self.dropped: Counter[str] = Counter()
        self.executed = 0
        #: per database: queries, seconds, errors (SHOW STATS)
        self.db_stats: dict[str, dict[str, float]] = {}
        self._conn: Any = None
        self._retry_at = 0.0
        self._backoff = 0.5
        self._stats_flushed_at = time.monotonic()
        self._partitions_at = 0.0
        self._lock = asyncio.Lock()
        #: (fingerprint, command, text, normalized, database) -> predicted ms or None (cost
        #: model serving)
        self.predictor: Callable[[str, str, str | None, str, str | None], float | None] | None
        self.predictor = None
        self.model_version: str | None = None
        #: |log(predicted / actual)| of recent executions, for the online q-error gauge
        self.recent_log_errors: deque[float] = deque(maxlen=2000)

    # ------------------------------------------------------------------ background

    async def stop(self, timeout: float = 5.0) -> None:
        """Flush what is queued (bounded by `timeout`) and close the connection."""
        await self._stop_loop(timeout)
        try:
            await asyncio.wait_for(self._final_flush(), timeout)
        except TimeoutError:
            self.log.warning("query log not fully flushed at shutdown", queued=self.queued)
        if self._conn is not None:
            try:
                await asyncio.wait_for(self._conn.close(), 2)
            except Exception:
                self._conn.terminate()
            self._conn = None

    async def _final_flush(self) -> None:
        self._retry_at = 0.0
        while self.queue:
            await self.flush_once(force_stats=True)
        await self.flush_stats()

    async def flush_once(self, force_stats: bool = False) -> None:
        """Drain the queue into the database (one flusher at a time: one connection)."""
        async with self._lock:
            await self._flush_locked(force_stats)

    async def _flush_locked(self, force_stats: bool) -> None:
        if self.dropped_full:
            self.metrics.querylog_dropped.labels("queue_full").inc(self.dropped_full)
            self.dropped["queue_full"] += self.dropped_full
            self.dropped_full = 0
        self.metrics.querylog_queue.set(self.queued)
        # only what is queued now: records that arrive during the COPY wait for the next
        # round, or the writer would spin on tiny COPYs under steady traffic
        remaining = self.queued
        while remaining > 0 and self.queue:
            sessions, rows = flatten(self.take(min(remaining, self.batch_size * 4)))
            remaining -= len(rows)
            await self._process_and_write(sessions, rows)
        now = time.monotonic()
        if force_stats or now - self._stats_flushed_at >= self.settings.stats_flush_interval:
            self._stats_flushed_at = now
            await self._flush_stats_locked()

    async def ingest(
        self, sessions: dict[int, SessionInfo], rows: list[Row], force_stats: bool = False
    ) -> None:
        """Process and write flat rows (the log worker's entry point)."""
        async with self._lock:
            await self._process_and_write(sessions, rows)
            now = time.monotonic()
            if force_stats or now - self._stats_flushed_at >= self.settings.stats_flush_interval:
                self._stats_flushed_at = now
                await self._flush_stats_locked()

    async def _process_and_write(self, sessions: dict[int, SessionInfo], rows: list[Row]) -> None:
        out: list[tuple[Any, ...]] = []
        for i in range(0, len(rows), SLICE):
            out.extend(self.process_rows(sessions, rows[i : i + SLICE]))
            await asyncio.sleep(0)
        await self.write(out)

    # ------------------------------------------------------------------ processing

    def process_rows(
        self, sessions: dict[int, SessionInfo], rows: list[Row]
    ) -> list[tuple[Any, ...]]:
        """Fingerprint, aggregate and meter flat rows (logrows.flatten), as the log worker
        receives them; their query_logs rows.

        The per-record loop only looks up the fingerprint and builds the row; durations are
        grouped and handed to the histogram and the per-fingerprint sketches in bulk.
        """
        built = build(
            sessions,
            rows,
            self.fingerprinter.fingerprint,
            CLOCK.epoch,
            CLOCK.anchor,
            self.settings.instance_name,
            self.predictor,
            self.model_version,
        )
        self.executed += len(rows)
        self._aggregate(built.by_fp, CLOCK.epoch(built.last_start) if rows else time.time())
        m = self.metrics
        db_stats = self.db_stats
        by_label: dict[tuple[str, str], list[float]] = {}
        for qlabels, durations in built.groups.items():
            m.queries.labels(*qlabels).inc(len(durations))
            by_label.setdefault((qlabels[0], qlabels[1]), []).extend(durations)
            d = db_stats.get(qlabels[0])
            if d is None:
                d = db_stats[qlabels[0]] = {"queries": 0, "seconds": 0.0, "errors": 0}
            d["queries"] += len(durations)
            d["seconds"] += float(sum(durations))
            if qlabels[3] != "ok":
                d["errors"] += len(durations)
        for labels, durations in by_label.items():
            m.query_duration.observe_many(labels, durations)
        for labels, n in built.rows_by.items():
            m.rows_returned.labels(*labels).inc(n)
        for cls, n in built.errors.items():
            m.query_errors.labels(cls).inc(n)
        if built.suspensions:
            m.portal_suspensions.inc(built.suspensions)
        log_ratios = built.log_ratios
        if log_ratios:
            m.cost_prediction_log_ratio.observe_many((), log_ratios)
            self.recent_log_errors.extend(abs(r) for r in log_ratios)
            m.cost_prediction_qerror.set(math.exp(float(np.median(self.recent_log_errors))))
        for direction, n in built.copies.items():
            m.copy_operations.labels(direction).inc(n)
        return built.rows

    def _aggregate(self, by_fp: dict[str, tuple[Any, list[float], list[Any]]], at: float) -> None:
        stats_get = self.stats.get
        for fid, (fp, durations, extra) in by_fp.items():
            st = stats_get(fid, fp.normalized, fp.command, fp.is_catalog)
            rows = sum(r for r in extra if r is not None)
            errors = sum(1 for r in extra if r is None)
            st.add_many(durations, rows, errors, at)

    # ------------------------------------------------------------------ database

    async def _connection(self) -> Any:
        if self.connect is None:
            return None
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        if time.monotonic() < self._retry_at:
            return None
        try:
            self._conn = await self.connect()
        except Exception as exc:
            self._failed("connect", exc)
            return None
        self._backoff = 0.5
        await self._maintain_partitions(force=True)
        return self._conn

    def _failed(self, what: str, exc: BaseException) -> None:
        self.log.warning(
            "metadata database unavailable", during=what, error=str(exc), retry_in=self._backoff
        )
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 30.0)
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows or self.connect is None:
            return
        conn = await self._connection()
        if conn is None:
            self._drop(len(rows), "db_unavailable")
            return
        try:
            columns, encoded = self.encoder.encode_present(rows)
            payload = memoryview(encoded)
        except (EncodeError, TypeError) as exc:  # a bug upstream, not the database's trouble
            self.log.error("query log rows not encodable; batch dropped", error=str(exc))
            self._drop(len(rows), "encode_error")
            return
        try:
            # (a memoryview: asyncpg would take bytes for a file name)
            await conn.copy_to_table(
                "query_logs", schema_name="metadata", columns=columns, source=payload,
                format="binary", timeout=30,
            )  # fmt: skip
        except Exception as exc:
            self._drop(len(rows), "db_error")
            self._failed("copy", exc)
            return
        self.written += len(rows)
        self.metrics.querylog_written.inc(len(rows))
        await self._maintain_partitions()

    def _drop(self, n: int, reason: str) -> None:
        self.dropped[reason] += n
        self.metrics.querylog_dropped.labels(reason).inc(n)

    async def _maintain_partitions(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._partitions_at < 3600:
            return
        self._partitions_at = now
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.execute("SELECT metadata.ensure_query_log_partitions(3)")
            if self.settings.querylog_retention_days:
                await conn.execute(
                    "SELECT metadata.drop_query_log_partitions($1)",
                    self.settings.querylog_retention_days,
                )
        except Exception as exc:
            self.log.warning("query log partition maintenance failed", error=str(exc))

    async def flush_stats(self) -> None:
        """Add the per-fingerprint deltas to metadata.query_stats."""
        async with self._lock:
            await self._flush_stats_locked()

    async def _flush_stats_locked(self) -> None:
        dirty = self.stats.dirty()
        if not dirty or self.connect is None:
            return
        conn = await self._connection()
        if conn is None:
            return
        rows = []
        for s in dirty:
            rows.append(
                (
                    s.fingerprint,
                    s.normalized,
                    s.command,
                    s.is_catalog,
                    s.d_calls,
                    s.d_errors,
                    s.d_rows,
                    s.d_time * 1000,
                    s.d_sum_sq * 1e6,
                    s.min_time * 1000,
                    s.max_time * 1000,
                    _ms(s.sketch.quantile(0.5)),
                    _ms(s.sketch.quantile(0.95)),
                    _ms(s.sketch.quantile(0.99)),
                    datetime.fromtimestamp(s.first_seen, UTC),
                    datetime.fromtimestamp(s.last_seen, UTC),
                )
            )
        try:
            await conn.executemany(_UPSERT_STATS, rows, timeout=30)
        except Exception as exc:
            self._failed("query_stats", exc)
            return
        for s in dirty:
            s.reset_deltas()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


_UPSERT_STATS = """
INSERT INTO metadata.query_stats AS q (
    fingerprint, normalized_text, command, is_catalog, calls, errors, rows, total_time_ms,
    sum_sq_time_ms, min_time_ms, max_time_ms, p50_ms, p95_ms, p99_ms, first_seen, last_seen,
    mean_time_ms, stddev_time_ms, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
        $8::float8 / greatest($5::bigint, 1), 0, now())
ON CONFLICT (fingerprint) DO UPDATE SET
    calls = q.calls + excluded.calls,
    errors = q.errors + excluded.errors,
    rows = q.rows + excluded.rows,
    total_time_ms = q.total_time_ms + excluded.total_time_ms,
    sum_sq_time_ms = q.sum_sq_time_ms + excluded.sum_sq_time_ms,
    min_time_ms = least(q.min_time_ms, excluded.min_time_ms),
    max_time_ms = greatest(q.max_time_ms, excluded.max_time_ms),
    p50_ms = excluded.p50_ms, p95_ms = excluded.p95_ms, p99_ms = excluded.p99_ms,
    last_seen = greatest(q.last_seen, excluded.last_seen),
    mean_time_ms = (q.total_time_ms + excluded.total_time_ms)
                   / greatest(q.calls + excluded.calls, 1),
    stddev_time_ms = sqrt(greatest(
        (q.sum_sq_time_ms + excluded.sum_sq_time_ms) / greatest(q.calls + excluded.calls, 1)
        - power((q.total_time_ms + excluded.total_time_ms)
                / greatest(q.calls + excluded.calls, 1), 2), 0)),
    updated_at = now()
"""
