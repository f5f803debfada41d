"""Prometheus metrics of the proxy (names and labels per shared/reference/metrics.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..records import SessionInfo

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ProxyMetrics:
    """Connection-level metrics; one instance per server, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.client_connections_active = Gauge(
            "pgsage_client_connections_active", "Client sessions past startup", registry=r
        )
        self.client_connections_opened = Counter(
            "pgsage_client_connections_opened",
            "Client sessions admitted",
            ["tls"],
            registry=r,
        )
        self.client_connection_errors = Counter(
            "pgsage_client_connection_errors",
            "Client connections that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.server_connect_duration = Histogram(
            "pgsage_server_connect_duration_seconds",
            "Time to open the upstream TCP connection",
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.startup_requests = Counter(
            "pgsage_startup_requests",
            "Startup-phase packets, by kind",
            ["kind"],
            registry=r,
        )
        self.cancel_requests = Counter(
            "pgsage_cancel_requests", "CancelRequests, by result", ["result"], registry=r
        )

    def startup_request(self, kind: str) -> None:
        self.startup_requests.labels(kind).inc()

    def connection_error(self, reason: str) -> None:
        self.client_connection_errors.labels(reason).inc()

    def client_opened(self, tls: bool) -> None:
        self.client_connections_opened.labels("true" if tls else "false").inc()

    def server_connected(self, seconds: float) -> None:
        self.server_connect_duration.observe(seconds)

    def session_started(self, info: SessionInfo) -> None:
        self.client_connections_active.inc()

    def session_ended(self, info: SessionInfo, started: bool) -> None:
        if started:
            self.client_connections_active.dec()

    def cancel(self, result: str) -> None:
        self.cancel_requests.labels(result).inc()
