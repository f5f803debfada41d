"""The proxy's side of the query log worker (see logworker.py): queue, ship, apply summaries.

Same interface as the in-process QueryLogRecorder (a RecordSink plus start/stop/flush), so the
service, the admin console and the tests use either. If the worker cannot be started or dies,
the batch it had is dropped and counted (`reason="worker"`) and a new worker is started.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import struct
import time
from collections import Counter
from typing import Any

from ..child import PYTHON
from ..clock import CLOCK
from ..settings import Settings
from .logrows import flatten
from .logworker import ENV_CONNECT, ENV_SETTINGS
from .metrics import ProxyMetrics
from .sink import BatchingSink, Group
from .stats import SnapshotTable

_LEN = struct.Struct("!I")


class WorkerRecorder(BatchingSink):
    def __init__(
        self, settings: Settings, metrics: ProxyMetrics, connect_args: dict[str, Any]
    ) -> None:
        super().__init__(settings)
        self.metrics = metrics
        self.connect_args = connect_args
        self.stats = SnapshotTable()
        self.db_stats: dict[str, dict[str, float]] = {}
        self.written = 0
        self.dropped: Counter[str] = Counter()
        self.executed = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._shipped_at = time.monotonic()

    # ------------------------------------------------------------------ worker process

    async def _worker(self) -> asyncio.subprocess.Process:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        env = {
            **os.environ,
            ENV_SETTINGS: self.settings.model_dump_json(),
            ENV_CONNECT: json.dumps(self.connect_args),
        }
        self._proc = await asyncio.create_subprocess_exec(
            *PYTHON, "-m", "proxy.telemetry.logworker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        return self._proc

    async def _request(self, request: tuple[Any, ...], timeout: float = 60.0) -> dict[str, Any]:
        proc = await self._worker()
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdin.is_closing():
            # the worker died and its pipe is gone before the process was reaped (returncode
            # still None): writing would raise uvloop's RuntimeError, not a failure of the worker
            raise BrokenPipeError("the query log worker's stdin is closed")
        body = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.write(_LEN.pack(len(body)) + body)
        await proc.stdin.drain()
        header = await asyncio.wait_for(proc.stdout.readexactly(4), timeout)
        reply = pickle.loads(await proc.stdout.readexactly(_LEN.unpack(header)[0]))
        return dict(reply[1])

    def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        self._proc = None

    # ------------------------------------------------------------------ background

    async def flush_once(self, force_stats: bool = False) -> None:
        async with self._lock:
            if self.dropped_full:
                self._count_drop("queue_full", self.dropped_full)
                self.dropped_full = 0
            n = self.queued
            self.metrics.querylog_queue.set(n)
            idle_for = time.monotonic() - self._shipped_at
            if not n and not force_stats and idle_for < self.settings.stats_flush_interval:
                return  # (an empty batch now and then lets the worker write its aggregates)
            self._shipped_at = time.monotonic()
            batch = self.take()
            self.executed += n
            # force: retry the database at once and write the aggregates too (flush, stop)
            await self._ship(batch, force_stats)

    async def _ship(self, batch: list[Group], force: bool) -> None:
        sessions, rows = flatten(batch)
        fields = {
            sid: (i.client_addr, i.database, i.user, i.application_name, i.tls, i.app)
            for sid, i in sessions.items()
        }
        clock = CLOCK.segments
        try:
            summary = await self._request(("batch", clock, fields, rows, force))
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.log.warning("query log worker failed; restarting it", error=repr(exc))
            self._kill()
            self._count_drop("worker", len(rows))
            return
        self._apply(summary)

    async def flush_stats(self) -> None:
        async with self._lock:
            try:
                self._apply(await self._request(("stats",)))
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.log.warning("query log worker failed", error=repr(exc))
                self._kill()

    def _count_drop(self, reason: str, n: int) -> None:
        self.dropped[reason] += n
        self.metrics.querylog_dropped.labels(reason).inc(n)

    def _apply(self, s: dict[str, Any]) -> None:
        m = self.metrics
        for name in ("queries", "rows_returned", "query_errors", "copy_operations",
                     "querylog_dropped", "anomalies"):  # fmt: skip
            counter = getattr(m, name)
            for labels, n in s.get(name, {}).items():
                counter.labels(*labels).inc(n)
        for name in ("portal_suspensions", "querylog_written"):
            n = s.get(name, {}).get((), 0)
            if n:
                getattr(m, name).inc(n)
        for labels, (counts, total) in s.get("query_duration", {}).items():
            m.query_duration.merge(labels, counts, total)
        for labels, (counts, total) in s.get("cost_prediction_log_ratio", {}).items():
            m.cost_prediction_log_ratio.merge(labels, counts, total)
        if s.get("cost_prediction_qerror") is not None:
            m.cost_prediction_qerror.set(s["cost_prediction_qerror"])
        if s.get("anomaly_incidents_open") is not None:
            m.anomaly_incidents_open.set(s["anomaly_incidents_open"])
        self.written += s.get("written", 0)
        for reason, n in s.get("dropped", {}).items():
            self.dropped[reason] += n
        if "db_stats" in s:
            self.db_stats = s["db_stats"]
        if "top" in s:
            self.stats.update(s["top"], s["totals"], s["tracked"], s["evicted"])

    async def stop(self, timeout: float = 5.0) -> None:
        await self._stop_loop(timeout)
        try:
            await asyncio.wait_for(self.flush_once(force_stats=True), timeout)
            async with self._lock:
                await asyncio.wait_for(self._request(("stop",)), timeout)
        except Exception as exc:
            self.log.warning("query log not fully flushed at shutdown", error=repr(exc),
                             queued=self.queued)  # fmt: skip
        proc = self._proc
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
            self._proc = None
