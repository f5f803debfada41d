"""Prometheus metrics of the proxy (names and labels per shared/reference/metrics.md).

Connection-level metrics are updated where the event happens (rare). Per-statement metrics are
updated by the query log recorder in batches, off the relay's hot path.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client import disable_created_metrics as _disable_created

from ..records import SessionInfo
from .collectors import LOG_RATIO_BUCKETS, OVERHEAD_BUCKETS, QUERY_BUCKETS, BatchedHistogram

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

_disable_created()

ERROR_REASONS = (
    "auth_failed",
    "upstream_unreachable",
    "protocol_error",
    "tls_error",
    "timeout",
    "too_many_connections",
)


class ProxyMetrics:
    """All of pgsage's metrics, on one registry per server."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "") -> None:
        self.registry = r = registry or CollectorRegistry()
        if registry is None:
            for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(default)
        # ---- connections
        self.client_connections_active = Gauge(
            "pgsage_client_connections_active",
            "Client sessions past startup",
            ["database"],
            registry=r,
        )
        self.client_connections_opened = Counter(
            "pgsage_client_connections_opened", "Client sessions admitted", ["tls"], registry=r
        )
        self.client_connection_errors = Counter(
            "pgsage_client_connection_errors",
            "Client connections that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.server_connections_active = Gauge(
            "pgsage_server_connections_active",
            "Upstream connections of client sessions",
            ["database"],
            registry=r,
        )
        self.server_connect_duration = Histogram(
            "pgsage_server_connect_duration_seconds",
            "Time to open the upstream connection",
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.server_pool_events = Counter(
            "pgsage_server_pool",
            "Server connections kept for reuse (server_pool_size): parked (reset and kept), "
            "reused (handed to a new client), closed (timed out, failed reset, pool full)",
            ["event"],
            registry=r,
        )
        self.server_connections_idle = Gauge(
            "pgsage_server_connections_idle",
            "Reset server connections waiting for a client with the same startup packet",
            registry=r,
        )
        self.startup_requests = Counter(
            "pgsage_startup_requests", "Startup-phase packets, by kind", ["kind"], registry=r
        )
        self.cancel_requests = Counter(
            "pgsage_cancel_requests", "CancelRequests, by result", ["result"], registry=r
        )
        # ---- queries (fed in batches by the recorder)
        self.queries = Counter(
            "pgsage_queries",
            "Statements executed",
            ["database", "command", "protocol", "status", "app"],
            registry=r,
        )
        self.query_duration = BatchedHistogram(
            "pgsage_query_duration_seconds",
            "Statement duration, first frame to completion",
            ("database", "command"),
            QUERY_BUCKETS,
        )
        r.register(self.query_duration)
        self.query_errors = Counter(
            "pgsage_query_errors",
            "Failed statements by SQLSTATE class",
            ["sqlstate_class"],
            registry=r,
        )
        self.rows_returned = Counter(
            "pgsage_rows_returned",
            "Rows from CommandComplete tags",
            ["database", "command"],
            registry=r,
        )
        self.portal_suspensions = Counter(
            "pgsage_portal_suspensions", "PortalSuspended legs of row-limited portals", registry=r
        )
        self.copy_operations = Counter(
            "pgsage_copy_operations", "COPY statements", ["direction"], registry=r
        )
        # ---- query log
        self.querylog_written = Counter(
            "pgsage_querylog_written", "Query log rows written to metadata.query_logs", registry=r
        )
        self.querylog_dropped = Counter(
            "pgsage_querylog_dropped", "Query log records dropped", ["reason"], registry=r
        )
        self.querylog_queue = Gauge(
            "pgsage_querylog_queue_records", "Records waiting to be written", registry=r
        )
        # ---- self
        self.build_info = Info("pgsage_build", "pgsage build", registry=r)
        self.build_info.info({"version": version})
        self.upstream_up = Gauge(
            "pgsage_upstream_up", "1 if the last upstream health probe succeeded", registry=r
        )
        self.event_loop_lag = Histogram(
            "pgsage_event_loop_lag_seconds",
            "Delay of a periodic timer on the event loop",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.proxy_overhead = BatchedHistogram(
            "pgsage_proxy_overhead_seconds",
            "Time inside the proxy per relayed chunk (sampled)",
            (),
            OVERHEAD_BUCKETS,
        )
        r.register(self.proxy_overhead)
        # ---- the cost model, online
        self.cost_prediction_log_ratio = BatchedHistogram(
            "pgsage_cost_prediction_log_ratio",
            "log(predicted / actual) latency of executions with a cost prediction",
            (),
            LOG_RATIO_BUCKETS,
        )
        r.register(self.cost_prediction_log_ratio)
        self.cost_prediction_qerror = Gauge(
            "pgsage_cost_prediction_qerror",
            "Median q-error of the recent cost predictions (1 = perfect)",
            registry=r,
        )
        # ---- anomalies (the detector in the query log worker; see proxy/telemetry/anomalies.py)
        self.anomalies = Counter(
            "pgsage_anomalies",
            "Anomalous executions detected, by kind and the severity of their incident",
            ["kind", "severity"],
            registry=r,
        )
        self.anomaly_incidents_open = Gauge(
            "pgsage_anomaly_incidents_open", "Anomaly incidents still open", registry=r
        )
        self.transactions = Counter(
            "pgsage_transactions",
            "Transactions, from ReadyForQuery status changes",
            ["database", "outcome"],
            registry=r,
        )
        self.transaction_duration = Histogram(
            "pgsage_transaction_duration_seconds",
            "Transaction blocks, BEGIN to COMMIT/ROLLBACK",
            buckets=QUERY_BUCKETS,
            registry=r,
        )
        # known label values start at 0, so the first occurrence is a visible increase
        for reason in ERROR_REASONS:
            self.client_connection_errors.labels(reason)
        for reason in ("queue_full", "db_error", "db_unavailable", "encode_error"):
            self.querylog_dropped.labels(reason)
        for kind in (
            "ssl",
            "ssl_accepted",
            "ssl_refused",
            "gssenc_refused",
            "direct_tls",
            "cancel",
        ):
            self.startup_requests.labels(kind)
        for result in ("forwarded", "relayed", "unknown_key"):
            self.cancel_requests.labels(result)

    # ---- connection events (called by the session; rare)

    def startup_request(self, kind: str) -> None:
        self.startup_requests.labels(kind).inc()

    def connection_error(self, reason: str) -> None:
        self.client_connection_errors.labels(reason).inc()

    def client_opened(self, tls: bool) -> None:
        self.client_connections_opened.labels("true" if tls else "false").inc()

    def server_connected(self, seconds: float) -> None:
        self.server_connect_duration.observe(seconds)

    def session_started(self, info: SessionInfo) -> None:
        db = info.database or ""
        self.client_connections_active.labels(db).inc()
        self.server_connections_active.labels(db).inc()

    def session_ended(self, info: SessionInfo, started: bool) -> None:
        if started:
            db = info.database or ""
            self.client_connections_active.labels(db).dec()
            self.server_connections_active.labels(db).dec()

    def cancel(self, result: str) -> None:
        self.cancel_requests.labels(result).inc()
