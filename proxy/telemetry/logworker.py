"""The query log worker: a child process that fingerprints, aggregates and writes the log.

The proxy's event loop only queues finished statements and, once per flush interval, pickles a
batch down a pipe. This process turns it into `metadata.query_logs` rows (binary COPY), the
per-fingerprint aggregates and the metric deltas, and answers each request with a summary the
proxy applies to its Prometheus registry. So the relay's core spends about a microsecond per
statement on logging, and the rest happens on another core.

Frames both ways: int32 length + pickle. Requests: ("batch", clock, sessions, records, force),
("stats",), ("stop",); a batch carries the identity of every session it mentions. Each request
gets one ("done", summary) reply.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pickle
import struct
import sys
import time
from collections import Counter, OrderedDict
from typing import Any

from ..clock import CLOCK
from ..log import get_logger
from ..records import SessionInfo
from ..settings import Settings
from .collectors import LOG_RATIO_BUCKETS, QUERY_BUCKETS, BatchedHistogram
from .logrows import COLUMNS
from .querylog import QueryLogRecorder

_LEN = struct.Struct("!I")
_FP, _TEXT, _NORMALIZED, _COMMAND, _STATUS = (
    COLUMNS.index(c) for c in ("fingerprint", "query_text", "normalized_text", "command", "status")
)
TOP_SNAPSHOT = 300  # fingerprints sent back each time (top by total time)
ENV_SETTINGS = "PGSAGE_LOGWORKER_SETTINGS"
ENV_CONNECT = "PGSAGE_LOGWORKER_CONNECT"


class _Bound:
    __slots__ = ("counts", "labels")

    def __init__(self, counts: Counter[tuple[str, ...]], labels: tuple[str, ...]) -> None:
        self.counts = counts
        self.labels = labels

    def inc(self, n: float = 1) -> None:
        self.counts[self.labels] += n


class DeltaCounter:
    """Quacks like a prometheus Counter; remembers increments to hand to the proxy."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, ...]] = Counter()

    def labels(self, *labels: str) -> _Bound:
        return _Bound(self.counts, tuple(str(v) for v in labels))

    def inc(self, n: float = 1) -> None:
        self.counts[()] += n

    def set(self, value: float) -> None:  # gauges: the proxy knows its own queue
        return None

    def take(self) -> dict[tuple[str, ...], float]:
        out = dict(self.counts)
        self.counts.clear()
        return out


class DeltaMetrics:
    """The subset of ProxyMetrics the recorder engine touches."""

    COUNTERS = (
        "queries",
        "rows_returned",
        "query_errors",
        "portal_suspensions",
        "copy_operations",
        "querylog_dropped",
        "querylog_written",
        "anomalies",
    )

    def __init__(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, DeltaCounter())
        self.querylog_queue = DeltaCounter()
        self.query_duration = BatchedHistogram("h", "", ("database", "command"), QUERY_BUCKETS)
        self.cost_prediction_log_ratio = BatchedHistogram("r", "", (), LOG_RATIO_BUCKETS)
        self.cost_prediction_qerror = _Gauge()
        self.anomaly_incidents_open = _Gauge()

    def take(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name).take() for name in self.COUNTERS}
        out["query_duration"] = self.query_duration.take_series()
        out["cost_prediction_log_ratio"] = self.cost_prediction_log_ratio.take_series()
        out["cost_prediction_qerror"] = self.cost_prediction_qerror.value
        out["anomaly_incidents_open"] = self.anomaly_incidents_open.value
        return out


class _Gauge:
    def __init__(self) -> None:
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = value


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


class ExplainConnections:
    """Connections the cost server plans statements on, one per database they ran in (a client
    of the proxy may use any database of the server, not only the warehouse): at most
    MAX_DATABASES, the least recently used closed first; a database that refused a connection
    is not tried again for RETRY_S seconds."""

    RETRY_S = 60.0

    def __init__(self, connect_args: dict[str, Any], setup_sql: str, log: Any) -> None:
        from models.serve import MAX_DATABASES

        self.connect_args = connect_args
        self.setup_sql = setup_sql
        self.log = log
        self.max = MAX_DATABASES
        self._home: tuple[str, Any] | None = None
        self._conns: OrderedDict[str, Any] = OrderedDict()
        self._failed: dict[str, float] = {}

    def home(self, database: str, conn: Any) -> None:
        """The metadata connection, used for statements of its own database."""
        self._home = (database, conn)

    async def get(self, database: str) -> Any:
        from .. import metadata

        if self._home is not None and self._home[0] == database:
            return self._home[1]
        conn = self._conns.get(database)
        if conn is not None and not conn.is_closed():
            self._conns.move_to_end(database)
            return conn
        failed = self._failed.get(database)
        if failed is not None and time.monotonic() - failed < self.RETRY_S:
            raise ConnectionError(f"database {database!r} refused the cost server recently")
        try:
            conn = await metadata.connect(
                {**self.connect_args, "database": database}, "pgsage-cost"
            )
            await conn.execute(self.setup_sql)
        except Exception as exc:
            self._failed[database] = time.monotonic()
            self.log.warning("cost model cannot plan in database", database=database,
                             error=repr(exc))  # fmt: skip
            raise
        self._failed.pop(database, None)
        self._conns[database] = conn
        while len(self._conns) > self.max:
            _, old = self._conns.popitem(last=False)
            old.terminate()
        return conn


class Worker:
    def __init__(self, settings: Settings, connect_args: dict[str, Any]) -> None:
        from .. import metadata

        async def connect() -> Any:
            return await metadata.connect(connect_args, "pgsage-querylog")

        self.metrics = DeltaMetrics()
        self.engine = QueryLogRecorder(settings, self.metrics, connect)  # type: ignore[arg-type]
        self.connect_args = connect_args
        self.cost: Any = None
        self._cost_task: asyncio.Task[None] | None = None
        self._window = 0
        if settings.cost_serving:
            from models.serve import HISTORY_WINDOW, CostServer

            self._window = HISTORY_WINDOW
            self.cost = CostServer(ttl=settings.cost_cache_ttl)
            self.engine.predictor = self.cost.predicted
            self._cost_task = asyncio.ensure_future(self._serve_cost(settings))
        self.anomalies: Any = None
        if settings.anomaly_enabled:
            from .anomalies import AnomalyMonitor

            self.anomalies = AnomalyMonitor(settings, connect_args, self.metrics)
        if self.anomalies is not None or self.cost is not None:
            write = self.engine.write

            async def write_observed(rows: list[tuple[Any, ...]]) -> None:
                if self.anomalies is not None:  # a cheap hand-over; scoring has its own task
                    self.anomalies.observe(rows)
                if self.cost is not None:
                    self._observe_cost(rows)
                await write(rows)

            self.engine.write = write_observed  # type: ignore[method-assign]

    def _observe_cost(self, rows: list[tuple[Any, ...]]) -> None:
        """Successful executions feed the cost server's history features (the rolling median,
        p90, last and hourly rate of their template, computed as training computes them), one
        call per fingerprint of the batch."""
        groups: dict[str, list[tuple[Any, ...]]] = {}
        for r in rows:
            if r[_STATUS] == "ok":
                group = groups.get(r[_FP])
                if group is None:
                    group = groups[r[_FP]] = []
                group.append(r)
        window = self._window
        for fid, group in groups.items():
            self.cost.observe_many(
                fid, group[0][_COMMAND], [r[0] for r in group],
                [(r[0], r[1], r[2], r[_TEXT], r[_NORMALIZED]) for r in group[-window:]],
            )  # fmt: skip

    async def _serve_cost(self, settings: Settings) -> None:
        """Keep the active model loaded and fill the prediction cache, in the background."""
        from models.serve import History

        from .. import metadata

        conn: Any = None
        log = get_logger("pgsage.cost")
        timeout_sql = f"SET statement_timeout = {int(settings.cost_explain_timeout_ms)}"
        explain = ExplainConnections(self.connect_args, timeout_sql, log)
        # the models' imports take seconds: on a thread, so batches keep being written meanwhile
        await asyncio.to_thread(importlib.import_module, "models.train")
        while True:
            try:
                if conn is None or conn.is_closed():
                    conn = await metadata.connect(self.connect_args, "pgsage-cost")
                    await conn.execute(timeout_sql)
                    explain.home(await conn.fetchval("SELECT current_database()"), conn)
                if await self.cost.refresh_model(conn):
                    log.info("cost model loaded", version=self.cost.version)
                self.engine.model_version = self.cost.version
                stats = self.engine.stats.entries
                history = {
                    fp: History(
                        s.calls,
                        _ms(s.sketch.quantile(0.5)),
                        _ms(s.sketch.quantile(0.9)),
                        _ms(s.mean_time),
                    )
                    for fp, s in stats.items()
                }
                await self.cost.fill(conn, history, CLOCK.now(), conn_for=explain.get)
            except Exception as exc:  # the log must go on without predictions
                log.warning("cost model serving failed", error=repr(exc))
                if conn is not None:
                    conn.terminate()
                    conn = None
            await asyncio.sleep(settings.cost_refresh_interval)

    async def handle(self, request: tuple[Any, ...]) -> dict[str, Any]:
        kind = request[0]
        engine = self.engine
        written, dropped = engine.written, Counter(engine.dropped)
        if kind == "batch":
            _, clock, sessions, rows, force = request
            CLOCK.load(clock)
            infos = {sid: SessionInfo(sid, *fields) for sid, fields in sessions.items()}
            if force:
                engine._retry_at = 0.0
            await engine.ingest(infos, rows, force_stats=force)
        elif kind == "stats":
            engine._retry_at = 0.0
            await engine.flush_stats()
        summary = self.metrics.take()
        stats = engine.stats
        top = sorted(stats.entries.values(), key=lambda s: s.total_time, reverse=True)
        summary.update(
            written=engine.written - written,
            dropped=dict(Counter(engine.dropped) - dropped),
            db_stats=engine.db_stats,
            top=[s.snapshot() for s in top[:TOP_SNAPSHOT]],
            totals=stats.totals(),
            tracked=stats.tracked,
            evicted=stats.evicted,
        )
        return summary


async def serve() -> None:
    settings = Settings.model_validate_json(os.environ[ENV_SETTINGS])
    from ..log import configure_logging

    configure_logging("json", settings.log_level)  # stderr: stdout carries the replies
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 20, 20)  # batches of short-lived rows; see proxy.runner.tune_gc
    connect_args = json.loads(os.environ[ENV_CONNECT])
    worker = Worker(settings, connect_args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    while True:
        try:
            header = await reader.readexactly(4)
            body = await reader.readexactly(_LEN.unpack(header)[0])
        except asyncio.IncompleteReadError:
            break  # the proxy went away
        request = pickle.loads(body)
        if request[0] == "stop":
            await worker.engine.stop()
            if worker.anomalies is not None:
                await worker.anomalies.stop()
            out.write(_frame(("done", {})))
            out.flush()
            break
        summary = await worker.handle(request)
        out.write(_frame(("done", summary)))
        out.flush()


def _frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:  # pragma: no cover
        asyncio.run(serve())
