"""Periodic samples of the host and the upstream: system metrics, backends, index usage.

Every `system_sample_interval`: CPU, memory, disk and network IO (psutil), backends by state
(pg_stat_activity), cache hit ratio and commits (pg_stat_database) -> metadata.system_metrics and
gauges. Every `index_sample_interval`: pg_stat_user_indexes -> metadata.index_usage_stats. The
same round trip is the upstream health probe (`pgsage_upstream_up`). Event-loop lag is measured
by a timer that should fire every 0.25 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
from prometheus_client import Gauge

from ..clock import CLOCK
from ..log import get_logger
from ..settings import Settings
from .metrics import ProxyMetrics

LAG_PERIOD = 0.25

_BACKENDS_SQL = """
SELECT count(*) FILTER (WHERE state = 'active') AS active,
       count(*) FILTER (WHERE state LIKE 'idle%') AS idle,
       count(*) FILTER (WHERE wait_event_type IN ('Lock', 'LWLock', 'BufferPin')) AS waiting
FROM pg_stat_activity WHERE backend_type = 'client backend'
"""
_DATABASE_SQL = """
SELECT sum(blks_hit)::float8 / nullif(sum(blks_hit) + sum(blks_read), 0) AS hit_ratio,
       sum(xact_commit)::bigint AS commits, sum(xact_rollback)::bigint AS rollbacks
FROM pg_stat_database
"""
_INDEX_SQL = """
SELECT schemaname, relname, indexrelname, idx_scan, idx_tup_read, idx_tup_fetch,
       pg_relation_size(indexrelid) AS size_bytes
FROM pg_stat_user_indexes
"""


class SystemSampler:
    def __init__(
        self,
        settings: Settings,
        metrics: ProxyMetrics,
        connect: Callable[[], Awaitable[Any]] | None,
        clients: Callable[[], int] = lambda: 0,
        executed: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.connect = connect
        self.clients = clients
        self.executed = executed
        self.log = get_logger("pgsage.sampler")
        r = metrics.registry
        self.cpu = Gauge("pgsage_host_cpu_ratio", "Host CPU utilisation (0-1)", registry=r)
        self.memory = Gauge("pgsage_host_memory_used_bytes", "Host memory in use", registry=r)
        self.backends = Gauge(
            "pgsage_upstream_backends", "Upstream client backends by state", ["state"], registry=r
        )
        self.hit_ratio = Gauge(
            "pgsage_upstream_cache_hit_ratio", "Upstream buffer cache hit ratio", registry=r
        )
        self.last: dict[str, Any] = {}
        self._conn: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_executed = 0
        self._last_at = time.monotonic()
        self._index_at = 0.0
        psutil.cpu_percent(None)  # prime: the first call has no interval to compare with

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._loop_lag()),
            asyncio.ensure_future(self._loop_samples()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _loop_lag(self) -> None:
        observe = self.metrics.event_loop_lag.observe
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_PERIOD)
            observe(max(0.0, time.monotonic() - t0 - LAG_PERIOD))

    async def _loop_samples(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:
                self.log.exception("sampling failed")
            await asyncio.sleep(self.settings.system_sample_interval)

    async def _connection(self) -> Any:
        if self.connect is None:
            return None
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncio.wait_for(self.connect(), self.settings.connect_timeout)
        return self._conn

    async def sample(self) -> dict[str, Any]:
        """Take one sample; store it if the database is reachable. Returns the sample."""
        mem = psutil.virtual_memory()
        disk = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        now = time.monotonic()
        executed = self.executed()
        qps = (executed - self._last_executed) / max(now - self._last_at, 1e-6)
        self._last_executed, self._last_at = executed, now
        s: dict[str, Any] = {
            "sampled_at": CLOCK.now(),
            "cpu_percent": psutil.cpu_percent(None),
            "memory_used_bytes": int(mem.used),
            "memory_percent": float(mem.percent),
            "disk_read_bytes": int(disk.read_bytes) if disk else None,
            "disk_write_bytes": int(disk.write_bytes) if disk else None,
            "net_sent_bytes": int(net.bytes_sent) if net else None,
            "net_recv_bytes": int(net.bytes_recv) if net else None,
            "proxy_clients": self.clients(),
            "proxy_queries_per_second": qps,
        }
        self.cpu.set(s["cpu_percent"] / 100.0)
        self.memory.set(s["memory_used_bytes"])
        try:
            conn = await self._connection()
            if conn is not None:
                b = await conn.fetchrow(_BACKENDS_SQL)
                d = await conn.fetchrow(_DATABASE_SQL)
                s.update(
                    backends_active=b["active"],
                    backends_idle=b["idle"],
                    backends_waiting=b["waiting"],
                    cache_hit_ratio=d["hit_ratio"],
                    xact_commit=d["commits"],
                    xact_rollback=d["rollbacks"],
                )
                for state in ("active", "idle", "waiting"):
                    self.backends.labels(state).set(b[state])
                if d["hit_ratio"] is not None:
                    self.hit_ratio.set(d["hit_ratio"])
                cols = list(s)
                await conn.execute(
                    f"INSERT INTO metadata.system_metrics ({', '.join(cols)}) VALUES "
                    f"({', '.join(f'${i + 1}' for i in range(len(cols)))})",
                    *s.values(),
                )
                if now - self._index_at >= self.settings.index_sample_interval:
                    self._index_at = now
                    await self.sample_indexes(conn)
                self.metrics.upstream_up.set(1)
        except Exception as exc:
            self.metrics.upstream_up.set(0)
            self.log.warning("upstream sample failed", error=str(exc))
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
        self.last = s
        return s

    async def sample_indexes(self, conn: Any) -> int:
        rows = await conn.fetch(_INDEX_SQL)
        at = CLOCK.now()
        await conn.executemany(
            "INSERT INTO metadata.index_usage_stats (sampled_at, schema_name, table_name,"
            " index_name, idx_scan, idx_tup_read, idx_tup_fetch, size_bytes)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            [(at, *tuple(r)) for r in rows],
        )
        return len(rows)
