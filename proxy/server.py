"""The listening proxy: shared server state, admission, cancel routing and shutdown.

Shutdown order (SIGTERM/SIGINT): 1. stop accepting; 2. close sessions with nothing in flight
(FATAL 57P01, as PostgreSQL's fast shutdown does); 3. let sessions with statements in flight
finish, up to `shutdown_timeout`; 4. terminate the rest, cancelling their upstream statements.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from optimizer.sqltext import split_statements

from .admission import AdmissionController
from .cache import ResultCache
from .log import get_logger
from .pool import ServerPool
from .protocol import CancelRequest, Phase, ProtocolViolation, SessionTracker
from .protocol.startup import parse_startup_packet
from .records import RecordSink
from .rewriting import RewriteController
from .session import ClientConnection
from .settings import Settings
from .steering import SteeringController
from .telemetry.metrics import ProxyMetrics
from .upstream import Upstream, UpstreamTLS
from .workers import WorkerInfo

SWEEP_INTERVAL = 0.5
TRAFFIC_KEYS = (
    "client_received",
    "client_sent",
    "server_received",
    "server_sent",
    "parse_named",
    "parse_unnamed",
)


def _add_session(totals: dict[str, int], c: ClientConnection) -> None:
    totals["client_received"] += c.rx
    totals["client_sent"] += c.tx
    up = c.upstream
    if up is not None:
        totals["server_received"] += up.rx
        totals["server_sent"] += up.tx
    totals["server_received"] += c.parked_rx
    totals["server_sent"] += c.parked_tx
    totals["parse_named"] += c.tracker.parses_named
    totals["parse_unnamed"] += c.tracker.parses_unnamed


class ProxyServer:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream | None = None,
        sink: RecordSink | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.settings = settings
        if upstream is None:
            if not settings.upstream:
                raise ValueError("no upstream configured")
            upstream = Upstream.parse(settings.upstream)
        self.upstream = upstream
        self.sink = sink if settings.record_statements else None
        self.metrics = metrics or ProxyMetrics()
        self.splitter: Callable[[str], list[str]] = split_statements
        self.log = get_logger("pgsage.proxy")
        self.clients: set[ClientConnection] = set()
        self.admitted: set[ClientConnection] = set()
        self.cancel_keys: dict[tuple[int, bytes], ClientConnection] = {}
        self.ssl_context = self._ssl_context()
        self.upstream_tls = UpstreamTLS.build(
            settings.upstream_sslmode,
            settings.upstream_sslrootcert,
            settings.upstream_sslcert,
            settings.upstream_sslkey,
        )
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.host, self.port = settings.listen_address
        self.shutting_down = False
        #: PAUSE in the admin console: no new statements start until RESUME
        self.paused = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        #: what the admin console talks to (the Service); None for a bare proxy
        self.admin_context: Any = None
        #: multi-worker mode (proxy/workers.py): bind with SO_REUSEPORT, relay unknown cancels
        self.worker: WorkerInfo | None = None
        #: traffic and Parse counts of sessions that ended (live ones are summed at scrape)
        self.closed_totals: dict[str, int] = dict.fromkeys(TRAFFIC_KEYS, 0)
        #: bytes from and to clients of ended sessions, per database (SHOW STATS)
        self.closed_by_database: dict[str, list[int]] = {}
        #: admission control (admission_enabled): short lane and adaptive long-lane slots
        self.admission: AdmissionController | None = (
            AdmissionController(settings, self.metrics.registry)
            if settings.admission_enabled
            else None
        )
        #: plan steering (steering_enabled): Bao-style hint sets per template
        self.steering: SteeringController | None = (
            SteeringController(settings, self.metrics.registry)
            if settings.steering_enabled
            else None
        )
        #: proven-equivalent rewrites (rewrite_enabled); the Service gives it a connection
        self.rewriter: RewriteController | None = (
            RewriteController(settings) if settings.rewrite_enabled else None
        )
        #: server connections kept for the next client with the same startup (session pooling)
        self.pool: ServerPool | None = (
            ServerPool(settings, self.metrics) if settings.server_pool_size > 0 else None
        )
        #: the result cache (cache_enabled); sessions consult it per request batch
        self.cache: ResultCache | None = (
            ResultCache(settings, self.metrics.registry) if settings.cache_enabled else None
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        if s.tls_client_ca is not None and s.tls_client_verify != "none":
            ctx.load_verify_locations(cafile=str(s.tls_client_ca))
            ctx.verify_mode = (
                ssl.CERT_REQUIRED if s.tls_client_verify == "required" else ssl.CERT_OPTIONAL
            )
        return ctx

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.settings.listen_address
        self._server = await loop.create_server(
            lambda: ClientConnection(self, next(self._ids)),
            host,
            port,
            reuse_address=True,
            reuse_port=self.worker is not None,
            backlog=1024,
        )
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        self._sweeper = asyncio.ensure_future(self._sweep())
        self.log.info("listening", listen=f"{self.host}:{self.port}", upstream=str(self.upstream))

    # ---------------------------------------------------------------- session bookkeeping

    def admit(self, client: ClientConnection) -> bool:
        if self.shutting_down or len(self.admitted) >= self.settings.max_client_connections:
            return False
        client.counted = True
        self.admitted.add(client)
        return True

    def pause(self) -> None:
        self.paused = True
        self.resumed.clear()
        for c in self.clients:
            if not c.is_admin:
                c.hold()

    def resume(self) -> None:
        self.paused = False
        self.resumed.set()
        for c in self.clients:
            if not c.is_admin:
                c.release()

    def traffic(self) -> dict[str, int]:
        """Totals since start: bytes both ways on both sides, Parse messages by kind."""
        totals = dict(self.closed_totals)
        for c in self.clients:
            _add_session(totals, c)
        return totals

    def traffic_by_database(self) -> dict[str, tuple[int, int]]:
        """Bytes received from and sent to clients, per database, since start."""
        out = {db: (rx, tx) for db, (rx, tx) in self.closed_by_database.items()}
        for c in self.clients:
            rx, tx = out.get(c.info.database or "", (0, 0))
            out[c.info.database or ""] = (rx + c.rx, tx + c.tx)
        return out

    def forget(self, client: ClientConnection) -> None:
        if client in self.clients:
            _add_session(self.closed_totals, client)
            per_db = self.closed_by_database.setdefault(client.info.database or "", [0, 0])
            per_db[0] += client.rx
            per_db[1] += client.tx
        self.clients.discard(client)
        if client.counted:
            self.admitted.discard(client)
            self.metrics.session_ended(client.info, client.started)
        key = client._cancel_key
        if key is not None and self.cancel_keys.get(key) is client:
            del self.cancel_keys[key]

    # ---------------------------------------------------------------- cancellation

    def forward_cancel(self, request: CancelRequest, raw: bytes) -> None:
        """A client's CancelRequest: pass it to the upstream if the key belongs to a session."""
        target = self.cancel_keys.get((request.process_id, request.secret_key))
        if target is None:
            if self.worker is not None and self.worker.count > 1:
                self.spawn(self._relay_cancel(raw))  # the session may live in another worker
            else:
                self.metrics.cancel("unknown_key")
            return
        self.metrics.cancel("forwarded")
        self.spawn(self._send_cancel(raw))

    async def _relay_cancel(self, raw: bytes) -> None:
        from .workers import ask_siblings

        assert self.worker is not None
        replies = await ask_siblings(self.worker, "cancel " + raw.hex())
        self.metrics.cancel("relayed" if b"1" in replies.values() else "unknown_key")

    def accept_relayed_cancel(self, raw: bytes) -> bool:
        """A CancelRequest another worker received: sent upstream if this worker holds the
        session whose key it carries."""
        try:
            request = parse_startup_packet(raw)
        except ProtocolViolation:
            return False
        if not isinstance(request, CancelRequest):
            return False
        if self.cancel_keys.get((request.process_id, request.secret_key)) is None:
            return False
        self.metrics.cancel("forwarded")
        self.spawn(self._send_cancel(raw))
        return True

    def cancel_upstream(self, tracker: SessionTracker) -> None:
        """Cancel whatever the upstream backend of a session runs (the client went away)."""
        if tracker.backend_pid is None or tracker.backend_secret is None:
            return
        raw = CancelRequest(tracker.backend_pid, tracker.backend_secret).encode()
        self.spawn(self._send_cancel(raw))

    async def _send_cancel(self, raw: bytes) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                self.upstream.open_stream(), self.settings.connect_timeout
            )
        except (TimeoutError, OSError) as exc:
            self.log.warning("cancel request not delivered", error=str(exc))
            return
        try:
            writer.write(raw)
            await writer.drain()
            # the server closes the connection once it has processed the request
            await asyncio.wait_for(reader.read(), self.settings.connect_timeout)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    def disable_cache(self, reason: str) -> None:
        """Stop serving from the cache (it may hold what a write changed): fail safe."""
        if self.cache is not None:
            self.log.error("result cache disabled", reason=reason)
            self.cache = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task, keeping a reference (the loop holds only weak ones)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- timeouts

    async def _sweep(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            if self.pool is not None:
                self.pool.sweep(now)
            for c in list(self.clients):
                if not c.started:
                    if now - c.connected_at > s.startup_timeout:
                        self.metrics.connection_error("timeout")
                        c.fatal("08006", "canceling authentication due to timeout")
                elif (
                    s.idle_timeout
                    and c.tracker.phase is Phase.IDLE
                    and now - c.last_activity > s.idle_timeout
                ):
                    c.idle_timeout()

    # ---------------------------------------------------------------- shutdown

    async def shutdown(self, timeout: float | None = None) -> None:
        """Graceful stop; see the module docstring for the order."""
        deadline = time.monotonic() + (
            self.settings.shutdown_timeout if timeout is None else timeout
        )
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        while True:
            for c in list(self.clients):
                if not c.tracker.in_flight or not c.started:
                    c.terminate()
            if not self.clients or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        for c in list(self.clients):
            c.terminate()
            c.connection_lost(None)
        if self.pool is not None:
            self.pool.close_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()
        if self.cache is not None:
            await self.cache.close()
        self.log.info("stopped")

    async def serve_until(self, stop: asyncio.Event) -> None:
        await self.start()
        await stop.wait()
        await self.shutdown()
